"""Protocol drift: each (model, corpus) protocol, for every profile, is snapshotted with syrupy.

A change of stride, max_length, corpus text, tokenizer or scoring rule shows up here as a
readable diff in review. Accept an intended change with `pytest -m quality --snapshot-update`
and re-baseline (`quantgate baseline --force`); the gate refuses to compare otherwise.
"""

import pytest


@pytest.mark.quality
@pytest.mark.quality_protocol
def test_protocol_snapshot(quality_protocols, snapshot):
    assert quality_protocols == snapshot
