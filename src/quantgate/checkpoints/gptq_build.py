"""Build GPTQ / AWQ checkpoints from a float Hugging Face causal LM with GPTQModel on CPU.

The output directory loads back with ``transformers.AutoModelForCausalLM.from_pretrained``
(GPTQ additionally needs ``optimum`` installed; both use gptqmodel's CPU kernels).

Reproducibility. GPTQ rounds each weight column and pushes the rounding error onto the columns not
yet rounded, so a difference in the last bit of one activation can flip one rounding, which moves
every later column of that row: the build is chaotic in its floating-point input. Measured on the
demo model, builds of one recipe under different BLAS code paths, torch kernel ISAs or thread
counts all gave different weights, and relative perplexities that differ by up to 0.4 points
(docs/demo.md "Builds across machines"). Two things are therefore pinned for every build:

- GPTQ's calibration forward passes and quantization run in float32 (the checkpoint is saved in
  the source's dtype, float16 as usual): CPU float16 matmuls go through oneDNN kernels chosen by
  instruction set. AWQ stays in the source dtype (gptqmodel's CPU AWQ kernel packs float16 or
  bfloat16 only), with oneDNN held to its AVX2 kernels instead;
- the numerics of the process that builds, which runs apart from the caller (`PINNED_NUMERICS`):
  MKL's conditional numerical reproducibility on its AVX2 code path, oneDNN and torch's own kernels
  at their AVX2 level, and one thread. MKL documents that branch as giving identical results on
  every Intel processor with AVX2, for one MKL version; on other vendors' CPUs it takes its AUTO
  branch instead, and on an AMD EPYC every build differed from the recorded Intel ones (docs/demo.md).

What still varies: another CPU vendor (above), a CPU without AVX2 or a non-x86 CPU (no pin applies,
the build follows the machine), another torch/MKL or gptqmodel version (the recipe hash covers gptqmodel's version;
constraints.txt pins torch for this repository). `QUANTGATE_BUILD_NUMERICS=native` turns the pin
off (to measure what it buys).
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

# Calibration rows are truncated here; a few hundred tokens is plenty for small models
# and keeps CPU quantization in the tens of seconds.
MAX_CALIBRATION_TOKENS = 256
# gptqmodel silently drops rows with <= 10 tokens; drop them ourselves so the count we report is real.
MIN_CALIBRATION_TOKENS = 11
GPTQ_COMPUTE_DTYPE = "float32"
SOURCE_DTYPE = "source"  # compute in the dtype the checkpoint is saved in
# Read when MKL and torch start, hence set for a process of its own. An explicit
# MKL_ENABLE_INSTRUCTIONS overrides MKL_CBWR, so it is pinned too.
PINNED_NUMERICS = {
    "MKL_CBWR": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
NUMERICS_SWITCH = "QUANTGATE_BUILD_NUMERICS"  # "native": no pin


def build_numerics(method: str) -> dict:
    """How a gptqmodel build's arithmetic is fixed on this machine (part of the recipe identity)."""
    pinned = os.environ.get(NUMERICS_SWITCH, "pinned") != "native" and _has_avx2()
    return {"compute_dtype": GPTQ_COMPUTE_DTYPE if method == "gptq" else SOURCE_DTYPE,
            "environment": dict(PINNED_NUMERICS) if pinned else "native"}


def _has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def build_gptq(
    source_dir: Path,
    out_dir: Path,
    *,
    bits: int,
    group_size: int,
    desc_act: bool,
    calibration_texts: list[str] | list[list[int]],
    seed: int = 0,
) -> dict:
    """Quantize ``source_dir`` to GPTQ (checkpoint format v1, ``format="gptq"``) into ``out_dir``."""
    return _build(
        source_dir,
        out_dir,
        calibration_texts=calibration_texts,
        seed=seed,
        config_kwargs=dict(
            method="gptq",
            format="gptq",
            bits=bits,
            group_size=group_size,
            desc_act=desc_act,
            # desc_act=True forbids group-aware reordering; say so explicitly to avoid a warning.
            # With desc_act=False it stays on (the default) and keeps the standard g_idx layout.
            act_group_aware=not desc_act,
        ),
        backend_name="GPTQ_TORCH",
    )


def build_awq(
    source_dir: Path,
    out_dir: Path,
    *,
    bits: int,
    group_size: int,
    desc_act: bool = False,
    calibration_texts: list[str] | list[list[int]],
    seed: int = 0,
) -> dict:
    """Quantize ``source_dir`` to AWQ (GEMM layout, zero point) into ``out_dir``."""
    if desc_act:
        raise ValueError("AWQ has no activation reordering (desc_act)")
    return _build(
        source_dir,
        out_dir,
        calibration_texts=calibration_texts,
        seed=seed,
        # sym=False -> zero_point=True, the usual AWQ layout.
        config_kwargs=dict(method="awq", format="gemm", bits=bits, group_size=group_size, sym=False),
        # The default AWQ_GEMM backend has no CPU kernel; the torch one does.
        backend_name="AWQ_TORCH",
    )


def _build(
    source_dir: Path,
    out_dir: Path,
    *,
    calibration_texts: list[str] | list[list[int]],
    seed: int,
    config_kwargs: dict,
    backend_name: str,
) -> dict:
    """Run the build in a process of its own, under `build_numerics()`; returns its build record."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(out_dir)
    numerics = build_numerics(config_kwargs["method"])
    env = dict(os.environ)
    if isinstance(numerics["environment"], dict):
        env.update(numerics["environment"])
    with tempfile.TemporaryDirectory(prefix="quantgate-build-") as scratch:
        spec, result = Path(scratch) / "spec.json", Path(scratch) / "record.json"
        spec.write_text(json.dumps({
            "source_dir": str(source_dir), "out_dir": str(out_dir), "calibration_texts": calibration_texts,
            "seed": seed, "config_kwargs": config_kwargs, "backend_name": backend_name,
            "compute_dtype": numerics["compute_dtype"], "record": str(result)}))
        failure = BuildProcess.for_environment(env, numerics["environment"]).build(spec)
        if failure is not None:
            raise RuntimeError(f"gptqmodel build of {out_dir.name} failed {failure}")
        record = json.loads(result.read_text())
    record["numerics"] = numerics
    return record


class BuildProcess:
    """The process that runs this process's gptqmodel builds, one after another: started on the first build
    under a numerics environment (which is read when torch and MKL start), and kept, so the builds of a run
    share the imports of torch, transformers and gptqmodel (about 3 s a build). Each build seeds its own
    generators, so a build in it gives the weights a build in a fresh process gives (tests/test_build_server.py).
    gptqmodel's own output goes to a log that a failure's message quotes."""

    _running: dict[str, BuildProcess] = {}

    def __init__(self, env: dict):
        self.log = Path(tempfile.mkstemp(prefix="quantgate-gptqmodel-", suffix=".log")[1])
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, "--serve"], env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True)
        self.builds = 0

    @classmethod
    def for_environment(cls, env: dict, numerics_env) -> BuildProcess:
        key = json.dumps(numerics_env, sort_keys=True)
        process = cls._running.get(key)
        if process is None or process.proc.poll() is not None:
            if not cls._running:
                import atexit

                atexit.register(cls.close_all)
            process = cls._running[key] = cls(env)
        return process

    def build(self, spec: Path) -> str | None:
        """None once the build in `spec` is done; else what went wrong, with the end of gptqmodel's output."""
        start = self.log.stat().st_size
        try:
            self.proc.stdin.write(f"{spec}\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline().strip()
        except BrokenPipeError:
            reply = ""
        except BaseException:  # interrupted: the build it runs is abandoned with it
            self.close(kill=True)
            raise
        self.builds += 1
        if reply == "ok":
            return None
        with self.log.open("rb") as log:  # the process has printed its traceback before answering (or died)
            log.seek(start)
            tail = "\n".join(log.read().decode(errors="replace").strip().splitlines()[-15:])
        self.close(kill=reply == "")
        return f"(build {self.builds} of its process, exit {self.proc.returncode}):\n{tail}"

    def close(self, kill: bool = False) -> None:
        for key, process in list(self._running.items()):
            if process is self:
                del self._running[key]
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)

    @classmethod
    def close_all(cls) -> None:
        for process in list(cls._running.values()):
            process.close()


def _build_here(
    source_dir: Path,
    out_dir: Path,
    *,
    calibration_texts: list[str] | list[list[int]],
    seed: int,
    config_kwargs: dict,
    backend_name: str,
    compute_dtype: str,
) -> dict:
    """Quantize in this process (the one `_build` starts), save to ``out_dir`` and return the build record."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)

    # Read once, at gptqmodel import. Its default on a 2-core box is 1 worker, and loading then fails
    # ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1").
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))

    import gptqmodel
    import torch

    random.seed(seed)
    torch.manual_seed(seed)

    calibration = _tokenize(source_dir, calibration_texts)
    dtype = _source_dtype(source_dir)  # what the checkpoint stores
    compute = dtype if compute_dtype == SOURCE_DTYPE else getattr(torch, compute_dtype)  # module docstring
    backend = gptqmodel.BACKEND[backend_name]
    qcfg = _quantize_config(config_kwargs)

    started = time.perf_counter()
    # Without an explicit dtype gptqmodel casts everything to bfloat16 on CPU.
    model = gptqmodel.GPTQModel.load(str(source_dir), qcfg, dtype=compute, backend=backend)
    loaded = time.perf_counter()
    with _scratch_log_dir():
        model.quantize(calibration, backend=backend, batch_size=1)
    quantized = time.perf_counter()
    _save_and_rename(model, out_dir, dtype, compute)
    finished = time.perf_counter()
    return _build_record(source_dir, out_dir, calibration, dtype=dtype, compute=compute, backend=backend, seed=seed,
                         times=(started, loaded, quantized, finished))


def _quantize_config(config_kwargs: dict):
    """gptqmodel's QuantizeConfig for the recipe, on the CPU and without offloading to disk."""
    from gptqmodel import QuantizeConfig

    return QuantizeConfig(
        **config_kwargs,
        # The device goes here, not to load(): gptqmodel refuses device= there when the config has one.
        device="cpu",
        # Offloading would only add disk traffic for a small model, and it writes a random
        # temp path into config.json, which breaks byte-for-byte reproducibility.
        offload_to_disk=False,
    )


def _save_and_rename(model, out_dir: Path, dtype, compute) -> None:
    """Save the quantized model in the source's dtype beside ``out_dir``, then rename it into place."""
    # Save next to the destination, then rename, so a crash never leaves a half-written out_dir.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if compute != dtype:
            model.model.to(dtype)  # scales and the unquantized layers as the source stores them
            model.model.config.dtype = dtype
        model.save(str(tmp_dir))
        tmp_dir.chmod(0o755)  # mkdtemp makes it 0700
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _build_record(source_dir: Path, out_dir: Path, calibration: list[dict], *, dtype, compute, backend, seed: int,
                  times: tuple[float, float, float, float]) -> dict:
    """The build record: the saved quantization config, dtypes, kernels, calibration, timings and versions."""
    import gptqmodel
    import torch
    import transformers

    started, loaded, quantized, finished = times
    saved = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    return {
        "source_dir": str(source_dir),
        "out_dir": str(out_dir),
        "method": saved["quant_method"],
        "bits": saved["bits"],
        "group_size": saved["group_size"],
        "desc_act": saved["desc_act"],
        "sym": saved.get("sym", not saved.get("zero_point", False)),
        "format": saved["format"],
        "checkpoint_format": saved["checkpoint_format"],
        "dtype": str(dtype).removeprefix("torch."),
        "compute_dtype": str(compute).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "backend": backend.value,
        "seed": seed,
        "calibration_samples": len(calibration),
        "calibration_tokens": sum(len(row["input_ids"]) for row in calibration),
        "seconds": {
            "load": round(loaded - started, 3),
            "quantize": round(quantized - loaded, 3),
            "save": round(finished - quantized, 3),
            "total": round(finished - started, 3),
        },
        "versions": {
            "gptqmodel": gptqmodel.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "files": sorted(p.name for p in out_dir.iterdir()),
    }


def _tokenize(source_dir: Path, texts: list[str] | list[list[int]]) -> list[dict]:
    """Tokenize (or take token ids as given) and truncate, so sample count and length are explicit."""
    from transformers import AutoTokenizer

    tokenizer = None
    rows = []
    for text in texts:
        if isinstance(text, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(source_dir)
            ids = tokenizer(text)["input_ids"][:MAX_CALIBRATION_TOKENS]
        else:
            ids = list(text)[:MAX_CALIBRATION_TOKENS]
        if len(ids) >= MIN_CALIBRATION_TOKENS:
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    if not rows:
        raise ValueError(f"no calibration text has >= {MIN_CALIBRATION_TOKENS} tokens")
    return rows


def _source_dtype(source_dir: Path):
    """bfloat16 sources stay bfloat16; everything else is quantized in float16 (the usual GPTQ dtype)."""
    import torch

    config = json.loads((source_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float16"
    return torch.bfloat16 if name == "bfloat16" else torch.float16


@contextmanager
def _scratch_log_dir():
    """gptqmodel writes per-run logs to ./logs (relative to the cwd); keep them out of the caller's tree."""
    from gptqmodel.looper import loop_processor

    previous = loop_processor._PROJECT_LOG_DIR
    with tempfile.TemporaryDirectory(prefix="gptqmodel-logs-") as scratch:
        loop_processor._PROJECT_LOG_DIR = Path(scratch)
        try:
            yield
        finally:
            loop_processor._PROJECT_LOG_DIR = previous


def _build_spec(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    record = _build_here(spec["source_dir"], spec["out_dir"], calibration_texts=spec["calibration_texts"],
                         seed=spec["seed"], config_kwargs=spec["config_kwargs"], backend_name=spec["backend_name"],
                         compute_dtype=spec["compute_dtype"])
    Path(spec["record"]).write_text(json.dumps(record))


def _serve() -> None:
    """The build process (BuildProcess): a spec's path per line in, "ok" per finished build out; anything
    gptqmodel prints goes to standard error (the log). A failed build ends the process."""
    import traceback

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for line in sys.stdin:
        try:
            _build_spec(line.strip())
        except Exception:
            traceback.print_exc()
            sys.stderr.flush()
            reply.write("failed\n")
            sys.exit(1)
        sys.stdout.flush()
        reply.write("ok\n")


if __name__ == "__main__":  # started by BuildProcess, or by hand with one spec
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        _build_spec(sys.argv[1])
