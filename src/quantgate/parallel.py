"""Variants in parallel over pytest-xdist workers (`pytest -m quality -n N`), and what the controller keeps.

pytest-xdist runs the tests; quantgate only tells it what belongs together and gathers the results:
- every check of one (model, variant) carries the mark `xdist_group("quantgate:model/variant")`, added before
  xdist's worker hook appends the group to the node id, so `--dist loadgroup` (chosen for `-n N` when no other
  mode is given) runs a variant's checks on one worker and the variant is loaded once;
- each worker is bound to one device of `--quality-devices` (default: every visible CUDA device, else the CPU;
  CPU workers each take an equal share of the cores);
- a worker's records travel with each test's report (`user_properties`, removed on arrival so that JUnit does
  not carry them), so a worker that crashes loses none that it finished; what belongs to the whole session
  (environment, build notes, shard) comes through xdist's `workeroutput` channel when the worker finishes;
- the controller writes the one summary, JSON and JUnit and computes the exit status as a serial run does. A
  check whose worker crashed is an error row ("cannot test here" under --quality-bisect) and is not run again;
  a check that never reported (the workers were all lost) is an error row too, never a missing one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import QuantgateError

GROUP_PREFIX = "quantgate:"
DIST_KEY = "quantgate_dist"  # workerinput: the distribution mode the controller runs
PAYLOAD = "quantgate"  # the user_properties key (per report) and the workeroutput key (per worker)
DEVICE = re.compile(r"cpu|cuda(:\d+)?")
NODEID_GROUP = re.compile(r"@(?P<group>[^\[\]@]*)$")  # xdist's suffix (after the params' bracket)
PARAMS = re.compile(r"::(?P<function>[^:\[]+)\[(?P<id>.*)\]$")
METRIC_OF_TEST = {"task_score": "task_score_drop"}  # quality_tests' function names that differ from the metric


def group_label(group: tuple[str, str]) -> str:
    """The xdist_group name of a (model, variant)."""
    return f"{GROUP_PREFIX}{group[0]}/{group[1]}"


@dataclass(frozen=True)
class Groups:
    """Which (model, variant) a node id's check belongs to, as the controller reads it: xdist's group suffix where
    the worker's pytest kept it, else the case id in the brackets (model/variant/...; quality tests are
    parametrized with it). pytest 9.2 keeps node ids in a structured form that xdist's suffix does not reach, so
    the suffix alone would leave a variant's checks spread over the workers."""

    pairs: frozenset[tuple[str, str]]

    @classmethod
    def of(cls, manifest) -> "Groups":
        return cls(frozenset((m.name, v.name) for m in manifest.models.values() for v in m.variants))

    def split(self, nodeid: str) -> tuple[str, tuple[str, str] | None]:
        """(the node id without xdist's group suffix, its (model, variant) or None)."""
        match = NODEID_GROUP.search(nodeid)
        if match and match.group("group").startswith(GROUP_PREFIX):
            model, _, variant = match.group("group")[len(GROUP_PREFIX):].partition("/")
            return nodeid[:match.start()], (model, variant)
        params = PARAMS.search(nodeid)
        if params:
            parts = params.group("id").split("/")
            if len(parts) >= 3 and (parts[0], parts[1]) in self.pairs:
                return nodeid, (parts[0], parts[1])
        return nodeid, None


def make_scheduler(config, log, groups: Groups):
    """xdist's loadgroup scheduling with quantgate's groups: every check of one (model, variant) is one unit of
    work, sent whole to one worker; any other test is a unit of its own."""
    from xdist.scheduler import LoadScopeScheduling

    class VariantGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            _, group = groups.split(nodeid)
            return group_label(group) if group is not None else nodeid

    return VariantGroups(config, log)


def parse_devices(text: str | None) -> list[str] | None:
    """--quality-devices cuda:0,cuda:1 (or cpu): the devices workers are bound to, in order."""
    if text is None:
        return None
    devices = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in devices if not DEVICE.fullmatch(d)]
    if not devices or bad:
        raise QuantgateError(f"--quality-devices {text!r}: give devices separated by commas (cuda:0,cuda:1 or cpu); "
                             f"not a device: {', '.join(bad) or '(none given)'}")
    return devices


def visible_devices() -> list[str]:
    """Every CUDA device this process sees, else the CPU."""
    try:
        import torch
    except ImportError:
        return ["cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def worker_device(devices: list[str], index: int) -> str:
    """Worker `index` (gw0 = 0) takes the devices in turn: more workers than devices share them."""
    return devices[index % len(devices)]


def cpu_share(cpus: Iterable[int], index: int, count: int) -> set[int]:
    """The cores CPU worker `index` of `count` uses: an equal, disjoint share (all of them when there are fewer
    cores than workers, which then share)."""
    cpus = sorted(cpus)
    per = len(cpus) // count
    if per == 0:
        return set(cpus)
    index %= count  # a worker xdist started in place of a crashed one (gw2 of 2) takes a share in turn
    return set(cpus[index * per:(index + 1) * per])


def rotated(pairs: list, index: int) -> list:
    """The build list as worker `index` walks it: each worker starts elsewhere, so that they build different
    recipe variants at once (a build's file lock makes the others find it built)."""
    if not pairs:
        return pairs
    k = index % len(pairs)
    return pairs[k:] + pairs[:k]


@dataclass
class Worker:
    """An xdist worker: its device, its place in the build list, and what it hands to the controller."""

    index: int
    count: int
    devices: list[str] | None = None  # --quality-devices
    handed: int = 0  # records already sent

    def device(self, device_option: str) -> str:
        """Its turn of --quality-devices (default: every visible CUDA device, else the CPU, whose cores the CPU
        workers share out), or the one device --quality-device names for all."""
        if self.devices is None and device_option != "auto":
            device = device_option
        else:
            device = worker_device(self.devices or visible_devices(), self.index)
        if device == "cpu":
            bind_cpu_worker(self.index, self.count)
        return device

    def build_order(self, pairs: list) -> list:
        return rotated(pairs, self.index)

    def handoff(self, report, *, untestable: bool) -> str:
        """The records finished since the last report, and whether the check could not be tested here (JSON)."""
        import json
        from dataclasses import asdict

        records = report.records[self.handed:] if report is not None else []
        self.handed += len(records)
        return json.dumps({"untestable": untestable, "records": [asdict(r) for r in records]})

    @staticmethod
    def output(report, shard) -> dict[str, Any]:
        """At its end, what belongs to the whole session (xdist's workeroutput channel)."""
        return {"environment": report.environment if report else {}, "builds": dict(report.builds) if report else {},
                "environment_changes": dict(report.environment_changes) if report else {},
                "device": report.device if report else None, "shard": shard}


@dataclass
class Controller:
    """What the xdist controller knows of the quality checks: how many each variant has, which have reported,
    the per-variant progress lines (the time is the sum of the checks' durations on their worker), and the
    records and session-level parts the workers send."""

    groups: Groups
    total: dict[tuple[str, str], int] = field(default_factory=dict)
    collected: set[str] = field(default_factory=set)  # node ids (with the group suffix) of grouped checks
    reported: set[str] = field(default_factory=set)
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    done: dict[tuple[str, str], int] = field(default_factory=dict)
    finished: int = 0
    devices: set[str] = field(default_factory=set)  # the workers' devices

    def collection(self, ids: Iterable[str]) -> None:
        """A worker's collection (all workers collect the same; the first one counts)."""
        if self.collected:
            return
        for nodeid in ids:
            _, group = self.groups.split(nodeid)
            if group is not None:
                self.collected.add(nodeid)
                self.total[group] = self.total.get(group, 0) + 1

    def report(self, nodeid: str, when: str, duration: float) -> str | None:
        """One phase's report of a grouped check; the variant's progress line when this was its last check."""
        _, group = self.groups.split(nodeid)
        if group is None:
            return None
        self.seconds[group] = self.seconds.get(group, 0.0) + float(duration or 0.0)
        if when not in ("teardown", "???") or nodeid in self.reported:
            return None
        self.reported.add(nodeid)
        self.done[group] = self.done.get(group, 0) + 1
        if self.done[group] != self.total.get(group):
            return None
        self.finished += 1
        return (f"quantgate: {group[0]}/{group[1]}: {self.done[group]} of {self.total[group]} checks in "
                f"{self.seconds[group]:.1f}s [{self.finished}/{len(self.total)} variants]")

    def unreported(self) -> list[str]:
        """Grouped checks that were collected but never reported (their workers were lost)."""
        return sorted(self.collected - self.reported)

    @staticmethod
    def receive(report, payload: str) -> bool:
        """A report's records into the run's; returns whether its check could not be tested here."""
        import json

        from .report import Record

        doc = json.loads(payload)
        report.records.extend(Record(**r) for r in doc["records"])
        return bool(doc["untestable"])

    def receive_worker(self, report, output: dict[str, Any]) -> dict[str, Any] | None:
        """A finished worker's session-level part into the run's report; returns its shard record, if any."""
        if output.get("environment") and not report.environment:
            report.environment = output["environment"]
        if output.get("device"):
            self.devices.add(output["device"])
            report.device = ",".join(sorted(self.devices))
        report.builds.update(output.get("builds") or {})
        report.environment_changes.update(output.get("environment_changes") or {})
        return output.get("shard")

    def lost(self, report, nodeid: str, manifest, why: str) -> str:
        """A check whose worker never finished it: an error row; returns its node id without the group suffix."""
        report.records.append(lost_check_record(nodeid, manifest, why))
        return self.groups.split(nodeid)[0]

    def gather(self, report, manifest) -> list[str]:
        """At the end: error rows for the checks that never reported (their node ids returned), every record in
        the manifest's order of variants, as a serial run writes them."""
        lost = [self.lost(report, nodeid, manifest, f"never run: the workers were lost before {nodeid!r}")
                for nodeid in self.unreported()]
        order = {(m.name, v.name): i for i, (m, v) in enumerate((m, v) for m in manifest.models.values()
                                                                  for v in m.variants)}
        report.records.sort(key=lambda r: order.get((r.model, r.variant), len(order)))
        return lost


def lost_check_record(nodeid: str, manifest, why: str):
    """The error row of a check that a worker never finished: the case read back from its node id."""
    from .report import Record

    plain, group = Groups.of(manifest).split(nodeid)
    match = PARAMS.search(plain)
    function = match.group("function") if match else "?"
    metric = function[len("test_"):] if function.startswith("test_") else function
    metric = METRIC_OF_TEST.get(metric, metric)
    model, variant = group
    rest = match.group("id").split("/", 2) if match else []
    corpus = rest[2] if len(rest) == 3 else "?"
    if metric == "registered_metric" and "/" in corpus:
        corpus, metric = corpus.rsplit("/", 1)
    declared = next((v for v in getattr(manifest.models.get(model), "variants", ()) if v.name == variant), None)
    fmt, bits = (declared.format, declared.bits) if declared is not None else ("?", None)
    return Record(model=model, variant=variant, corpus=corpus, metric=metric, format=fmt, bits=bits,
                  verdict="error", detail=why)


def worker_index(workerinput: dict[str, Any] | None) -> int | None:
    """gw3 -> 3 on an xdist worker; None elsewhere."""
    if not workerinput:
        return None
    match = re.fullmatch(r"gw(\d+)", str(workerinput.get("workerid", "")))
    return int(match.group(1)) if match else 0


def bind_cpu_worker(index: int, count: int) -> int:
    """Pin this CPU worker to its share of the cores (llama.cpp's thread count follows the affinity) and give
    torch as many threads, unless OMP_NUM_THREADS says otherwise; returns the number of cores it took."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    share = cpu_share(cpus, index, count)
    os.sched_setaffinity(0, share)
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(len(share))
    return len(share)
