"""The gptqmodel builds of a run share one build process: a build made there after another one gives the weights
that the same recipe gives in a fresh process, the process is reused, and a failed build is named with
gptqmodel's output and ends that process only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (pip install 'quantgate[gptq]')")

from quantgate.checkpoints import gptq_build, loading  # noqa: E402
from quantgate.zoo import weights_digest  # noqa: E402

# The tiny reference's layers are 32 and 64 wide: groups of 32.
GPTQ4 = dict(bits=4, group_size=32, desc_act=False)
GPTQ8 = dict(bits=8, group_size=32, desc_act=True)


def _calibration(reference: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference)
    text = " ".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200))
    ids = tokenizer(text)["input_ids"]
    return [ids[i:i + 48] for i in range(0, 48 * 8, 48)]


def _fresh_process_build(reference: Path, out: Path, chunks, recipe: dict, tmp_path: Path) -> dict:
    """The same recipe built by `python -m quantgate.checkpoints.gptq_build SPEC`: a process of its own."""
    import os

    numerics = gptq_build.build_numerics("gptq")
    env = {**os.environ, **(numerics["environment"] if isinstance(numerics["environment"], dict) else {})}
    spec, record = tmp_path / "spec.json", tmp_path / "record.json"
    spec.write_text(json.dumps({
        "source_dir": str(reference), "out_dir": str(out), "calibration_texts": chunks, "seed": 0,
        "config_kwargs": dict(method="gptq", format="gptq", act_group_aware=not recipe["desc_act"], **recipe),
        "backend_name": "GPTQ_TORCH", "compute_dtype": numerics["compute_dtype"], "record": str(record)}))
    proc = subprocess.run([sys.executable, "-m", "quantgate.checkpoints.gptq_build", str(spec)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(record.read_text())


@pytest.fixture(scope="module")
def gptq8(tiny_zoo_template, tmp_path_factory) -> tuple[Path, dict]:
    """An 8-bit build of the tiny reference, the first of a new build process (left running)."""
    reference = tiny_zoo_template / "models" / "reference"
    gptq_build.BuildProcess.close_all()
    out = tmp_path_factory.mktemp("gptq8") / "w8"
    record = gptq_build.build_gptq(reference, out, calibration_texts=_calibration(reference), **GPTQ8)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (reference / name).exists() and not (out / name).exists():
            (out / name).write_bytes((reference / name).read_bytes())
    return out, record


def test_builds_in_one_process_give_the_weights_of_fresh_processes(gptq8, tiny_zoo_template, tmp_path):
    reference = tiny_zoo_template / "models" / "reference"
    chunks = _calibration(reference)
    first = gptq8[1]
    process = next(iter(gptq_build.BuildProcess._running.values()))
    second = gptq_build.build_gptq(reference, tmp_path / "w4", calibration_texts=chunks, **GPTQ4)
    assert next(iter(gptq_build.BuildProcess._running.values())) is process and process.builds == 2  # reused
    assert first["bits"] == 8 and second["bits"] == 4 and second["seconds"]["total"] > 0
    fresh = _fresh_process_build(reference, tmp_path / "w4-fresh", chunks, GPTQ4, tmp_path)
    assert fresh["bits"] == 4
    assert weights_digest(tmp_path / "w4") == weights_digest(tmp_path / "w4-fresh")
    gptq_build.BuildProcess.close_all()
    assert not gptq_build.BuildProcess._running and process.proc.returncode == 0 and not process.log.exists()


def test_a_failed_build_quotes_gptqmodel_and_the_next_build_gets_a_new_process(tiny_zoo_template, tmp_path):
    reference = tiny_zoo_template / "models" / "reference"
    chunks = _calibration(reference)
    gptq_build.BuildProcess.close_all()
    logs = Path(gptq_build.tempfile.gettempdir()).glob
    before = set(logs("quantgate-gptqmodel-*.log"))
    with pytest.raises(RuntimeError) as failed:
        gptq_build.build_gptq(reference, tmp_path / "bad", calibration_texts=chunks, bits=4, group_size=48,
                              desc_act=False)  # 48 does not divide the layers' widths
    message = str(failed.value)
    assert message.startswith("gptqmodel build of bad failed (build 1 of its process, exit 1):")
    assert "Traceback" in message or "Error" in message
    assert not gptq_build.BuildProcess._running  # that process ended with its failure
    assert set(logs("quantgate-gptqmodel-*.log")) == before  # and its log went with it
    gptq_build.build_gptq(reference, tmp_path / "good", calibration_texts=chunks, **GPTQ4)
    assert (tmp_path / "good" / "config.json").is_file()
    gptq_build.BuildProcess.close_all()


# gptqmodel's torch GPTQ kernel (8-bit layers) unpacks every weight on every forward pass; on the CPU the gate lets
# it keep the unpacked weights (its own switch) where memory allows: the same logits, bit for bit.


def _load(path):
    return loading.load_checkpoint(path, fmt="gptq", dtype="float32", device="cpu", what="tiny/gptq-w8")


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_unpacked_weights_are_kept_and_give_the_same_logits(gptq8):
    import torch

    loaded = _load(gptq8[0])
    layers = [m for m in loaded.model.modules() if hasattr(m, "_cached_weights")]
    assert layers, loaded.description["kernels"]
    assert loaded.description["dequantized_weights_cached_bytes"] == sum(4 * m.in_features * m.out_features
                                                                         for m in layers)
    ids = torch.randint(0, loaded.model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    first = _logits(loaded.model, ids)  # unpacks each weight and keeps it
    assert all(m._cached_weights for m in layers)
    kept = _logits(loaded.model, ids)  # reads the kept weights
    for m in layers:
        m._cache_enabled = False
        m._cached_weights.clear()
    unpacked = _logits(loaded.model, ids)  # gptqmodel's default: unpacked on every pass
    assert torch.equal(first, unpacked) and torch.equal(kept, unpacked)


def test_without_the_memory_for_them_the_weights_are_unpacked_each_pass(gptq8, monkeypatch):
    monkeypatch.setattr(loading, "_memory_available", lambda: 4096)
    loaded = _load(gptq8[0])
    assert "dequantized_weights_cached_bytes" not in loaded.description
    assert not any(m._cache_enabled for m in loaded.model.modules() if hasattr(m, "_cached_weights"))


# Its CPU int4 kernel (4-bit layers) copies the input's columns into the order the groups were quantized in on every
# pass; without act-order that order is the identity, and the gate drops the copy after the kernel's first pass.


@pytest.fixture(scope="module")
def gptq4(tiny_zoo_template, tmp_path_factory) -> Path:
    reference = tiny_zoo_template / "models" / "reference"
    out = tmp_path_factory.mktemp("gptq4") / "w4"
    gptq_build.build_gptq(reference, out, calibration_texts=_calibration(reference), **GPTQ4)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (reference / name).exists() and not (out / name).exists():
            (out / name).write_bytes((reference / name).read_bytes())
    return out


def test_an_identity_column_order_is_not_copied_and_gives_the_same_logits(gptq4, monkeypatch):
    import torch

    loaded = _load(gptq4)
    ids = torch.randint(0, loaded.model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    layers = [m for m in loaded.model.modules() if type(m).__name__ == "TorchAtenLinear"]
    assert layers, loaded.description["kernels"]
    first = _logits(loaded.model, ids)  # the kernel builds its order and copies the columns once
    assert all(isinstance(m.ret_idx, slice) for m in layers)
    second = _logits(loaded.model, ids)  # no copy
    monkeypatch.setattr(loading, "skip_identity_permutations", lambda model: 0)
    library = _load(gptq4)
    copied = [_logits(library.model, ids) for _ in range(2)]  # gptqmodel's own: the copy on every pass
    assert all(isinstance(m.ret_idx, torch.Tensor) for m in library.model.modules()
               if type(m).__name__ == "TorchAtenLinear")
    assert torch.equal(first, copied[0]) and torch.equal(second, copied[1]) and torch.equal(first, second)


def test_a_real_column_order_is_kept(gptq4):
    """act-order's order (here one set before the kernel builds its own) is a real permutation: it stays."""
    import torch

    loaded = _load(gptq4)
    layer = next(m for m in loaded.model.modules() if type(m).__name__ == "TorchAtenLinear")
    order = torch.arange(layer.in_features - 1, -1, -1, dtype=torch.int32)
    layer.ret_idx = order  # the kernel's transform takes an order already there
    _logits(loaded.model, torch.arange(5, 25).unsqueeze(0))
    assert isinstance(layer.ret_idx, torch.Tensor) and torch.equal(layer.ret_idx, order)
