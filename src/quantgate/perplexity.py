"""Sliding-window perplexity: every token after the first scored exactly once.

A window covers ids[begin:end]. Targets in [score_from, end) are scored; the tokens before
score_from are context only (label -100 in the HF formulation). With stride < max_length
each window's fresh targets start where the previous window ended, so every token but the
very first is scored once, with up to max_length - stride tokens of context. With
stride == max_length the windows are disjoint chunks and each chunk's first token has no
context, so it is not scored (exactly what scoring each chunk on its own gives).

Perplexity is exp of the token-weighted mean NLL over all scored tokens, not the mean of
per-window losses (the seed snippet's mistake: it weights a short last window like a full one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    score_from: int

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    windows: list[Window] = []
    scored_until = 0  # every target < scored_until has been scored (or is token 0)
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + max_length, n_tokens)
        score_from = max(scored_until, begin + 1)
        if end > score_from:
            windows.append(Window(begin, end, score_from))
        scored_until = end
        if end == n_tokens:
            break
    return windows


def scored_positions(windows: list[Window]) -> np.ndarray:
    if not windows:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(w.score_from, w.end, dtype=np.int64) for w in windows])


def count_scored(n_tokens: int, max_length: int, stride: int) -> int:
    return sum(w.n_scored for w in plan_windows(n_tokens, max_length, stride))


@dataclass(frozen=True)
class TokenScores:
    """Log-probability of each scored target token, in stream order, and what else was asked for."""

    positions: np.ndarray  # int64, absolute index of the target token in the stream
    logprobs: np.ndarray  # float64, log p(token | context)
    argmax: np.ndarray | None = None  # int64: the model's most likely next token
    max_logprob: np.ndarray | None = None  # float32: its log-probability (ties: any id with this value is top)
    topk_ids: np.ndarray | None = None  # int64 (n, k): the k most likely next tokens, best first
    topk_logprobs: np.ndarray | None = None  # float32 (n, k): their log-probabilities
    gathered: np.ndarray | None = None  # float32 (n, k): log-probs at ids the caller chose (the reference's top k)
    block_sizes: np.ndarray | None = None  # int64: scored targets per window, in order (bootstrap blocks)

    @property
    def n(self) -> int:
        return int(self.positions.size)

    @property
    def mean_nll(self) -> float:
        return float(-self.logprobs.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)
