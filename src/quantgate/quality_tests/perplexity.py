"""The gate: every variant against its stored FP16 baseline, one test per (variant x corpus x metric).

Cases come from quantgate.toml; the plugin orders them so that one model is resident at a time,
and the three checks of a case share one scoring pass. Run with `pytest -m quality`.
"""

import pytest


@pytest.mark.quality
def test_relative_perplexity(quality_case, quality_gate):
    quality_gate.relative_perplexity(quality_case)


@pytest.mark.quality
def test_kl_divergence(quality_case, quality_gate):
    quality_gate.kl_divergence(quality_case)


@pytest.mark.quality
def test_top1_agreement(quality_case, quality_gate):
    quality_gate.top1_agreement(quality_case)


@pytest.mark.quality
def test_registered_metric(quality_metric_case, quality_gate):
    """Metrics a team registered (quantgate.metrics.register_metric); none by default."""
    quality_gate.metric(quality_metric_case.case, quality_metric_case.metric)
