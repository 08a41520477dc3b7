"""`quantgate compare`: two runs' JSON reports, paired by case and metric."""

import json
from dataclasses import replace

from quantgate.cli import main
from quantgate.compare import compare_runs
from quantgate.report import Record, RunReport


def record(variant, metric, verdict="pass", value=1.0, ratio=None, protocol="p1", corpus="code"):
    return Record(model="m", variant=variant, corpus=corpus, metric=metric, format="gptq", bits=4, verdict=verdict,
                  value=value, ratio=ratio, protocol_fingerprint=protocol, interval=[value - 0.01, value + 0.01])


def run(*records, **environment):
    return RunReport(profile="fast", device="cpu", records=list(records), environment=environment)


def write(tmp_path, name, report):
    path = tmp_path / name
    path.write_text(report.to_json())
    return str(path)


OLD = run(record("a", "relative_perplexity", value=10.0, ratio=1.02),
          record("a", "top1_agreement", value=0.95),
          record("b", "kl_divergence", value=0.01),
          record("c", "kl_divergence", verdict="FAIL", value=0.2),
          record("gone", "top1_agreement", value=0.9),
          transformers="5.23.0")


def test_the_same_run_compares_unchanged_and_exits_0(tmp_path):
    result = compare_runs(OLD, OLD)
    assert result.counts()["unchanged"] == 5 and result.exit_status() == 0
    a = write(tmp_path, "a.json", OLD)
    assert main(["compare", a, a]) == 0


def test_a_new_failure_is_named_first_and_exits_1(tmp_path, capsys):
    new = run(record("a", "relative_perplexity", value=10.0, ratio=1.02),
              record("a", "top1_agreement", value=0.95),
              replace(record("b", "kl_divergence", verdict="FAIL", value=0.05), detail="m/b on code: kl divergence 0.05 exceeds"),
              record("c", "kl_divergence", value=0.02),
              record("new", "top1_agreement", value=0.99),
              transformers="5.24.0")
    result = compare_runs(OLD, new)
    kinds = [c.kind for c in result.changes]
    assert kinds[0] == "new failure" and result.changes[0].case == "m/b/code/kl_divergence"
    assert set(kinds) == {"new failure", "fixed", "added", "removed", "unchanged"}
    assert result.environment == ["transformers: 5.23.0 -> 5.24.0"]
    old_path, new_path = write(tmp_path, "old.json", OLD), write(tmp_path, "new.json", new)
    out = tmp_path / "cmp.json"
    assert main(["compare", old_path, new_path, "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert text.index("| new failure | m/b/code/kl_divergence | 0.01 [0, 0.02] (pass) -> 0.05 [0.04, 0.06] (FAIL)") \
        < text.index("| fixed |")
    assert "transformers: 5.23.0 -> 5.24.0" in text
    doc = json.loads(out.read_text())
    assert doc["exit_status"] == 1 and doc["changes"][0]["change"] == "new failure"


def test_a_protocol_difference_makes_the_pair_incomparable_and_its_values_are_not_compared():
    new = run(*[replace(r, value=(r.value or 0) * 2, protocol_fingerprint="p2") if r.variant == "a" else r
                for r in OLD.records])
    result = compare_runs(OLD, new)
    incomparable = [c for c in result.changes if c.kind == "incomparable"]
    assert {c.case for c in incomparable} == {"m/a/code/relative_perplexity", "m/a/code/top1_agreement"}
    assert "protocol p1 -> p2" in incomparable[0].detail
    assert result.exit_status() == 0


def test_values_move_beyond_the_tolerance_only():
    tiny = run(*[replace(r, ratio=r.ratio * (1 + 2.0 ** -22)) if r.ratio else r for r in OLD.records])
    assert compare_runs(OLD, tiny).counts()["moved"] == 0  # within 2^-20: the same perplexity
    real = run(*[replace(r, ratio=r.ratio * 1.001) if r.ratio else r for r in OLD.records])
    (moved,) = [c for c in compare_runs(OLD, real).changes if c.kind == "moved"]
    assert moved.case == "m/a/code/relative_perplexity"
    top1 = run(*[replace(r, value=0.9501) if r.metric == "top1_agreement" and r.variant == "a" else r for r in OLD.records])
    assert [c.case for c in compare_runs(OLD, top1).changes if c.kind == "moved"] == ["m/a/code/top1_agreement"]


def test_a_file_that_is_not_a_report_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"records": []}')
    assert main(["compare", str(bad), str(bad)]) == 2
    assert f"{bad}: not a quantgate --quality-json file" in capsys.readouterr().err
