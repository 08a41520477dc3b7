"""The protocol: everything that makes two perplexities comparable, with a stable fingerprint.

Perplexity moves with the protocol (the HF docs show GPT-2-large on WikiText-2 going from
19.44 to 16.44 by halving the stride), so a baseline is only ever compared with a
measurement made under an identical protocol. Library versions and the exact device are
the *environment*: recorded beside the protocol and reported when they change, but not
part of the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from typing import Any

# Bump when the scoring code changes what a number means.
SCORING_RULE = "token-weighted-mean-nll/sliding-window/context-masked/v1"


class ProtocolBase:
    """What every protocol does, whatever it fixes: a dict with a stable fingerprint, compared by value.

    Two kinds share it: `Protocol` (a corpus scored by sliding windows) and `TaskProtocol` (a task's
    items scored one by one). A field named "kernels" is left out of the dict (and so of the
    fingerprint) when empty, so that adding pinned kernels to one backend moved no other fingerprint."""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not data.get("kernels", True):
            del data["kernels"]
        return data

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.as_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, defaults: dict[str, Any] | None = None):
        """Strict: every field must be present, except those given `defaults` (older schemas)."""
        names = {f.name for f in fields(cls)}
        data = {"kernels": "", **(defaults or {}), **data}
        missing = names - data.keys()
        if missing:
            raise KeyError(f"protocol lacks {sorted(missing)}")
        return cls(**{k: data[k] for k in names})

    def matches(self, other: "ProtocolBase") -> bool:
        """Same protocol, by value (not by class identity: baselines come back from JSON)."""
        return self.as_dict() == other.as_dict()

    def differences(self, other: "ProtocolBase") -> list[str]:
        """Human-readable 'field: ours != theirs' lines."""
        a, b = self.as_dict(), other.as_dict()
        return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in [*a, *(k for k in b if k not in a)] if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class Protocol(ProtocolBase):
    """A corpus scored by sliding windows (perplexity, KL, top-1)."""

    corpus: str  # corpus name in the manifest
    corpus_source: str  # builder or hub id, config, split, revision, files (see corpus.describe_source)
    text_sha256: str
    documents: int
    joiner: str  # escaped ("\\n\\n"), so that snapshot diffs stay on one line
    tokenizer_sha256: str
    tokens_sha256: str  # of the token stream actually scored (after the token cap)
    add_bos: bool
    max_length: int
    stride: int
    token_cap: int | None
    scoring_rule: str
    dtype: str
    device_class: str  # "cpu" or "cuda": kernels differ between them
    tokens_scored: int
    backend: str = "transformers"  # whose kernels score: "transformers" (torch) or "llama.cpp"
    # the backend's pinned kernel choices that move numbers (llama.cpp: flash attention, KV cache type);
    # left out of the dict (and so of the fingerprint) when empty, as for transformers
    kernels: str = ""


@dataclass(frozen=True)
class TaskProtocol(ProtocolBase):
    """A task's items scored one by one: everything that changes its score (tasks/suite.py)."""

    task: str
    schema: str
    source: str
    items: int
    items_sha256: str  # of the rendered prompts, choices and answers (shots and template included)
    shots: int
    scoring: str
    max_length: int
    max_new_tokens: int | None  # None for kinds that do not generate
    tokenizer_sha256: str
    backend: str
    dtype: str
    device_class: str
    rule: str
    kernels: str = ""


def fingerprint_of(protocol: dict[str, Any]) -> str:
    canonical = json.dumps(protocol, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def device_class(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


_ENV_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "numpy", "safetensors",
                 "accelerate", "gptqmodel", "optimum", "gguf", "llama-cpp-python", "quantgate")


def environment(device: str | None = None) -> dict[str, Any]:
    """Library versions and hardware: recorded beside a protocol, compared only for reporting."""
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _ENV_PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if device is not None:
        env["device"] = describe_device(device)
    return env


def describe_device(device: str) -> str:
    if device_class(device) == "cuda":
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def environment_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(recorded) | set(current))
    return [f"{k}: {recorded.get(k, '-')} -> {current.get(k, '-')}"
            for k in keys if k != "platform" and recorded.get(k) != current.get(k)]
