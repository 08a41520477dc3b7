"""Scoring with a transformers causal LM (FP16/BF16, GPTQ, AWQ, dequantized GGUF ...)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..perplexity import Window
from .base import ScoringBackend


class TransformersBackend(ScoringBackend):
    name = "transformers"

    def __init__(self, model, device: str):
        self.model = model
        self.device = device
        model.eval()

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
                logits = self.model(input_ids=inputs.to(self.device), attention_mask=attention.to(self.device)).logits
                yield torch.log_softmax(logits[scored.to(logits.device)].float(), dim=-1)

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


def _load(path, *, fmt: str, dtype: str, device: str, what: str, tokenizer_path=None):
    from ..checkpoints.loading import load_with_transformers

    return load_with_transformers(path, fmt=fmt, dtype=dtype, device=device, what=what, tokenizer_path=tokenizer_path)


def _require(fmt: str, what: str) -> None:
    from ..checkpoints.loading import require_format_library

    require_format_library(fmt, what)


def _numerics(dtype: str, device: str) -> dict[str, str]:
    from ..protocol import device_class

    return {"dtype": dtype, "device_class": device_class(device)}


def _reference(manifest, ref, reference_sha256: str):
    return ref.path, ref.format, f"reference {ref.name}"


def _register():
    from . import DEFAULT_BACKEND, Backend, register_backend

    return register_backend(Backend(name=DEFAULT_BACKEND, suffix="", formats=None, load=_load, require=_require,
                                    numerics=_numerics, reference=_reference))


BACKEND = _register()
