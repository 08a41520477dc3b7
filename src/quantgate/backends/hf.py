"""Scoring with a transformers causal LM (FP16/BF16, GPTQ, AWQ, dequantized GGUF ...)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..perplexity import Window
from .base import ScoringBackend, collect_scores

IGNORE = -100  # label of context tokens, as in the HF perplexity recipe


class TransformersBackend(ScoringBackend):
    name = "transformers"

    def __init__(self, model, device: str):
        self.model = model
        self.device = device
        model.eval()

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device)}

    def score_windows(self, ids: np.ndarray, windows: Sequence[Window], batch_size: int, top_k: int = 0):
        import torch

        out: list[np.ndarray] = []
        top_ids: list[np.ndarray] = []
        top_lp: list[np.ndarray] = []
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        with torch.inference_mode():
            for first in range(0, len(windows), batch_size):
                batch = windows[first:first + batch_size]
                width = max(w.end - w.begin for w in batch)
                # Right padding: a causal model never attends forward, so pads cannot move real scores.
                inputs = torch.zeros((len(batch), width), dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
                for row, w in enumerate(batch):
                    n = w.end - w.begin
                    inputs[row, :n] = ids_t[w.begin:w.end]
                    attention[row, :n] = 1
                    labels[row, w.score_from - w.begin:n] = ids_t[w.score_from:w.end]
                logits = self.model(input_ids=inputs.to(self.device),
                                    attention_mask=attention.to(self.device)).logits
                # Position i predicts token i + 1.
                targets = labels[:, 1:].to(logits.device)
                keep = targets != IGNORE
                dist = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)
                out.append(dist.gather(1, targets[keep].unsqueeze(1)).squeeze(1).cpu().numpy().astype(np.float64))
                if top_k:
                    values, indices = dist.topk(top_k, dim=-1)
                    top_ids.append(indices.cpu().numpy().astype(np.int64))
                    top_lp.append(values.cpu().numpy())
        return collect_scores(out, top_ids, top_lp, top_k)
