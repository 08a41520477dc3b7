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
