"""Two source trees of quantgate measured side by side on the same variants, in alternating fresh processes.

    python benchmarks/side_by_side.py BEFORE_TREE AFTER_TREE [variant ...] [--model demo] [--rounds 2]

Each tree is a checkout (its own `src/` and `quantgate.toml`; the recipe variants already built in its
`build/zoo`). For each variant and tree, a fresh process loads the variant and does what the gate does with
it while it is resident: both corpora scored, every task scored. It reports, per variant and tree:

- task: each task's scoring time (the sum over the variant's tasks is the issue's "task scoring per variant"),
  as the gate scores it: a tree whose `run_task` takes drafts gets the task baseline's answers (read before
  the clock starts), as `compare_task` passes them;
- ppl: the corpora's scoring time;
- forward: the time spent inside the model's forward passes (transformers) or llama_decode (llama.cpp);
- fixed: everything else from the process's start to the end (imports, manifest, tokenizing, hashing,
  loading, audits, bookkeeping), the issue's "fixed cost per variant".

Rounds alternate before/after so that a change in the machine's load hits both. The figure per tree is the
smallest over the rounds.
"""

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = r"""
import json, sys, time
started = time.perf_counter()
forward = [0.0]

def timed(fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            forward[0] += time.perf_counter() - t
    return wrapper

try:
    import llama_cpp
    llama_cpp.llama_decode = timed(llama_cpp.llama_decode)
except ImportError:
    pass
from pathlib import Path
from quantgate.evaluation import Evaluator
from quantgate.manifest import load_manifest

tree, model, variant = sys.argv[1], sys.argv[2], sys.argv[3]
ev = Evaluator(manifest=load_manifest(Path(tree) / "quantgate.toml"), profile="full", device="cpu")
loaded = ev.checkpoint(model, variant)
if hasattr(getattr(loaded, "model", None), "forward"):
    import torch
    loaded.model.forward = timed(loaded.model.forward)
out = {"ppl": {}, "task": {}}
for corpus in ev.model(model).corpora:
    t = time.perf_counter()
    ev.measure(model, variant, corpus)
    out["ppl"][corpus] = time.perf_counter() - t
import inspect
drafted = "drafts" in inspect.signature(ev.run_task).parameters
for task in ev.model(model).tasks:
    kwargs = {}
    if drafted:  # as the gate scores a variant's task: against its baseline, whose answers are drafts
        baseline = ev.comparable_task_baseline(model, task, ev.backend_of(model, variant))
        kwargs["drafts"] = dict(zip(baseline.ids, baseline.answers))
    t = time.perf_counter()
    ev.run_task(model, variant, task, **kwargs)
    out["task"][task] = time.perf_counter() - t
out["forward"] = forward[0]
out["total"] = time.perf_counter() - started
out["fixed"] = out["total"] - forward[0]
print("RESULT " + json.dumps(out))
"""


def run(tree: str, model: str, variant: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.abspath(tree), "src")}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WORKER, os.path.abspath(tree), model, variant], env=env,
                          capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - started
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{tree} {variant}: no result\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    result["process_wall"] = wall  # interpreter start included
    result["fixed"] += wall - result["total"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("variants", nargs="*", default=["fp16", "gptq-w4g128", "bnb-nf4", "ct-w8a8-int8",
                                                        "gguf-q4_k_m", "gguf-q4_k_m-llamacpp"])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    best: dict = {}
    for _ in range(args.rounds):
        for variant in args.variants:
            for label, tree in (("before", args.before), ("after", args.after)):
                r = run(tree, args.model, variant)
                keep = best.setdefault((variant, label), r)
                for key in ("forward", "fixed", "process_wall"):
                    keep[key] = min(keep[key], r[key])
                for kind in ("ppl", "task"):
                    for name, seconds in r[kind].items():
                        keep[kind][name] = min(keep[kind][name], seconds)
    print("| variant | tree | task scoring (s) | per task | corpora (s) | forward passes (s) | fixed cost (s) | process (s) |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {"before": 0.0, "after": 0.0}
    for variant in args.variants:
        for label in ("before", "after"):
            r = best[(variant, label)]
            tasks = sum(r["task"].values())
            totals[label] += tasks
            per = ", ".join(f"{k} {v:.2f}" for k, v in r["task"].items())
            print(f"| {variant} | {label} | {tasks:.2f} | {per} | {sum(r['ppl'].values()):.2f} | {r['forward']:.2f} | "
                  f"{r['fixed']:.2f} | {r['process_wall']:.2f} |")
        b, a = (sum(best[(variant, x)]["task"].values()) for x in ("before", "after"))
        print(f"| {variant} | ratio | {b / a:.2f}x | | | | | |")
    print(f"\ntask scoring over these variants: before {totals['before']:.1f}s, after {totals['after']:.1f}s, "
          f"{totals['before'] / totals['after']:.2f}x")


if __name__ == "__main__":
    main()
