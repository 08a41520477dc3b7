"""Checkpoints made by the real AutoGPTQ 0.7.1 and AutoAWQ 0.2.9 (fixtures/legacy) load and are audited."""

import shutil
from pathlib import Path

import pytest

from quantgate.checkpoints.loading import load_checkpoint
from quantgate.errors import LoadAuditError

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"
pytest.importorskip("gptqmodel", reason="GPTQ/AWQ kernels come from gptqmodel (extra 'gptq')")


def load(path, fmt):
    return load_checkpoint(path, fmt=fmt, dtype="float32", device="cpu", what=f"legacy {path.name}")


def test_autogptq_layout_loads_with_v1_zero_points_and_only_its_zero_biases_ignored():
    d = load(LEGACY / "autogptq-w4g128", "gptq").description
    assert "GPTQ v1" in d["legacy_layout"]
    assert d["ignored_zero_biases"] == 28  # 7 projections x 4 layers, all zeros in the file
    assert d["kernels"]


def test_a_nonzero_bias_in_an_autogptq_file_is_still_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(LEGACY / "autogptq-w4g128", tmp_path / "autogptq")
    weights = copy / "gptq_model-4bit-128g.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.bias"][0] = 0.5
    save_file(tensors, weights)
    with pytest.raises(LoadAuditError, match=r"unexpected weights: model\.layers\.0\.mlp\.up_proj\.bias$"):
        load(copy, "gptq")


def test_autoawq_gemm_checkpoint_loads_as_saved():
    d = load(LEGACY / "autoawq-w4g128", "awq").description
    assert any("Awq" in k for k in d["kernels"]) and "legacy_layout" not in d
