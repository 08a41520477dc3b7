"""Where a checkpoint's layers go when it does not fit one device: a model or variant's placement keys.

For checkpoints transformers loads, accelerate's big-model inference takes them as `from_pretrained` does:
`device_map` ("auto", "balanced", "sequential", a device, or a table of module name -> device), `max_memory`
(device -> size, e.g. {0 = "70GiB", cpu = "200GiB"}) and `offload_folder` (where layers that fit nowhere go, on
disk). For GGUF files that llama.cpp scores: `n_gpu_layers`, `split_mode` ("none", "layer", "row") and
`tensor_split` (a share per GPU), as llama.cpp takes them.

A variant's keys override its model's. Placement moves where a layer computes, not what it computes, so it is
recorded beside each result (the JSON record's `placement`), not in the protocol: a baseline stays comparable.
`tests/test_placement.py` shows that the demo model offloaded to disk gives the same per-token log-probs as the
model loaded whole, and that the load audit still reads every weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRANSFORMERS_KEYS = ("device_map", "max_memory", "offload_folder")
LLAMA_CPP_KEYS = ("n_gpu_layers", "split_mode", "tensor_split")
SPLIT_MODES = ("none", "layer", "row")


@dataclass(frozen=True)
class Placement:
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[str, Any] | None = None
    offload_folder: Path | None = None
    n_gpu_layers: int | None = None
    split_mode: str | None = None
    tensor_split: tuple[float, ...] | None = None

    def keys(self) -> tuple[str, ...]:
        """The keys that are set."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def over(self, base: Placement) -> Placement:
        """These keys, and `base`'s where these are not set (a variant's over its model's)."""
        return dataclasses.replace(base, **{k: getattr(self, k) for k in self.keys()})

    def transformers_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` arguments; device_map "auto" when only a memory limit or a folder is given."""
        if not any(getattr(self, k) is not None for k in TRANSFORMERS_KEYS):
            return {}
        kwargs: dict[str, Any] = {"device_map": self.device_map if self.device_map is not None else "auto"}
        if self.max_memory is not None:
            kwargs["max_memory"] = {_device_key(k): v for k, v in self.max_memory.items()}
        if self.offload_folder is not None:
            self.offload_folder.mkdir(parents=True, exist_ok=True)
            kwargs["offload_folder"] = str(self.offload_folder)
        return kwargs

    def record(self) -> dict[str, Any] | None:
        """The keys that are set, as JSON values (what a result records); None when nothing is set."""
        out = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
               for k in self.keys() for v in [getattr(self, k)]}
        return out or None


def _device_key(key: str) -> str | int:
    """TOML keys are strings; accelerate names GPUs by index."""
    return int(key) if isinstance(key, str) and key.isdigit() else key


def parse_placement(table, root: Path) -> Placement:
    """The placement keys of a [models.NAME] table or a variant (a manifest._Table), checked."""
    device_map = table.take("device_map", (str, dict), None)
    max_memory = table.take("max_memory", dict, None)
    folder = table.take("offload_folder", str, None)
    n_gpu_layers = table.take("n_gpu_layers", int, None)
    split_mode = table.take("split_mode", str, None, choices=SPLIT_MODES)
    tensor_split = table.take("tensor_split", list, None)
    from .errors import ManifestError

    for name, value in (max_memory or {}).items():
        if not isinstance(value, (str, int)):
            raise ManifestError(table.file, f"{table.key('max_memory')}.{name}",
                                f"must be a size (\"20GiB\") or a number of bytes, not {value!r}")
    if isinstance(device_map, dict):
        for name, value in device_map.items():
            if not isinstance(value, (str, int)):
                raise ManifestError(table.file, f"{table.key('device_map')}.{name}",
                                    f"must name a device (\"cpu\", \"disk\", 0, \"cuda:1\"), not {value!r}")
    if n_gpu_layers is not None and n_gpu_layers < -1:
        raise ManifestError(table.file, table.key("n_gpu_layers"), "must be -1 (all layers) or a layer count >= 0")
    if tensor_split is not None and not all(isinstance(x, (int, float)) and x >= 0 for x in tensor_split):
        raise ManifestError(table.file, table.key("tensor_split"), f"must list a non-negative share per GPU, not {tensor_split!r}")
    return Placement(device_map=device_map, max_memory=max_memory, offload_folder=root / folder if folder else None,
                     n_gpu_layers=n_gpu_layers, split_mode=split_mode,
                     tensor_split=tuple(float(x) for x in tensor_split) if tensor_split is not None else None)
