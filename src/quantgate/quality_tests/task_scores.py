"""Task scores beside perplexity: every variant against FP16's per-item results, one test per
(variant x task), within the maximum drop the acceptability table sets for the task's capability.

Task protocols (rendered prompts, shots, scoring rule, token budget, tokenizer) are snapshotted
like corpus protocols: a change shows as a diff and the comparison is refused until re-baselined.
"""

import pytest


@pytest.mark.quality
def test_task_score(quality_task_case, quality_gate):
    quality_gate.task_score(quality_task_case)


@pytest.mark.quality
@pytest.mark.quality_protocol
def test_task_protocol_snapshot(quality_task_protocols, snapshot):
    assert quality_task_protocols == snapshot
