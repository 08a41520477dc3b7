"""The quality session: what the pytest plugin's hooks hand off to.

Options, the manifest (loaded once), the outcome ledger of the quality checks, and the exit-status
policy. `exit_status` is a pure function of the ledger and pytest's own status, so the policy that
`git bisect run` and CI depend on is unit-tested without running pytest:
  0 all quality checks passed;  1 a check failed (or, with --quality-strict, was skipped);
  125 with --quality-bisect, when nothing failed for real but something could not be tested here
  (missing checkpoint, no CUDA, protocol drift, a manifest this commit cannot load, no tests, a
  collection or usage error inside the session), so that `git bisect run` skips the commit;
  255 with --quality-bisect, when a quality option's value is wrong (the same at every commit):
  git aborts `bisect run` on any exit code above 127 (plugin.pytest_cmdline_main).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERIAL, WORKER, CONTROLLER = "serial", "worker", "controller"
BISECT_SKIP = 125
BISECT_ABORT = 255
TESTS_FAILED = 1
INTERRUPTED, INTERNAL_ERROR, USAGE_ERROR, NO_TESTS_COLLECTED = 2, 3, 4, 5
UNTESTABLE_EXITS = (INTERRUPTED, INTERNAL_ERROR, USAGE_ERROR, NO_TESTS_COLLECTED)


def exit_status(pytest_status: int, *, bad: int, untestable: int, skipped: int, bisect: bool, strict: bool) -> int:
    """The run's exit status from pytest's and the quality checks' outcomes (counts of each kind)."""
    status = int(pytest_status)
    if strict and skipped:
        status = TESTS_FAILED
    if bisect:
        if bad:
            return TESTS_FAILED
        if untestable or skipped or status in UNTESTABLE_EXITS:
            return BISECT_SKIP
    return status


@dataclass
class Progress:
    """One line per (model, variant) when its checks are done: how many, and how long they took together
    (loading, scoring, judging), so that a CI log shows where a run's time goes while it runs."""

    total: dict[tuple[str, str], int] = field(default_factory=dict)  # checks collected per (model, variant)
    _started: dict[tuple[str, str], float] = field(default_factory=dict)
    _done: dict[tuple[str, str], int] = field(default_factory=dict)
    _finished: int = 0
    _pending: list[str] = field(default_factory=list)

    def started(self, group: tuple[str, str]) -> None:
        import time

        self._started.setdefault(group, time.perf_counter())
        self._done[group] = self._done.get(group, 0) + 1

    def finished(self, group: tuple[str, str]) -> str | None:
        import time

        if group not in self._started:
            return None
        seconds = time.perf_counter() - self._started.pop(group)
        done = self._done.pop(group, 0)
        self._finished += 1
        of = f" of {self.total[group]}" if group in self.total else ""
        position = f" [{self._finished}/{len(self.total)} variants]" if self.total else ""
        line = f"quantgate: {group[0]}/{group[1]}: {done}{of} checks in {seconds:.1f}s{position}"
        self._pending.append(line)
        return line

    def take_lines(self) -> list[str]:
        """The lines finished since the last call (the plugin writes them where output is not captured)."""
        lines, self._pending = self._pending, []
        return lines


@dataclass
class QualitySession:
    manifest_option: str | None
    profile_option: str | None
    device_option: str
    bisect: bool
    strict: bool
    json_path: Path | None
    summary_path: Path | None
    rootdir: Path
    exact_kl: bool = False
    html_path: Path | None = None
    failures: dict[str, str] = field(default_factory=dict)  # failing quality check -> its full message (HTML)
    bad: list[str] = field(default_factory=list)
    untestable: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _manifest: Any = None
    _table: Any = None
    progress: Progress = field(default_factory=Progress)
    shard: dict[str, Any] | None = None  # this run's part of a sharded run (shard.py)
    evaluator: Any = None
    report: Any = None
    role: str = SERIAL  # or WORKER / CONTROLLER of a pytest-xdist run (parallel.py)
    worker: Any = None  # parallel.Worker on an xdist worker
    controller: Any = None  # parallel.Controller on the xdist controller

    def manifest(self):
        if self._manifest is None:
            from .errors import ManifestError
            from .manifest import find_manifest, load_manifest

            path = Path(self.manifest_option) if self.manifest_option else find_manifest(self.rootdir)
            if path is None:
                raise ManifestError(self.rootdir / "quantgate.toml", "file", "not found (pass --quality-manifest PATH)")
            manifest = load_manifest(path)  # as this run's profile sees it (a variant's `profiles` may leave it out)
            self._manifest = manifest.for_profile(self.profile_option or manifest.default_profile)
        return self._manifest

    def configure(self) -> None:
        """Where quantgate is in use, the manifest and the acceptability table are read now, before collection:
        a broken one is a usage error naming the file, not a failure of every check."""
        if self.in_use():
            self.manifest()
            self.table()

    def table(self):
        """(rows, capability max drops) of the acceptability table the manifest names (or the packaged one)."""
        if self._table is None:
            from .errors import QuantgateError
            from .thresholds import load_capabilities, load_table

            path = self.manifest().table
            try:
                self._table = (load_table(path), load_capabilities(path))
            except (OSError, ValueError) as exc:  # a missing file, TOML that does not parse
                raise QuantgateError(f"{path}: the acceptability table cannot be read ({exc})") from None
        return self._table

    @property
    def profile(self) -> str:
        return self.profile_option or self.manifest().default_profile

    def start(self):
        """The evaluator and the run's report, created once (the quality_evaluator fixture hands them out)."""
        if self.evaluator is None:
            from .evaluation import Evaluator, resolve_device
            from .report import RunReport

            device = resolve_device(self.worker.device(self.device_option) if self.worker else self.device_option)
            self.evaluator = Evaluator(manifest=self.manifest(), profile=self.profile, device=device,
                                       exact_kl=self.exact_kl)
            self.report = RunReport(profile=self.profile, device=device, environment=self.evaluator.environment(),
                                    builds=self.evaluator.build_notes)
        return self.evaluator

    def build(self, pairs, write) -> None:
        """Before anything is measured: the recipe variants the checks need, then what a model's variants share."""
        pairs = list(dict.fromkeys(pairs))
        if not pairs:
            return
        if self.worker is not None:  # every worker walks the list from elsewhere: builds run side by side
            pairs = self.worker.build_order(pairs)
        build_and_prepare(self.start(), pairs, write)

    def in_use(self) -> bool:
        """A manifest was named or is found: this run is quantgate's business."""
        from .manifest import find_manifest

        return bool(self.manifest_option) or find_manifest(self.rootdir) is not None

    def record(self, nodeid: str, *, skipped: bool, failed: bool, untestable: bool) -> None:
        """One quality check's outcome: skipped, failed for real (bad), or could not be tested here."""
        if skipped:
            self.skipped.append(nodeid)
        elif failed:
            (self.untestable if untestable else self.bad).append(nodeid)

    def gathering(self):
        """On the xdist controller: the run's report, which the workers' records go into (parallel.Controller)."""
        if self.report is None:
            from .report import RunReport

            self.report = RunReport(profile=self.profile, device=self.device_option)
        return self.report

    def finish(self, pytest_status: int) -> int:
        """Write the reports and return the run's exit status (a shard's JSON records it, for the merge). An xdist
        worker writes nothing: its controller does."""
        if self.role == CONTROLLER:
            for nodeid in self.controller.gather(self.gathering(), self.manifest()):  # checks that never reported
                self.record(nodeid, skipped=False, failed=True, untestable=True)
                pytest_status = pytest_status or TESTS_FAILED
        status = exit_status(pytest_status, bad=len(self.bad), untestable=len(self.untestable),
                             skipped=len(self.skipped), bisect=self.bisect, strict=self.strict)
        if self.role == WORKER:
            return status
        if self.report is not None:
            from .ablation import annotate_reversals

            annotate_reversals(self.report.records)
        if self.shard is not None:
            if self.report is None:
                from .report import RunReport

                self.report = RunReport(profile=self.profile, device=self.device_option)
            self.report.shard = {**self.shard, "exit_status": status}
            self.report.write(self.json_path, self.summary_path)
        elif self.report is not None and self.report.records:
            self.report.write(self.json_path, self.summary_path)
        if self.html_path is not None and self.report is not None and self.report.records:
            from . import htmlreport

            htmlreport.write(self.html_path, self.report, rows=self.table()[0], failures=self.failures,
                             plots_dir=(self.summary_path or self.html_path).parent, manifest_path=self.manifest().path)
        return status

    def closing_lines(self, *, quiet: bool = False) -> list[tuple[str, bool]]:
        """(line, red) for the end of the terminal report; quiet (-q -q) keeps the strict-mode line only."""
        lines = []
        if self.strict and self.skipped:
            lines.append((f"--quality-strict: {len(self.skipped)} quality check(s) skipped, which fails the gate: "
                          + ", ".join(self.skipped), True))
        if self.bisect and not quiet:
            if self.bad:
                lines.append(("quantgate bisect: bad (quality failure)", False))
            elif self.untestable or self.skipped:
                lines.append((f"quantgate bisect: cannot test here, exit {BISECT_SKIP}: "
                              + ", ".join(self.untestable + self.skipped), False))
        return lines


def build_and_prepare(evaluator, pairs: list[tuple[str, str]], write) -> None:
    """The recipe builds, a line each, then workspace.prepare, timed: the reference tokenizers and token ids every
    variant of a model shares."""
    from .workspace import prepare

    for model, variant, what in evaluator.build(pairs):
        write(f"quantgate: build {model}/{variant}: {what}")
    started = time.perf_counter()
    ready = prepare(evaluator.workspace, [model for model, _ in pairs])
    libraries = import_format_libraries(evaluator.workspace, pairs)
    write(f"quantgate: prepared {', '.join(f'{m} ({len(c)} corpora)' for m, c in ready.items())}"
          f"{''.join(f', {name}' for name in libraries)}: reference tokenizers"
          f"{', token ids and format libraries' if libraries else ' and token ids'} in "
          f"{time.perf_counter() - started:.1f}s")


def import_format_libraries(workspace, pairs: list[tuple[str, str]]) -> list[str]:
    """The format libraries the run's variants load through, imported once before the first check."""
    from .checkpoints.loading import import_format_libraries as load

    formats = []
    for model, variant in pairs:
        try:
            formats.append(workspace.variant(model, variant).format)
        except (KeyError, StopIteration, TypeError):  # the reference, or a name the checks will report
            continue
    return load(formats)
