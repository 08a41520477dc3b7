"""Scoring with a transformers causal LM (FP16/BF16, GPTQ, AWQ, dequantized GGUF ...)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .. import progress
from ..errors import NonFiniteScores
from ..perplexity import Window
from .base import ScoringBackend

PART = 32  # continuations of one context scored in one pass at most (results do not depend on it)


class TransformersBackend(ScoringBackend):
    name = "transformers"

    def __init__(self, model, device: str):
        import inspect

        self.model = model
        self.device = device
        model.eval()
        # transformers' causal LMs compute the output layer only at the positions asked for (logits_to_keep)
        forward = getattr(model, "forward", None)
        self._keeps_logits = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device)}

    def iter_logprobs(self, ids: np.ndarray, windows: Sequence[Window], batch_size: int):
        import torch

        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        with torch.inference_mode():
            for first in range(0, len(windows), batch_size):
                batch = windows[first:first + batch_size]
                width = max(w.end - w.begin for w in batch)
                # Right padding: a causal model never attends forward, so pads cannot move real scores.
                inputs = torch.zeros((len(batch), width), dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                scored = torch.zeros((len(batch), width), dtype=torch.bool)
                for row, w in enumerate(batch):
                    n = w.end - w.begin
                    inputs[row, :n] = ids_t[w.begin:w.end]
                    attention[row, :n] = 1
                    scored[row, w.score_from - w.begin - 1:n - 1] = True  # position i predicts token i + 1
                # The output layer only where a row predicts a scored token (about half a window at stride
                # max_length / 2): the same logits there, half the output layer's work and memory.
                rows = torch.nonzero(scored.any(dim=0)).flatten()
                lo, hi = int(rows[0]), int(rows[-1]) + 1
                keep = {"logits_to_keep": torch.arange(lo, hi, device=self.device)} if self._keeps_logits else {}
                logits = self.model(input_ids=inputs.to(self.device), attention_mask=attention.to(self.device),
                                    **keep).logits
                if keep:
                    scored = scored[:, lo:hi]
                yield torch.log_softmax(logits[scored.to(logits.device)].float(), dim=-1)

    def loglikelihood_grouped(self, groups, *, max_length: int, batch_size: int):
        """Contexts forwarded once, `batch_size` of them per pass (right-padded, longest first); their KV cache,
        each row repeated once per continuation, then scores every continuation in a second pass, as
        lm-evaluation-harness shares a context between its continuations. A group whose context and longest
        continuation do not fit in max_length goes through the plain path (cut from the left)."""
        out: list = [None] * len(groups)
        fits = [i for i, (ctx, conts) in enumerate(groups) if ctx and conts and len(ctx) + max(map(len, conts)) <= max_length]
        rest = sorted(set(range(len(groups))) - set(fits))
        for i, result in zip(rest, super().loglikelihood_grouped([groups[i] for i in rest], max_length=max_length,
                                                                 batch_size=batch_size), strict=True):
            out[i] = result
        # A group of many continuations (acc_pmi's neutral prompt with every distinct choice) in parts of
        # similar length, so that a pass pads each continuation to its neighbours' length, not the longest's.
        parts, left = [], {}
        for i in fits:
            conts = groups[i][1]
            order = sorted(range(len(conts)), key=lambda k: len(conts[k])) if len(conts) > PART else list(range(len(conts)))
            for k in range(0, len(order), PART):
                parts.append((i, order[k:k + PART]))
            left[i], out[i] = -(-len(order) // PART), [None] * len(conts)
        parts.sort(key=lambda part: -len(groups[part[0]][0]))
        step = max(1, batch_size)
        for begin in range(0, len(parts), step):
            chunk = parts[begin:begin + step]
            results = _shared_contexts(self, [(groups[i][0], [groups[i][1][k] for k in ks]) for i, ks in chunk])
            for (i, ks), result in zip(chunk, results, strict=True):
                for k, r in zip(ks, result, strict=True):
                    out[i][k] = r
                left[i] -= 1
            progress.advance(sum(left[i] == 0 for i, _ in chunk), "item")
        return out

    def generate_batch(self, contexts, *, max_new_tokens: int, max_length: int, stop=(), batch_size: int = 1):
        """Greedy decoding of `batch_size` contexts side by side (left-padded, longest first, each row ending at
        its own first stop token), as lm-evaluation-harness batches generation requests."""
        import torch

        keep = max(1, max_length - max_new_tokens)
        rows = [list(c)[-keep:] for c in contexts]
        stop = [int(t) for t in stop]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list = [None] * len(rows)
        for begin in range(0, len(order), max(1, batch_size)):
            chunk = order[begin:begin + max(1, batch_size)]
            width = max(len(rows[i]) for i in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                ids[row, width - len(rows[i]):] = torch.as_tensor(rows[i])
                mask[row, width - len(rows[i]):] = 1
            with torch.inference_mode():
                generated = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                                eos_token_id=stop or None, pad_token_id=stop[0] if stop else 0)
            for row, i in enumerate(chunk):
                new = generated[row, width:].tolist()
                out[i] = next((new[:k] for k, t in enumerate(new) if t in stop), new)
            progress.advance(len(chunk), "item")
        return out

    def generate_until(self, context, *, max_new_tokens: int, max_length: int, stop=()) -> list[int]:
        """Greedy decoding with the model's KV cache (transformers' generate, sampling off)."""
        import torch

        keep = max(1, max_length - max_new_tokens)
        ids = torch.as_tensor([list(context)[-keep:]], dtype=torch.long, device=self.device)
        stop = [int(t) for t in stop]
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, num_beams=1, eos_token_id=stop or None,
                                      pad_token_id=stop[0] if stop else 0)
        new = out[0, ids.shape[1]:].tolist()
        for i, token in enumerate(new):
            if token in stop:
                return new[:i]
        return new


def _shared_contexts(backend: TransformersBackend, groups) -> list[list[tuple[float, bool]]]:
    """One pass over the contexts (right-padded), then one over every continuation from their KV cache."""
    import torch

    lengths = [len(ctx) for ctx, _ in groups]
    ids = torch.zeros((len(groups), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (ctx, _) in enumerate(groups):
        ids[row, :len(ctx)] = torch.as_tensor(list(ctx))
        mask[row, :len(ctx)] = 1
    # the output layer only at each context's last position: its row predicts the continuations' first token
    last = sorted({n - 1 for n in lengths}) if backend._keeps_logits else list(range(ids.shape[1]))
    keep = {"logits_to_keep": torch.as_tensor(last, device=backend.device)} if backend._keeps_logits else {}
    column = {position: k for k, position in enumerate(last)}
    with torch.inference_mode():
        first = backend.model(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device),
                              use_cache=True, **keep)
        heads = [torch.log_softmax(first.logits[row, column[n - 1]].float(), dim=-1) for row, n in enumerate(lengths)]
        owners = [row for row, (_, conts) in enumerate(groups) for _ in conts]
        conts = [list(c) for _, cs in groups for c in cs]
        scored = _continuations(backend, conts, owners, lengths, mask, heads, _cache_of(first))
    out, start = [], 0
    for _, cs in groups:
        out.append(scored[start:start + len(cs)])
        start += len(cs)
    return out


def _continuations(backend: TransformersBackend, conts, owners, lengths, context_mask, heads,
                   cache) -> list[tuple[float, bool]]:
    """Every continuation from its context's cached keys: positions go on from the context's own end."""
    import torch

    width = max(map(len, conts))
    ids = torch.zeros((len(conts), width), dtype=torch.long)
    mask = torch.cat([context_mask[owners], torch.zeros((len(conts), width), dtype=torch.long)], dim=1)
    positions = torch.zeros((len(conts), width), dtype=torch.long)
    for row, (c, owner) in enumerate(zip(conts, owners, strict=True)):
        ids[row, :len(c)] = torch.as_tensor(c)
        mask[row, context_mask.shape[1]:context_mask.shape[1] + len(c)] = 1
        positions[row] = torch.arange(lengths[owner], lengths[owner] + width)
    cache.batch_select_indices(torch.as_tensor(owners, device=backend.device))
    logits = backend.model(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device),
                        position_ids=positions.to(backend.device), use_cache=True,
                        **_cache_argument(backend.model, cache)).logits
    out = []
    for row, (c, owner) in enumerate(zip(conts, owners, strict=True)):
        rows = torch.cat([heads[owner][None], torch.log_softmax(logits[row, :len(c) - 1].float(), dim=-1)])
        target = torch.as_tensor(c, device=rows.device)
        total = float(rows.gather(1, target[:, None]).double().sum())
        if not math.isfinite(total):
            raise NonFiniteScores(f"{backend.name} produced a non-finite log-likelihood")
        out.append((total, bool((rows.argmax(dim=1) == target).all())))
    return out


def _load(path, *, fmt: str, dtype: str, device: str, what: str, tokenizer_path=None, placement=None):
    from ..checkpoints.loading import load_with_transformers

    return load_with_transformers(path, fmt=fmt, dtype=dtype, device=device, what=what, tokenizer_path=tokenizer_path,
                                  placement=placement)


def _require(fmt: str, what: str) -> None:
    from ..checkpoints.loading import require_format_library

    require_format_library(fmt, what)


def _numerics(dtype: str, device: str) -> dict[str, str]:
    from ..protocol import device_class

    return {"dtype": dtype, "device_class": device_class(device)}


def _reference(manifest, ref, reference_sha256: str):
    return ref.path, ref.format, f"reference {ref.name}"


def _register():
    from ..placement import TRANSFORMERS_KEYS
    from . import DEFAULT_BACKEND, Backend, register_backend

    # accelerate dispatches plain and dequantized-GGUF weights; the quantized kernels are loaded whole
    return register_backend(Backend(name=DEFAULT_BACKEND, suffix="", formats=None, load=_load, require=_require,
                                    numerics=_numerics, reference=_reference, placement_keys=TRANSFORMERS_KEYS,
                                    placement_formats=("fp16", "bf16", "fp32", "gguf")))


BACKEND = _register()


def _cache_of(output):
    """The KV cache a forward returned (transformers 5 names it `cache`, earlier versions `past_key_values`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _cache_argument(model, cache) -> dict:
    import inspect

    takes_cache = "cache" in inspect.signature(model.forward).parameters
    return {"cache": cache} if takes_cache else {"past_key_values": cache}
