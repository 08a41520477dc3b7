"""Stored FP16 baselines: reviewable JSON plus a compact per-token array file.

Layout: baselines/<model>/<corpus>.<profile>.json and .npz beside it (<corpus>.<profile>.llamacpp.json
for the llama.cpp backend's reference, the F16 GGUF scored by llama.cpp). The JSON holds the
summary and its provenance (protocol, environment, git commit, date, reference checkpoint
hash); the .npz holds what paired statistics need: per scored token the log-probability of the
true token and the reference's top-k next tokens with their log-probabilities (the mass outside
them is 1 - their sum), plus document starts. Files are only written by `quantgate baseline`, and read strictly:
a corrupt file, a wrong hash or an unknown schema is refused with a message that names the file.

One commit across both files: the arrays go to a new file named by their hash
(<corpus>.<profile>.<sha12>.npz), then the JSON that names them replaces the old JSON in one
rename, then the old arrays, no longer named by anything, are removed. A kill at any point leaves
the old baseline or the new one, each whole; at worst an unreferenced array file, removed by the
next write. Every number the gate takes from a baseline is checked on read: perplexity and mean
NLL against the hashed arrays (hand-edited summaries are refused by file name), and the numbers
that cannot be derived from them (the noise floor) are covered by `integrity.sha256` (schema 4).
Schema 3 files, which named their arrays <corpus>.<profile>.npz, are read as they are; one whose
noise floor would widen the bounds has nothing covering it and is refused with the command that
rewrites it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import DEFAULT_BACKEND
from .errors import BaselineFormatError, BaselineMissing
from .protocol import Protocol, fingerprint_of

SCHEMA_VERSION = 4
# summary numbers against those recomputed from the stored log-probs: schema 3 stored them as float32,
# which moves the mean NLL by ~1e-9; a hand edit moves it by far more
SUMMARY_TOLERANCE = 1e-7
# What each older schema lacks, and the value it implies: schema 1 predates the protocol's
# backend field, and every schema-1 baseline was scored by transformers. Schemas 1 and 2 hold no
# top-k distributions: perplexity still compares, KL divergence asks for a re-baseline.
SCHEMA_DEFAULTS = {1: {"backend": DEFAULT_BACKEND}}
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
    logprobs: np.ndarray  # per scored token, stream order (float64; float32 in schema 3)
    doc_starts: np.ndarray  # int64
    topk_ids: np.ndarray | None = None  # (n, k) the reference's k most likely next tokens, best first
    topk_logprobs: np.ndarray | None = None  # float32 (n, k) their log-probabilities
    noise: dict[str, Any] | None = None  # how far re-scoring the reference moved it (GPU non-determinism)
    path: Path | None = None

    @property
    def noise_log_ratio(self) -> float:
        return float((self.noise or {}).get("log_ratio", 0.0))

    @property
    def noise_top1(self) -> float:
        return float((self.noise or {}).get("top1_disagreement", 0.0))

    @property
    def top_k(self) -> int | None:
        return None if self.topk_ids is None else int(self.topk_ids.shape[1])

    def require_distributions(self, top_k: int, command: str) -> None:
        """KL divergence needs the reference's top-k rows, with the k the manifest asks for."""
        if self.topk_ids is None:
            raise BaselineMissing(f"{self.path}: this baseline has no top-k distributions (an older schema); "
                                  f"KL divergence and top-1 agreement need them: {command} --force")
        if self.top_k != top_k:
            raise BaselineMissing(f"{self.path}: stores the top {self.top_k} tokens per position, the manifest asks "
                                  f"for top_k = {top_k}; re-baseline: {command} --force")


def baseline_path(baselines_dir: Path, model: str, corpus: str, profile: str, backend: str = DEFAULT_BACKEND) -> Path:
    from .backends import get_backend

    return Path(baselines_dir) / model / f"{corpus}.{profile}{get_backend(backend).suffix}.json"


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


_FILE_HASHES: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256: a checkpoint is read once per process


def file_sha256(path: Path) -> str:
    """sha256 of a file's contents, remembered while its path, inode, size and modification time stay the same
    (the build step and the gate hash the same reference many times; gigabytes for a real model)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


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
    try:  # the rename itself survives a crash of the machine only once the directory is on disk
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_baseline(baseline: Baseline, path: Path) -> Path:
    buffer = io.BytesIO()
    # float64: the summary and the gate's ratio are recomputed from these, and must equal what the
    # reference measured (schema 3 stored float32, which moves a perplexity by ~1e-8)
    arrays: dict[str, np.ndarray] = {"logprobs": baseline.logprobs.astype(np.float64),
                                     "doc_starts": baseline.doc_starts.astype(np.int64)}
    if baseline.topk_ids is not None:
        small_vocab = baseline.topk_ids.size == 0 or int(baseline.topk_ids.max()) < 2 ** 16
        arrays["topk_ids"] = baseline.topk_ids.astype(np.uint16 if small_vocab else np.int32)
        arrays["topk_logprobs"] = baseline.topk_logprobs.astype(np.float32)
    np.savez_compressed(buffer, **arrays)
    data = buffer.getvalue()
    arrays_sha = hashlib.sha256(data).hexdigest()
    arrays_path = path.parent / f"{path.stem}.{arrays_sha[:12]}.npz"
    mean_nll = _mean_nll(arrays["logprobs"])  # what a reader recomputes from the stored arrays
    document = {
        "kind": KIND,
        "schema": SCHEMA_VERSION,
        "model": baseline.model,
        "corpus": baseline.corpus,
        "profile": baseline.profile,
        "summary": {
            "perplexity": math.exp(mean_nll),
            "mean_nll": mean_nll,
            "tokens_scored": baseline.protocol.tokens_scored,
        },
        **({"noise_floor": baseline.noise} if baseline.noise is not None else {}),
        "protocol_fingerprint": baseline.protocol.fingerprint,
        "protocol": baseline.protocol.as_dict(),
        "environment": baseline.environment,
        "provenance": baseline.provenance,
        "arrays": {"file": arrays_path.name, "sha256": arrays_sha,
                   "logprobs": "float64 log p(token) per scored token, stream order",
                   "doc_starts": "int64 token index of each document's first token",
                   **({"topk_ids": f"uint16/int32 (tokens, {baseline.top_k}) the reference's most likely next tokens",
                       "topk_logprobs": "float32 their log-probabilities (the rest of the mass: 1 - their sum)",
                       "top_k": baseline.top_k} if baseline.topk_ids is not None else {})},
    }
    document["integrity"] = {"sha256": _integrity(document),
                             "covers": "summary, noise_floor, protocol_fingerprint and arrays.sha256"}
    previous = _referenced_arrays(path)
    _atomic_write(arrays_path, data)  # a new name: the old JSON still names the old arrays
    _atomic_write(path, (json.dumps(document, indent=2, sort_keys=False) + "\n").encode())  # the commit
    _remove_unreferenced(path, keep=arrays_path, also=previous)
    baseline.path = path
    return path


def _mean_nll(logprobs: np.ndarray) -> float:
    return float(-np.mean(logprobs.astype(np.float64)))


def _integrity(doc: dict) -> str:
    covered = {"summary": doc.get("summary"), "noise_floor": doc.get("noise_floor"),
               "protocol_fingerprint": doc.get("protocol_fingerprint"), "arrays": (doc.get("arrays") or {}).get("sha256")}
    return hashlib.sha256(json.dumps(covered, sort_keys=True).encode()).hexdigest()


def _referenced_arrays(path: Path) -> Path | None:
    try:
        name = json.loads(path.read_text())["arrays"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path.parent / name if isinstance(name, str) and "/" not in name else None


def _remove_unreferenced(path: Path, *, keep: Path, also: Path | None) -> None:
    """Array files of this baseline that its JSON no longer names: the previous ones, and any left by a
    write that was killed before its commit."""
    own = re.compile(re.escape(path.stem) + r"(\.[0-9a-f]{12})?\.npz")
    for candidate in {*(p for p in path.parent.glob("*.npz") if own.fullmatch(p.name)), *([also] if also else [])}:
        if candidate != keep:
            candidate.unlink(missing_ok=True)


def _field(doc: dict, dotted: str, path: Path, kind: type | tuple = object):
    value: Any = doc
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise BaselineFormatError(f"{path}: malformed baseline, key '{dotted}' is missing")
        value = value[part]
    if not isinstance(value, kind):
        raise BaselineFormatError(f"{path}: malformed baseline, key '{dotted}' has the wrong type ({value!r})")
    return value


def read_document(path: Path, kind: str, what: str, create_hint: str) -> dict:
    """A stored baseline's JSON document, or an error naming the file: missing, not JSON, another kind."""
    if not path.is_file():
        raise BaselineMissing(f"no FP16 {what} at {path}; create it with: {create_hint}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineFormatError(f"{path}: not valid JSON ({exc}); restore it from git or re-create it") from None
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise BaselineFormatError(f"{path}: not a quantgate {what} (kind {doc.get('kind') if isinstance(doc, dict) else None!r})")
    return doc


def read_baseline(path: Path, *, create_hint: str = "quantgate baseline") -> Baseline:
    path = Path(path)
    doc = read_document(path, KIND, "baseline", create_hint)
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
        topk_ids = npz["topk_ids"].astype(np.int64) if "topk_ids" in npz else None
        topk_logprobs = npz["topk_logprobs"] if "topk_logprobs" in npz else None
    if logprobs.size != protocol.tokens_scored:
        raise BaselineFormatError(f"{arrays_path}: {logprobs.size} scores for {protocol.tokens_scored} tokens")
    if (topk_ids is None) != (topk_logprobs is None) or (
            topk_ids is not None and not (topk_ids.shape == topk_logprobs.shape and len(topk_ids) == logprobs.size)):
        raise BaselineFormatError(f"{arrays_path}: top-k arrays do not match each other or the {logprobs.size} scores")
    mean_nll = _mean_nll(logprobs)  # the numbers the gate uses come from the hashed arrays
    for key, recomputed in (("summary.mean_nll", mean_nll), ("summary.perplexity", math.exp(mean_nll))):
        stored = float(_field(doc, key, path, (int, float)))
        if not math.isclose(stored, recomputed, rel_tol=SUMMARY_TOLERANCE):
            raise BaselineFormatError(f"{path}: {key} {stored!r} does not match its arrays ({recomputed!r}, from "
                                      f"{arrays_path.name}): edited by hand? Restore it from git, or re-measure: "
                                      f"{create_hint} --force")
    noise = doc.get("noise_floor") if isinstance(doc.get("noise_floor"), dict) else None
    if schema >= 4 and _field(doc, "integrity.sha256", path, str) != _integrity(doc):
        raise BaselineFormatError(f"{path}: its summary or noise floor does not match integrity.sha256 (edited by "
                                  f"hand?); restore it from git, or re-measure: {create_hint} --force")
    widens = noise is not None and (float(noise.get("log_ratio", 0.0)) != 0.0
                                    or float(noise.get("top1_disagreement", 0.0)) != 0.0)
    if schema < 4 and widens:  # nothing covers it, and it would loosen the bounds
        raise BaselineFormatError(f"{path}: a schema {schema} baseline whose noise floor widens the bounds and nothing "
                                  f"verifies; rewrite it with: {create_hint} --force")
    return Baseline(
        model=_field(doc, "model", path, str), corpus=_field(doc, "corpus", path, str),
        profile=_field(doc, "profile", path, str), protocol=protocol,
        perplexity=math.exp(mean_nll), mean_nll=mean_nll,
        environment=_field(doc, "environment", path, dict), provenance=_field(doc, "provenance", path, dict),
        logprobs=logprobs, doc_starts=doc_starts, topk_ids=topk_ids, topk_logprobs=topk_logprobs,
        noise=noise, path=path,
    )


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
