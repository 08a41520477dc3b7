"""Stored FP16 task baselines: the reference's per-item correctness under a task protocol.

Layout: baselines/<model>/tasks/<task>.<profile>.json (".llamacpp" before ".json" for the
llama.cpp backend's reference). One reviewable JSON file: the protocol and its fingerprint, the
score, and per item its id, whether FP16 got it right and what it answered, so that a variant can
be compared item by item (paired). Written only by `quantgate baseline`, atomically; read strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends import DEFAULT_BACKEND
from ..errors import BaselineFormatError
from ..protocol import TaskProtocol, fingerprint_of

KIND = "quantgate-task-baseline"
SCHEMA_VERSION = 1


@dataclass
class TaskBaseline:
    model: str
    task: str
    profile: str
    capability: str
    protocol: TaskProtocol
    ids: list[str]
    correct: list[bool]
    answers: list[Any]
    environment: dict[str, Any]
    provenance: dict[str, Any]
    path: Path | None = None

    @property
    def score(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def fingerprint(self) -> str:
        return self.protocol.fingerprint


def task_baseline_path(baselines_dir: Path, model: str, task: str, profile: str, backend: str = DEFAULT_BACKEND) -> Path:
    from ..backends import get_backend

    return Path(baselines_dir) / model / "tasks" / f"{task}.{profile}{get_backend(backend).suffix}.json"


def write_task_baseline(baseline: TaskBaseline, path: Path) -> Path:
    import json

    from ..baselines import _atomic_write

    document = {
        "kind": KIND, "schema": SCHEMA_VERSION, "model": baseline.model, "task": baseline.task,
        "profile": baseline.profile, "capability": baseline.capability,
        "summary": {"score": baseline.score, "items": len(baseline.ids), "correct": sum(baseline.correct)},
        "protocol_fingerprint": baseline.fingerprint, "protocol": baseline.protocol.as_dict(),
        "environment": baseline.environment, "provenance": baseline.provenance,
        "items": [{"id": i, "correct": c, "answer": a}
                  for i, c, a in zip(baseline.ids, baseline.correct, baseline.answers, strict=True)],
    }
    _atomic_write(path, (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    baseline.path = path
    return path


def read_task_baseline(path: Path, *, create_hint: str = "quantgate baseline") -> TaskBaseline:
    from ..baselines import read_document

    path = Path(path)
    doc = read_document(path, KIND, "task baseline", create_hint)
    if doc.get("schema") != SCHEMA_VERSION:
        raise BaselineFormatError(f"{path}: task baseline schema {doc.get('schema')!r}, this quantgate reads "
                                  f"{SCHEMA_VERSION}")
    try:
        protocol, items = doc["protocol"], doc["items"]
        if not isinstance(protocol, dict) or not isinstance(items, list):
            raise TypeError("protocol must be a table and items a list")
        if doc["protocol_fingerprint"] != fingerprint_of(protocol):
            raise BaselineFormatError(f"{path}: protocol_fingerprint does not match its protocol (edited by hand?)")
        ids = [str(x["id"]) for x in items]
        correct = [x["correct"] for x in items]
        if not all(isinstance(c, bool) for c in correct):
            raise TypeError("every item's 'correct' must be true or false")
        if len(ids) != protocol.get("items") or len(set(ids)) != len(ids):
            raise ValueError(f"{len(ids)} items (unique: {len(set(ids))}) for a protocol of {protocol.get('items')}")
        protocol = TaskProtocol.from_dict(protocol)
        return TaskBaseline(model=str(doc["model"]), task=str(doc["task"]), profile=str(doc["profile"]),
                            capability=str(doc["capability"]), protocol=protocol, ids=ids, correct=correct,
                            answers=[x.get("answer") for x in items], environment=dict(doc["environment"]),
                            provenance=dict(doc["provenance"]), path=path)
    except (KeyError, TypeError, ValueError) as exc:
        raise BaselineFormatError(f"{path}: malformed task baseline ({type(exc).__name__}: {exc})") from None
