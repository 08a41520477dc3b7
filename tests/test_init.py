"""`quantgate init`: from an empty directory with a small model, a BF16 copy and a GGUF Q8_0 of it, init, baseline
and `pytest -m quality` pass with no file copied or edited by hand."""

import shutil
import sys
from pathlib import Path

import datasets  # noqa: F401  imported out here: pytester's in-process runs drop modules imported inside them
import pytest

from quantgate import cli
from quantgate.errors import QuantgateError
from quantgate.manifest import load_manifest
from quantgate.scaffold import corpus_block, describe_variant

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkpoints(tmp_path):
    """models/tiny (the reference: the demo's trained 5.5M-parameter model; a random one's BF16 copy would fail
    the table's BF16 KL bound), models/tiny-bf16 (a BF16 copy) and models/tiny-q8_0.gguf, nothing else."""
    import torch
    from transformers import AutoModelForCausalLM

    pytest.importorskip("llama_cpp")
    from quantgate.checkpoints.gguf_build import quantize_gguf, write_f16_gguf

    root = tmp_path / "project"
    models = root / "models"
    shutil.copytree(REPO / "fixtures" / "demo_zoo" / "reference", models / "tiny")
    model = AutoModelForCausalLM.from_pretrained(models / "tiny", dtype=torch.bfloat16)
    model.save_pretrained(models / "tiny-bf16")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (models / "tiny" / name).is_file():
            shutil.copy(models / "tiny" / name, models / "tiny-bf16" / name)
    f16 = tmp_path / "tiny-f16.gguf"
    write_f16_gguf(models / "tiny", f16)
    quantize_gguf(f16, models / "tiny-q8_0.gguf", "Q8_0")
    return root


def test_init_baseline_and_the_gate_pass_with_nothing_copied_or_edited(checkpoints, pytester, monkeypatch):
    monkeypatch.chdir(checkpoints)
    assert cli.main(["init", "models/tiny", "models/tiny-bf16", "models/*.gguf", "--corpus", "humaneval"]) == 0
    manifest = load_manifest(checkpoints / "quantgate.toml")
    variants = {v.name: v for v in manifest.models["tiny"].variants}
    assert (variants["tiny-bf16"].format, variants["tiny-bf16"].bits) == ("bf16", 16)
    assert (variants["tiny-q8_0"].format, variants["tiny-q8_0"].bits) == ("gguf", 8)  # read from general.file_type
    assert variants["tiny-q8_0-llamacpp"].backend == "llama.cpp"
    assert (checkpoints / ".github" / "workflows" / "quality.yml").is_file()
    assert "build/" in (checkpoints / ".gitignore").read_text()
    tests = (checkpoints / "quality_tests" / "test_quality.py").read_text()
    assert "from quantgate.quality_tests import *" in tests  # imported, never a copy

    assert cli.main(["baseline", "--profile", "fast"]) == 0  # also records the protocol snapshots
    assert list((checkpoints / "quality_tests" / "__snapshots__").glob("*.ambr"))
    pytester.chdir()
    result = pytester.run(sys.executable, "-m", "pytest", "-m", "quality", "--quality-profile", "fast",
                          "-p", "no:cacheprovider", str(checkpoints / "quality_tests"),
                          "--rootdir", str(checkpoints))
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert "passed" in result.stdout.str() and "failed" not in result.stdout.str().split("quantgate summary")[0]


def test_init_never_overwrites_without_force(checkpoints, monkeypatch, capsys):
    monkeypatch.chdir(checkpoints)
    (checkpoints / "quantgate.toml").write_text("# mine\n")
    assert cli.main(["init", "models/tiny", "models/tiny-bf16"]) == 2
    assert "quantgate.toml: exists; nothing was written (--force replaces it)" in capsys.readouterr().err
    assert (checkpoints / "quantgate.toml").read_text() == "# mine\n"
    assert not (checkpoints / "quality_tests").exists()
    assert cli.main(["init", "models/tiny", "models/tiny-bf16", "--force"]) == 0
    assert "wikitext-2-raw-v1" in (checkpoints / "quantgate.toml").read_text()  # WikiText-2 by default


def test_bad_inputs_are_named(checkpoints, tmp_path):
    with pytest.raises(QuantgateError, match="no-such: no such file or directory"):
        describe_variant(tmp_path / "no-such", tmp_path, set(), llama_cpp=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantgateError, match="neither a checkpoint directory"):
        describe_variant(tmp_path / "empty", tmp_path, set(), llama_cpp=False)
    with pytest.raises(QuantgateError, match="not a shipped corpus"):
        corpus_block("not a corpus!", tmp_path)


def test_the_gate_says_how_to_get_its_tests_when_none_is_collected(pytester, tiny_zoo_template):
    import tinyzoo

    shutil.copytree(tiny_zoo_template, pytester.path, dirs_exist_ok=True)
    tinyzoo.write_manifest(pytester.path, variants=tinyzoo.GOOD_VARIANTS)
    result = pytester.runpytest("-m", "quality", "-p", "no:cacheprovider")
    assert result.ret == 5
    assert "no quality test was collected: `quantgate init` writes quality_tests/test_quality.py" in result.stdout.str()


def test_an_f16_gguf_alone_becomes_the_reference(checkpoints, tmp_path):
    """Only GGUF files: transformers writes an HF copy of the F16 GGUF, which the manifest takes as the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantgate.scaffold import resolve_reference

    ref, found = resolve_reference(str(tmp_path / "tiny-f16.gguf"), checkpoints)
    assert ref == checkpoints / "build" / "reference" / "tiny-f16" and "written as a transformers checkpoint" in found
    assert (ref / "config.json").is_file() and (ref / "tokenizer.json").is_file()
    ids = torch.arange(1, 65).unsqueeze(0)
    with torch.inference_mode():
        original = AutoModelForCausalLM.from_pretrained(checkpoints / "models" / "tiny", dtype=torch.float32)(ids).logits
        copied = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)(ids).logits
    assert torch.allclose(original, copied, atol=0.05)  # the same model, its weights rounded to F16 once


def test_a_hub_id_in_the_local_cache_is_the_reference(checkpoints, tmp_path, monkeypatch):
    """A hub id is taken from the local Hugging Face cache (the layout huggingface_hub writes), never fetched."""
    from quantgate.scaffold import resolve_reference

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoints / "models" / "tiny", snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    ref, found = resolve_reference("acme/tiny", checkpoints)
    assert ref == snapshot and found == "the hub id acme/tiny in the local cache"
    with pytest.raises(QuantgateError, match="acme/other: not a directory, and not in the local Hugging Face cache"):
        resolve_reference("acme/other", checkpoints)


def test_two_int8_checkpoints_that_differ_in_outlier_threshold_become_an_ablation_pair(tmp_path):
    """bitsandbytes 8-bit checkpoints state LLM.int8()'s outlier threshold; init declares it as outlier handling,
    so the summary pairs the two (ablation.py) with nothing written by hand."""
    pytest.importorskip("bitsandbytes")
    from quantgate.ablation import pairs_among
    from quantgate.checkpoints.bnb_build import build_bnb

    reference = REPO / "fixtures" / "demo_zoo" / "reference"
    for name, threshold in (("int8", None), ("int8-plain", 0.0)):
        build_bnb(reference, tmp_path / name, bits=8, llm_int8_threshold=threshold)
    taken: set[str] = set()
    found = [v for name in ("int8", "int8-plain")
             for v in describe_variant(tmp_path / name, tmp_path, taken, llama_cpp=False)]
    assert [v.outlier_handling for v in found] == [
        "outlier columns kept in fp16 (LLM.int8(), llm_int8_threshold = 6)", "none (llm_int8_threshold = 0)"]
    assert 'outlier_handling = "none (llm_int8_threshold = 0)"' in found[1].toml("m")
    pairs = pairs_among({("m", "transformers", v.name): v for v in found})
    assert [(p.factor, p.first, p.second) for p in pairs] == [("outlier_handling", "int8", "int8-plain")]


@pytest.mark.parametrize("config, max_length, words", [
    ({"model_type": "gpt2", "n_positions": 512}, 512, "(n_positions 512)"),
    ({"model_type": "llama", "max_position_embeddings": 8192}, 2048, "(max_position_embeddings 8192), at most 2048"),
    ({"model_type": "custom"}, 2048, "config.json states no context length"),
])
def test_init_reads_the_context_where_the_config_states_it(tmp_path, config, max_length, words):
    """GPT-2's config says n_positions: reading only max_position_embeddings gave 2048-token windows to a 512-position
    model, and its first forward pass an IndexError."""
    import json

    from quantgate.scaffold import protocol_block

    (tmp_path / "config.json").write_text(json.dumps(config))
    block = protocol_block(tmp_path)
    assert f"max_length = {max_length} " in block and f"stride = {max_length // 2} " in block and words in block
