"""The scoring interface, in the spirit of lm-evaluation-harness's `LM`.

A backend yields the full next-token log-probability rows of the scored targets
(`iter_logprobs`); everything else is derived here, once for every backend:
`loglikelihood_rolling` scores a whole token stream with sliding windows and returns the
log-probability of every scored token, the model's own top token, and on request its top-k
distribution or its log-probabilities at token ids chosen by the caller (the reference's top k).
"""

from __future__ import annotations

import abc
from typing import Iterator, Sequence

import numpy as np

from .. import progress
from ..errors import NonFiniteScores
from ..perplexity import TokenScores, Window, plan_windows, scored_positions

GROUPS_PER_CALL = 64  # groups of continuations scored per call (a progress step); results do not depend on it


class ScoringBackend(abc.ABC):
    name: str = "abstract"

    @abc.abstractmethod
    def iter_logprobs(self, ids: np.ndarray, windows: Sequence[Window], batch_size: int) -> Iterator:
        """torch tensors (rows, vocab) of log p(. | ids[w.begin:t]) for t in [w.score_from, w.end),
        windows in order, yielded in pieces that together cover every scored target once."""

    def describe(self) -> dict:
        return {"backend": self.name}

    def score_windows(self, ids: np.ndarray, windows: Sequence[Window], batch_size: int, *, top_k: int = 0,
                      gather_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per scored target: `logprobs` (of the true token), `argmax`; with top_k, `topk_ids` and
        `topk_logprobs` (best first); with gather_ids (n, k), `gathered` (log-probs at those ids)."""
        import torch

        targets = torch.as_tensor(np.asarray(ids, dtype=np.int64)[scored_positions(list(windows))])
        gather = None if gather_ids is None else torch.as_tensor(np.asarray(gather_ids, dtype=np.int64))
        pieces: dict[str, list] = {"logprobs": [], "argmax": [], "max_logprob": []}
        row = 0
        for dist in self.iter_logprobs(ids, windows, batch_size):  # reduced where it lives (GPU), then moved
            n = dist.shape[0]
            pieces["logprobs"].append(dist.gather(1, targets[row:row + n, None].to(dist.device)).squeeze(1).double().cpu())
            best = dist.max(dim=1)
            pieces["argmax"].append(best.indices.cpu())
            pieces["max_logprob"].append(best.values.float().cpu())
            if top_k:
                values, indices = dist.topk(top_k, dim=1)
                pieces.setdefault("topk_ids", []).append(indices.cpu())
                pieces.setdefault("topk_logprobs", []).append(values.float().cpu())
            if gather is not None:
                pieces.setdefault("gathered", []).append(dist.gather(1, gather[row:row + n].to(dist.device)).float().cpu())
            row += n
            progress.advance(n, "tok")
        if row != len(targets):
            raise RuntimeError(f"{self.name}: {row} scores for {len(targets)} targets")
        empty = {"logprobs": np.zeros(0), "argmax": np.zeros(0, np.int64), "max_logprob": np.zeros(0, np.float32),
                 "topk_ids": np.zeros((0, top_k), np.int64), "topk_logprobs": np.zeros((0, top_k), np.float32),
                 "gathered": np.zeros((0, 0 if gather is None else gather.shape[1]), np.float32)}
        out = {k: torch.cat(v).numpy() if v else empty[k] for k, v in pieces.items()}
        if top_k and "topk_ids" not in out:
            out["topk_ids"], out["topk_logprobs"] = empty["topk_ids"], empty["topk_logprobs"]
        if gather is not None and "gathered" not in out:
            out["gathered"] = empty["gathered"]
        return out

    def loglikelihood_rolling(self, ids: np.ndarray, *, max_length: int, stride: int, batch_size: int,
                              top_k: int = 0, gather_ids: np.ndarray | None = None,
                              windows: Sequence[Window] | None = None) -> TokenScores:
        """Every scored target's log-probability: over `windows` when given (a protocol preset's), else the
        sliding windows of max_length every stride tokens."""
        windows = plan_windows(len(ids), max_length, stride) if windows is None else list(windows)
        positions = scored_positions(windows)
        if gather_ids is not None and len(gather_ids) != len(positions):
            raise ValueError(f"gather_ids has {len(gather_ids)} rows for {len(positions)} scored targets")
        got = self.score_windows(ids, windows, batch_size, top_k=top_k, gather_ids=gather_ids)
        logprobs = np.asarray(got["logprobs"], dtype=np.float64)
        for name in ("logprobs", "gathered", "topk_logprobs"):
            values = got.get(name)
            bad = None if values is None else ~np.isfinite(values).reshape(len(positions), -1).all(axis=1)
            if bad is not None and bad.any():
                first = int(positions[bad][0])
                raise NonFiniteScores(
                    f"{self.name} produced {int(bad.sum())} non-finite log-probabilities "
                    f"(first at token {first}): the model or its kernels are broken")
        return TokenScores(positions=positions, logprobs=logprobs, argmax=got["argmax"].astype(np.int64),
                           max_logprob=got["max_logprob"],
                           topk_ids=got.get("topk_ids"), topk_logprobs=got.get("topk_logprobs"),
                           gathered=got.get("gathered"), block_sizes=np.array([w.n_scored for w in windows], np.int64))

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_length: int,
                      batch_size: int) -> list[tuple[float, bool]]:
        """lm-evaluation-harness's `loglikelihood` on token ids: for each (context, continuation),
        the sum of log p(continuation | context) and whether greedy decoding would produce the
        continuation. The joined sequence is cut from the left to max_length tokens."""
        flat: list[int] = []
        windows: list[Window] = []
        for context, continuation in requests:
            if not continuation:
                raise ValueError("an empty continuation has no likelihood")
            tokens = (list(context) + list(continuation))[-max_length:]
            if len(tokens) <= len(continuation):
                raise ValueError(f"continuation of {len(continuation)} tokens leaves no context within {max_length}")
            begin = len(flat)
            flat.extend(tokens)
            windows.append(Window(begin, begin + len(tokens), begin + len(tokens) - len(continuation)))
        ids = np.asarray(flat, dtype=np.int64)
        # Longest first, so that each batch holds requests of similar length (little padding).
        order = sorted(range(len(windows)), key=lambda i: windows[i].begin - windows[i].end)
        ordered = [windows[i] for i in order]
        got = self.score_windows(ids, ordered, batch_size)
        targets = ids[scored_positions(ordered)]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(windows)
        row = 0
        for i, w in zip(order, ordered, strict=True):
            span = slice(row, row + w.n_scored)
            total = float(got["logprobs"][span].sum())
            if not np.isfinite(total):
                raise NonFiniteScores(f"{self.name} produced a non-finite log-likelihood")
            out[i] = (total, bool((got["argmax"][span] == targets[span]).all()))
            row += w.n_scored
        return out

    def loglikelihood_grouped(self, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], *,
                              max_length: int, batch_size: int) -> list[list[tuple[float, bool]]]:
        """`loglikelihood` for continuations that share a context (a multiple-choice item's choices): per
        group, one (log-likelihood, greedy) per continuation. Here the requests are flattened; a backend
        that can keep a context's state (a KV cache) overrides it to forward each context once."""
        out = []
        for first in range(0, len(groups), GROUPS_PER_CALL):
            chunk = groups[first:first + GROUPS_PER_CALL]
            flat = [(context, c) for context, conts in chunk for c in conts]
            results = self.loglikelihood(flat, max_length=max_length, batch_size=batch_size) if flat else []
            start = 0
            for _, conts in chunk:
                out.append(results[start:start + len(conts)])
                start += len(conts)
            progress.advance(len(chunk), "item")
        return out

    def generate_batch(self, contexts: Sequence[Sequence[int]], *, max_new_tokens: int, max_length: int,
                       stop: Sequence[int] = (), batch_size: int = 1, drafts=None) -> list[list[int]]:
        """`generate_until` for many contexts; a backend that can decode rows side by side overrides it. `drafts`
        (a guessed continuation per context) may only make it faster, never change what it returns: unused here."""
        out = []
        for c in contexts:
            out.append(self.generate_until(c, max_new_tokens=max_new_tokens, max_length=max_length, stop=stop))
            progress.advance(1, "item")
        return out

    def generate_until(self, context: Sequence[int], *, max_new_tokens: int, max_length: int,
                       stop: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of `context` (deterministic on CPU), at most max_new_tokens, ending
        before the first token in `stop`. This generic version re-scores the window each step;
        backends with a KV cache override it."""
        tokens = list(context)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            window = np.asarray(tokens[-max_length:], dtype=np.int64)
            if len(window) < 1:
                raise ValueError("generation needs at least one context token")
            # A placeholder target after the context: its row is the next-token distribution.
            (rows,) = list(self.iter_logprobs(np.append(window, 0), [Window(0, len(window) + 1, len(window))], 1))
            nxt = int(rows[-1].argmax().item())
            if nxt in stop:
                break
            generated.append(nxt)
            tokens.append(nxt)
        return generated
