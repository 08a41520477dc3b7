"""A copy of the reference in another floating-point dtype (BF16): the noise floor of the metrics.

Rounding FP16 weights to BF16 changes every weight a little and nothing else, so its KL
divergence and top-1 agreement against FP16 are what "no real quantization" looks like.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def build_cast(reference: Path, out: Path, *, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(reference), dtype=getattr(torch, dtype), device_map="cpu")
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if (Path(reference) / name).is_file():
            shutil.copy2(Path(reference) / name, out / name)
    return {"dtype": dtype, "seconds": round(time.perf_counter() - started, 2)}
