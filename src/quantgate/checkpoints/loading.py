"""Load checkpoints (FP16/BF16, GPTQ/AWQ, bitsandbytes, compressed-tensors and GGUF through transformers;
GGUF through llama.cpp) and audit them.

transformers only *warns* when a checkpoint lacks weights and initialises them randomly;
a model loaded that way still runs and its perplexity is merely terrible (we saw x35). So
every load asks for the loading info and refuses anything missing, unexpected or mismatched,
and every parameter is checked for NaN/Inf before a single token is scored.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointMissing, LoadAuditError

HF_FORMATS = ("fp16", "bf16", "fp32", "gptq", "awq", "bnb", "compressed-tensors")
LOADABLE_FORMATS = (*HF_FORMATS, "gguf")
# format -> (module transformers needs to load it, quantgate extra that installs it)
FORMAT_LIBRARIES = {
    "gptq": ("gptqmodel", "gptq"),
    "awq": ("gptqmodel", "gptq"),
    "bnb": ("bitsandbytes", "bnb"),
    "compressed-tensors": ("compressed_tensors", "compressed"),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class LoadedCheckpoint:
    model: Any
    tokenizer: Any
    description: dict[str, Any] = field(default_factory=dict)
    backend: Any = None  # the ScoringBackend that scores with this model
    vocabulary: list[str] | None = None  # id -> token string, for backends that score ids without a HF tokenizer
    audited: set[str] = field(default_factory=set)  # corpora its own tokenizer was seen to cut into the reference's ids


def checkpoint_size_bytes(path: Path) -> int:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files)


def _require(path: Path | None, what: str) -> Path:
    if path is None or not Path(path).exists():
        raise CheckpointMissing(f"{what}: checkpoint not found at {path}")
    if Path(path).is_dir() and not any(p.suffix in WEIGHT_SUFFIXES for p in Path(path).iterdir()):
        raise CheckpointMissing(f"{what}: {path} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return Path(path)


def quiet_optional_libraries() -> None:
    """Optional quantization libraries log import-time noise (missing CUDA extensions on CPU)."""
    for noisy in ("gptqmodel", "torchao", "torchao.kernel.intmm", "torch.utils._pytree", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    # LLM.int8() computes in fp16 by design; bitsandbytes warns about it on every matmul.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def require_format_library(fmt: str, what: str) -> None:
    """Raise BackendUnavailable (a skip; exit 125 under --quality-bisect) when a format's library is absent."""
    import importlib.util

    if fmt not in FORMAT_LIBRARIES:
        return
    module, extra = FORMAT_LIBRARIES[fmt]
    if importlib.util.find_spec(module) is None:
        from ..errors import BackendUnavailable

        raise BackendUnavailable(f"{what}: format {fmt!r} needs the {module} package, which is not installed "
                                 f"(pip install 'quantgate[{extra}]')")


def import_format_libraries(formats) -> list[str]:
    """Import the installed libraries these formats load through (gptqmodel alone takes seconds), so that a process
    pays it before its first check rather than inside its first variant of that format. Returns the modules
    imported; one that is absent or fails to import is left for the load that needs it to report."""
    import importlib
    import importlib.util

    quiet_optional_libraries()
    imported = []
    for module in dict.fromkeys(FORMAT_LIBRARIES[f][0] for f in formats if f in FORMAT_LIBRARIES):
        if importlib.util.find_spec(module) is None:
            continue
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the load of a variant in this format raises it, naming the variant
            continue
        imported.append(module)
    return imported


def load_tokenizer(path: Path):
    quiet_optional_libraries()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def legacy_gptq_config(path: Path):
    """A config that lets transformers read an AutoGPTQ checkpoint as AutoGPTQ wrote it, or None.

    AutoGPTQ names its weights `gptq_model-4bit-128g.safetensors`, and before 0.7 kept its
    settings only in quantize_config.json. Its zero points are GPTQ v1: say so explicitly,
    since reading them as v2 gives garbage (perplexity x32 on the demo model).
    """
    standard = any((path / n).exists() for n in ("model.safetensors", "model.safetensors.index.json"))
    weights = sorted(path.glob("*.safetensors"))
    config_json = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    quantize_config = path / "quantize_config.json"
    needs_file = not standard and len(weights) == 1
    needs_settings = "quantization_config" not in config_json and quantize_config.exists()
    if not (needs_file or needs_settings):
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if needs_file:
        config.transformers_weights = weights[0].name  # read by transformers; must sit inside the dir
    if needs_settings:
        settings = json.loads(quantize_config.read_text())
        config.quantization_config = {**settings, "quant_method": "gptq",
                                      "checkpoint_format": settings.get("checkpoint_format", "gptq")}
    return config


def zero_biases_of_quantized_layers(path: Path, keys: list[str]) -> list[str]:
    """Those of `keys` that are all-zero `.bias` tensors of quantized layers (AutoGPTQ writes them
    even for bias-free architectures). Dropping them changes nothing; anything else stays an error."""
    candidates = [k for k in keys if k.endswith(".bias")]
    if not candidates or not path.is_dir():
        return []
    from safetensors import safe_open

    harmless = []
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            names = set(fh.keys())
            for k in candidates:
                if k in names and k[: -len("bias")] + "qweight" in names and not bool(fh.get_tensor(k).any()):
                    harmless.append(k)
    return harmless


def audit_loading_info(info: dict[str, Any], what: str, tolerated: list[str] = ()) -> None:
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing weights: {', '.join(sorted(info['missing_keys']))}")
    unexpected = sorted(set(info.get("unexpected_keys") or ()) - set(tolerated))
    if unexpected:
        problems.append(f"unexpected weights: {', '.join(unexpected)}")
    if info.get("mismatched_keys"):
        shown = ", ".join(str(m) for m in info["mismatched_keys"])
        problems.append(f"weights with wrong shapes: {shown}")
    if info.get("error_msgs"):
        problems.append(f"load errors: {'; '.join(map(str, info['error_msgs']))}")
    if problems:
        raise LoadAuditError(f"{what} did not load whole: " + "; ".join(problems))


def _finite_checkable(tensor):
    """torch has no isfinite for FP8 storage types; their float32 upcast is exact and keeps NaN."""
    return tensor.float() if tensor.element_size() == 1 else tensor


def audit_finite(model, what: str) -> None:
    import torch

    bad = []
    for prefix, module in _weights_by_module(model):
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(_finite_checkable(tensor)).all()):
                bad.append(f"{prefix}.{name}" if prefix else name)
    if bad:
        raise LoadAuditError(f"{what} has NaN/Inf weights in: {', '.join(bad[:10])}"
                             + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))


def _weights_by_module(model):
    """(name, module) for every module, its weights in memory while it is yielded: a module accelerate offloaded
    (to CPU memory or disk) has them brought back for the audit and put away again."""
    if getattr(model, "hf_device_map", None) is None:
        yield from model.named_modules()
        return
    from accelerate.utils import align_module_device, has_offloaded_params

    for name, module in model.named_modules():
        if has_offloaded_params(module):
            with align_module_device(module, execution_device="cpu"):
                yield name, module
        else:
            yield name, module


def _quantized_kernels(model) -> list[str]:
    """Class names of the linear modules that are not plain torch Linear: the kernel in use."""
    import torch

    names = {type(m).__name__ for m in model.modules()
             if "Linear" in type(m).__name__ and type(m) is not torch.nn.Linear}
    return sorted(names)


def _memory_available() -> int:
    """Bytes of memory the system can still give (Linux's MemAvailable); 0 where it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cache_dequantized_weights(model, device: str) -> int:
    """On the CPU, let gptqmodel's torch GPTQ kernel keep each layer's dequantized weight after its first forward
    pass (its own `GPTQ_TORCH_CACHE_WEIGHTS` switch) instead of unpacking it again on every pass: the same matmul
    on the same weight, so the same logits, and 1.3 to 1.7x faster scoring on the demo's 8-bit GPTQ. Only where the float
    weights take at most a quarter of the memory still available; returns the bytes they will take (0: off)."""
    if str(device) != "cpu":
        return 0
    layers = [m for m in model.modules() if hasattr(m, "_cache_enabled") and hasattr(m, "_cached_weights")]
    if not layers:
        return 0
    size = sum(m.in_features * m.out_features * 4 for m in layers)  # at most float32, the compute dtype here
    if size > _memory_available() // 4:
        return 0
    for m in layers:
        m._cache_enabled = True
    return size


def skip_identity_permutations(model) -> int:
    """gptqmodel's CPU int4 GPTQ kernel (TorchAtenLinear) permutes its input's columns on every forward pass
    (`x[:, ret_idx]`, a copy of the activations), the order the layer's groups were quantized in. Without act-order
    (desc_act false) that order is the identity, and the copy cost about a fifth of the layer's time. Once the
    kernel has built its order (on its first forward pass), an identity order is replaced by a full slice: a view
    of the same values, so the same logits, without the copy. Returns the layers it will look at."""
    import torch

    def after_first_pass(module, args, output):
        order = getattr(module, "ret_idx", None)
        if getattr(module, "linear_mode", None) != "inference" or not isinstance(order, torch.Tensor):
            return  # not transformed yet (or not this kernel's fused path): look again after the next pass
        if torch.equal(order.to(torch.long), torch.arange(order.numel(), device=order.device)):
            module.ret_idx = slice(None)
        module._quantgate_identity_hook.remove()

    layers = [m for m in model.modules() if type(m).__name__ == "TorchAtenLinear" and hasattr(m, "_fused_op_forward")]
    for m in layers:
        m._quantgate_identity_hook = m.register_forward_hook(after_first_pass)
    return len(layers)


def gguf_file(path: Path, what: str) -> Path:
    """The GGUF file a variant names: the path itself, or the single .gguf inside a directory."""
    path = _require(path, what)
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise CheckpointMissing(f"{what}: {path} must hold exactly one .gguf file (found: {found}); name the file")
    return files[0]


def load_checkpoint(path: Path | None, *, fmt: str, dtype: str, device: str, what: str,
                    tokenizer_path: Path | None = None, backend: str = "transformers",
                    placement=None) -> LoadedCheckpoint:
    """Load one checkpoint for scoring; raise CheckpointMissing or LoadAuditError, never half-load."""
    if fmt not in LOADABLE_FORMATS:
        raise LoadAuditError(f"{what}: no loader for format {fmt!r} yet (supported: {', '.join(LOADABLE_FORMATS)})")
    from ..backends import get_backend

    engine = get_backend(backend)
    if not engine.scores(fmt):
        raise LoadAuditError(f"{what}: backend {backend!r} cannot load format {fmt!r}")
    placed = {"placement": placement} if placement is not None and placement.keys() else {}
    return engine.load(path, fmt=fmt, dtype=dtype, device=device, what=what, tokenizer_path=tokenizer_path, **placed)


def load_with_transformers(path: Path | None, *, fmt: str, dtype: str, device: str, what: str,
                           tokenizer_path: Path | None = None, placement=None) -> LoadedCheckpoint:
    """The transformers backend's loader: every loadable format, GGUF dequantized to `dtype`; with a placement
    (placement.py), accelerate spreads the layers over devices, CPU memory and disk."""
    if fmt == "gguf":
        file = gguf_file(path, what)
        return _load_hf(file.parent, fmt=fmt, dtype=dtype, device=device, what=what,
                        tokenizer_path=tokenizer_path, gguf=file, placement=placement)
    require_format_library(fmt, what)
    return _load_hf(_require(path, what), fmt=fmt, dtype=dtype, device=device, what=what,
                    tokenizer_path=tokenizer_path, placement=placement)


def _load_hf(path: Path, *, fmt: str, dtype: str, device: str, what: str, tokenizer_path: Path | None,
             gguf: Path | None = None, placement=None) -> LoadedCheckpoint:
    """Load a checkpoint with transformers (a GGUF dequantized), audit it and describe how it was loaded."""
    quiet_optional_libraries()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the audit below reports what the warnings would have said
    kwargs = {"dtype": _torch_dtype(dtype), "device_map": device, "output_loading_info": True,
              **(placement.transformers_kwargs() if placement is not None else {})}
    if gguf is not None:
        kwargs["gguf_file"] = gguf.name  # transformers dequantizes every tensor to `dtype`
    legacy = legacy_gptq_config(path) if fmt == "gptq" and path.is_dir() else None
    if legacy is not None:
        kwargs["config"] = legacy
    try:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except RuntimeError as exc:
            if "ignore_mismatched_sizes" not in str(exc):
                raise
            # Reload only to learn *which* tensors have the wrong shape; the audit then refuses it.
            model, info = AutoModelForCausalLM.from_pretrained(str(path), ignore_mismatched_sizes=True, **kwargs)
    except Exception as exc:  # safetensors, json, torch and library errors alike: the file is unusable
        raise LoadAuditError(f"{what}: cannot load checkpoint {gguf or path}: {type(exc).__name__}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(previous)
    tolerated, weights_digest, compressed = _audit_hf_model(model, info, path, fmt=fmt, what=what)
    tokenizer, tok_dir = _hf_tokenizer(path, what=what, tokenizer_path=tokenizer_path, gguf=gguf)
    description = _describe_hf_load(model, path, fmt=fmt, dtype=dtype, device=device, started=started, tok_dir=tok_dir,
                                    gguf=gguf, weights_digest=weights_digest, compressed=compressed, legacy=legacy,
                                    tolerated=tolerated)
    cached = cache_dequantized_weights(model, device) if placement is None or not placement.keys() else 0
    skip_identity_permutations(model)
    if cached:
        description["dequantized_weights_cached_bytes"] = cached
    if info.get("aligned_biases"):
        description["aligned_biases"] = info["aligned_biases"]  # align_biases: cast to their weights' dtype
    placed = placement is not None and bool(placement.transformers_kwargs())
    if placed:
        description["placement"] = {**placement.record(), "layers": _placed_layers(model)}
    from ..backends.hf import TransformersBackend

    return LoadedCheckpoint(model=model, tokenizer=tokenizer, description=description,
                            backend=TransformersBackend(model, _input_device(model) if placed else device))


def _placed_layers(model) -> dict[str, int]:
    """How many of the model's modules accelerate put on each device ("disk": offloaded)."""
    counts: dict[str, int] = {}
    for where in (getattr(model, "hf_device_map", None) or {}).values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return counts


def _input_device(model) -> str:
    """Where a dispatched model takes its input ids: the first GPU it uses, else the CPU (accelerate's hooks move
    activations between the devices, and weights in from CPU memory or disk)."""
    gpus = [str(d) for d in (getattr(model, "hf_device_map", None) or {}).values() if str(d) not in ("cpu", "disk")]
    if not gpus:
        return "cpu"
    return f"cuda:{gpus[0]}" if gpus[0].isdigit() else gpus[0]


def align_biases(model) -> int:
    """transformers loads a bitsandbytes checkpoint's unquantized weights in their stored dtype (fp16) whatever the
    requested dtype, and casts their biases to the requested one: a LayerNorm with an fp16 weight and an fp32 bias
    cannot run (GPT-2: "expected scalar type Half but found Float"). Each such bias follows its weight; a model
    without biases (Llama) is untouched. Returns how many were cast."""
    import torch

    count = 0
    for module in model.modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if (isinstance(weight, torch.nn.Parameter) and isinstance(bias, torch.nn.Parameter)
                and weight.is_floating_point() and bias.is_floating_point() and weight.dtype != bias.dtype):
            bias.data = bias.data.to(weight.dtype)
            count += 1
    return count


def _audit_hf_model(model, info: dict[str, Any], path: Path, *, fmt: str, what: str):
    """Audit a loaded model (loading info, bnb weights digest, compressed-tensors, finite weights), then eval() it."""
    tolerated = zero_biases_of_quantized_layers(path, list(info.get("unexpected_keys") or ()))
    audit_loading_info(info, what, tolerated)
    weights_digest = None
    if fmt == "bnb":
        from .bnb_build import verify_weights_digest

        weights_digest = verify_weights_digest(model, path, what)  # before any forward pass can repack them
        info["aligned_biases"] = align_biases(model)
    compressed = decompress_compressed_tensors(model, what) if fmt == "compressed-tensors" else None
    audit_finite(model, what)
    model.eval()
    return tolerated, weights_digest, compressed


def _hf_tokenizer(path: Path, *, what: str, tokenizer_path: Path | None, gguf: Path | None):
    """The variant's tokenizer and where it came from: the GGUF's own, the checkpoint's, or the reference's."""
    if gguf is not None:  # a GGUF carries its own tokenizer; the evaluator checks it against the reference's
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf.name)
        except Exception as exc:
            raise LoadAuditError(f"{what}: cannot read the tokenizer inside {gguf}: {type(exc).__name__}: {exc}") from exc
        return tokenizer, gguf
    tok_dir = path if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists() else tokenizer_path
    if tok_dir is None:
        raise LoadAuditError(f"{what}: {path} has no tokenizer and no reference tokenizer was given")
    return load_tokenizer(tok_dir), tok_dir


def _describe_hf_load(model, path: Path, *, fmt: str, dtype: str, device: str, started: float, tok_dir: Path,
                      gguf: Path | None, weights_digest, compressed: dict[str, Any] | None, legacy,
                      tolerated: list[str]) -> dict[str, Any]:
    """The loaded checkpoint's description: format, dtype, device, kernels, load time, size and audit notes."""
    description = {
        "format": fmt,
        "dtype": dtype,
        "device": str(device),
        "kernels": _quantized_kernels(model),
        "load_seconds": round(time.perf_counter() - started, 3),
        "size_bytes": checkpoint_size_bytes(gguf or path),
        "tokenizer_from": str(tok_dir),
    }
    if gguf is not None:
        from .gguf_build import gguf_tensor_types

        description.update(kernels=["torch (GGUF dequantized)"], gguf_tensor_types=gguf_tensor_types(gguf))
    if fmt == "bnb":
        description["weights_digest"] = "verified against the build record" if weights_digest else "no build record"
    if compressed is not None:
        description.update(kernels=[compressed.pop("kernel")], compressed_tensors=compressed)
    if legacy is not None:
        description["legacy_layout"] = "AutoGPTQ (weights file and/or quantize_config.json), GPTQ v1 zero points"
    if tolerated:
        description["ignored_zero_biases"] = len(tolerated)
    return description


def _describe_quantization_args(args) -> str | None:
    if args is None:
        return None
    grouping = f"group {args.group_size}" if args.group_size else str(args.strategy)
    timing = "dynamic" if args.dynamic else "static"
    return f"{args.type}{args.num_bits} {grouping}, {'symmetric' if args.symmetric else 'asymmetric'}, {timing}"


def decompress_compressed_tensors(model, what: str) -> dict[str, Any]:
    """Unpack a compressed-tensors checkpoint's weights now, not on the first forward pass.

    transformers leaves the weights packed (int4 in int32, int8, FP8) and compressed-tensors
    unpacks them in a hook on the first forward; doing it here puts that time in the load time
    and lets the NaN/Inf audit see the weights the model computes with. Input-activation
    quantization (W8A8, FP8 dynamic) stays on the modules and runs in torch on every forward.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    compressor = getattr(quantizer, "compressor", None)
    if compressor is None or compressor.quantization_config is None:
        raise LoadAuditError(f"{what}: declared compressed-tensors, but the checkpoint's config.json has no "
                             "compressed-tensors quantization_config")
    config = compressor.quantization_config
    compressor.decompress_model(model)
    groups = list(config.config_groups.values())
    quantized = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
    activations = {_describe_quantization_args(g.input_activations) for g in groups} - {None}
    return {
        "kernel": "torch (compressed-tensors: weights unpacked at load"
                  + ("; activations quantized per forward" if activations else "") + ")",
        "storage_format": config.format,
        "weights": sorted({_describe_quantization_args(g.weights) for g in groups} - {None}),
        "input_activations": sorted(activations) or None,
        "ignored": list(config.ignore or ()),
        "quantized_modules": quantized,
    }


def release(loaded: LoadedCheckpoint | None) -> None:
    """Drop a model and give its memory back before the next one loads."""
    if loaded is None:
        return
    import gc

    device = loaded.description.get("device", "cpu")
    close = getattr(loaded.model, "close", None)  # llama.cpp models hold native memory
    if callable(close):
        close()
    loaded.model = loaded.backend = None
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
