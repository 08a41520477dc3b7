"""Stored FP16 baselines: reviewable JSON plus a compact per-token array file.

Layout: baselines/<model>/<corpus>.<profile>.json and .npz beside it (<corpus>.<profile>.llamacpp.json
for the llama.cpp backend's reference, the F16 GGUF scored by llama.cpp). The JSON holds the
summary and its provenance (protocol, environment, git commit, date, reference checkpoint
hash); the .npz holds the per-token log-probabilities and document starts that paired
statistics need. Files are only written by `quantgate baseline`, atomically (temp file +
rename), and read strictly: a corrupt file, a wrong hash or an unknown schema is refused
with a message that names the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BaselineFormatError, BaselineMissing
from .protocol import Protocol, fingerprint_of

SCHEMA_VERSION = 2
# What each older schema lacks, and the value it implies: schema 1 predates the protocol's
# backend field, and every schema-1 baseline was scored by transformers.
SCHEMA_DEFAULTS = {1: {"backend": "transformers"}}
KIND = "quantgate-baseline"


@dataclass
class Baseline:
    model: str
    corpus: str
    profile: str
    protocol: Protocol
    perplexity: float
    mean_nll: float
    environment: dict[str, Any]
    provenance: dict[str, Any]
    logprobs: np.ndarray  # float32 per scored token, stream order
    doc_starts: np.ndarray  # int64
    path: Path | None = None


def baseline_path(baselines_dir: Path, model: str, corpus: str, profile: str, backend: str = "transformers") -> Path:
    suffix = "" if backend == "transformers" else "." + backend.replace(".", "")
    return Path(baselines_dir) / model / f"{corpus}.{profile}{suffix}.json"


def git_state(cwd: Path) -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = run("rev-parse", "HEAD")
    dirty = run("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(dirty) if dirty is not None else None}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(path: Path) -> str:
    """Hash of every weight and config file of a checkpoint (names and contents)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".gguf", ".json"}
        and p.name != "training.json")
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(file_sha256(p).encode())
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; baselines are shared through git
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_baseline(baseline: Baseline, path: Path) -> Path:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, logprobs=baseline.logprobs.astype(np.float32),
                        doc_starts=baseline.doc_starts.astype(np.int64))
    arrays = buffer.getvalue()
    arrays_path = path.with_suffix(".npz")
    document = {
        "kind": KIND,
        "schema": SCHEMA_VERSION,
        "model": baseline.model,
        "corpus": baseline.corpus,
        "profile": baseline.profile,
        "summary": {
            "perplexity": baseline.perplexity,
            "mean_nll": baseline.mean_nll,
            "tokens_scored": baseline.protocol.tokens_scored,
        },
        "protocol_fingerprint": baseline.protocol.fingerprint,
        "protocol": baseline.protocol.as_dict(),
        "environment": baseline.environment,
        "provenance": baseline.provenance,
        "arrays": {"file": arrays_path.name, "sha256": hashlib.sha256(arrays).hexdigest(),
                   "logprobs": "float32 log p(token) per scored token, stream order",
                   "doc_starts": "int64 token index of each document's first token"},
    }
    # Arrays first: a JSON that exists always points at complete arrays.
    _atomic_write(arrays_path, arrays)
    _atomic_write(path, (json.dumps(document, indent=2, sort_keys=False) + "\n").encode())
    baseline.path = path
    return path


def _field(doc: dict, dotted: str, path: Path, kind: type | tuple = object):
    value: Any = doc
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise BaselineFormatError(f"{path}: malformed baseline, key '{dotted}' is missing")
        value = value[part]
    if not isinstance(value, kind):
        raise BaselineFormatError(f"{path}: malformed baseline, key '{dotted}' has the wrong type ({value!r})")
    return value


def read_baseline(path: Path, *, create_hint: str = "quantgate baseline") -> Baseline:
    path = Path(path)
    if not path.is_file():
        raise BaselineMissing(f"no FP16 baseline at {path}; create it with: {create_hint}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineFormatError(f"{path}: not valid JSON ({exc}); restore it from git or re-create it") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise BaselineFormatError(f"{path}: not a quantgate baseline (kind {doc.get('kind') if isinstance(doc, dict) else None!r})")
    schema = _field(doc, "schema", path, int)
    if schema > SCHEMA_VERSION:
        raise BaselineFormatError(
            f"{path}: baseline schema {schema} was written by a newer quantgate (this one reads <= {SCHEMA_VERSION}); upgrade quantgate")
    if schema < 1:
        raise BaselineFormatError(f"{path}: unknown baseline schema {schema}")
    stored = _field(doc, "protocol", path, dict)
    try:
        protocol = Protocol.from_dict(stored, defaults=SCHEMA_DEFAULTS.get(schema))
    except (KeyError, TypeError) as exc:
        raise BaselineFormatError(f"{path}: malformed protocol: {exc}") from None
    if _field(doc, "protocol_fingerprint", path, str) != fingerprint_of(stored):
        raise BaselineFormatError(f"{path}: protocol_fingerprint does not match its protocol (edited by hand?)")
    arrays_path = path.parent / _field(doc, "arrays.file", path, str)
    if not arrays_path.is_file():
        raise BaselineFormatError(f"{path}: its array file {arrays_path.name} is missing")
    raw = arrays_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != _field(doc, "arrays.sha256", path, str):
        raise BaselineFormatError(f"{arrays_path}: contents do not match the hash recorded in {path.name}")
    with np.load(io.BytesIO(raw)) as npz:
        logprobs, doc_starts = npz["logprobs"], npz["doc_starts"]
    if logprobs.size != protocol.tokens_scored:
        raise BaselineFormatError(f"{arrays_path}: {logprobs.size} scores for {protocol.tokens_scored} tokens")
    return Baseline(
        model=_field(doc, "model", path, str), corpus=_field(doc, "corpus", path, str),
        profile=_field(doc, "profile", path, str), protocol=protocol,
        perplexity=float(_field(doc, "summary.perplexity", path, (int, float))),
        mean_nll=float(_field(doc, "summary.mean_nll", path, (int, float))),
        environment=_field(doc, "environment", path, dict), provenance=_field(doc, "provenance", path, dict),
        logprobs=logprobs, doc_starts=doc_starts, path=path,
    )


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
