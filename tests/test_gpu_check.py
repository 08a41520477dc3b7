"""The prepared GPU check's scratch manifest: the demo model's variants that can load on that machine, the others
named with what they need, and a manifest quantgate still reads."""

import importlib.util
import sys
from pathlib import Path

import pytest

from quantgate.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)
    spec.loader.exec_module(module)
    return module


def test_the_scratch_manifest_keeps_what_loads_there_and_names_the_rest(gpu_check, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    absent = {"gptqmodel", "llama_cpp", "bitsandbytes"}  # as on the GPU machine, which has none of them
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    project, left_out = gpu_check.scratch_copy(tmp_path / "scratch")
    manifest = load_manifest(project / "quantgate.toml")
    assert list(manifest.models) == ["demo"]
    kept = {v.name for v in manifest.models["demo"].variants}
    assert {"fp16", "bf16", "ct-w4a16-g128", "ct-w8a8-int8"} <= kept
    assert not any(v.startswith(("gptq", "awq", "bnb", "autogptq")) or v.endswith("llamacpp") for v in kept)
    assert "gptq-w4g128 (needs gptqmodel)" in left_out and "bnb-nf4 (needs bitsandbytes)" in left_out
    assert "gguf-q4_k_m (needs llama_cpp)" in left_out  # its k-quant is built with llama.cpp's quantizer
    assert not (project / "baselines").exists() and not (project / ".git").exists()
