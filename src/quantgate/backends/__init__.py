"""Scoring backends: one interface (`ScoringBackend`), and a registry of the engines that implement it.

A registered `Backend` owns everything that differs between engines: how it loads a checkpoint,
which formats it scores, the numerics its protocols record (dtype, device class, pinned kernels),
where its FP16 reference comes from (transformers: the reference checkpoint; llama.cpp: the F16
GGUF written from it, so that kernel differences are not blamed on quantization), what a baseline
records about that reference, and the suffix of its baseline files. Nothing outside this package
compares a backend's name: a new engine is one module that calls `register_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .base import ScoringBackend

DEFAULT_BACKEND = "transformers"


@dataclass(frozen=True)
class Backend:
    name: str
    suffix: str  # before ".json" in a baseline's file name ("" for the default backend)
    formats: tuple[str, ...] | None  # the checkpoint formats it scores; None: every loadable format
    load: Callable[..., Any]  # (path, *, fmt, dtype, device, what, tokenizer_path) -> LoadedCheckpoint
    require: Callable[[str, str], None]  # (format, what): raise BackendUnavailable when its library is absent
    numerics: Callable[[str, str], dict[str, str]]  # (manifest dtype, device) -> the protocol's dtype/device_class[/kernels]
    reference: Callable[[Any, Any, str], tuple[Path, str, str]]  # (manifest, model, sha) -> (path, format, label)
    provenance: Callable[[Any, Any, str], dict[str, Any]] = lambda manifest, ref, sha: {}  # a baseline's extra record
    placement_keys: tuple[str, ...] = ()  # the manifest's placement keys its loader takes (placement.py)
    placement_formats: tuple[str, ...] | None = None  # formats it can place that way; None: every format it scores

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_BACKEND

    def label(self, what: str) -> str:
        """`what` (a profile, a model/corpus) with this backend named unless it is the default."""
        return what if self.is_default else f"{what} ({self.name})"

    def option(self) -> str:
        """The CLI words that select it (none for the default)."""
        return "" if self.is_default else f" --backend {self.name}"

    def scores(self, fmt: str) -> bool:
        return self.formats is None or fmt in self.formats


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name in _REGISTRY and _REGISTRY[backend.name] is not backend:
        from ..errors import QuantgateError

        raise QuantgateError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    return backend


def _builtins() -> None:
    from . import hf, llamacpp  # noqa: F401  (each registers itself)


def registered_backends() -> list[Backend]:
    _builtins()
    return list(_REGISTRY.values())


def backend_names() -> tuple[str, ...]:
    return tuple(b.name for b in registered_backends())


def get_backend(name: str) -> Backend:
    _builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        from ..errors import QuantgateError

        raise QuantgateError(f"no backend {name!r} is registered (known: {', '.join(sorted(_REGISTRY))})") from None


__all__ = ["DEFAULT_BACKEND", "Backend", "ScoringBackend", "backend_names", "get_backend", "register_backend",
           "registered_backends"]
