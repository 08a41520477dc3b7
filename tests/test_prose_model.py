"""The gate on its second model (fixtures/prose_model): flat next-token distributions full of near-ties.

Before top-1 agreement excused near-ties, this model's own BF16 copy failed the table's 0.997 on
code (0.9967 on the fast tier): the figure comes from Llama-3-8B, whose distributions have fewer
near-ties. Here every legitimate variant passes under the table's default bounds, and a variant
whose top-1 disagreement is more than near-ties explain still fails, on this model and on the demo.
"""

from pathlib import Path

import pytest
from tinyzoo import perturb_layer

from quantgate.checks import Case, Gate
from quantgate.evaluation import Evaluator
from quantgate.gate import TIE_WIDTH
from quantgate.manifest import load_manifest
from quantgate.report import RunReport
from quantgate.thresholds import find_row, load_table

REPO = Path(__file__).resolve().parents[1]
REFERENCES = {"prose": REPO / "fixtures" / "prose_model" / "reference",
              "demo": REPO / "fixtures" / "demo_zoo" / "reference"}


def gate_for(manifest_path: Path):
    report = RunReport(profile="fast", device="cpu")
    return Gate(Evaluator(manifest=load_manifest(manifest_path), profile="fast", device="cpu"), load_table(), report), report


def checks(gate: Gate, case: Case) -> None:
    gate.relative_perplexity(case)
    gate.kl_divergence(case)
    gate.top1_agreement(case)


@pytest.mark.parametrize("variant", ["bf16", "gptq-w8g128", "gguf-q8_0", "gguf-q8_0-llamacpp"])
@pytest.mark.parametrize("corpus", ["code", "prose"])
def test_every_legitimate_variant_passes_under_the_tables_default_bounds(variant, corpus):
    """The repository's manifest and baselines, as `pytest -m quality --quality-profile fast` runs them."""
    gate, report = gate_for(REPO / "quantgate.toml")
    checks(gate, Case("prose", variant, corpus))
    assert [r.verdict for r in report.records] == ["pass"] * 3


def test_the_bf16_copy_disagrees_more_than_the_table_allows_and_every_flip_is_a_near_tie():
    """The false failure reproduced: plain agreement is below 0.997, every flip is a near-tie."""
    gate, report = gate_for(REPO / "quantgate.toml")
    gate.top1_agreement(Case("prose", "bf16", "code"))
    (record,) = report.records
    assert record.verdict == "pass"
    stats = gate.evaluator.compare("prose", "bf16", "code",
                                   gate.evaluator.comparable_baseline("prose", "code", "transformers")).stats
    assert stats.top1_plain < find_row(load_table(), "bf16", 16).min_top1
    assert stats.tie_flips == round((1 - stats.top1_plain) * stats.tokens) > 20
    assert stats.top1 == record.value == 1.0


def project_with(tmp_path: Path, model: str, block: str) -> Path:
    """The repository's manifest, paths made absolute, with one extra variant of `model`."""
    text = (REPO / "quantgate.toml").read_text()
    text = text.replace('baselines = "baselines"', f'baselines = "{REPO / "baselines"}"')
    text = text.replace('zoo_dir = "build/zoo"', f'zoo_dir = "{REPO / "build" / "zoo"}"')
    text = text.replace('"fixtures/', f'"{REPO / "fixtures"}/')
    marker = f"[[models.{model}.variants]]"
    at = text.index(marker)
    (tmp_path / "quantgate.toml").write_text(text[:at] + block.replace("MODEL", model) + "\n" + text[at:])
    return tmp_path / "quantgate.toml"


@pytest.mark.parametrize("model, scale", [("prose", 2.0), ("demo", 0.5)])
def test_a_perturbed_layer_still_fails_top1_under_the_16_bit_rows(tmp_path, model, scale):
    """Noise on one layer, declared FP16: more flips beyond near-ties than the 0.3% the FP16 row allows.
    Near-ties excused, it still fails, and the message says how many flips were near-ties. (The prose
    model's six layers damp the noise: at 0.5x its KL, 1e-5, is the size of its BF16 copy's and every
    flip is a near-tie, so it takes 2x to make a variant the 16-bit rows must refuse.) The demo's
    3x perturbation against the 4-bit row: tests/test_kl_gate.py."""
    path = perturb_layer(REFERENCES[model], tmp_path / "perturbed", scale)
    manifest = project_with(tmp_path, model, f'[[models.MODEL.variants]]\nname = "perturbed"\nformat = "fp16"\n'
                                             f'bits = 16\npath = "{path}"\n')
    gate, report = gate_for(manifest)
    with pytest.raises(pytest.fail.Exception) as failed:
        gate.top1_agreement(Case(model, "perturbed", "prose"))
    (record,) = report.records
    assert record.verdict == "FAIL" and record.value < 0.997
    message = str(failed.value)
    assert "below the minimum 0.997" in message and f"within {TIE_WIDTH:g} nats" in message
    stats = gate.evaluator.compare(model, "perturbed", "prose",
                                   gate.evaluator.comparable_baseline(model, "prose", "transformers")).stats
    assert 1 - stats.top1 > 0.003 and stats.top1 > stats.top1_plain  # some flips excused, too many left
    assert f"near-ties : {stats.tie_flips:,} of the" in message
