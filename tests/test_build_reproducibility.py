"""Recipe builds across machines: a GPTQ recipe gives the same weights whatever thread count and BLAS code
path the calling process has (the build pins its own numerics), an unpinned build under other settings
gives other weights but the same verdicts, and a build that differs from the recorded one is named."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (pip install 'quantgate[gptq]')")

from quantgate.checkpoints.gptq_build import NUMERICS_SWITCH, build_numerics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANT = "gptq-w4g64"  # the demo variant that sat nearest its reversal tolerance on another CPU
# What a machine with another CPU changes (BLAS code path, torch's kernel ISA, threads):
OTHER_MACHINE = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                 "ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}

pytestmark = pytest.mark.skipif(build_numerics("gptq")["environment"] == "native",
                                reason="builds are pinned on x86-64 CPUs with AVX2 only")


def demo_manifest(tmp_path: Path, zoo: str) -> Path:
    """The demo manifest with the repository's baselines and fixtures, and a zoo directory of its own."""
    text = (REPO / "quantgate.toml").read_text()
    text = text.replace('baselines = "baselines"', f'baselines = "{REPO / "baselines"}"')
    text = text.replace('zoo_dir = "build/zoo"', f'zoo_dir = "{tmp_path / zoo}"')
    if not (tmp_path / "fixtures").exists():
        (tmp_path / "fixtures").symlink_to(REPO / "fixtures")
    path = tmp_path / f"{zoo}.toml"
    path.write_text(text)
    return path


def zoo_build(manifest: Path, **env) -> tuple[Path, dict]:
    proc = subprocess.run([sys.executable, "-m", "quantgate.cli", "zoo", "build", "--manifest", str(manifest),
                           "--variant", VARIANT], env={**os.environ, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith(f"demo/{VARIANT}:"))
    path = Path(line.split(": ", 1)[1].split(" (", 1)[0])
    return path, json.loads((path / "quantgate-recipe.json").read_text())


def gate_verdicts(manifest: Path, tmp_path: Path, **env) -> dict:
    out = tmp_path / f"{manifest.stem}.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "quality", str(REPO / "quality_tests"),
                           "--quality-manifest", str(manifest), "--quality-profile", "fast", "--quality-json", str(out),
                           "-k", VARIANT, "-p", "no:cacheprovider", "-q"],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    records = json.loads(out.read_text())["records"]
    return {(r["metric"], r["corpus"]): (r["verdict"], r["ratio"] if r["metric"] == "relative_perplexity" else r["value"])
            for r in records}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("builds")
    here = zoo_build(demo_manifest(tmp, "here"))
    other = zoo_build(demo_manifest(tmp, "other"), **OTHER_MACHINE)
    native_manifest = demo_manifest(tmp, "native")
    native = zoo_build(native_manifest, **OTHER_MACHINE, **{NUMERICS_SWITCH: "native"})
    return tmp, here, other, (native_manifest, native)


def test_a_gptq_build_is_identical_under_other_threads_and_blas_settings(builds):
    _, (_, here), (_, other), _ = builds
    assert here["numerics"]["environment"]["MKL_CBWR"] == "AVX2" and here["compute_dtype"] == "float32"
    assert other["torch_threads"] == 1 and other["cpu_capability"] == "AVX2"  # the pin, not the caller's settings
    assert other["weights_digest"] == here["weights_digest"]


def test_an_unpinned_build_differs_but_gets_the_same_verdicts(builds):
    """Without the pin the same recipe builds other weights (GPTQ is chaotic in its floating-point input);
    the demo's tolerances are set from that spread, so the verdicts hold for either build."""
    tmp, (_, here), _, (native_manifest, (_, native)) = builds
    assert native["numerics"]["environment"] == "native"
    assert native["weights_digest"] != here["weights_digest"]
    pinned = gate_verdicts(demo_manifest(tmp, "here"), tmp)
    unpinned = gate_verdicts(native_manifest, tmp, **OTHER_MACHINE, **{NUMERICS_SWITCH: "native"})
    assert set(pinned) == set(unpinned) and len(pinned) >= 6
    assert {k: v[0] for k, v in pinned.items()} == {k: v[0] for k, v in unpinned.items()}
    assert {v[0] for v in pinned.values()} == {"pass"}
    assert any(pinned[k][1] != unpinned[k][1] for k in pinned)  # other numbers, same verdicts


def test_a_build_that_differs_from_the_recorded_one_is_named(builds, tmp_path):
    from quantgate.manifest import load_manifest
    from quantgate.zoo import compare_with_recorded, recipe_hash, record_builds

    _, (here_path, _), _, (native_manifest, (native_path, native)) = builds
    manifest = load_manifest(native_manifest)
    manifest = manifest.__class__(**{**manifest.__dict__, "baselines_dir": tmp_path / "baselines"})
    ref = manifest.models["demo"]
    variant = next(v for v in ref.variants if v.name == VARIANT)
    assert compare_with_recorded(manifest, ref, variant, here_path)[0] == "not recorded"
    record_builds(manifest, ref, {VARIANT: here_path})
    assert compare_with_recorded(manifest, ref, variant, here_path)[0] == "same"
    status, words = compare_with_recorded(manifest, ref, variant, native_path)
    assert status == "recipe changed" and "numerics differ" in words
    # The same recipe built to other weights (as on a CPU whose numerics the pin does not fix): named as such.
    path = tmp_path / "baselines" / "demo" / "builds.json"
    recorded = json.loads(path.read_text())
    recorded["variants"][VARIANT].update(identity=native["identity"], recipe_hash=recipe_hash(native["identity"]),
                                         weights_digest="0" * 64)
    path.write_text(json.dumps(recorded))
    status, words = compare_with_recorded(manifest, ref, variant, native_path)
    assert status == "differs"
    assert f"weights {native['weights_digest'][:12]} differ from the recorded build's 000000000000" in words
