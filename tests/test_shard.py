"""Shards across machines: --quality-shard K/N partitions the cases by whole variants, the same way everywhere;
`quantgate merge` joins the shards into the serial run's records and exit status, and refuses shards that do not
make one run."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_plugin_e2e import WORSE, make_project

from quantgate import cli
from quantgate.errors import QuantgateError
from quantgate.shard import ShardSpec, assign, merged_status

UNIFORM = WORSE + """
[[models.tiny.variants]]
name = "third"
format = "fp16"
bits = 16
path = "models/close"
max_ratio = 1.05
"""


@given(groups=st.dictionaries(st.text("abcdef/", min_size=1, max_size=6), st.integers(1, 9), min_size=1, max_size=30),
       count=st.integers(1, 6), costs=st.dictionaries(st.text("abcdef/", min_size=1, max_size=6),
                                                       st.floats(0, 100), max_size=10))
@settings(max_examples=60, deadline=None)
def test_every_variant_goes_to_exactly_one_shard_the_same_way_each_time(groups, count, costs):
    first = assign(groups, count, costs)
    assert first == assign(dict(reversed(list(groups.items()))), count, costs)  # order of discovery is irrelevant
    assert set(first) == set(groups) and all(1 <= k <= count for k in first.values())


def test_measured_costs_balance_the_shards():
    groups = {"m/a": 3, "m/b": 3, "m/c": 3, "m/d": 3}
    costs = {"m/a": 100.0, "m/b": 10.0, "m/c": 10.0, "m/d": 80.0}
    got = assign(groups, 2, costs)
    assert got["m/a"] != got["m/d"]  # the two slow variants on different machines


@pytest.mark.parametrize("bad", ["0/3", "4/3", "3", "a/b", "1/0"])
def test_a_shard_that_is_not_k_of_n_is_refused(bad):
    with pytest.raises(QuantgateError, match="K/N"):
        ShardSpec.parse(bad)


def test_merged_status_fails_on_any_failure_then_cannot_test():
    assert merged_status([0, 1, 125]) == 1 and merged_status([0, 125]) == 125 and merged_status([0, 0]) == 0


def _collected(result) -> list[str]:
    return sorted(line for line in result.stdout.lines if "::" in line and "[" in line)


def _variant(nodeid: str) -> str:
    return re.search(r"\[tiny/([^/\]]+)", nodeid).group(1)


def test_the_shards_partition_the_cases_by_whole_variants(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template, variants=UNIFORM)
    everything = _collected(pytester.runpytest("-m", "quality", "--co", "-q", "-p", "no:cacheprovider"))
    parts = [_collected(pytester.runpytest("-m", "quality", "--co", "-q", "-p", "no:cacheprovider",
                                           f"--quality-shard={k}/3")) for k in (1, 2, 3)]
    assert sorted(n for part in parts for n in part) == everything  # each case once, none lost
    owners = {}
    for k, part in enumerate(parts):
        for nodeid in part:
            if re.search(r"\[tiny/[^/\]]+/", nodeid):
                assert owners.setdefault(_variant(nodeid), k) == k, nodeid  # a variant never straddles two shards
    assert len(set(owners.values())) == 3


def test_merged_shards_are_the_serial_run(pytester, tiny_zoo_template):
    make_project(pytester, tiny_zoo_template, variants=UNIFORM)
    serial = pytester.runpytest("-m", "quality", "-p", "no:cacheprovider", "--quality-json=serial.json")
    shards = [pytester.runpytest("-m", "quality", "-p", "no:cacheprovider", f"--quality-shard={k}/2",
                                 f"--quality-json=shard{k}.json") for k in (1, 2)]
    assert serial.ret == 1 and {s.ret for s in shards} <= {0, 1}  # "worse" fails wherever it runs
    out = pytester.path
    status = cli.main(["merge", str(out / "shard1.json"), str(out / "shard2.json"), "--json", str(out / "merged.json"),
                       "--summary", str(out / "merged.md")])
    assert status == serial.ret
    key = ("model", "variant", "corpus", "metric", "verdict", "value", "baseline", "ratio")
    rows = lambda path: sorted(tuple(r[k] for k in key) for r in json.loads((out / path).read_text())["records"])  # noqa: E731
    assert rows("merged.json") == rows("serial.json")
    assert "tiny/worse" in (out / "merged.md").read_text()


def test_merge_refuses_shards_that_are_not_one_run(pytester, tiny_zoo_template, capsys):
    make_project(pytester, tiny_zoo_template, variants=UNIFORM)
    out = pytester.path
    for k in (1, 2):
        pytester.runpytest("-m", "quality", "-p", "no:cacheprovider", f"--quality-shard={k}/2",
                           f"--quality-json=shard{k}.json", "-k", "perplexity")
    pytester.runpytest("-m", "quality", "-p", "no:cacheprovider", "--quality-json=serial.json", "-k", "perplexity")
    one, two = str(out / "shard1.json"), str(out / "shard2.json")
    other = json.loads((out / "shard2.json").read_text())
    other["shard"]["git_commit"] = "0" * 40
    (out / "other.json").write_text(json.dumps(other))
    for args, words in (([one], "shard(s) 2/2 missing"), ([one, one, two], "shard 1/2 given twice"),
                        ([one, str(out / "other.json")], "different runs: their commit differ"),
                        ([one, str(out / "serial.json")], "not a shard's report")):
        assert cli.main(["merge", *args, "--summary", str(out / "m.md")]) == 2
        assert words in capsys.readouterr().err, words
