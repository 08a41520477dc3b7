"""The gate: relative perplexity of every variant against its stored FP16 baseline.

Cases come from quantgate.toml (one per variant x corpus); the plugin orders them so that one
model is resident at a time. Run with `pytest -m quality`.
"""

import pytest


@pytest.mark.quality
def test_relative_perplexity(quality_case, quality_gate):
    quality_gate.relative_perplexity(quality_case)
