"""compressed-tensors checkpoints made by the real llm-compressor (fixtures/llmcompressor): load, audit, skip."""

import shutil
from pathlib import Path

import pytest
import tinyzoo
from test_plugin_e2e import assert_skipped_as_untestable, make_project

from quantgate.checkpoints import loading
from quantgate.checkpoints.loading import load_checkpoint
from quantgate.errors import BackendUnavailable, LoadAuditError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures" / "llmcompressor"
REFERENCE = REPO / "fixtures" / "demo_zoo" / "reference"


def load(path, what="ct"):
    return load_checkpoint(path, fmt="compressed-tensors", dtype="float32", device="cpu", what=what,
                           tokenizer_path=REFERENCE)


def copy_fixture(name, tmp_path):
    return shutil.copytree(FIXTURES / name, tmp_path / name)


def edit_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


needs_compressed_tensors = pytest.mark.skipif(
    not __import__("importlib.util").util.find_spec("compressed_tensors"),
    reason="compressed-tensors is not installed (pip install 'quantgate[compressed]')")


@needs_compressed_tensors
@pytest.mark.parametrize("name, storage, weights, activations", [
    ("w4a16-g128", "pack-quantized", ["int4 group 128, symmetric, static"], None),
    ("w8a8-int8", "int-quantized", ["int8 channel, symmetric, static"], ["int8 token, symmetric, dynamic"]),
    ("fp8-dynamic", "float-quantized", ["float8 channel, symmetric, static"], ["float8 token, symmetric, dynamic"]),
])
def test_llm_compressor_fixture_loads_whole_and_says_what_it_is(name, storage, weights, activations):
    loaded = load(FIXTURES / name)
    d = loaded.description
    assert d["compressed_tensors"] == {"storage_format": storage, "weights": weights, "input_activations": activations,
                                       "ignored": ["lm_head"], "quantized_modules": 28}
    # unpacked at load, so the NaN/Inf audit saw the weights the model computes with
    assert loaded.model.model.layers[0].mlp.down_proj.weight.dtype.is_floating_point
    assert loaded.model.model.layers[0].mlp.down_proj.weight.element_size() == 4


@needs_compressed_tensors
def test_w8a8_activations_are_quantized_on_every_forward():
    """A loader that dropped activation quantization would measure W8A16 and call it W8A8."""
    import torch

    model = load(FIXTURES / "w8a8-int8").model
    ids = torch.arange(5, 133).unsqueeze(0)
    with torch.no_grad():
        quantized = model(ids).logits
        for module in model.modules():
            if getattr(module, "quantization_scheme", None) is not None:
                module.quantization_scheme.input_activations = None
        weight_only = model(ids).logits
    assert (quantized - weight_only).abs().max() > 1e-3


@needs_compressed_tensors
def test_missing_scale_is_refused_by_name(tmp_path):
    folder = copy_fixture("w8a8-int8", tmp_path)
    edit_weights(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight_scale"))
    with pytest.raises(LoadAuditError, match=r"did not load whole: missing weights: "
                                             r"model\.layers\.1\.mlp\.down_proj\.weight_scale"):
        load(folder)


@needs_compressed_tensors
def test_nan_in_fp8_weights_is_refused(tmp_path):
    import torch

    def poison(tensors):
        weight = tensors["model.layers.2.self_attn.v_proj.weight"]
        assert weight.dtype == torch.float8_e4m3fn
        flat = weight.view(-1).float()
        flat[7] = float("nan")
        tensors["model.layers.2.self_attn.v_proj.weight"] = flat.view(weight.shape).to(torch.float8_e4m3fn)

    folder = copy_fixture("fp8-dynamic", tmp_path)
    edit_weights(folder, poison)
    with pytest.raises(LoadAuditError, match=r"NaN/Inf weights in: model\.layers\.2\.self_attn\.v_proj\.weight"):
        load(folder)


@needs_compressed_tensors
def test_declared_compressed_tensors_without_its_config_is_refused():
    with pytest.raises(LoadAuditError, match="declared compressed-tensors, but the checkpoint's config.json has no "
                                             "compressed-tensors quantization_config"):
        load(REFERENCE, what="variant demo/mislabelled")


def test_missing_format_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(loading.FORMAT_LIBRARIES, "compressed-tensors", ("quantgate_absent_module", "compressed"))
    with pytest.raises(BackendUnavailable, match=r"variant x/y: format 'compressed-tensors' needs the "
                                                  r"quantgate_absent_module package, which is not installed "
                                                  r"\(pip install 'quantgate\[compressed\]'\)"):
        loading.require_format_library("compressed-tensors", "variant x/y")


def test_variant_whose_format_library_is_missing_is_skipped_before_any_load(pytester, tiny_zoo_template, monkeypatch):
    make_project(pytester, tiny_zoo_template)
    tinyzoo.write_manifest(pytester.path, variants="""
[[models.tiny.variants]]
name = "ct"
format = "compressed-tensors"
bits = 8
path = "models/reference"
""")
    monkeypatch.setitem(loading.FORMAT_LIBRARIES, "compressed-tensors", ("quantgate_absent_module", "compressed"))
    assert_skipped_as_untestable(pytester, "needs the quantgate_absent_module package, which is not installed "
                                           "(pip install 'quantgate[compressed]')")

