"""The scoring interface, in the spirit of lm-evaluation-harness's `LM`.

`loglikelihood_rolling` scores a whole token stream with sliding windows and returns the
log-probability of every scored token (kept for paired statistics). Generation and top-k
distributions come later behind the same class.
"""

from __future__ import annotations

import abc
from typing import Sequence

import numpy as np

from ..errors import NonFiniteScores
from ..perplexity import TokenScores, Window, plan_windows, scored_positions


def collect_scores(logprobs: list, top_ids: list, top_logprobs: list, top_k: int):
    """Join per-window pieces into what `score_windows` returns."""
    joined = np.concatenate(logprobs) if logprobs else np.zeros(0)
    if not top_k:
        return joined, None, None
    if not top_ids:
        return joined, np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float32)
    return joined, np.concatenate(top_ids), np.concatenate(top_logprobs)


class ScoringBackend(abc.ABC):
    name: str = "abstract"

    @abc.abstractmethod
    def score_windows(self, ids: np.ndarray, windows: Sequence[Window], batch_size: int,
                      top_k: int = 0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """For t in [w.score_from, w.end), windows in order, concatenated:
        log p(ids[t] | ids[w.begin:t]) and, if top_k > 0, the ids and log-probs of the top_k next tokens."""

    def describe(self) -> dict:
        return {"backend": self.name}

    def loglikelihood_rolling(self, ids: np.ndarray, *, max_length: int, stride: int,
                              batch_size: int, top_k: int = 0) -> TokenScores:
        windows = plan_windows(len(ids), max_length, stride)
        logprobs, topk_ids, topk_logprobs = self.score_windows(ids, windows, batch_size, top_k)
        logprobs = np.asarray(logprobs, dtype=np.float64)
        positions = scored_positions(windows)
        if logprobs.shape != positions.shape:
            raise RuntimeError(f"{self.name}: {logprobs.size} scores for {positions.size} targets")
        bad = ~np.isfinite(logprobs)
        if bad.any():
            first = int(positions[bad][0])
            raise NonFiniteScores(
                f"{self.name} produced {int(bad.sum())} non-finite log-probabilities "
                f"(first at token {first}): the model or its kernels are broken")
        return TokenScores(positions=positions, logprobs=logprobs, topk_ids=topk_ids, topk_logprobs=topk_logprobs)
