"""How far the demo's gptqmodel builds move between machines: each recipe built under other settings of
the building process (BLAS code path, torch kernel level, threads), with and without the pinned
numerics, then gated: weights digest, relative perplexity, KL, top-1 and task drops per build.

    python benchmarks/build_spread.py                                   # every gptqmodel recipe, every setting
    python benchmarks/build_spread.py --variant gptq-w4g64 --profile fast --setting pinned --setting native

docs/demo.md "Builds across machines" and the tolerances in quantgate.toml come from its output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # what another machine changes, as environment variables of the building process
    "pinned": {},
    "pinned, other machine": {"OMP_NUM_THREADS": "2", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                              "ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"},
    "native": {"QUANTGATE_BUILD_NUMERICS": "native"},
    "native, 1 thread": {"QUANTGATE_BUILD_NUMERICS": "native", "OMP_NUM_THREADS": "1"},
    "native, MKL AVX2": {"QUANTGATE_BUILD_NUMERICS": "native", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "native, torch AVX2": {"QUANTGATE_BUILD_NUMERICS": "native", "ATEN_CPU_CAPABILITY": "avx2"},
}
TASKS = ("code-next-line", "code-line-end", "prose-cloze")


def build(manifest: Path, variant: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "quantgate.cli", "zoo", "build", "--manifest", str(manifest), "--variant",
                    variant], env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)


def measure(manifest_path: Path, variant: str, profiles: list[str], env: dict) -> dict:
    from quantgate.evaluation import Evaluator
    from quantgate.manifest import load_manifest
    from quantgate.zoo import build_record, built_dir

    os.environ.pop("QUANTGATE_BUILD_NUMERICS", None)
    os.environ.update({k: v for k, v in env.items() if k == "QUANTGATE_BUILD_NUMERICS"})  # the same recipe identity
    manifest = load_manifest(manifest_path)
    ref = manifest.models["demo"]
    spec = next(v for v in ref.variants if v.name == variant)
    out = {"weights": build_record(built_dir(manifest, ref, spec))["weights_digest"][:12]}
    for profile in profiles:
        ev = Evaluator(manifest=manifest, profile=profile, device="cpu")
        for corpus in ref.corpora:
            s = ev.compare("demo", variant, corpus, ev.comparable_baseline("demo", corpus)).stats
            out[f"{profile}/{corpus}"] = {"ratio": round(s.ppl_ratio, 5), "kl": s.kl_mean, "top1": round(s.top1, 5)}
        for task in TASKS if profile == "fast" else ():
            _, drop = ev.compare_task("demo", variant, task, ev.comparable_task_baseline("demo", task))
            out[f"{profile}/task/{task}"] = round(drop.drop, 4)
        ev.release()
    return out


def main() -> None:
    from quantgate.manifest import load_manifest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append")
    parser.add_argument("--setting", action="append", choices=list(SETTINGS))
    parser.add_argument("--profile", action="append", choices=["fast", "full"])
    args = parser.parse_args()
    recipes = [v.name for v in load_manifest(REPO / "quantgate.toml").models["demo"].variants
               if v.recipe and v.recipe.get("builder") == "gptqmodel"]
    text = (REPO / "quantgate.toml").read_text().replace('baselines = "baselines"', f'baselines = "{REPO / "baselines"}"')
    with tempfile.TemporaryDirectory(prefix="build-spread-") as scratch:
        scratch = Path(scratch)
        (scratch / "fixtures").symlink_to(REPO / "fixtures")
        for variant in args.variant or recipes:
            for name in args.setting or list(SETTINGS):
                manifest = scratch / f"{len(list(scratch.glob('*.toml')))}.toml"
                manifest.write_text(text.replace('zoo_dir = "build/zoo"', f'zoo_dir = "{scratch / manifest.stem}"'))
                build(manifest, variant, SETTINGS[name])
                row = measure(manifest, variant, args.profile or ["fast", "full"], SETTINGS[name])
                print(json.dumps({"variant": variant, "setting": name, **row}), flush=True)


if __name__ == "__main__":
    main()
