"""Models larger than one device: the manifest's placement keys, their checks, and the proof on CPU that a model
whose layers accelerate offloads to disk scores exactly as the model loaded whole, with every weight audited."""

import shutil

import numpy as np
import pytest
import tinyzoo

from quantgate.errors import LoadAuditError, ManifestError
from quantgate.manifest import load_manifest
from quantgate.placement import Placement

OFFLOADED = """
[[models.tiny.variants]]
name = "close"
format = "fp16"
bits = 16
path = "models/close"

[[models.tiny.variants]]
name = "offloaded"
format = "fp16"
bits = 16
path = "models/close"
max_memory = {cpu = "1KB"}
offload_folder = "build/offload"
"""


def _project(tiny_zoo_template, tmp_path, variants, model_keys=""):
    root = tmp_path / "project"
    shutil.copytree(tiny_zoo_template, root)
    manifest = tinyzoo.write_manifest(root, variants=variants)
    if model_keys:
        text = manifest.read_text().replace('corpora = ["code", "prose"]\n', f'corpora = ["code", "prose"]\n{model_keys}\n', 1)
        manifest.write_text(text)
    return root, manifest


def test_a_variant_offloaded_to_disk_scores_as_the_model_loaded_whole(tiny_zoo_template, tmp_path):
    from quantgate.evaluation import Evaluator

    root, manifest = _project(tiny_zoo_template, tmp_path, OFFLOADED)
    ev = Evaluator(manifest=load_manifest(manifest), profile="full", device="cpu")
    whole = ev.measure("tiny", "close", "code")
    offloaded = ev.measure("tiny", "offloaded", "code")
    assert offloaded.description["placement"]["layers"].get("disk", 0) >= 1, offloaded.description["placement"]
    assert "placement" not in whole.description
    np.testing.assert_allclose(offloaded.scores.logprobs, whole.scores.logprobs, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(offloaded.scores.argmax, whole.scores.argmax)
    assert offloaded.protocol.fingerprint == whole.protocol.fingerprint  # placement is not protocol


def test_the_load_audit_reads_every_offloaded_weight(tiny_zoo_template, tmp_path):
    """A NaN planted in a weight that lives on disk after loading is still found, and named."""
    from safetensors.torch import load_file, save_file

    from quantgate.checkpoints.loading import load_checkpoint

    bad = tmp_path / "bad"
    shutil.copytree(tiny_zoo_template / "models" / "close", bad)
    (weights,) = bad.glob("*.safetensors")
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("layers.0.mlp.down_proj.weight"))
    tensors[name][3, 5] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    placement = Placement(max_memory={"cpu": "1KB"}, offload_folder=tmp_path / "offload")
    with pytest.raises(LoadAuditError, match=r"NaN/Inf weights in: .*layers\.0\.mlp\.down_proj\.weight"):
        load_checkpoint(bad, fmt="fp16", dtype="float32", device="cpu", what="variant tiny/bad", placement=placement)


def test_model_keys_reach_the_variants_whose_backend_takes_them_and_a_variant_overrides(tiny_zoo_template, tmp_path):
    from quantgate.workspace import REFERENCE, Workspace

    variants = OFFLOADED.replace('max_memory = {cpu = "1KB"}', 'device_map = "sequential"')
    _, manifest = _project(tiny_zoo_template, tmp_path, variants, model_keys='max_memory = {cpu = "2GiB"}')
    ws = Workspace(manifest=load_manifest(manifest), profile="full", device="cpu")
    assert ws.placement("tiny", REFERENCE, "transformers").max_memory == {"cpu": "2GiB"}
    own = ws.placement("tiny", "offloaded", "transformers")
    assert own.device_map == "sequential" and own.max_memory == {"cpu": "2GiB"} and own.offload_folder.name == "offload"
    assert ws.placement("tiny", REFERENCE, "llama.cpp").keys() == ()  # not a key llama.cpp takes


@pytest.mark.parametrize("keys, fmt, backend, words", [
    ('n_gpu_layers = 10', "fp16", "transformers", "scored by transformers, which takes device_map"),
    ('device_map = "auto"', "gguf", "llama.cpp", "scored by llama.cpp, which takes n_gpu_layers"),
    ('device_map = "auto"', "gptq", "transformers", "cannot split or offload a 'gptq' checkpoint"),
    ('max_memory = {cpu = [1]}', "fp16", "transformers", "must be a size"),
    ('split_mode = "diagonal"', "gguf", "llama.cpp", "split_mode"),
])
def test_placement_keys_a_backend_or_format_cannot_take_are_refused_by_name(tiny_zoo_template, tmp_path, keys, fmt,
                                                                            backend, words):
    variant = (f'\n[[models.tiny.variants]]\nname = "v"\nformat = "{fmt}"\nbits = {16 if fmt == "fp16" else 4}\n'
               f'path = "models/close"\nbackend = "{backend}"\n{keys}\n')
    _, manifest = _project(tiny_zoo_template, tmp_path, variant)
    with pytest.raises(ManifestError, match=words) as err:
        load_manifest(manifest)
    assert keys.split(" =")[0] in str(err.value)


def test_a_model_wide_key_a_variants_format_cannot_take_names_the_variant(tiny_zoo_template, tmp_path):
    variant = '\n[[models.tiny.variants]]\nname = "q"\nformat = "gptq"\nbits = 4\npath = "models/close"\n'
    _, manifest = _project(tiny_zoo_template, tmp_path, variant, model_keys='device_map = "auto"')
    with pytest.raises(ManifestError, match="variant 'q': quantgate cannot split or offload a 'gptq' checkpoint"):
        load_manifest(manifest)


def test_llama_cpp_takes_its_gpu_keys_and_records_them(tiny_zoo_template, tmp_path):
    """n_gpu_layers, split_mode and tensor_split reach llama.cpp's model parameters. The PyPI build of
    llama-cpp-python is CPU-only, so here llama.cpp keeps every layer on the CPU: same scores, setting recorded."""
    pytest.importorskip("llama_cpp")
    from quantgate.backends.llamacpp import LlamaCppBackend
    from quantgate.checkpoints.gguf_build import write_f16_gguf

    f16 = tmp_path / "gguf" / "tiny-F16.gguf"
    f16.parent.mkdir()
    write_f16_gguf(tiny_zoo_template / "models" / "reference", f16)
    ids = np.arange(300) % 90
    plain = LlamaCppBackend(f16, n_threads=2)
    placed = LlamaCppBackend(f16, n_threads=2,
                             placement=Placement(n_gpu_layers=99, split_mode="layer", tensor_split=(1.0,)))
    try:
        a = plain.loglikelihood_rolling(ids, max_length=64, stride=32, batch_size=1)
        b = placed.loglikelihood_rolling(ids, max_length=64, stride=32, batch_size=1)
        assert placed.describe()["placement"] == {"n_gpu_layers": 99, "split_mode": "layer", "tensor_split": [1.0]}
        assert "placement" not in plain.describe()
        import llama_cpp  # where this build can offload, the scoring device says so; the PyPI build cannot

        assert placed.describe()["device"] == ("gpu" if llama_cpp.llama_supports_gpu_offload() else "cpu")
    finally:
        plain.close()
        placed.close()
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
