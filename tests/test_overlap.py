"""Calibration text overlapping evaluation text: measured, shown beside the variant, and blamed for a reversal."""

import json

import numpy as np

from quantgate.overlap import CalibrationOverlap, ngram_share


def test_a_hand_counted_share():
    evaluation = np.arange(1, 11)  # 3-grams at positions 0..7
    calibration = np.array([42, 3, 4, 5, 6, 7, 42])  # holds (3,4,5), (4,5,6), (5,6,7)
    assert ngram_share(evaluation, calibration, n=3) == 3 / 8
    assert ngram_share(evaluation, evaluation[::-1], n=3) == 0.0
    assert ngram_share(evaluation[:2], calibration, n=3) == 0.0  # no n-gram at all
    assert CalibrationOverlap("c", "e", 0.05, 0.05).attributed and not CalibrationOverlap("c", "e", 0.049, 0.05).attributed


PLANTED = """
[[models.tiny.variants]]
name = "uniform"
format = "fp16"
bits = 16
path = "models/uniform"
max_ratio = 1.05
calibration = "planted"

# the same checkpoint declared without calibration text: an ablation partner of "uniform" (calibration only)
[[models.tiny.variants]]
name = "uniform-twin"
format = "fp16"
bits = 16
path = "models/uniform"
max_ratio = 1.05
calibration = "none"

[corpora.planted]
description = "the code corpus itself, planted as calibration text"
path = "json"
data_files = ["data/code.jsonl"]
split = "train"
text = "{prompt}{solution}"
"""


def test_calibration_planted_in_an_evaluation_corpus_takes_the_blame_for_its_reversal(pytester, tiny_zoo_template,
                                                                                       tmp_path):
    """The uniform variant scores below FP16 on both corpora. Its calibration text is the code corpus: on code the
    reversal is attributed to it (all the 8-grams); on prose the overlap is measured, small, and said not to be the
    cause. Both shares are in the JSON and beside the variant in the summary."""
    from test_plugin_e2e import make_project, run

    make_project(pytester, tiny_zoo_template, variants=PLANTED)
    result = run(pytester, "-k", "relative_perplexity", "--quality-json", str(tmp_path / "r.json"))
    out = result.stdout.str()
    assert result.ret == 1
    assert ("tiny/uniform on code: PERPLEXITY REVERSAL" in out and "Attributed to calibration on the evaluation text: "
            "calibration text 'planted' holds 100.0% of corpus 'code''s 8-grams (declared share 5%)" in out)
    prose = out[out.index("tiny/uniform on prose"):]
    assert "(not calibration overlap: calibration text 'planted' holds" in prose and "Attributed" not in prose.split("\n\n")[0]
    records = {r["corpus"]: r for r in json.loads((tmp_path / "r.json").read_text())["records"]
               if r["metric"] == "relative_perplexity" and r["variant"] == "uniform"}
    assert records["code"]["calibration_overlap"] == 1.0 and records["prose"]["calibration_overlap"] < 0.05
    summary = (pytester.path / "reports" / "quality-summary.md").read_text()
    assert "| tiny/uniform |" in summary and "code 100.00%, prose " in summary
    # its ablation partner: named in the message when its check ran (measured after it, so not yet), and in the
    # record's note with its status once the run had both
    assert "Ablation partners: uniform-twin (calibration) not measured yet." in out
    assert ("Ablation partners: uniform (calibration) also reverses (" in out[out.index("tiny/uniform-twin on code"):])
    assert records["code"]["note"].startswith("Ablation partners: uniform-twin (calibration) also reverses (0.0008 [")
