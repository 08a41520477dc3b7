"""The acceptability table and the gate's decision rule."""

import pytest

from quantgate.errors import QuantgateError
from quantgate.gate import FAIL, PASS, REVERSAL, XFAIL, judge
from quantgate.protocol import SCORING_RULE, Protocol
from quantgate.thresholds import choose_bound, load_table


@pytest.fixture(scope="module")
def table():
    return load_table()


def test_table_reproduces_the_seed_rows(table):
    rows = {(r.format, r.bits): (r.expected, r.low, r.high, r.acceptable) for r in table}
    assert rows[("gptq", 8)] == ("1.02-1.05", 1.02, 1.05, "Yes")
    assert rows[("gguf", 8)] == ("1.03-1.06", 1.03, 1.06, "Yes")
    assert rows[("gptq", 4)] == ("1.05-1.10", 1.05, 1.10, "Usually")
    assert rows[("awq", 4)] == ("1.04-1.08", 1.04, 1.08, "Usually")
    assert rows[("gguf", 4)] == ("1.05-1.12", 1.05, 1.12, "Usually")
    assert rows[("gguf", 3)] == ("1.10-1.20", 1.10, 1.20, "Marginal")
    assert rows[("gguf", 2)] == ("1.15-1.30+", 1.15, None, "Problematic")
    assert rows[("fp16", 16)][2] == 1.0


def test_bound_precedence(table):
    assert choose_bound(table, "gptq", 4, variant_override=None, model_overrides={}).value == 1.10
    assert choose_bound(table, "gptq", 4, variant_override=None, model_overrides={"gptq/4": 1.2}).value == 1.2
    b = choose_bound(table, "gptq", 4, variant_override=1.07, model_overrides={"gptq/4": 1.2})
    assert (b.value, b.source) == (1.07, "manifest variant max_ratio")
    assert choose_bound(table, "gguf", 2, variant_override=None, model_overrides={}).value is None
    with pytest.raises(QuantgateError, match="no row for format 'gptq' at 3 bits"):
        choose_bound(table, "gptq", 3, variant_override=None, model_overrides={})


def test_custom_table_file_is_validated(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[[row]]\nlabel="x"\nformat="gptq"\nbits=4\nexpected="1-2"\nlow=1\nhigh=2\nacceptable="Maybe"\n')
    with pytest.raises(QuantgateError, match="acceptable='Maybe'"):
        load_table(path)


PROTOCOL_LINE = "abcd1234 (max_length 256, stride 128)"


def decide(table, value, fmt="gptq", bits=4, baseline=10.0, tolerance=0.005, override=None):
    bound = choose_bound(table, fmt, bits, variant_override=override, model_overrides={})
    return judge(variant="demo/v", corpus="code", value=value, baseline=baseline, bound=bound,
                 reversal_tolerance=tolerance, tokens=1234, baseline_source="baselines/demo/code.full.json",
                 protocol_line=PROTOCOL_LINE)


def test_within_and_beyond_the_bound(table):
    assert decide(table, 11.0).outcome == PASS  # ratio 1.10 == bound: inside
    j = decide(table, 11.2345)
    assert j.outcome == FAIL and j.verdict == "FAIL"
    for text in ("relative perplexity 1.1235 exceeds bound 1.1", "value     : 11.2345", "baseline  : 10.0000",
                 "ratio     : 1.1235", "1.1 (acceptability table)", "GPTQ 4-bit, expected 1.05-1.10, acceptable: Usually",
                 f"protocol  : {PROTOCOL_LINE}", "1,234 tokens", "baselines/demo/code.full.json"):
        assert text in j.message


def test_marginal_rows_pass_but_are_marked(table):
    j = decide(table, 11.5, fmt="gguf", bits=3)
    assert (j.outcome, j.verdict) == (PASS, "pass (marginal)")
    assert decide(table, 12.5, fmt="gguf", bits=3).outcome == FAIL


def test_problematic_rows_are_expected_failures_unless_bounded(table):
    j = decide(table, 14.0, fmt="gguf", bits=2)
    assert j.outcome == XFAIL and "ratio     : 1.4000" in j.message and "open-ended" in j.message
    assert decide(table, 14.0, fmt="gguf", bits=2, override=1.3).outcome == FAIL
    assert decide(table, 12.0, fmt="gguf", bits=2, override=1.3).outcome == PASS


def test_reversal_is_flagged_beyond_the_tolerance_only(table):
    assert decide(table, 9.96).outcome == PASS  # 0.4% below: noise
    j = decide(table, 9.90)  # 1% below
    assert j.outcome == REVERSAL and "PERPLEXITY REVERSAL" in j.message and "Investigate" in j.message
    assert decide(table, 9.90, tolerance=0.02).outcome == PASS


def test_protocol_fingerprint_is_stable_and_sensitive():
    p = Protocol(corpus="c", corpus_source="s", text_sha256="t", documents=1, joiner="\n", tokenizer_sha256="k",
                 tokens_sha256="i", add_bos=False, max_length=8, stride=4, token_cap=None, scoring_rule=SCORING_RULE,
                 dtype="float32", device_class="cpu", tokens_scored=7)
    assert p.fingerprint == Protocol.from_dict(p.as_dict()).fingerprint
    from dataclasses import fields, replace

    for f in fields(p):
        value = getattr(p, f.name)
        changed = replace(p, **{f.name: (not value) if isinstance(value, bool) else
                                (value + 1 if isinstance(value, int) else f"{value}x")})
        assert changed.fingerprint != p.fingerprint, f.name
        assert changed.differences(p) and changed.differences(p)[0].startswith(f.name)


def test_report_round_trips_and_fills_a_marked_readme_section(tmp_path):
    from quantgate import cli
    from quantgate.report import Record, RunReport

    report = RunReport(profile="full", device="cpu", records=[
        Record(model="demo", variant="q4", corpus="code", metric="relative_perplexity", format="gptq", bits=4,
               verdict="pass (marginal)", value=11.0, baseline=10.0, ratio=1.1, bound=1.2)])
    (tmp_path / "q.json").write_text(report.to_json())
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo-summary:start -->\nold\n<!-- demo-summary:end -->\noutro\n")
    assert cli.main(["report", str(tmp_path / "q.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| demo/q4 | gptq | 4 | - | code | 11.000 | 10.000 | 1.1000 | 1.2 | pass (marginal) |" in text


def test_acceptability_view_puts_measured_ratios_beside_each_row(table):
    from quantgate.report import Record, RunReport

    report = RunReport(profile="full", device="cpu", records=[
        Record(model="demo", variant="gptq-w4g128", corpus="code", metric="relative_perplexity", format="gptq", bits=4,
               verdict="pass", ratio=1.0009)])
    text = report.acceptability_markdown(table)
    assert "| GPTQ 4-bit | 1.05-1.10 | Usually | 1.1 | gptq-w4g128 / code: 1.0009 | 0.031 / 0.85 | - | pass |" in text
    assert "| GGUF Q2_K | 1.15-1.30+ | Problematic | none | not in this run | none / none | - | - |" in text


def decide_with_interval(table, value, interval, rule="point", tolerance=0.005):
    from quantgate.stats import Interval

    bound = choose_bound(table, "gptq", 4, variant_override=None, model_overrides={})
    return judge(variant="demo/v", corpus="code", value=value, baseline=10.0, bound=bound, reversal_tolerance=tolerance,
                 tokens=1234, baseline_source="b.json", protocol_line=PROTOCOL_LINE,
                 ratio_interval=Interval(*interval), rule=rule)


def test_a_reversal_is_reported_only_when_its_interval_lies_below_one(table):
    noisy = decide_with_interval(table, 9.90, (0.97, 1.01))  # 1% below, but the interval reaches 1
    assert (noisy.outcome, noisy.note) == (PASS, None)
    real = decide_with_interval(table, 9.90, (0.985, 0.995))
    assert real.outcome == REVERSAL and "95% interval [0.985, 0.995]" in real.message and "Investigate" in real.message
    small = decide_with_interval(table, 9.97, (0.9960, 0.9990))  # significant, within the 0.5% tolerance
    assert small.outcome == PASS and small.note.startswith("significant reversal: 0.30% below FP16")
    assert "note      : significant reversal" in small.message


@pytest.mark.parametrize("rule", ["point", "interval"])
def test_a_significant_exceedance_fails_under_either_rule(table, rule):
    j = decide_with_interval(table, 11.2, (1.11, 1.13), rule=rule)
    assert j.outcome == FAIL
    assert "exceeds bound 1.1 (significant: the whole 95% interval [1.11, 1.13] is above the bound)" in j.message


def test_an_exceedance_within_noise_fails_by_point_estimate_and_passes_by_interval(table):
    point = decide_with_interval(table, 11.2, (1.08, 1.16), rule="point")
    assert point.outcome == FAIL and "(within noise: the 95% interval [1.08, 1.16] reaches back over the bound)" in point.message
    interval = decide_with_interval(table, 11.2, (1.08, 1.16), rule="interval")
    assert interval.outcome == PASS and "within noise" in interval.note and "exceedance rule: interval" in interval.message


@pytest.mark.parametrize("value, interval, rule, outcome, wording", [
    (0.90, (0.89, 0.91), "point", FAIL, "significant: the whole 95% interval [0.89, 0.91] is below the bound"),
    (0.94, (0.93, 0.96), "point", FAIL, "within noise"),
    (0.94, (0.93, 0.96), "interval", PASS, "within noise"),
    (0.97, (0.96, 0.98), "point", PASS, None),
])
def test_top1_agreement_is_bounded_from_below(value, interval, rule, outcome, wording):
    from quantgate.gate import judge_metric
    from quantgate.stats import Interval

    j = judge_metric(variant="demo/v", corpus="code", metric="top1 agreement", value=value, interval=Interval(*interval),
                     bound=0.95, higher_is_better=True, rule=rule, row_text="GPTQ 4-bit", details=[])
    assert j.outcome == outcome
    if outcome == FAIL:
        assert f"top1 agreement {value:g} below the minimum 0.95 ({wording}" in j.message
    elif wording:
        assert wording in j.note
    else:
        assert j.note is None


def test_kl_bound_comes_from_the_row_unless_the_variant_overrides_it(table):
    from quantgate.thresholds import distribution_bound, find_row

    row = find_row(table, "gptq", 4)
    assert distribution_bound(row, "max_kl", None).value == row.max_kl
    assert (distribution_bound(row, "max_kl", 0.5).value, distribution_bound(row, "max_kl", 0.5).source) == (
        0.5, "manifest variant max_kl")


def test_a_measured_noise_floor_widens_the_bound_and_the_reversal_line(table):
    bound = choose_bound(table, "fp16", 16, variant_override=None, model_overrides={})  # bound 1.00 exactly
    kwargs = dict(variant="demo/fp16", corpus="code", baseline=10.0, bound=bound, reversal_tolerance=0.0, tokens=1,
                  baseline_source="b.json", protocol_line=PROTOCOL_LINE)
    assert judge(value=10.0005, **kwargs).outcome == FAIL  # CPU: no noise, 1.00005 > 1.00
    gpu = judge(value=10.0005, noise_log_ratio=1e-4, **kwargs)  # the reference itself moves 1e-4 on re-scoring
    assert gpu.outcome == PASS and "noise     : bound and reversal line widened by x1.000100" in gpu.message
    assert judge(value=9.9995, **kwargs).outcome == REVERSAL
    assert judge(value=9.9995, noise_log_ratio=1e-4, **kwargs).outcome == PASS


def test_a_non_finite_metric_fails_instead_of_passing():
    from quantgate.gate import judge_metric

    j = judge_metric(variant="demo/v", corpus="code", metric="kl divergence", value=float("nan"), interval=None,
                     bound=0.03, higher_is_better=False, rule="point", row_text="GPTQ 4-bit", details=[])
    assert j.outcome == FAIL and "not a number" in j.message


@pytest.mark.parametrize("rule", ["point", "interval"])
def test_differences_below_the_float_tolerance_are_never_a_reversal_a_note_or_a_failure(table, rule):
    """The FP16 reference re-scored on another CPU: ratios 1 - 2.4e-8 and 1 + 5.6e-9 with intervals that do
    not reach 1 (KL 4.3e-12) were "significant reversal" notes and a failure of the FP16 row's bound 1.00."""
    from quantgate.stats import Interval

    bound = choose_bound(table, "fp16", 16, variant_override=None, model_overrides={})
    kwargs = dict(variant="demo/fp16", corpus="prose", baseline=372.0, bound=bound, reversal_tolerance=0.005,
                  tokens=8191, baseline_source="b.json", protocol_line=PROTOCOL_LINE, rule=rule)
    below = judge(value=372.0 * (1 - 2.4e-8), ratio_interval=Interval(1 - 3e-8, 1 - 1.5e-8), **kwargs)
    above = judge(value=372.0 * (1 + 5.6e-9), ratio_interval=Interval(1 + 3e-9, 1 + 8e-9), **kwargs)
    for j in (below, above):
        assert (j.outcome, j.note) == (PASS, None) and "note" not in j.message
    from quantgate.gate import judge_metric

    kl = judge_metric(variant="demo/fp16", corpus="prose", metric="kl divergence", value=4.3e-12,
                      interval=Interval(4.1e-12, 4.5e-12), bound=2.5e-5, higher_is_better=False, rule=rule,
                      row_text="FP16", details=[])
    assert (kl.outcome, kl.note) == (PASS, None)


def test_a_real_small_reversal_is_still_reported_above_the_float_tolerance(table):
    noted = decide_with_interval(table, 10.0 * 0.999, (0.9985, 0.9995))
    assert noted.outcome == PASS and noted.note.startswith("significant reversal: 0.10% below FP16")
    assert decide_with_interval(table, 10.0 * 0.999, (0.9985, 0.9995), tolerance=0.0005).outcome == REVERSAL


def test_a_near_tie_at_the_top_within_the_float_tolerance_counts_as_agreement():
    import numpy as np

    from quantgate.gate import FLOAT_TOKEN_TOL
    from quantgate.measurement import same_top1

    class Scores:  # the variant's view: its argmax, its max log-prob, FP16's top token's log-prob under it
        argmax = np.array([5, 5, 5])
        max_logprob = np.array([-1.0, -1.0, -1.0])
        gathered = np.array([[-1.0 - FLOAT_TOKEN_TOL / 2], [-1.0 - 4 * FLOAT_TOKEN_TOL], [-1.0]])

    class Baseline:
        topk_ids = np.array([[7], [7], [5]])

    assert same_top1(Scores, Baseline).tolist() == [True, False, True]
