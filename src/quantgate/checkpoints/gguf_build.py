"""Build GGUF files from a float Hugging Face Llama checkpoint: F16 with gguf-py, k-quants with llama.cpp.

``write_f16_gguf`` is a small, Llama-only stand-in for llama.cpp's ``convert_hf_to_gguf.py``
(which is not shipped on PyPI). ``quantize_gguf`` calls llama.cpp's own quantizer through
llama-cpp-python (the code ``llama-quantize`` runs, with its per-tensor type mixes).
Both write next to the output and rename, so an interrupted build never leaves a truncated file.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import time
from pathlib import Path

# llama.cpp's llama_ftype values (also gguf.LlamaFileType) for the types we build.
QUANT_FTYPES = {"Q8_0": 7, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15}


def _permute_qk(w, n_head: int):
    """HF rotates the two halves of each head (rotate_half); llama.cpp's Llama rope rotates adjacent
    pairs. Interleave each head's halves so both compute the same attention (the HF->GGUF permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(hf_dir: Path, vocab_size: int) -> dict:
    """tokens / token types / merges of a byte-level BPE tokenizer.json, in llama.cpp's spelling."""
    from gguf import TokenType

    spec = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{hf_dir}: only byte-level BPE tokenizers are supported, got {model.get('type')}")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise ValueError(f"{hf_dir}: tokenizer has ids up to {max(by_id)} but the model only {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token maps to (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    # tokenizers >= 0.20 saves merges as pairs, older ones as "a b" strings; GGUF wants the strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _special_ids(hf_dir: Path, config: dict, tokens: list[str]) -> tuple[int | None, int | None]:
    tok_config_path = hf_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text()) if tok_config_path.exists() else {}
    index = {t: i for i, t in enumerate(tokens)}
    found = []
    for name in ("bos", "eos"):
        token = tok_config.get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        found.append(index.get(token, config.get(f"{name}_token_id")))
    return found[0], found[1]


def _hf_tensors(hf_dir: Path):
    """(name, float32 numpy array) for every tensor in the checkpoint's safetensors shards."""
    import torch
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no .safetensors files")
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                # through torch because numpy has no bfloat16
                yield name, fh.get_tensor(name).to(torch.float32).numpy()


def _llama_shapes(hf_dir: Path) -> tuple[dict, dict]:
    """Read config.json, refuse what the converter does not support, and derive the shapes it writes."""
    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{hf_dir}: only model_type 'llama' is supported, got {config.get('model_type')!r}")
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{hf_dir}: rope scaling {rope.get('rope_type')!r} is not supported")
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    n_layer = config["num_hidden_layers"]
    shapes = {"n_head": n_head, "n_kv": n_kv, "hidden": hidden, "head_dim": head_dim, "rope_theta": rope_theta,
              "n_layer": n_layer}
    return config, shapes


def _gguf_named_tensors(hf_dir: Path, config: dict, shapes: dict) -> dict:
    """Every checkpoint tensor under its GGUF name, Q/K permuted, matrices F16 and 1-D tensors F32."""
    import gguf
    import numpy as np

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shapes["n_layer"])
    tensors: dict[str, np.ndarray] = {}
    for name, data in _hf_tensors(hf_dir):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope.freq_base
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"{hf_dir}: no GGUF name for tensor {name}")
        if name.endswith("q_proj.weight"):
            data = _permute_qk(data, shapes["n_head"])
        elif name.endswith("k_proj.weight"):
            data = _permute_qk(data, shapes["n_kv"])
        # llama.cpp keeps norms (1-D) in F32; matrices go to F16.
        tensors[new_name] = data.astype(np.float16 if data.ndim > 1 else np.float32)
    if "output.weight" not in tensors and not config.get("tie_word_embeddings", False):
        raise ValueError(f"{hf_dir}: untied model without lm_head.weight")
    return tensors


def _add_llama_metadata(writer, hf_dir: Path, config: dict, shapes: dict) -> None:
    """Write the model's name, file type and Llama hyperparameters into the GGUF header."""
    import gguf

    writer.add_name(hf_dir.name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(shapes["hidden"])
    writer.add_block_count(shapes["n_layer"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(shapes["n_head"])
    writer.add_head_count_kv(shapes["n_kv"])
    writer.add_key_length(shapes["head_dim"])
    writer.add_value_length(shapes["head_dim"])
    writer.add_rope_dimension_count(shapes["head_dim"])
    writer.add_rope_freq_base(float(shapes["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])


def _add_tokenizer(writer, vocab: dict, bos: int | None, eos: int | None) -> None:
    """Write the byte-level BPE vocabulary, merges and special ids into the GGUF header."""
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex, as in the ByteLevel pre-tokenizer
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)  # scoring feeds exactly the ids it was given


def _write_and_rename(writer, tmp: Path, out_path: Path) -> None:
    """Write the GGUF to its temporary name, then rename it; on any failure remove the partial file."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, out_path)


def write_f16_gguf(hf_dir: Path, out_path: Path) -> dict:
    """Convert a Hugging Face LlamaForCausalLM directory to a GGUF file with F16 weights (1-D tensors F32)."""
    import gguf

    started = time.perf_counter()
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    config, shapes = _llama_shapes(hf_dir)
    vocab = _tokenizer_metadata(hf_dir, config["vocab_size"])
    bos, eos = _special_ids(hf_dir, config, vocab["tokens"])
    # Map and convert every tensor before opening the output, so a bad checkpoint writes nothing.
    tensors = _gguf_named_tensors(hf_dir, config, shapes)

    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_llama_metadata(writer, hf_dir, config, shapes)
    _add_tokenizer(writer, vocab, bos, eos)
    for new_name, data in tensors.items():
        writer.add_tensor(new_name, data)
    _write_and_rename(writer, tmp, out_path)
    return {
        "path": str(out_path),
        "qtype": "F16",
        "size_bytes": out_path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
        "n_tensors": len(tensors),
        "tensor_types": sorted({"F16" if t.ndim > 1 else "F32" for t in tensors.values()}),
    }


def quantize_gguf(f16_path: Path, out_path: Path, qtype: str, n_threads: int = 0) -> dict:
    """Quantize an F16 GGUF with llama.cpp's quantizer (llama-cpp-python); qtype in QUANT_FTYPES."""
    import logging

    import llama_cpp

    # llama-cpp-python prints llama.cpp's log (a line per tensor here) unless its logger is raised.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    if qtype not in QUANT_FTYPES:
        raise ValueError(f"unsupported GGUF type {qtype!r} (supported: {', '.join(QUANT_FTYPES)})")
    f16_path, out_path = Path(f16_path), Path(out_path)
    if not f16_path.exists():
        raise FileNotFoundError(f16_path)
    started = time.perf_counter()
    tmp = out_path.with_name(out_path.name + ".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[qtype]
    params.nthread = n_threads  # 0: llama.cpp picks the hardware thread count
    rc = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({f16_path} -> {qtype}) failed with code {rc}")
    os.replace(tmp, out_path)
    return {
        "path": str(out_path),
        "qtype": qtype,
        "size_bytes": out_path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
        "tensor_types": gguf_tensor_types(out_path),
    }


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds (what a "Q4_K_M" file really contains)."""
    from collections import Counter

    return dict(Counter(t.tensor_type.name for t in gguf_reader(path).tensors))


def gguf_reader(path: Path):
    """gguf's reader of a file, parsed once per process: the format audit, the tokenizer audit and the description
    read the same parse in turn (a parse walks the whole vocabulary, a quarter second for the demo's 4,096 tokens).
    Keyed by the file's size and modification time, so a file written again under the same name is parsed again."""
    from ..errors import LoadAuditError

    st = os.stat(path)
    try:
        return _reader(str(path), st.st_size, st.st_mtime_ns)
    except Exception as exc:  # gguf's own words ("file appears to be version 0"), which do not name the file
        raise LoadAuditError(f"{path}: not a GGUF file gguf can read ({type(exc).__name__}: {exc})") from exc


@functools.lru_cache(maxsize=2)  # the variant resident and the one before it; a reader maps its file, read-only
def _reader(path: str, size: int, mtime_ns: int):
    from gguf import GGUFReader

    return GGUFReader(path)
