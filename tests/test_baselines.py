"""Baseline files: round trip, atomic writes, strict reads with messages that name the file."""

import json
from dataclasses import replace

import numpy as np
import pytest

from quantgate import baselines as bl
from quantgate.errors import BaselineFormatError, BaselineMissing
from quantgate.protocol import SCORING_RULE, Protocol


@pytest.fixture
def protocol():
    return Protocol(corpus="code", corpus_source="json[train]", text_sha256="a" * 64, documents=3, joiner="\n\n",
                    tokenizer_sha256="b" * 64, tokens_sha256="c" * 64, add_bos=False, max_length=64, stride=32,
                    token_cap=None, scoring_rule=SCORING_RULE, dtype="float32", device_class="cpu", tokens_scored=5)


@pytest.fixture
def baseline(protocol):
    logprobs = np.log(np.array([0.5, 0.25, 0.1, 0.9, 0.3]))
    return bl.Baseline(model="m", corpus="code", profile="full", protocol=protocol,
                       perplexity=float(np.exp(-logprobs.mean())), mean_nll=float(-logprobs.mean()),
                       environment={"torch": "2.13.0"}, provenance={"git_commit": "abc", "reference_sha256": "d"},
                       logprobs=logprobs, doc_starts=np.array([0, 2]))


def test_round_trip(tmp_path, baseline):
    path = bl.baseline_path(tmp_path, "m", "code", "full")
    bl.write_baseline(baseline, path)
    back = bl.read_baseline(path)
    assert back.protocol == baseline.protocol
    assert back.perplexity == pytest.approx(baseline.perplexity, rel=1e-7)  # recomputed from the float32 arrays
    np.testing.assert_allclose(back.logprobs, baseline.logprobs, rtol=1e-6)
    assert back.doc_starts.tolist() == [0, 2]
    doc = json.loads(path.read_text())
    assert doc["schema"] == bl.SCHEMA_VERSION and doc["protocol_fingerprint"] == baseline.protocol.fingerprint
    arrays = doc["arrays"]["file"]
    assert arrays == f"code.full.{doc['arrays']['sha256'][:12]}.npz"  # named by its content
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["code.full.json", arrays])  # no temp files
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_missing_baseline_says_which_command_creates_it(tmp_path):
    with pytest.raises(BaselineMissing, match="create it with: quantgate baseline --model m"):
        bl.read_baseline(tmp_path / "m" / "code.full.json", create_hint="quantgate baseline --model m")


def _corrupt(path, mutate):
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(schema=99), "schema 99 was written by a newer quantgate"),
    (lambda d: d.update(schema=0), "unknown baseline schema 0"),
    (lambda d: d["summary"].pop("perplexity"), "key 'summary.perplexity' is missing"),
    (lambda d: d["protocol"].update(stride=16), "protocol_fingerprint does not match"),
    (lambda d: d["arrays"].update(sha256="0" * 64), "do not match the hash"),
    (lambda d: d.update(kind="something-else"), "not a quantgate baseline"),
])
def test_malformed_baselines_are_refused_by_name(tmp_path, baseline, mutate, message):
    path = bl.write_baseline(baseline, bl.baseline_path(tmp_path, "m", "code", "full"))
    _corrupt(path, mutate)
    with pytest.raises(BaselineFormatError, match=message) as err:
        bl.read_baseline(path)
    assert str(path.parent) in str(err.value)


def test_truncated_json_and_missing_arrays(tmp_path, baseline):
    path = bl.write_baseline(baseline, bl.baseline_path(tmp_path, "m", "code", "full"))
    arrays = json.loads(path.read_text())["arrays"]["file"]
    (path.parent / arrays).unlink()
    with pytest.raises(BaselineFormatError, match=f"array file {arrays} is missing"):
        bl.read_baseline(path)
    path.write_text(path.read_text()[:40])
    with pytest.raises(BaselineFormatError, match="not valid JSON"):
        bl.read_baseline(path)


def test_failed_write_leaves_the_old_baseline_intact(tmp_path, baseline, monkeypatch):
    path = bl.write_baseline(baseline, bl.baseline_path(tmp_path, "m", "code", "full"))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    files = sorted(p.name for p in path.parent.iterdir())
    monkeypatch.setattr(bl.os, "replace", boom)
    with pytest.raises(OSError):
        bl.write_baseline(replace(baseline, logprobs=baseline.logprobs * 2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == files
    assert bl.read_baseline(path).perplexity == pytest.approx(baseline.perplexity, rel=1e-6)


def test_schema_1_baselines_are_read_as_transformers_ones(tmp_path, baseline):
    """Schema 1 predates the protocol's backend field; every schema-1 baseline was scored by transformers."""
    from quantgate.protocol import fingerprint_of

    path = bl.baseline_path(tmp_path, "m", "code", "full")
    bl.write_baseline(baseline, path)

    def as_schema_1(d):
        del d["protocol"]["backend"]
        d.update(schema=1, protocol_fingerprint=fingerprint_of(d["protocol"]))

    _corrupt(path, as_schema_1)
    back = bl.read_baseline(path)
    assert back.protocol.backend == "transformers" and back.protocol.matches(baseline.protocol)
    _corrupt(path, lambda d: d.update(schema=2))  # a schema-2 file must carry the field
    with pytest.raises(BaselineFormatError, match=r"malformed protocol: .*backend"):
        bl.read_baseline(path)


def test_each_backend_has_its_own_baseline_file(tmp_path):
    assert bl.baseline_path(tmp_path, "m", "code", "full").name == "code.full.json"
    assert bl.baseline_path(tmp_path, "m", "code", "full", "llama.cpp").name == "code.full.llamacpp.json"


def test_noise_floor_reruns_are_stored_and_zero_on_cpu(tiny_project):
    """--noise-reruns re-scores the reference; on CPU nothing moves, and the baseline says how it was measured."""
    import json

    from quantgate import cli

    manifest = tiny_project / "quantgate.toml"
    assert cli.main(["baseline", "--manifest", str(manifest), "--corpus", "code", "--noise-reruns", "2"]) == 0
    doc = json.loads(next((tiny_project / "baselines" / "tiny").glob("code.*.json")).read_text())
    assert doc["noise_floor"]["reruns"] == 2
    assert (doc["noise_floor"]["log_ratio"], doc["noise_floor"]["top1_disagreement"]) == (0.0, 0.0)
    assert cli.main(["baseline", "--manifest", str(manifest), "--corpus", "prose"]) == 0
    doc = json.loads(next((tiny_project / "baselines" / "tiny").glob("prose.*.json")).read_text())
    assert doc["noise_floor"]["reruns"] == 0 and "deterministic" in doc["noise_floor"]["why"]


def test_a_hand_edited_summary_is_refused_naming_the_baseline(tmp_path, baseline):
    """x1.029 on summary.perplexity turned a failing variant into a pass: the gate's numbers now come from
    the hashed arrays, and a summary that disagrees with them is an error about the baseline file."""
    path = bl.write_baseline(baseline, bl.baseline_path(tmp_path, "m", "code", "full"))
    for key in ("perplexity", "mean_nll"):
        _corrupt(path, lambda d, key=key: d["summary"].update({key: d["summary"][key] * 1.029}))
        with pytest.raises(BaselineFormatError, match=rf"code.full.json: summary.{key} .* does not match its arrays "
                                                      r".*edited by hand\? Restore it from git, or re-measure"):
            bl.read_baseline(path)
        bl.write_baseline(baseline, path)


def test_a_hand_edited_noise_floor_is_refused(tmp_path, baseline):
    noisy = replace(baseline, noise={"reruns": 1, "log_ratio": 1e-4, "top1_disagreement": 0.001})
    path = bl.write_baseline(noisy, bl.baseline_path(tmp_path, "m", "code", "full"))
    assert bl.read_baseline(path).noise_log_ratio == 1e-4
    _corrupt(path, lambda d: d["noise_floor"].update(log_ratio=0.05))  # a 5% wider bound, by hand
    with pytest.raises(BaselineFormatError, match="summary or noise floor does not match integrity.sha256"):
        bl.read_baseline(path)


def test_schema_3_baselines_are_read_unless_an_unverified_noise_floor_would_widen_the_bounds(tmp_path, baseline):
    path = bl.write_baseline(replace(baseline, noise={"reruns": 0, "log_ratio": 0.0, "top1_disagreement": 0.0}),
                             bl.baseline_path(tmp_path, "m", "code", "full"))
    _corrupt(path, lambda d: (d.update(schema=3), d.pop("integrity")))
    assert bl.read_baseline(path).noise_log_ratio == 0.0  # as the repository's own schema-3 baselines
    _corrupt(path, lambda d: d["noise_floor"].update(log_ratio=0.05))
    with pytest.raises(BaselineFormatError, match="schema 3 baseline whose noise floor widens the bounds and nothing "
                                                  "verifies; rewrite it with: quantgate baseline --force"):
        bl.read_baseline(path)


def test_the_repositorys_schema_3_baselines_still_read():
    from pathlib import Path

    stored = sorted((Path(__file__).resolve().parents[1] / "baselines" / "demo").glob("*.json"))
    read = [bl.read_baseline(p) for p in stored if p.name != "builds.json"]
    assert len(read) == 8 and all(b.perplexity > 1 for b in read)


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    """The reference is hashed by the build step and the gate many times: read once, re-read after a change."""
    import hashlib
    import os

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (reads.append(p), real_open(p, *a, **k))[1])
    first = bl.file_sha256(path)
    assert bl.file_sha256(path) == first == hashlib.sha256(b"weights").hexdigest() and len(reads) == 1
    path.write_bytes(b"other weights")
    os.utime(path, ns=(1, 1))  # even an edit that restores an old timestamp changes the size here
    assert bl.file_sha256(path) == hashlib.sha256(b"other weights").hexdigest() and len(reads) == 2
