"""KL divergence of a variant's next-token distributions from the reference's, two ways.

- The gate's default (`kl_bound_from_baseline`): the reference is not loaded. Its baseline keeps
  each scored token's top-k log-probs; the variant is scored at those ids, and KL over the k
  tokens plus a "rest" bucket is computed: a lower bound of the full KL (data processing).
- Exact, opt-in (`exact_kl`): both models resident, full distributions compared window by
  window (`windows_for` cuts the protocol's windows after a number of tokens, for benchmarks).
  It can also return the bound on the same tokens, which is how the bound's tightness is measured.
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
             top_k: int, *, with_bound: bool = True, chunk_rows: int = 256) -> dict[str, np.ndarray]:
    """Per-token exact KL(reference || variant) and, with_bound, the top-k + rest bound on the same tokens.

    `reference` and `variant` are scoring backends over the same token ids, both resident. Rows are
    compared in chunks on the device they come from, so memory stays at chunk_rows x vocab."""
    import torch

    exact, bound = [], []
    for ref_rows, var_rows in zip(reference.iter_logprobs(ids, windows, batch_size),
                                  variant.iter_logprobs(ids, windows, batch_size), strict=True):
        if var_rows.shape[1] < ref_rows.shape[1]:
            raise ValueError(f"the variant's vocabulary ({var_rows.shape[1]}) is smaller than the reference's "
                             f"({ref_rows.shape[1]}): KL divergence is undefined")
        for start in range(0, ref_rows.shape[0], chunk_rows):
            p = ref_rows[start:start + chunk_rows].double()
            q = var_rows[start:start + chunk_rows, :p.shape[1]].to(p.device).double()
            q = q - torch.logsumexp(q, dim=1, keepdim=True)  # a padded vocabulary: renormalise over the shared ids
            exact.append(kl_full(p.cpu().numpy(), q.cpu().numpy()))
            if with_bound:
                ref_top, top = p.topk(top_k, dim=1)
                var_top = q.gather(1, top)
                bound.append(kl_bound_from_baseline(ref_top.float().cpu().numpy(), var_top.float().cpu().numpy()))
    return {"exact": np.concatenate(exact) if exact else np.zeros(0),
            "bound": np.concatenate(bound) if bound else np.zeros(0)}
