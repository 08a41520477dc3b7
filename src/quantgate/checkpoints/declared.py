"""What a checkpoint says of its own quantization, against what the manifest declares for it.

A variant declared `format = "gptq"`, `bits = 4` that points at the FP16 reference would otherwise
be gated (and pass) as GPTQ 4-bit. The declared format, bits, group size and desc_act are compared
with the checkpoint's own metadata (config.json's `quantization_config`, AutoGPTQ's
quantize_config.json, a GGUF's `general.file_type`); a mismatch is refused with both named. Bits
per weight from the file size stay a reported figure, never a reason to refuse: embeddings are
often left unquantized (the demo's GPTQ 4-bit measures 8.74 bits per weight).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LoadAuditError

UNQUANTIZED = ("fp16", "bf16", "fp32")
QUANT_METHODS = {"gptq": "gptq", "awq": "awq", "bnb": "bitsandbytes", "compressed-tensors": "compressed-tensors"}
# llama.cpp's llama_ftype -> bits of its main tensor type (the k-quant mixes keep some tensors wider)
GGUF_FILE_TYPE_BITS = {0: 32, 1: 16, 2: 4, 3: 4, 7: 8, 8: 5, 9: 5, 10: 2, 11: 3, 12: 3, 13: 3, 14: 4, 15: 4,
                       16: 5, 17: 5, 18: 6, 32: 16}


def bnb_outlier_handling(threshold: float) -> str:
    """LLM.int8()'s outlier threshold in words, the manifest's `outlier_handling` (an ablation factor)."""
    if not threshold:
        return "none (llm_int8_threshold = 0)"
    return f"outlier columns kept in fp16 (LLM.int8(), llm_int8_threshold = {threshold:g})"


def own_quantization(path: Path) -> dict[str, Any]:
    """{method, bits, group_size, desc_act} as the checkpoint states them (None where it says nothing);
    method None means it declares no quantization at all."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf(path)
    config, source = _json(path / "config.json").get("quantization_config"), "quantization_config"
    if config is None and (path / "quantize_config.json").is_file():  # AutoGPTQ before 0.7
        config, source = {**_json(path / "quantize_config.json"), "quant_method": "gptq"}, "quantize_config.json"
    if not config:
        return {"method": None, "bits": 16, "group_size": None, "desc_act": None,
                "source": f"{path / 'config.json'} (no quantization_config)"}
    method = config.get("quant_method")
    if method == "bitsandbytes":
        bits = 8 if config.get("load_in_8bit") else 4 if config.get("load_in_4bit") else None
        return {"method": method, "bits": bits, "group_size": None, "desc_act": None, "source": "quantization_config",
                **({"outlier_handling": bnb_outlier_handling(config.get("llm_int8_threshold", 6.0))} if bits == 8
                   else {})}
    if method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in (config.get("config_groups") or {}).values()]
        bits = {w.get("num_bits") for w in weights} - {None}
        groups = {w.get("group_size") for w in weights if w.get("strategy") == "group"} - {None}
        return {"method": method, "bits": bits.pop() if len(bits) == 1 else None,
                "group_size": groups.pop() if len(groups) == 1 else None, "desc_act": None,
                "source": "quantization_config.config_groups"}
    return {"method": method, "bits": config.get("bits", config.get("w_bit")),
            "group_size": config.get("group_size", config.get("q_group_size")), "desc_act": config.get("desc_act"),
            "source": source}


def audit_declared(path: Path, *, fmt: str, bits: int, group_size: int | None, desc_act: bool | None,
                   what: str) -> dict[str, Any]:
    """Refuse a checkpoint whose own metadata contradicts the manifest; returns what it says of itself."""
    own = own_quantization(path)
    declared = f"{fmt} {bits}-bit" + (f", group size {group_size}" if group_size else "")
    said = ("no quantization" if own["method"] is None else f"{own['method']} {own['bits']}-bit"
            + (f", group size {own['group_size']}" if own["group_size"] else ""))
    problems = []
    if fmt in UNQUANTIZED:
        if own["method"] is not None:
            problems.append(f"it is quantized ({own['method']})")
    elif fmt == "gguf":
        if own["bits"] is not None and own["bits"] != bits:
            problems.append(f"its file type is {own['bits']}-bit")
    else:
        if own["method"] != QUANT_METHODS[fmt]:
            problems.append("its quantization method is " + (repr(own["method"]) if own["method"] else "none"))
        elif own["bits"] is not None and own["bits"] != bits:
            problems.append(f"its bits are {own['bits']}")
        elif group_size is not None and own["group_size"] is not None and own["group_size"] != group_size:
            problems.append(f"its group size is {own['group_size']}")
        elif desc_act is not None and own["desc_act"] is not None and bool(own["desc_act"]) != desc_act:
            problems.append(f"its desc_act is {own['desc_act']}")
    if problems:
        raise LoadAuditError(f"{what}: declared {declared} in the manifest, but the checkpoint says {said} "
                             f"({own['source']}): {'; '.join(problems)}. Fix the manifest entry or the path.")
    return own


def _gguf(path: Path) -> dict[str, Any]:
    try:
        import gguf  # noqa: F401
    except ImportError:
        return {"method": "gguf", "bits": None, "group_size": None, "desc_act": None, "source": "gguf not installed"}
    from .gguf_build import gguf_reader

    field = gguf_reader(path).fields.get("general.file_type")
    file_type = int(field.parts[field.data[0]][0]) if field is not None else None
    return {"method": "gguf", "bits": GGUF_FILE_TYPE_BITS.get(file_type), "group_size": None, "desc_act": None,
            "source": f"{path.name}: general.file_type {file_type}"}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
