"""Variants in parallel with pytest-xdist (`pytest -m quality -n 2`): every check of a variant on one worker, the
same values, verdicts, test names and exit status as the serial run, one report from the controller, and a crashed
worker's checks as error rows, never missing ones."""

import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest
from test_plugin_e2e import CAST, make_project

from quantgate.parallel import Controller, Groups, cpu_share, parse_devices, rotated, worker_device
from quantgate.session import BISECT_SKIP

pytest.importorskip("xdist")

TIMINGS = {"load_seconds", "eval_seconds"}
WORKER_LINE = re.compile(r"^\[(gw\d+)\] \[ *\d+%\] (?:PASSED|FAILED|SKIPPED|XFAIL|ERROR) (\S+)")


def _run(pytester, *args):
    return pytester.runpytest_subprocess("-m", "quality", "-p", "no:cacheprovider", "--quality-profile", "fast",
                                         "-v", *args)


def _records(path) -> dict:
    doc = json.loads(path.read_text())
    return {(r["model"], r["variant"], r["corpus"], r["metric"]): {k: v for k, v in r.items() if k not in TIMINGS}
            for r in doc["records"]}


def _junit_names(path) -> list[str]:
    cases = ET.parse(path).getroot().iter("testcase")
    return sorted(f"{c.get('classname')}::{c.get('name')}" for c in cases)


def test_two_workers_give_the_serial_run(pytester, tiny_zoo_template, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same torch thread count in both runs
    make_project(pytester, tiny_zoo_template, variants=CAST)
    shutil.rmtree(pytester.path / "build" / "zoo")  # the workers build the recipe variant
    parallel = _run(pytester, "-n", "2", "--quality-json=parallel.json", "--junitxml=parallel.xml")
    serial = _run(pytester, "--quality-json=serial.json", "--junitxml=serial.xml")
    assert parallel.ret == serial.ret == 0, parallel.stdout.str()

    assert _records(pytester.path / "parallel.json") == _records(pytester.path / "serial.json")
    assert len(_records(pytester.path / "serial.json")) == 12  # 2 variants x 2 corpora x 3 metrics
    names = [re.sub(r"@quantgate:[^\]@]*$", "", n) for n in _junit_names(pytester.path / "parallel.xml")]
    assert names == _junit_names(pytester.path / "serial.xml")  # the same tests, group suffix stripped
    assert "property name=\"quantgate\"" not in (pytester.path / "parallel.xml").read_text()  # records left there

    workers: dict[str, set[str]] = {}
    for line in parallel.stdout.lines:
        match = WORKER_LINE.match(line)
        if match and "[tiny/" in match.group(2) and match.group(2).count("/") >= 3:
            variant = re.search(r"\[tiny/([^/\]]+)/", match.group(2)).group(1)
            workers.setdefault(variant, set()).add(match.group(1))
    assert set(workers) == {"close", "cast"}
    assert all(len(w) == 1 for w in workers.values()), workers  # each variant's checks on one worker
    out = parallel.stdout.str()
    assert re.search(r"quantgate: tiny/cast: \d+ of \d+ checks in [0-9.]+s \[\d/2 variants\]", out)  # from the controller
    assert "quantgate summary" in out and out.count("## quantgate summary") == 1
    assert re.search(r"\[gw\d\] quantgate: build tiny/cast: built in", parallel.stderr.str())


CRASH = """
import os

def pytest_runtest_call(item):
    if os.environ.get("PYTEST_XDIST_WORKER") and "top1_agreement[tiny/close/code]" in item.nodeid:
        os._exit(3)  # the worker dies as on a segfault or the OOM killer
"""


@pytest.mark.parametrize("bisect", [False, True], ids=["plain", "bisect"])
def test_a_crashed_worker_leaves_error_rows_not_missing_ones(pytester, tiny_zoo_template, bisect):
    make_project(pytester, tiny_zoo_template)
    (pytester.path / "quality_tests" / "conftest.py").write_text(CRASH)
    result = _run(pytester, "-n", "2", "--quality-json=q.json", *(["--quality-bisect"] if bisect else []))
    assert result.ret == (BISECT_SKIP if bisect else 1), result.stdout.str()
    records = json.loads((pytester.path / "q.json").read_text())["records"]
    assert len(records) == 6  # 1 variant x 2 corpora x 3 metrics: the crashed check's row is there
    verdicts = {(r["corpus"], r["metric"]): r["verdict"] for r in records}
    assert verdicts.pop(("code", "top1_agreement")) == "error"
    assert set(verdicts.values()) == {"pass"}
    crashed = next(r for r in records if r["verdict"] == "error")
    assert "crashed while running" in crashed["detail"]
    ran = [line for line in result.stdout.lines if WORKER_LINE.match(line) and "top1_agreement[tiny/close/code]" in line]
    assert len(ran) == 1  # reported once, not run again on the worker that replaced it


# -- the pieces, without workers -----------------------------------------------------------------------------


class _Manifest:
    class _Model:
        def __init__(self, name, variants):
            self.name = name
            self.variants = [type("V", (), {"name": v, "format": "gguf", "bits": 4})() for v in variants]

    def __init__(self):
        self.models = {"m": self._Model("m", ["q4", "q8"])}


def test_the_controller_reads_the_variant_from_the_suffix_or_the_case_id():
    groups = Groups.of(_Manifest())
    assert groups.split("t.py::test_kl_divergence[m/q4/wiki]") == ("t.py::test_kl_divergence[m/q4/wiki]", ("m", "q4"))
    assert groups.split("t.py::test_kl_divergence[m/q4/wiki]@quantgate:m/q4") == ("t.py::test_kl_divergence[m/q4/wiki]",
                                                                                  ("m", "q4"))
    assert groups.split("t.py::test_protocol_snapshot[m/wiki]")[1] is None  # no variant: not grouped
    assert groups.split("t.py::test_other[m/zz/wiki]")[1] is None  # not a declared variant
    assert groups.split("t.py::test_x[a@b]")[1] is None


def test_progress_lines_come_when_a_variant_s_last_check_reports():
    controller = Controller(Groups.of(_Manifest()))
    ids = [f"t.py::test_{k}[m/q4/wiki]" for k in ("a", "b")] + ["t.py::test_a[m/q8/wiki]", "t.py::other"]
    controller.collection(ids)
    assert controller.total == {("m", "q4"): 2, ("m", "q8"): 1}
    assert controller.report(ids[0], "call", 1.0) is None
    assert controller.report(ids[0], "teardown", 0.5) is None
    line = controller.report(ids[1], "teardown", 2.0)
    assert line == "quantgate: m/q4: 2 of 2 checks in 3.5s [1/2 variants]"
    assert controller.unreported() == ["t.py::test_a[m/q8/wiki]"]


def test_devices_and_cores_are_shared_out_among_workers():
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    with pytest.raises(Exception, match="not a device: gpu0"):
        parse_devices("cuda:0,gpu0")
    assert [worker_device(["cuda:0", "cuda:1"], i) for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    shares = [cpu_share(range(8), i, 3) for i in range(3)]
    assert shares == [{0, 1}, {2, 3}, {4, 5}]
    assert cpu_share(range(2), 2, 2) == {0}  # gw2, started in place of a crashed gw0
    assert cpu_share(range(2), 0, 4) == {0, 1}  # more workers than cores: they share
    assert rotated([1, 2, 3], 1) == [2, 3, 1] and rotated([], 5) == []


def test_shards_run_with_workers_merge_into_the_serial_run(pytester, tiny_zoo_template):
    """--quality-shard K/N under -n 2: the controller writes each shard's JSON (its shard record comes from the
    workers, which did the deselecting), and `quantgate merge` gives the serial run's records and exit status."""
    from test_shard import UNIFORM

    from quantgate import cli

    make_project(pytester, tiny_zoo_template, variants=UNIFORM)
    serial = _run(pytester, "--quality-json=serial.json")
    shards = [_run(pytester, "-n", "2", f"--quality-shard={k}/2", f"--quality-json=shard{k}.json") for k in (1, 2)]
    out = pytester.path
    docs = [json.loads((out / f"shard{k}.json").read_text()) for k in (1, 2)]
    assert [d["shard"]["index"] for d in docs] == [1, 2]
    assert [d["shard"]["exit_status"] for d in docs] == [s.ret for s in shards]
    assert cli.main(["merge", str(out / "shard1.json"), str(out / "shard2.json"), "--json", str(out / "merged.json"),
                     "--summary", str(out / "merged.md")]) == serial.ret
    assert _records(out / "merged.json") == _records(out / "serial.json")
