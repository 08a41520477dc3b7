"""The baseline store: one place for the FP16 baselines of corpora and tasks, used by the CLI and the gate.

A `Subject` is what a baseline is of (a model on a corpus or a task, scored by one backend). The
store knows where its file lives, the command that (re-)measures it, how to read it (verified: see
baselines.py and tasks/baseline.py for each kind's checks) and write it (atomically), and its
status against the protocol the manifest now gives: up to date, missing, unreadable, or differs
(with the differences, field by field). `quantgate baseline` writes only what is missing (or, with
--force, what differs); the gate compares only with a baseline that is up to date, and otherwise
refuses with the differences and the command, as pytest-regressions' `perform_regression_check`
does for its data files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import DEFAULT_BACKEND, get_backend
from .errors import BaselineFormatError, BaselineMissing, ProtocolMismatch

UP_TO_DATE, MISSING, DIFFERS, UNREADABLE = "up to date", "missing", "differs", "unreadable"


@dataclass(frozen=True)
class Subject:
    model: str
    name: str  # the corpus or the task
    kind: str = "corpus"  # "corpus" | "task"
    backend: str = DEFAULT_BACKEND

    @property
    def what(self) -> str:
        return f"{self.model}/{self.name}" if self.kind == "corpus" else f"{self.model}/task {self.name}"


@dataclass
class Status:
    state: str  # UP_TO_DATE, MISSING, DIFFERS or UNREADABLE
    baseline: Any = None
    differences: list[str] = field(default_factory=list)
    error: str | None = None


def _reader(kind: str):
    from . import baselines
    from .tasks import baseline as task_baselines

    return {"corpus": (baselines.read_baseline, baselines.write_baseline),
            "task": (task_baselines.read_task_baseline, task_baselines.write_task_baseline)}[kind]


class BaselineStore:
    def __init__(self, root: Path, profile: str, default_profile: str):
        self.root, self.profile, self.default_profile = Path(root), profile, default_profile

    def path(self, s: Subject) -> Path:
        suffix = get_backend(s.backend).suffix
        folder = self.root / s.model / ("tasks" if s.kind == "task" else "")
        return folder / f"{s.name}.{self.profile}{suffix}.json"

    def command(self, s: Subject) -> str:
        """The command that (re-)measures this baseline."""
        profile = "" if self.profile == self.default_profile else f" --profile {self.profile}"
        return f"quantgate baseline --model {s.model} --{s.kind} {s.name}{profile}{get_backend(s.backend).option()}"

    def read(self, s: Subject):
        """The stored baseline, verified; BaselineMissing / BaselineFormatError naming the file otherwise."""
        return _reader(s.kind)[0](self.path(s), create_hint=self.command(s))

    def write(self, s: Subject, baseline) -> Path:
        return _reader(s.kind)[1](baseline, self.path(s))

    def status(self, s: Subject, protocol, reference_sha256: str, *, top_k: int | None = None) -> Status:
        """The stored baseline against the protocol and reference checkpoint the manifest now gives."""
        try:
            baseline = self.read(s)
        except BaselineMissing:
            return Status(MISSING)
        except BaselineFormatError as exc:
            return Status(UNREADABLE, error=str(exc))
        differences = protocol.differences(baseline.protocol)
        recorded = baseline.provenance.get("reference_sha256")
        if recorded != reference_sha256:
            differences.append(f"reference checkpoint: sha256 {str(recorded)[:12]} -> {reference_sha256[:12]}")
        stored_k = getattr(baseline, "top_k", top_k)
        if top_k is not None and stored_k != top_k:
            differences.append(f"top_k: {stored_k} -> {top_k}")
        return Status(DIFFERS if differences else UP_TO_DATE, baseline, differences)

    def comparable(self, s: Subject, protocol, reference_sha256: str, reference_path: Path):
        """The stored baseline, refused (ProtocolMismatch, with the differences and the command) unless its
        protocol and reference checkpoint are the manifest's."""
        command = self.command(s)
        baseline = self.read(s)
        differences = protocol.differences(baseline.protocol)
        if differences:
            fields = ", ".join(d.split(":", 1)[0] for d in differences)
            its = "the protocol" if s.kind == "corpus" else "its protocol"
            label = "protocol" if s.kind == "corpus" else "task protocol"
            raise ProtocolMismatch("\n".join([
                f"refusing to compare {s.what}: {its} differs from the baseline's in {fields}",
                f"  manifest {label} : {protocol.fingerprint}",
                f"  baseline {label} : {baseline.protocol.fingerprint} ({baseline.path})",
                "  current != baseline:",
                *(f"    {d}" for d in differences),
                f"  Restore the {s.kind if s.kind == 'task' else 'protocol'}, or re-baseline on purpose: {command} --force",
            ]))
        recorded = baseline.provenance.get("reference_sha256")
        if recorded != reference_sha256:
            raise ProtocolMismatch(
                f"refusing to compare {s.what}: the reference checkpoint {reference_path} changed since the baseline "
                f"was measured (sha256 {str(recorded)[:12]} -> {reference_sha256[:12]}); re-baseline: {command} --force")
        return baseline
