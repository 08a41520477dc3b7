"""KL divergence of a variant's next-token distributions from the reference's, two ways.

- The gate's default (`kl_bound_from_baseline`): the reference is not loaded. Its baseline keeps
  each scored token's top-k log-probs; the variant is scored at those ids, and KL over the k
  tokens plus a "rest" bucket is computed: a lower bound of the full KL (data processing).
- Exact, opt-in (`exact_kl`): both models resident, full distributions compared window by
  window, for up to `max_tokens` scored tokens. It also returns the bound on the same tokens,
  which is how the bound's tightness is measured.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .perplexity import Window, plan_windows
from .stats import kl_full, kl_topk_rest, rest_logprob


def kl_bound_from_baseline(ref_topk_logprobs: np.ndarray, var_gathered: np.ndarray) -> np.ndarray:
    """Per-token KL lower bound from the baseline's top-k log-probs and the variant's at the same ids."""
    return kl_topk_rest(ref_topk_logprobs, rest_logprob(ref_topk_logprobs), var_gathered, rest_logprob(var_gathered))


def windows_for(n_tokens: int, max_length: int, stride: int, max_tokens: int | None) -> list[Window]:
    """The protocol's windows, cut after the first `max_tokens` scored tokens (whole windows)."""
    windows = plan_windows(n_tokens, max_length, stride)
    if max_tokens is None:
        return windows
    kept, scored = [], 0
    for w in windows:
        if scored >= max_tokens:
            break
        kept.append(w)
        scored += w.n_scored
    return kept


def exact_kl(reference, variant, ids: np.ndarray, windows: Sequence[Window], batch_size: int,
             top_k: int) -> dict[str, np.ndarray]:
    """Per-token exact KL(reference || variant) and, on the same tokens, the top-k + rest bound.

    `reference` and `variant` are scoring backends over the same vocabulary, both resident.
    """
    exact, bound = [], []
    for ref_rows, var_rows in zip(reference.iter_logprobs(ids, windows, batch_size),
                                  variant.iter_logprobs(ids, windows, batch_size), strict=True):
        p, q = ref_rows.double().numpy(), var_rows.double().numpy()
        if p.shape[1] != q.shape[1]:
            q = q[:, :p.shape[1]]  # a padded vocabulary: ids beyond the reference's are never targets
        exact.append(kl_full(p, q))
        top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
        ref_top = np.take_along_axis(p, top, axis=1).astype(np.float32)
        var_top = np.take_along_axis(q, top, axis=1).astype(np.float32)
        bound.append(kl_bound_from_baseline(ref_top, var_top))
    return {"exact": np.concatenate(exact), "bound": np.concatenate(bound)}
