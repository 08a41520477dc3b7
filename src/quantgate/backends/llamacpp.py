"""Scoring a GGUF file with llama.cpp's own kernels (through llama-cpp-python's C API bindings).

This is the number a llama.cpp user gets; transformers' ``gguf_file=`` loader dequantizes to
float and runs torch, which measures the weights but not llama.cpp's quantized matmuls.

Each window is decoded on a cleared KV cache in one ``llama_decode`` call, asking for logits
only at the positions that predict scored targets. The high-level ``llama_cpp.Llama`` is not
used: it cannot switch off llama.cpp's extra (weight-repacking) buffer types at load. Those pick
CPU-specific kernels (AMX, AVX512/aarch64 repacks) that move Q4_K scores by ~1e-5 between
machines, and the AMX one has been seen to crash; the plain kernels give one answer everywhere.

Kernel choices that move numbers are pinned and recorded in the protocol (`NUMERICS`); the thread
count is not, since it does not change a result. Flash attention is set on explicitly: llama.cpp's
default ("auto") resolves per device, and on the CPU it means on (measured: logits identical to
"on", up to 0.11 apart from "off", a ratio moved by about 1e-4).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..perplexity import Window
from .base import ScoringBackend

NUMERICS = {"flash_attn": "on", "kv_cache": "f16", "weight_repack": "off"}


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def require_llama_cpp(what: str) -> None:
    """Raise BackendUnavailable (a skip, exit 125 under --quality-bisect) when llama-cpp-python is absent."""
    if not llama_cpp_available():
        from ..errors import BackendUnavailable

        raise BackendUnavailable(f"{what}: the llama.cpp backend needs llama-cpp-python, which is not installed "
                                 "(pip install 'quantgate[llamacpp]'; it compiles llama.cpp on install)")


def _import_llama_cpp():
    import llama_cpp

    # llama-cpp-python routes llama.cpp's log through this logger, and prints everything by default.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


class LlamaCppBackend(ScoringBackend):
    name = "llama.cpp"
    flash_attn_type = 1  # LLAMA_FLASH_ATTN_TYPE_ENABLED (NUMERICS); -1 is llama.cpp's per-device "auto"

    def __init__(self, gguf_path: Path, *, n_threads: int | None = None, n_ctx: int = 0, placement=None):
        lc = _import_llama_cpp()
        self._lc = lc
        self.path = Path(gguf_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self.n_threads = n_threads or max(1, len(os.sched_getaffinity(0)))
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        self.placement = placement.record() if placement is not None else None
        offloads = bool(placement is not None and placement.n_gpu_layers) and bool(lc.llama_supports_gpu_offload())
        self.device = "gpu" if offloads else "cpu"  # the PyPI build keeps every layer on the CPU whatever it is told
        shares = _place(lc, params, placement) if placement is not None else None  # noqa: F841 (alive until loaded)
        params.use_extra_bufts = False  # no CPU weight repacking (AMX / aarch64 paths)
        self._model = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        self._ctx = None
        self._n_ctx = 0
        if n_ctx:
            self._context(n_ctx)

    def vocabulary(self) -> list[str]:
        """Token strings by id, as the GGUF stores them (the ids this backend is fed must mean the same)."""
        lc = self._lc
        vocab = lc.llama_model_get_vocab(self._model)
        return [lc.llama_vocab_get_text(vocab, i).decode("utf-8", errors="replace") for i in range(self.n_vocab)]

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "n_threads": self.n_threads,
                "llama_cpp_python": getattr(self._lc, "__version__", "?"),
                **({"placement": self.placement} if self.placement else {})}

    def _context(self, n_tokens: int):
        """A context whose cache and batch hold a whole window; rebuilt only when a longer one comes."""
        lc = self._lc
        if self._ctx is not None and n_tokens <= self._n_ctx:
            return self._ctx
        self._free_context()
        # llama.cpp pads the KV cache to 256 anyway; batch limits must match it or a longer window
        # that fits the cache would overflow the batch.
        size = -(-n_tokens // 256) * 256
        params = lc.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = size
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.n_threads
        params.flash_attn_type = self.flash_attn_type
        params.type_k = params.type_v = lc.GGML_TYPE_F16
        params.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a {size}-token context for {self.path}")
        self._n_ctx = size
        self._batch = lc.llama_batch_init(size, 0, 1)
        return self._ctx

    def _window_logits(self, tokens: np.ndarray, first_output: int) -> np.ndarray:
        """float32 logits (len(tokens) - first_output - 1, n_vocab): rows predict tokens[first_output + 1:]."""
        lc = self._lc
        ctx = self._context(len(tokens))
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)  # fresh KV state per window
        batch = self._batch
        n = len(tokens)
        for i, token in enumerate(tokens.tolist()):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = first_output <= i < n - 1
        batch.n_tokens = n
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} on a {n}-token window")
        n_out = n - 1 - first_output
        # Outputs come back in the order of the flagged tokens; copy before the next decode reuses the buffer.
        return np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(n_out, self.n_vocab)).copy()

    def iter_logprobs(self, ids: np.ndarray, windows: Sequence[Window], batch_size: int):
        import torch

        # batch_size is ignored: one window per decode already fills the threads on CPU.
        ids = np.asarray(ids, dtype=np.int64)
        for w in windows:
            logits = torch.from_numpy(self._window_logits(ids[w.begin:w.end], w.score_from - 1 - w.begin))
            yield torch.log_softmax(logits.double(), dim=-1)

    def _decode_last(self, ctx, tokens: list[int], start: int) -> np.ndarray:
        """Append tokens to the KV cache at positions start.., returning the logits after the last one."""
        lc, batch = self._lc, self._batch
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at position {start}")
        return np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(1, self.n_vocab))[0].copy()

    def generate_until(self, context, *, max_new_tokens: int, max_length: int, stop=()) -> list[int]:
        """Greedy decoding on llama.cpp's KV cache: the context once, then one token per step."""
        keep = max(1, max_length - max_new_tokens)
        tokens = [int(t) for t in list(context)[-keep:]]
        ctx = self._context(len(tokens) + max_new_tokens)
        self._lc.llama_memory_clear(self._lc.llama_get_memory(ctx), True)
        logits = self._decode_last(ctx, tokens, 0)
        stop, generated = set(int(t) for t in stop), []
        for step in range(max_new_tokens):
            nxt = int(np.argmax(logits))
            if nxt in stop:
                break
            generated.append(nxt)
            if step + 1 < max_new_tokens:
                logits = self._decode_last(ctx, [nxt], len(tokens) + step)
        return generated

    def _free_context(self):
        if self._ctx is not None:
            self._lc.llama_batch_free(self._batch)
            self._lc.llama_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        """Free llama.cpp's model and context now (they live outside Python's heap)."""
        if getattr(self, "_model", None):
            self._free_context()
            self._lc.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _load(path, *, fmt: str, dtype: str, device: str, what: str, tokenizer_path=None, placement=None):
    """The llama.cpp backend's loader: a GGUF file scored by llama.cpp's own kernels."""
    from ..checkpoints.loading import LoadedCheckpoint, gguf_file
    from ..errors import LoadAuditError

    file = gguf_file(path, what)
    require_llama_cpp(what)
    # n_gpu_layers=0: llama.cpp scores on the CPU whatever `device` says (a CUDA build of
    # llama-cpp-python would need its own protocol device class).
    started = time.perf_counter()
    try:
        backend = LlamaCppBackend(file, placement=placement)
    except RuntimeError as exc:
        raise LoadAuditError(f"{what}: {exc} (llama.cpp refuses files with missing or malformed tensors; "
                             "its log says which)") from exc
    from ..checkpoints.gguf_build import gguf_tensor_types

    description = {
        "format": "gguf",
        "dtype": "native (llama.cpp kernels)",
        "device": "cpu",
        "kernels": ["llama.cpp CPU"],
        "load_seconds": round(time.perf_counter() - started, 3),
        "size_bytes": file.stat().st_size,
        "tokenizer_from": str(file),
        "gguf_tensor_types": gguf_tensor_types(file),
        "placement": backend.placement,
    }
    return LoadedCheckpoint(model=backend, tokenizer=None, description=description, backend=backend,
                            vocabulary=backend.vocabulary())


def _place(lc, params, placement):
    """A variant's n_gpu_layers, split_mode and tensor_split, as llama.cpp's model parameters take them. The PyPI
    build of llama-cpp-python is CPU-only: there llama.cpp accepts them and keeps every layer on the CPU."""
    if placement.n_gpu_layers is not None:
        params.n_gpu_layers = placement.n_gpu_layers
    if placement.split_mode is not None:
        params.split_mode = {"none": lc.LLAMA_SPLIT_MODE_NONE, "layer": lc.LLAMA_SPLIT_MODE_LAYER,
                             "row": lc.LLAMA_SPLIT_MODE_ROW}[placement.split_mode]
    if placement.tensor_split is not None:
        import ctypes

        shares = (ctypes.c_float * max(len(placement.tensor_split), lc.LLAMA_MAX_DEVICES))(*placement.tensor_split)
        params.tensor_split = shares
        return shares  # the caller keeps it alive until the model is loaded
    return None


def _require(fmt: str, what: str) -> None:
    require_llama_cpp(what)


def _numerics(dtype: str, device: str) -> dict[str, str]:
    """llama.cpp computes in its own (mixed) precision on the CPU, whatever the manifest says."""
    return {"dtype": "native", "device_class": "cpu", "kernels": ", ".join(f"{k}={v}" for k, v in NUMERICS.items())}


def _reference(manifest, ref, reference_sha256: str):
    from ..zoo import reference_gguf

    return reference_gguf(manifest, ref, reference_sha256), "gguf", f"reference {ref.name} (F16 GGUF)"


def _provenance(manifest, ref, reference_sha256: str) -> dict:
    """What a llama.cpp baseline scored: the F16 GGUF, by path and hash."""
    import os

    from ..baselines import file_sha256

    gguf = _reference(manifest, ref, reference_sha256)[0]
    return {"scored_file": os.path.relpath(gguf, manifest.root), "scored_sha256": file_sha256(gguf)}


def _register():
    from ..placement import LLAMA_CPP_KEYS
    from . import Backend, register_backend

    return register_backend(Backend(name=LlamaCppBackend.name, suffix=".llamacpp", formats=("gguf",), load=_load,
                                    require=_require, numerics=_numerics, reference=_reference,
                                    provenance=_provenance, placement_keys=LLAMA_CPP_KEYS))


BACKEND = _register()
