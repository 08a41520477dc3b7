"""Scoring with a transformers causal LM (FP16/BF16, GPTQ, AWQ, dequantized GGUF ...)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .. import progress
from ..errors import NonFiniteScores, QuantgateError
from ..perplexity import Window
from .base import ScoringBackend


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
        self._packs = None  # whether the model honours a 4-D attention mask (checked on first use)

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
                try:
                    logits = self.model(input_ids=inputs.to(self.device), attention_mask=attention.to(self.device),
                                        **keep).logits
                except IndexError as exc:  # an embedding lookup past its table: positions or vocabulary
                    raise _lookup_error(exc, inputs, self.model.config) from exc
                if keep:
                    scored = scored[:, lo:hi]
                yield torch.log_softmax(logits[scored.to(logits.device)].float(), dim=-1)

    def loglikelihood_grouped(self, groups, *, max_length: int, batch_size: int):
        """Each context and its continuations in one row, forwarded once (`batch_size` rows per pass, longest
        first): the continuations sit side by side after their context, each seeing the context and itself
        only (a 4-D attention mask) at the positions it would have alone, as lm-evaluation-harness shares a
        context between its continuations. A group whose context and longest continuation do not fit in
        max_length goes through the plain path (cut from the left), and so does every group when the model
        does not honour the mask (checked once on the first group against the plain path)."""
        out: list = [None] * len(groups)
        fits = [i for i, (ctx, conts) in enumerate(groups) if ctx and conts and len(ctx) + max(map(len, conts)) <= max_length]
        if fits and self._packs is None:
            self._packs = _packing_agrees(self, groups[fits[0]], max_length=max_length)
        if not self._packs:
            fits = []
        rest = sorted(set(range(len(groups))) - set(fits))
        for i, result in zip(rest, super().loglikelihood_grouped([groups[i] for i in rest], max_length=max_length,
                                                                 batch_size=batch_size), strict=True):
            out[i] = result
        # Many continuations of one context (acc_pmi's neutral prompt with every distinct choice) go in parts
        # of similar length, each part's row at most max_length tokens of continuations long.
        parts, left = [], {}
        for i in fits:
            conts = groups[i][1]
            order = sorted(range(len(conts)), key=lambda k: len(conts[k])) if len(conts) > 8 else list(range(len(conts)))
            begin = len(parts)
            part, size = [], 0
            for k in order:
                if part and size + len(conts[k]) > max_length:
                    parts.append((i, part))
                    part, size = [], 0
                part.append(k)
                size += len(conts[k])
            parts.append((i, part))
            left[i], out[i] = len(parts) - begin, [None] * len(conts)
        parts.sort(key=lambda p: -(len(groups[p[0]][0]) + sum(len(groups[p[0]][1][k]) for k in p[1])))
        step = max(1, batch_size)
        for begin in range(0, len(parts), step):
            chunk = parts[begin:begin + step]
            results = _packed(self, [(groups[i][0], [groups[i][1][k] for k in ks]) for i, ks in chunk])
            for (i, ks), result in zip(chunk, results, strict=True):
                for k, r in zip(ks, result, strict=True):
                    out[i][k] = r
                left[i] -= 1
            progress.advance(sum(left[i] == 0 for i, _ in chunk), "item")
        return out

    def generate_batch(self, contexts, *, max_new_tokens: int, max_length: int, stop=(), batch_size: int = 1,
                       drafts=None):
        """Greedy decoding of `batch_size` contexts side by side (left-padded, longest first, each row ending at
        its own first stop token), as lm-evaluation-harness batches generation requests.

        With `drafts` (a guess per context at its continuation: the reference's answer), each context and its
        draft first go through the model in one pass, and the draft's tokens are kept as long as each is the
        model's own greedy choice there (speculative decoding's check): a row whose draft holds up to a stop
        token, or to max_new_tokens, needs no decoding step at all; any other row decodes on from its last kept
        token, the model's own. The output is the model's greedy decoding either way; only the arithmetic
        order differs (one pass against step by step), which can flip a near-tie."""
        keep = max(1, max_length - max_new_tokens)
        rows = [list(c)[-keep:] for c in contexts]
        stop = [int(t) for t in stop]
        kept: list[list[int]] = [[] for _ in rows]
        pending = list(range(len(rows)))
        if drafts is not None and _plain_greedy(self.model, stop):
            pending = _check_drafts(self, rows, [list(d or ())[:max_new_tokens] for d in drafts], kept,
                                    max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size)
        out: list = list(kept)
        for i, tokens in zip(pending, _decode(self, [rows[i] + kept[i] for i in pending],
                                              [max_new_tokens - len(kept[i]) for i in pending],
                                              stop=stop, batch_size=batch_size), strict=True):
            out[i] = kept[i] + tokens
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


def _packed(backend: TransformersBackend, groups) -> list[list[tuple[float, bool]]]:
    """One pass over rows of [context, continuation 1, continuation 2, ...] (right-padded). Each continuation
    attends to its context and to itself, with the positions it has after its context alone; the output layer
    runs from the first position that predicts a continuation token on."""
    import torch

    rows = []
    for ctx, conts in groups:
        ids, positions, segment = list(ctx), list(range(len(ctx))), [0] * len(ctx)
        for k, c in enumerate(conts, 1):
            ids += c
            positions += range(len(ctx), len(ctx) + len(c))
            segment += [k] * len(c)
        rows.append((ids, positions, segment))
    width = max(len(ids) for ids, _, _ in rows)
    ids_t = torch.zeros((len(rows), width), dtype=torch.long)
    positions_t = torch.zeros_like(ids_t)
    segment_t = torch.full_like(ids_t, -1)  # -1: padding
    for row, (ids, positions, segment) in enumerate(rows):
        ids_t[row, :len(ids)], positions_t[row, :len(ids)] = torch.as_tensor(ids), torch.as_tensor(positions)
        segment_t[row, :len(ids)] = torch.as_tensor(segment)
    query, key = segment_t[:, :, None], segment_t[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    visible = causal & (key >= 0) & ((key == 0) | (key == query))
    visible |= torch.eye(width, dtype=torch.bool) & (query < 0)  # a pad sees itself, so no row is empty
    lo = min(len(ctx) for ctx, _ in groups) - 1
    keep = {"logits_to_keep": torch.arange(lo, width, device=backend.device)} if backend._keeps_logits else {}
    lo = lo if keep else 0
    with torch.inference_mode():
        logits = backend.model(input_ids=ids_t.to(backend.device), position_ids=positions_t.to(backend.device),
                               attention_mask=_mask(backend.model, visible[:, None]).to(backend.device), **keep).logits
    out = []
    for row, (ctx, conts) in enumerate(groups):
        logprobs = torch.log_softmax(logits[row].float(), dim=-1)
        scored, start = [], len(ctx)
        for c in conts:
            at = torch.as_tensor([len(ctx) - 1] + list(range(start, start + len(c) - 1))) - lo
            target = torch.as_tensor(c, device=logprobs.device)
            picked = logprobs[at.to(logprobs.device)]
            total = float(picked.gather(1, target[:, None]).double().sum())
            if not math.isfinite(total):
                raise NonFiniteScores(f"{backend.name} produced a non-finite log-likelihood")
            scored.append((total, bool((picked.argmax(dim=1) == target).all())))
            start += len(c)
        out.append(scored)
    return out


def _mask(model, visible):
    """The 4-D mask in the form the model's attention takes: boolean for SDPA, additive for the others."""
    import torch

    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        return visible
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)


def _decode(backend: TransformersBackend, rows, budgets, *, stop, batch_size):
    """transformers' greedy generate over rows of similar length and budget, side by side."""
    import torch

    order = sorted(range(len(rows)), key=lambda i: (-budgets[i], -len(rows[i])))
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
            generated = backend.model.generate(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device),
                                            max_new_tokens=max(budgets[i] for i in chunk), do_sample=False,
                                            num_beams=1, eos_token_id=stop or None,
                                            pad_token_id=stop[0] if stop else 0)
        for row, i in enumerate(chunk):
            new = generated[row, width:width + budgets[i]].tolist()  # greedy is causal: a shorter budget is a cut
            out[i] = next((new[:k] for k, t in enumerate(new) if t in stop), new)
        progress.advance(len(chunk), "item")
    return out

def _check_drafts(backend: TransformersBackend, rows, drafts, kept, *, max_new_tokens: int, stop,
                  batch_size: int) -> list[int]:
    """One pass over each context and its draft (right-padded, `batch_size` rows a pass): fills `kept` with the
    greedy tokens the pass settles and returns the rows that still need decoding."""
    import torch

    pending = []
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i]) + len(drafts[i])))
    for begin in range(0, len(order), max(1, batch_size)):
        chunk = order[begin:begin + max(1, batch_size)]
        width = max(len(rows[i]) + len(drafts[i]) for i in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            seq = rows[i] + drafts[i]
            ids[row, :len(seq)] = torch.as_tensor(seq)
            mask[row, :len(seq)] = 1
        lo = min(len(rows[i]) for i in chunk) - 1  # the first position that predicts a generated token
        keep = {"logits_to_keep": torch.arange(lo, width, device=backend.device)} if backend._keeps_logits else {}
        lo = lo if keep else 0
        with torch.inference_mode():
            logits = backend.model(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device), **keep).logits
            best = logits.float().argmax(dim=-1).cpu()
        done = 0
        for row, i in enumerate(chunk):
            at = len(rows[i]) - 1 - lo
            settled, finished = _settle(best[row, at:at + len(drafts[i]) + 1].tolist(), drafts[i],
                                        max_new_tokens=max_new_tokens, stop=stop)
            kept[i] = settled
            if finished:
                done += 1
            else:
                pending.append(i)
        progress.advance(done, "item")
    return sorted(pending)


def _settle(best: list[int], draft: list[int], *, max_new_tokens: int, stop) -> tuple[list[int], bool]:
    """The greedy tokens that a pass over context + draft settles, from the model's top token at each position
    (best[k] follows draft[:k]), and whether decoding is over (a stop token, or max_new_tokens reached)."""
    out: list[int] = []
    for k, token in enumerate(best):
        if len(out) == max_new_tokens or token in stop:
            return out, True
        out.append(token)
        if k == len(draft) or token != draft[k]:  # past the draft, or off it: the model's own token, then decode on
            break
    return out, len(out) == max_new_tokens


# transformers' generation settings that make a decoding step something other than the top token
_NOT_PLAIN = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
              "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "min_length": 0,
              "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
              "sequence_bias": None, "exponential_decay_length_penalty": None, "logits_processor": None}


def _plain_greedy(model, stop) -> bool:
    """Whether the model's generation config leaves greedy decoding as the top token at each step (no penalty,
    no suppressed or forced token, no end token but `stop`): only then can a draft be checked against a single
    pass's top tokens."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    if not stop and getattr(config, "eos_token_id", None) is not None:
        return False
    return all(getattr(config, key, default) in (default, None) for key, default in _NOT_PLAIN.items())


def _packing_agrees(backend: TransformersBackend, group, *, max_length: int) -> bool:
    """Whether the packed rows score one group as separate requests do (an attention implementation that
    ignores a 4-D mask, such as FlashAttention's, lets a continuation see the ones before it)."""
    import warnings

    ctx, conts = group
    probe = (ctx, [list(c) for c in conts[:2]] + [list(conts[0])])  # a continuation after another one
    try:
        packed = _packed(backend, [probe])[0]
    except (RuntimeError, TypeError, ValueError) as error:
        warnings.warn(f"{backend.name}: the model does not take a 4-D attention mask ({error}); each continuation "
                      "is scored with its own copy of the context", stacklevel=3)
        return False
    plain = backend.loglikelihood([(ctx, c) for c in probe[1]], max_length=max_length, batch_size=len(probe[1]))
    low_precision = str(backend.model.dtype) in ("torch.float16", "torch.bfloat16")
    tolerance = 5e-2 if low_precision else 1e-4
    if all(abs(a - b) <= tolerance * (1 + abs(b)) for (a, _), (b, _) in zip(packed, plain, strict=True)):
        return True
    warnings.warn(f"{backend.name}: the model's attention does not honour a 4-D mask (a packed continuation scored "
                  f"{packed[-1][0]:.4f} against {plain[-1][0]:.4f} alone); each continuation is scored with its own "
                  "copy of the context", stacklevel=3)
    return False


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


def _lookup_error(exc: IndexError, inputs, config) -> QuantgateError:
    """An IndexError from a forward pass, said in the manifest's and the checkpoint's terms."""
    positions = getattr(config, "max_position_embeddings", None)
    vocab = getattr(config, "vocab_size", None)
    width, top = inputs.shape[1], int(inputs.max())
    causes = []
    if positions is not None and width > positions:
        causes.append(f"a window of {width} tokens is longer than the {positions} positions its config.json allows: "
                      f"set [protocol] max_length to at most {positions} (and re-baseline)")
    if vocab is not None and top >= vocab:
        causes.append(f"token id {top} is outside its vocabulary of {vocab} (config.json vocab_size): the tokenizer "
                      "does not belong to this model")
    return QuantgateError("the model's forward pass failed (" + str(exc) + "): "
                          + ("; ".join(causes) or "an embedding lookup out of range"))
