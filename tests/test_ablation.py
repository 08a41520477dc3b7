"""Ablation pairs: variants that differ in exactly one declared factor, side by side, with reversal partners."""

import numpy as np
import pytest

from quantgate.ablation import annotate_reversals, find_pairs, markdown
from quantgate.report import Record
from quantgate.stats import compare, paired_difference, paired_task_difference


def _ppl(variant, ratio, interval, **factors):
    base = dict(model="m", corpus="wiki", metric="relative_perplexity", format="gptq", bits=4, verdict="pass",
                backend="transformers", group_size=128, desc_act=False, outlier_handling="none", calibration="c4",
                tokens_scored=1000, eval_seconds=2.0, kernels=["TorchLinear"])
    return Record(variant=variant, ratio=ratio, distribution={"ppl_ratio_interval": interval}, **{**base, **factors})


RECORDS = [
    _ppl("g128", 0.995, [0.993, 0.997]),  # a significant reversal
    _ppl("g64", 1.004, [1.002, 1.006], group_size=64),
    _ppl("act", 0.996, [0.994, 0.998], desc_act=True, outlier_handling="activation-order (desc_act)"),
    _ppl("w8-g64", 1.0, [0.999, 1.001], bits=8, group_size=64),  # two factors from g128: no pair with it
    _ppl("g128-llamacpp", 1.0, [0.999, 1.001], backend="llama.cpp"),  # another backend: never paired across
    Record(model="m", variant="g128", corpus="task:mmlu", metric="task_score_drop", format="gptq", bits=4,
           verdict="pass", value=0.61, backend="transformers"),
    Record(model="m", variant="g64", corpus="task:mmlu", metric="task_score_drop", format="gptq", bits=4,
           verdict="pass", value=0.58, backend="transformers"),
]


def test_pairs_differ_in_one_factor_and_desc_act_restated_as_outlier_handling_counts_once():
    pairs = {(p.first, p.second): (p.factor, p.values) for p in find_pairs(RECORDS)}
    assert pairs == {("act", "g128"): ("desc_act", (True, False)),
                     ("g128", "g64"): ("group_size", (128, 64)),
                     ("g64", "w8-g64"): ("bits", (4, 8))}


def test_the_table_shows_both_sides_their_difference_speed_tasks_and_reversal_partners():
    text = "\n".join(markdown(RECORDS, "cpu"))
    assert ("| group_size | m/g128 (128) | m/g64 (64) | wiki | 0.9950 [0.9930, 0.9970] | 1.0040 [1.0020, 1.0060] | "
            "+0.0090 (unpaired) | - | - | - | 500 tok/s (cpu; TorchLinear) | 500 tok/s (cpu; TorchLinear) |") in text
    assert "| group_size | m/g128 (128) | m/g64 (64) | tasks | mmlu 0.610 | mmlu 0.580 | mmlu -0.030 (unpaired) |" in text
    assert "- m/g128 reverses on wiki; its group_size partner g64 does not" in text
    assert "- m/g128 reverses on wiki; its desc_act partner act also reverses" in text
    assert "- m/act reverses on wiki; its desc_act partner g128 also reverses" in text
    assert markdown([RECORDS[0]], "cpu") == []


def test_a_variant_that_was_not_measured_leaves_its_pairs_out():
    """A failed build or a missing checkpoint gives a record without a ratio: no row, no crash."""
    unmeasured = Record(**{**RECORDS[1].__dict__, "ratio": None, "distribution": None, "verdict": "cannot test"})
    assert markdown([RECORDS[0], unmeasured], "cpu") == []  # a pair, but no row: no table at all
    # an error record from a worker that died carries no backend at all
    crashed = Record(model="m", variant="lost", corpus="wiki", metric="relative_perplexity", format="?", bits=None,
                     verdict="error")
    assert find_pairs([*RECORDS, crashed]) == find_pairs(RECORDS)


def _scored(rng, shared, offset, n_windows=40, size=50):
    """A variant's paired comparison with FP16: per-token NLL differences = a per-window part both variants of a
    pair share (the text's hard passages) + this variant's own offset + a little token noise."""
    sizes = np.full(n_windows, size)
    nll_diff = np.repeat(shared, size) + offset + rng.normal(0, 0.01, n_windows * size)
    ref = np.full(n_windows * size, -2.0)
    return compare(ref_target=ref, var_target=ref - nll_diff, kl=np.abs(nll_diff), same_top1=np.ones(len(ref), bool),
                   block_sizes=sizes, kl_kind="exact", top_k=None)


def test_the_difference_of_a_pair_is_paired_window_by_window():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.05, 40)  # large next to the 0.002 the two variants differ by
    a, b = _scored(rng, shared, 0.0), _scored(rng, shared, 0.002)
    diff = paired_difference(a.windows, b.windows)
    assert diff.ratio_difference == pytest.approx(b.ppl_ratio - a.ppl_ratio, rel=1e-6)
    assert diff.kl_difference == pytest.approx(b.kl_mean - a.kl_mean, rel=1e-6)
    # paired, the shared part cancels: B is worse, and the interval says so; each ratio's own interval is ~10x wider
    assert 0 < diff.ratio_interval.low < diff.ratio_difference < diff.ratio_interval.high
    own = a.ppl_ratio_interval.high - a.ppl_ratio_interval.low
    assert diff.ratio_interval.high - diff.ratio_interval.low < own / 5
    # the sums are per window: the shared part x 50 tokens, plus the token noise; together the ratio
    assert a.windows["tokens"] == [50] * 40
    assert np.allclose(a.windows["nll_diff"], shared * 50, atol=0.4)
    assert np.exp(np.sum(a.windows["nll_diff"]) / 2000) == pytest.approx(a.ppl_ratio, rel=1e-9)
    # scored on other windows (another protocol, a shard of a different run): no pairing
    assert paired_difference(a.windows, {**b.windows, "tokens": [49] * 40}) is None


def test_task_differences_pair_item_by_item():
    rng = np.random.default_rng(1)
    n = 60
    ref, a, b = (rng.random(n) < 0.6 for _ in range(3))
    ids = [f"i{k}" for k in range(n)]
    lost_gained = [({i for i, r, v in zip(ids, ref, side, strict=True) if r and not v},
                    {i for i, r, v in zip(ids, ref, side, strict=True) if v and not r}) for side in (a, b)]
    d, interval = paired_task_difference(n, *lost_gained)
    assert d == pytest.approx(b.mean() - a.mean())
    assert interval.low <= d <= interval.high
    assert paired_task_difference(n, *lost_gained[::-1])[0] == pytest.approx(-d)


def test_the_table_pairs_when_both_records_carry_their_windows():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.05, 40)
    scored = {"g128": _scored(rng, shared, 0.0), "g64": _scored(rng, shared, 0.002)}
    records = [_ppl(v, st.ppl_ratio, [st.ppl_ratio_interval.low, st.ppl_ratio_interval.high],
                    **({"group_size": 64} if v == "g64" else {})) for v, st in scored.items()]
    for r in records:
        r.windows = scored[r.variant].windows
    diff = paired_difference(*(scored[v].windows for v in ("g128", "g64")))
    row = next(line for line in markdown(records, "cpu") if line.startswith("| group_size"))
    assert (f"| {diff.ratio_difference:+.4f} [{diff.ratio_interval.low:+.4f}, {diff.ratio_interval.high:+.4f}] |"
            in row)
    assert "(unpaired)" not in row


def test_a_reversal_note_names_its_partners_and_whether_they_reverse():
    records = [Record(**r.__dict__) for r in RECORDS]
    records[0].note = "significant reversal: 0.50% below FP16. Ablation partners: act (desc_act) not measured yet."
    annotate_reversals(records)
    note = records[0].note
    assert note.startswith("significant reversal: 0.50% below FP16. Ablation partners: ")
    assert "act (desc_act) also reverses (0.9960 [0.9940, 0.9980])" in note
    assert "g64 (group_size) does not reverse (1.0040 [1.0020, 1.0060])" in note
    assert "not measured yet" not in note and note.count("Ablation partners") == 1
    assert records[1].note is None  # g64 does not reverse: nothing added
    annotate_reversals(records)
    assert records[0].note == note  # a second pass (a merge of shards) replaces, never repeats
