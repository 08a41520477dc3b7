"""GGUF variants in the gate: both backends, their own references, the audits, and a missing llama.cpp."""

import json
import shutil

import pytest
import tinyzoo
from test_plugin_e2e import assert_skipped_as_untestable, make_project, run

pytest.importorskip("gguf", reason="gguf-py is not installed (pip install 'quantgate[gguf]')")

from quantgate.checkpoints.gguf_build import write_f16_gguf  # noqa: E402
from quantgate.checkpoints.loading import load_checkpoint  # noqa: E402
from quantgate.errors import LoadAuditError, TokenizerMismatch  # noqa: E402
from quantgate.evaluation import Evaluator  # noqa: E402
from quantgate.manifest import load_manifest  # noqa: E402


def gguf_variant(name, *, backend="transformers", path="models/gguf"):
    return f"""
[[models.tiny.variants]]
name = "{name}"
format = "gguf"
bits = 16
scheme = "F16"
path = "{path}"
max_ratio = 1.01
backend = "{backend}"
"""


def llama_cpp_or_skip():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'quantgate[llamacpp]')")


def write_gguf(root, source="models/reference", out="models/gguf"):
    target = root / out / "model-F16.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_f16_gguf(root / source, target)
    return target


def records(path):
    return {r["variant"] + "/" + r["corpus"]: r for r in json.loads(path.read_text())["records"]
            if r["metric"] == "relative_perplexity"}


def test_gguf_file_is_gated_through_transformers(pytester, tiny_zoo_template):
    shutil.copytree(tiny_zoo_template, pytester.path, dirs_exist_ok=True)
    write_gguf(pytester.path)
    make_project(pytester, tiny_zoo_template, variants=gguf_variant("f16-gguf"))
    result = run(pytester, "--quality-json", "reports/q.json")
    assert result.ret == 0, result.stdout.str()[-2000:]
    rec = records(pytester.path / "reports" / "q.json")["f16-gguf/code"]
    assert (rec["format"], rec["bits"], rec["backend"], rec["verdict"]) == ("gguf", 16, "transformers", "pass")
    assert rec["kernels"] == ["torch (GGUF dequantized)"]
    # the same fp16 values, read back from GGUF and dequantized: the FP16 reference's own perplexity
    assert rec["ratio"] == pytest.approx(1.0, abs=1e-5)


def test_both_backends_side_by_side_each_against_its_own_reference(pytester, tiny_zoo_template):
    llama_cpp_or_skip()
    shutil.copytree(tiny_zoo_template, pytester.path, dirs_exist_ok=True)
    write_gguf(pytester.path)
    make_project(pytester, tiny_zoo_template,
                 variants=gguf_variant("f16-gguf") + gguf_variant("f16-gguf-llamacpp", backend="llama.cpp"))
    baselines = pytester.path / "baselines" / "tiny"
    assert (baselines / "code.full.llamacpp.json").is_file()
    provenance = json.loads((baselines / "code.full.llamacpp.json").read_text())["provenance"]
    assert provenance["scored_file"].endswith("model-F16.gguf") and provenance["backend"] == "llama.cpp"
    result = run(pytester, "--quality-json", "reports/q.json")
    assert result.ret == 0, result.stdout.str()[-2000:]
    rec = records(pytester.path / "reports" / "q.json")
    native = rec["f16-gguf-llamacpp/prose"]
    assert (native["backend"], native["kernels"]) == ("llama.cpp", ["llama.cpp CPU"])
    assert native["ratio"] == pytest.approx(1.0, abs=1e-9)  # the F16 GGUF against itself, same kernels
    assert "The same file under each backend" in result.stdout.str()
    assert "| tiny | gguf F16 | prose |" in result.stdout.str()


def test_llama_cpp_variant_without_llama_cpp_python_is_skipped_with_the_extra_named(pytester, tiny_zoo_template,
                                                                                   monkeypatch):
    import quantgate.backends.llamacpp as lc  # imported out here, so the in-process runs see the patch

    shutil.copytree(tiny_zoo_template, pytester.path, dirs_exist_ok=True)
    write_gguf(pytester.path)
    make_project(pytester, tiny_zoo_template)  # baselines for transformers only
    tinyzoo.write_manifest(pytester.path, variants=gguf_variant("native", backend="llama.cpp"))
    monkeypatch.setattr(lc, "llama_cpp_available", lambda: False)
    assert_skipped_as_untestable(pytester, "needs llama-cpp-python, which is not installed "
                                           "(pip install 'quantgate[llamacpp]'")


def test_gguf_missing_a_tensor_is_refused_by_both_loaders(tiny_project):
    from safetensors.torch import load_file, save_file

    broken = tiny_project / "models" / "broken"
    shutil.copytree(tiny_project / "models" / "reference", broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    gguf = write_gguf(tiny_project, source="models/broken", out="models/broken-gguf")
    with pytest.raises(LoadAuditError, match="did not load whole: missing weights: model.layers.1.mlp.down_proj.weight"):
        load_checkpoint(gguf, fmt="gguf", dtype="float32", device="cpu", what="v")
    llama_cpp_or_skip()
    with pytest.raises(LoadAuditError, match="llama.cpp could not load .*model-F16.gguf"):
        load_checkpoint(gguf, fmt="gguf", dtype="float32", device="cpu", what="v", backend="llama.cpp")


@pytest.mark.parametrize("backend", ["transformers", "llama.cpp"])
def test_gguf_with_another_vocabulary_is_refused(tiny_project, backend):
    if backend == "llama.cpp":
        llama_cpp_or_skip()
    other = tiny_project / "models" / "other-vocab"
    shutil.copytree(tiny_project / "models" / "reference", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "Ġthe", "Ġriver"  # swap two frequent tokens' ids: same strings, other meanings
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    write_gguf(tiny_project, source="models/other-vocab", out="models/other-gguf")
    manifest = tinyzoo.write_manifest(tiny_project, variants=gguf_variant("v", backend=backend, path="models/other-gguf"))
    ev = Evaluator(manifest=load_manifest(manifest), profile="full", device="cpu")
    # one audit for both backends, from the file: the same ids would mean other tokens
    with pytest.raises(TokenizerMismatch, match="vocabulary in .*model-F16.gguf differs .* the same ids would mean other tokens"):
        ev.measure("tiny", "v", "prose")
    ev.release()
