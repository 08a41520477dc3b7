"""bitsandbytes variants: quantized on load (LLM.int8() or NF4), saved, and proven to reload unchanged.

bitsandbytes 4-bit has a silent failure: on CPU the first forward pass repacks the packed NF4
weights in place, so a model saved *after* it was used reloads with different weights and no
error (perplexity x1.05 on the demo model, logits off by 2). The builder therefore saves before
any forward pass, reloads and compares a digest of the quantized tensors, and writes that digest
beside the checkpoint; the loader checks every later load against it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

WEIGHTS_DIGEST_FILE = "quantgate-weights.json"


def quantized_weights_digest(model) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes, bytes), as loaded."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def bnb_config(bits: int, quant_type: str = "nf4", llm_int8_threshold: float | None = None):
    """llm_int8_threshold (8 bits): activations above it keep their weight columns in fp16 (LLM.int8()'s outlier
    decomposition; bitsandbytes' default 6.0); 0 turns the decomposition off. It is saved in the checkpoint's
    quantization_config and applies on every load."""
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **({} if llm_int8_threshold is None
                                                        else {"llm_int8_threshold": float(llm_int8_threshold)}))
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_compute_dtype=torch.float32)
    raise ValueError(f"bitsandbytes quantizes to 8 or 4 bits, not {bits}")


def build_bnb(reference: Path, out: Path, *, bits: int, quant_type: str = "nf4",
              llm_int8_threshold: float | None = None) -> dict:
    """Quantize `reference` with bitsandbytes on load, save it to `out`, and verify the round trip."""
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    # float16: the layers bitsandbytes leaves alone (embeddings, lm_head, norms) stay as the FP16
    # reference stores them, so the size on disk measures the quantization, not an fp32 copy.
    model = AutoModelForCausalLM.from_pretrained(str(reference), quantization_config=bnb_config(bits, quant_type, llm_int8_threshold),
                                                 dtype=torch.float16, device_map="cpu")
    digest = quantized_weights_digest(model)  # before any forward pass (see the module docstring)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16, device_map="cpu")
    if quantized_weights_digest(reloaded) != digest:
        raise RuntimeError(f"bitsandbytes {bits}-bit weights changed between save and reload ({out}); "
                           "refusing to keep this build")
    (out / WEIGHTS_DIGEST_FILE).write_text(json.dumps({"sha256": digest, "what": "quantized_weights_digest, "
                                                       "taken before any forward pass"}, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    threshold = reloaded.config.quantization_config.llm_int8_threshold if bits == 8 else None
    del reloaded
    return {"bits": bits, "quant_type": quant_type if bits == 4 else "int8 (LLM.int8())", "size_bytes": size,
            **({"llm_int8_threshold": threshold} if threshold is not None else {}),
            "seconds": round(time.perf_counter() - started, 3), "weights_sha256": digest}


def verify_weights_digest(model, path: Path, what: str) -> str | None:
    """Compare a freshly loaded model with the digest recorded at build time; None if none was recorded."""
    from ..errors import LoadAuditError

    record = Path(path) / WEIGHTS_DIGEST_FILE
    if not record.is_file():
        return None
    expected = json.loads(record.read_text())["sha256"]
    actual = quantized_weights_digest(model)
    if actual != expected:
        raise LoadAuditError(
            f"{what}: its quantized weights differ from those recorded when it was built ({WEIGHTS_DIGEST_FILE}: "
            f"{expected[:12]}, loaded: {actual[:12]}); bitsandbytes 4-bit weights saved after a CPU forward pass "
            "are repacked and reload wrong without an error. Rebuild it: quantgate zoo build --force")
    return actual
