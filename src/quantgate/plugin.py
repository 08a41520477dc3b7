"""The pytest plugin (entry point `pytest11: quantgate`): options, fixtures, hooks.

Kept thin and import-light: pytest loads it on every run, so the evaluation stack is imported
inside fixtures only. Hooks hand off to the session object (`session.QualitySession`), whose
`exit_status` policy (0 / 1 / 125 / 255, and why) is documented and unit-tested there.
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import pytest

# The quality checks live in the package (quantgate/quality_tests) and are imported by a project's test module;
# their asserts are rewritten like a test module's, so that a protocol drift shows syrupy's diff.
pytest.register_assert_rewrite("quantgate.quality_tests")

from .errors import CannotTest, ManifestError, QuantgateError  # noqa: E402
from .session import (  # noqa: E402
    BISECT_ABORT,
    BISECT_SKIP,
    CONTROLLER,
    NO_TESTS_COLLECTED,
    SERIAL,
    WORKER,
    QualitySession,
)

DEVICE_SYNTAX = re.compile(r"auto|cpu|cuda(:\d+)?")


class OptionError(pytest.UsageError):
    """A quality option's value is wrong: the same at every commit, so a bisection aborts on it."""


STATE = pytest.StashKey[QualitySession]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantgate", "quantgate: quality gate for quantized checkpoints")
    group.addoption("--quality-manifest", dest="quality_manifest", metavar="PATH", default=None,
                    help="manifest file (default: quantgate.toml in the rootdir or above)")
    group.addoption("--quality-profile", dest="quality_profile", metavar="NAME", default=None,
                    help="protocol profile of the manifest to run (default: the manifest's default_profile)")
    group.addoption("--quality-device", dest="quality_device", metavar="DEVICE", default="auto",
                    help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    group.addoption("--quality-bisect", dest="quality_bisect", action="store_true", default=False,
                    help="exit 125 when a commit cannot be tested here, for `git bisect run`")
    group.addoption("--quality-strict", dest="quality_strict", action="store_true", default=False,
                    help="fail the run if any quality check was skipped or could not be tested (merge gates)")
    group.addoption("--quality-exact-kl", dest="quality_exact_kl", action="store_true", default=False,
                    help="KL divergence from full distributions, the FP16 reference loaded beside each variant "
                         "(two models resident, scoring twice); default: the lower bound from the baseline's top-k")
    group.addoption("--quality-json", dest="quality_json", metavar="PATH", default=None,
                    help="write one JSON record per (variant, corpus, metric)")
    group.addoption("--quality-summary", dest="quality_summary", metavar="PATH",
                    default="reports/quality-summary.md",
                    help="Markdown summary file (default: %(default)s; also appended to $GITHUB_STEP_SUMMARY)")
    group.addoption("--quality-html", dest="quality_html", metavar="PATH", default=None,
                    help="write a self-contained HTML report (summary, plots, failures, environment, protocol); the "
                         "plots (PNG and SVG) go beside the Markdown summary")
    group.addoption("--quality-shard", dest="quality_shard", metavar="K/N", default=None,
                    help="run shard K of N: whole variants, the same split on every machine; join the shards' "
                         "--quality-json reports with `quantgate merge`")
    group.addoption("--quality-devices", dest="quality_devices", metavar="LIST", default=None,
                    help="with pytest-xdist (-n N): the devices workers take in turn, e.g. cuda:0,cuda:1 (default: every "
                         "visible CUDA device, else the CPU, its cores shared out among the workers)")
    group.addoption("--quality-shard-times", dest="quality_shard_times", metavar="JSON", default=None,
                    help="a previous run's --quality-json: shards balanced by each variant's measured time")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "quality: a quality check of a checkpoint against its FP16 baseline")
    config.addinivalue_line("markers", "quality_protocol: a protocol-drift snapshot (drift = cannot test)")
    opt = config.option
    if not DEVICE_SYNTAX.fullmatch(opt.quality_device):
        raise OptionError(f"--quality-device {opt.quality_device!r} is not a device: use auto, cpu, cuda or cuda:N")
    config.pluginmanager.register(_ProgressLines(config), "quantgate-progress")
    config.stash[STATE] = QualitySession(
        manifest_option=opt.quality_manifest, profile_option=opt.quality_profile,
        device_option=opt.quality_device, bisect=opt.quality_bisect, strict=opt.quality_strict,
        json_path=Path(opt.quality_json) if opt.quality_json else None,
        summary_path=Path(config.rootpath, opt.quality_summary) if opt.quality_summary else None,
        rootdir=Path(config.rootpath), exact_kl=opt.quality_exact_kl,
        html_path=Path(config.rootpath, opt.quality_html) if opt.quality_html else None,
    )
    _configure_workers(config)
    try:  # the manifest and the table, before anything is collected or measured
        _state(config).configure()
        known = _state(config).manifest().profile_names() if opt.quality_profile is not None else ()
    except QuantgateError as exc:  # ManifestError, a broken acceptability table
        raise pytest.UsageError(str(exc)) from None
    if _state(config).role == CONTROLLER:
        if not _state(config).in_use():  # not quantgate's run: xdist schedules as it would
            _state(config).role = SERIAL
        else:
            from .parallel import Controller, Groups

            _state(config).controller = Controller(Groups.of(_state(config).manifest()))
            if config.option.dist == "load":  # -n N alone: a variant's checks stay together on one worker
                config.option.dist = "loadgroup"
            config.pluginmanager.register(_Controller(config), "quantgate-xdist-controller")
    if opt.quality_profile is not None:
        if opt.quality_profile not in known:
            raise OptionError(f"--quality-profile {opt.quality_profile!r}: the manifest has no such profile "
                              f"(its profiles: {', '.join(known)})")


def _state(config: pytest.Config) -> QualitySession:
    return config.stash[STATE]


def _configure_workers(config: pytest.Config) -> None:
    """pytest-xdist: this process is a worker (bound to a device) or the controller (gathers the records)."""
    from . import parallel

    state = _state(config)
    try:
        devices = parallel.parse_devices(config.option.quality_devices)
    except QuantgateError as exc:
        raise OptionError(str(exc)) from None
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        state.role = WORKER
        state.worker = parallel.Worker(parallel.worker_index(workerinput), int(workerinput.get("workercount", 1)),
                                       devices)
        if workerinput.get(parallel.DIST_KEY) == "loadgroup":  # chosen by the controller, not in the worker's args
            config.option.loadgroup = True
        if getattr(config.option, "loadgroup", False):
            config.pluginmanager.register(_GroupMarks(), "quantgate-xdist-groups")
    elif getattr(config.option, "dist", "no") != "no" and not config.option.collectonly:
        state.role = CONTROLLER


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    wants_case = "quality_case" in metafunc.fixturenames
    wants_protocol = "quality_protocol_case" in metafunc.fixturenames
    wants_task = "quality_task_case" in metafunc.fixturenames
    wants_task_protocol = "quality_task_protocol_case" in metafunc.fixturenames
    wants_metric = "quality_metric_case" in metafunc.fixturenames
    if not (wants_case or wants_protocol or wants_task or wants_task_protocol or wants_metric):
        return
    try:
        manifest = _state(metafunc.config).manifest()
    except ManifestError as exc:
        raise pytest.UsageError(str(exc)) from None
    from .checks import Case, MetricCase, TaskCase

    if wants_task:
        tasks = [TaskCase(m.name, v.name, t) for m in manifest.models.values() for v in m.variants for t in m.tasks]
        metafunc.parametrize("quality_task_case", tasks, ids=[c.id for c in tasks])
    if wants_task_protocol:
        pairs = [(m.name, t) for m in manifest.models.values() for t in m.tasks]
        metafunc.parametrize("quality_task_protocol_case", pairs, ids=[f"{m}/{t}" for m, t in pairs])
    if wants_case:
        cases = [Case(m.name, v.name, c) for m in manifest.models.values() for v in m.variants for c in m.corpora]
        metafunc.parametrize("quality_case", cases, ids=[c.id for c in cases])
    if wants_metric:  # metrics registered beyond the built-ins (metrics.register_metric, e.g. in a conftest.py)
        from .metrics import registered

        extra = [MetricCase(Case(m.name, v.name, c), spec.name) for spec in registered(builtin=False)
                 for m in manifest.models.values() for v in m.variants for c in m.corpora]
        metafunc.parametrize("quality_metric_case", extra, ids=[c.id for c in extra])
    if wants_protocol:
        pairs = [(m.name, c) for m in manifest.models.values() for c in m.corpora]
        metafunc.parametrize("quality_protocol_case", pairs, ids=[f"{m}/{c}" for m, c in pairs])


def _group(item: pytest.Item) -> tuple[str, str] | None:
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec else {}
    case = params.get("quality_case") or params.get("quality_task_case") or params.get("quality_metric_case")
    if case is None or _is_notset(case):
        return None
    case = getattr(case, "case", case)
    return (case.model, case.variant) if case is not None else None


_CASE_PARAMS = ("quality_case", "quality_task_case", "quality_protocol_case", "quality_task_protocol_case",
                "quality_metric_case")


def _empty_case(item: pytest.Item) -> bool:
    """A quality test whose case list is empty (e.g. a manifest without tasks): nothing to check."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec else {}
    return any(_is_notset(params.get(name)) for name in _CASE_PARAMS)


def _is_notset(value) -> bool:
    # pytest's placeholder for a parameter of an empty parametrize list (private type, so by name)
    return type(value).__name__ == "NotSetType"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    empty = [it for it in items if _empty_case(it)]
    if empty:  # deselected, not skipped: --quality-strict fails on skips, and there is nothing to run
        config.hook.pytest_deselected(items=empty)
        items[:] = [it for it in items if not _empty_case(it)]
    # Keep every check of one (model, variant) together so it is loaded once and freed after.
    groups: dict[tuple[str, str], int] = {}
    for item in items:
        g = _group(item)
        if g is not None:
            groups.setdefault(g, len(groups))
    if groups:
        order = {id(it): (groups.get(_group(it), -1), i) for i, it in enumerate(items)}
        items.sort(key=lambda it: order[id(it)])
    if config.option.quality_shard:
        _keep_shard(config, items)


def _keep_shard(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--quality-shard K/N: deselect every check of the variants other shards run (checks of no variant, the
    protocol snapshots, run on shard 1)."""
    from .shard import ShardSpec, assign, group_name, measured_costs, shard_record

    state = _state(config)
    try:
        spec = ShardSpec.parse(config.option.quality_shard)
        costs = measured_costs(config.option.quality_shard_times)
    except QuantgateError as exc:
        raise OptionError(str(exc)) from None
    checks = collections.Counter(group_name(g) for g in map(_group, items) if g is not None)
    assignment = assign(dict(checks), spec.count, costs)

    def mine(item) -> bool:
        g = _group(item)
        return spec.index == 1 if g is None else assignment[group_name(g)] == spec.index

    others = [it for it in items if not mine(it)]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = [it for it in items if mine(it)]
    state.shard = shard_record(spec, assignment, state.manifest().path, Path(config.rootpath))


@pytest.fixture(scope="session")
def quality_evaluator(request: pytest.FixtureRequest):
    state = _state(request.config)
    yield state.start()
    state.evaluator.release()


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session):
    """Recipe variants are built in a step of their own, before the first check runs."""
    if not session.config.option.collectonly:
        pairs = [g for g in map(_group, session.items) if g is not None]
        _state(session.config).progress.total = dict(collections.Counter(pairs))  # after every deselection
        if pairs:
            write = _line_writer(session.config)
            try:
                _state(session.config).build(pairs, write)
            except ManifestError as exc:
                raise pytest.UsageError(str(exc)) from None
    return (yield)


def _line_writer(config: pytest.Config):
    """Where a line for the user goes: the terminal report, or an xdist worker's standard error (its terminal
    report goes nowhere), prefixed with the worker's id."""
    import sys

    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        def write(line: str) -> None:  # one write per line: two workers share the stream
            sys.stderr.write(f"[{workerinput.get('workerid')}] {line}\n")
            sys.stderr.flush()

        return write
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return reporter.write_line if reporter is not None else print


@pytest.fixture(scope="session")
def quality_gate(request: pytest.FixtureRequest, quality_evaluator):
    from .checks import Gate

    state = _state(request.config)
    table, capabilities = state.table()
    return Gate(quality_evaluator, table, state.report, capabilities)


@pytest.fixture
def quality_protocols(request: pytest.FixtureRequest, quality_protocol_case, quality_evaluator) -> dict:
    """Every profile's protocol for one (model, corpus): what the drift snapshot records."""
    from .backends import get_backend

    model, corpus = quality_protocol_case
    manifest = _state(request.config).manifest()
    protocols = {}
    for backend in manifest.models[model].backends():
        for profile in manifest.profile_names():
            protocols[get_backend(backend).label(profile)] = quality_evaluator.protocol(model, corpus, profile,
                                                                                       backend).as_dict()
    return protocols


@pytest.fixture
def quality_task_protocols(request: pytest.FixtureRequest, quality_task_protocol_case, quality_evaluator) -> dict:
    """Every profile's protocol for one (model, task): what the task drift snapshot records."""
    from .backends import get_backend

    model, task = quality_task_protocol_case
    manifest = _state(request.config).manifest()
    return {get_backend(backend).label(profile): quality_evaluator.task_protocol(model, task, profile, backend).as_dict()
            for backend in manifest.models[model].backends() for profile in manifest.profile_names()}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if item.get_closest_marker("quality") is None:
        return report
    exc = call.excinfo.value if call.excinfo else None
    if report.failed and isinstance(exc, QuantgateError):
        report.longrepr = f"{type(exc).__name__}: {exc}"  # the message says it all; no traceback
    drift = item.get_closest_marker("quality_protocol") is not None
    state = _state(item.config)
    untestable = isinstance(exc, CannotTest) or drift
    state.record(item.nodeid, skipped=report.skipped and not hasattr(report, "wasxfail"), failed=report.failed,
                 untestable=untestable)
    if report.failed:
        state.failures[item.nodeid] = str(report.longrepr)
    if state.role == WORKER:  # to the controller, with this report (parallel.py)
        from .parallel import PAYLOAD

        report.user_properties.append((PAYLOAD, state.worker.handoff(state.report, untestable=untestable)))
    return report


def pytest_runtest_setup(item: pytest.Item) -> None:
    group = _group(item)
    if group is not None:
        _state(item.config).progress.started(group)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    state = _state(item.config)
    group = _group(item)
    if group is not None and _group(nextitem) != group:
        if state.evaluator is not None:
            state.evaluator.release()  # the next test needs another model (or none)
        state.progress.finished(group)  # shown by pytest_runtest_logfinish, outside output capture


class _GroupMarks:
    """On an xdist worker under --dist loadgroup: every check of a (model, variant) marked as one group, before
    xdist's own hook (a plain one) appends the group's name to the node ids; a mark added later is not seen."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        from .parallel import group_label

        for item in items:
            group = _group(item)
            if group is not None:
                item.add_marker(pytest.mark.xdist_group(group_label(group)))


class _Controller:
    """On the xdist controller: records and outcomes gathered from the workers' reports, the progress lines,
    crashed checks made error rows (not run again), and each worker's session-level part (parallel.py)."""

    def __init__(self, config: pytest.Config):
        self.config, self.state = config, _state(config)

    def _write(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(line)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        from .parallel import DIST_KEY

        node.workerinput[DIST_KEY] = self.config.option.dist  # workers parse the command line, not our choice

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log):
        """-n N alone or --dist loadgroup: a variant's checks go to one worker together."""
        if config.option.dist != "loadgroup":
            return None  # a mode the user chose (loadscope, loadfile, worksteal, each): theirs
        from .parallel import make_scheduler

        return make_scheduler(config, log, self.state.controller.groups)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        self.state.controller.collection(ids)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        from .parallel import PAYLOAD

        payloads = [value for key, value in report.user_properties if key == PAYLOAD]
        report.user_properties[:] = [(k, v) for k, v in report.user_properties if k != PAYLOAD]  # not for JUnit
        plain, group = self.state.controller.groups.split(report.nodeid)
        state, controller = self.state, self.state.controller
        if report.when == "???" and group is not None:  # xdist's report of the check its worker crashed in
            controller.lost(state.gathering(), report.nodeid, state.manifest(), str(report.longrepr))
            state.record(plain, skipped=False, failed=True, untestable=True)
        if report.failed and (payloads or group is not None):
            state.failures[plain] = str(report.longrepr)
        for payload in payloads:
            untestable = controller.receive(state.gathering(), payload)
            state.record(plain, skipped=report.skipped and not hasattr(report, "wasxfail"), failed=report.failed,
                         untestable=untestable)
        line = self.state.controller.report(report.nodeid, report.when, report.duration)
        if line:
            self._write(line)

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report, sched) -> None:
        """A check that crashed its worker is an error row, not run again on the next worker (loadgroup puts the
        unfinished rest of its group back in the queue, this check included)."""
        if self.state.controller.groups.split(crashitem)[1] is None:
            return
        queue = getattr(sched, "workqueue", None)
        for scope, unit in list((queue or {}).items()):
            if crashitem in unit:
                unit[crashitem] = True
                if all(unit.values()):
                    del queue[scope]

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        from .parallel import PAYLOAD

        output = getattr(node, "workeroutput", None) or {}
        if PAYLOAD in output:
            shard = self.state.controller.receive_worker(self.state.gathering(), output[PAYLOAD])
            self.state.shard = shard if shard is not None else self.state.shard


class _ProgressLines:
    """Writes the session's progress lines after each test's teardown, where pytest captures no output; on a
    terminal, also the live line of what runs now (progress.py), drawn with pytest's capture suspended."""

    def __init__(self, config: pytest.Config):
        self.config = config

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        import sys

        from . import progress

        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and sys.__stdout__ is not None and sys.__stdout__.isatty():
            progress.use(progress.Uncaptured(self.config.pluginmanager.get_plugin("capturemanager"), _TerminalOut(),
                                             newline=reporter.ensure_newline))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        from . import progress

        progress.use(None)

    def pytest_runtest_logfinish(self, nodeid: str, location) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        for line in _state(self.config).progress.take_lines():
            if reporter is not None:
                reporter.write_line(line)


class _TerminalOut:
    """Standard output as it is when capture is suspended (looked up at each write)."""

    def write(self, text: str) -> int:
        import sys

        return sys.stdout.write(text)

    def flush(self) -> None:
        import sys

        sys.stdout.flush()


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config):
    # A usage error raised inside the session (e.g. a path that does not exist) is re-raised
    # past pytest_sessionfinish and turned into exit 4 by pytest.main: map it here.
    # (Errors in the command-line options themselves happen before any plugin runs.)
    try:
        return (yield)
    except pytest.UsageError as exc:
        if not config.option.quality_bisect:
            raise
        import sys

        if isinstance(exc, OptionError):
            sys.stderr.write(f"ERROR: {exc}\nquantgate bisect: the command line is wrong at every commit; "
                             f"exit {BISECT_ABORT} aborts the bisection\n")
            return BISECT_ABORT
        sys.stderr.write(f"ERROR: {exc}\nquantgate bisect: usage error, cannot test here, exit {BISECT_SKIP}\n")
        return BISECT_SKIP


@pytest.hookimpl(trylast=True)  # after syrupy, which ORs its own status into the exit code
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = _state(session.config)
    session.exitstatus = state.finish(session.exitstatus)
    if state.role == WORKER:  # xdist sends it to the controller once this hook returns
        from .parallel import PAYLOAD

        session.config.workeroutput[PAYLOAD] = state.worker.output(state.report, state.shard)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    state = _state(config)
    if exitstatus == NO_TESTS_COLLECTED and "quality" in (config.option.markexpr or "") and state.in_use():
        terminalreporter.write_line(
            "quantgate: a quantgate.toml is here but no quality test was collected: `quantgate init` writes "
            "quality_tests/test_quality.py (or put `from quantgate.quality_tests import *` in a test module)",
            yellow=True)
    if state.report is not None and state.report.records:
        terminalreporter.write_sep("=", "quantgate summary")
        terminalreporter.write_line(state.report.markdown())
        if state.summary_path:
            terminalreporter.write_line(f"summary written to {state.summary_path}")
    for line, red in state.closing_lines(quiet=config.get_verbosity() < 0):
        terminalreporter.write_line(line, red=red)


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    if os.environ.get("QUANTGATE_QUIET_HEADER"):
        return None
    state = _state(config)
    if not state.in_use():
        return None
    flags = [f for f, on in (("bisect", state.bisect), ("strict", state.strict)) if on]
    return [f"quantgate: device={state.device_option} profile={state.profile_option or '(manifest default)'}"
            + (f" ({', '.join(flags)})" if flags else "")]


__all__ = ["QualitySession", "STATE", "QuantgateError"]
