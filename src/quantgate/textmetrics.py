"""Measures that do not depend on the tokenizer: bits per byte and word perplexity.

Token perplexity divides by the number of tokens, so two tokenizers (a model and another, or a GGUF
whose tokenizer was rebuilt) give numbers on different scales for the same text. Dividing the same
total log-likelihood by the text's UTF-8 bytes or its words instead puts every model on the text's
own scale, as lm-evaluation-harness reports `bits_per_byte` and `word_perplexity` for its WikiText
task. Here the text is the one the scored tokens cover: from the first scored token's first
character to where the token after the last scored one starts (under a profile's token cap, the
capped part); a word is a maximal run of non-whitespace characters. The gate's ratios stay on the
reference's tokens: these are reported beside them, not gated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TextSize:
    """How much text a measurement's scored tokens cover."""

    bytes: int
    words: int

    def bits_per_byte(self, logprob_sum: float) -> float | None:
        """-(total log-likelihood in nats) / (bytes x ln 2)."""
        return -logprob_sum / (self.bytes * math.log(2)) if self.bytes else None

    def word_perplexity(self, logprob_sum: float) -> float | None:
        """exp(-(total log-likelihood in nats) / words)."""
        if not self.words:
            return None
        exponent = -logprob_sum / self.words
        return math.exp(exponent) if exponent < 700 else math.inf


def scored_text(tokenized, positions: np.ndarray) -> list[str]:
    """The pieces of text covered by the scored token positions (one per run of consecutive positions)."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    return [tokenized.span_text(int(run[0]), int(run[-1]) + 1) for run in np.split(positions, breaks)]


def text_size(tokenized, positions: np.ndarray) -> TextSize | None:
    """The bytes and words of the text the scored tokens cover; None without character offsets."""
    if getattr(tokenized, "char_starts", None) is None:
        return None
    pieces = scored_text(tokenized, positions)
    return TextSize(bytes=sum(len(p.encode("utf-8")) for p in pieces), words=sum(len(p.split()) for p in pieces))
