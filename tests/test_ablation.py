"""Ablation pairs: variants that differ in exactly one declared factor, side by side, with reversal partners."""

from quantgate.ablation import find_pairs, markdown
from quantgate.report import Record


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
            "+0.0090 | - | - | 500 tok/s (cpu; TorchLinear) | 500 tok/s (cpu; TorchLinear) |") in text
    assert "| group_size | m/g128 (128) | m/g64 (64) | tasks | mmlu 0.610 | mmlu 0.580 | -0.030 |" in text
    assert "- m/g128 reverses on wiki; its group_size partner g64 does not" in text
    assert "- m/g128 reverses on wiki; its desc_act partner act also reverses" in text
    assert "- m/act reverses on wiki; its desc_act partner g128 also reverses" in text
    assert markdown([RECORDS[0]], "cpu") == []


def test_a_variant_that_was_not_measured_leaves_its_pairs_out():
    """A failed build or a missing checkpoint gives a record without a ratio: no row, no crash."""
    unmeasured = Record(**{**RECORDS[1].__dict__, "ratio": None, "distribution": None, "verdict": "cannot test"})
    text = "\n".join(markdown([RECORDS[0], unmeasured], "cpu"))
    assert "| wiki |" not in text
    # an error record from a worker that died carries no backend at all
    crashed = Record(model="m", variant="lost", corpus="wiki", metric="relative_perplexity", format="?", bits=None,
                     verdict="error")
    assert find_pairs([*RECORDS, crashed]) == find_pairs(RECORDS)
