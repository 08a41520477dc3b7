"""The demo zoo's task items scored by one checkpoint: accuracy, its Wilson interval, chance, time.

    python benchmarks/demo_tasks.py [VARIANT]     (default: the FP16 reference)

Multiple choice (fixtures/demo_tasks/code_next_line_mc.jsonl) with acc, acc_norm and acc_pmi;
generation (code_line_end_gen.jsonl): greedy, exact match of the rest of the line.
"""

import json
import sys
import time
from pathlib import Path

from quantgate.evaluation import Evaluator
from quantgate.manifest import load_manifest
from quantgate.stats import wilson_interval
from quantgate.tasks.generation import line_end_items, newline_token_ids, rest_of_line, score_generation
from quantgate.tasks.multiple_choice import next_line_items, score_choices

TASKS = Path("fixtures/demo_tasks")
ev = Evaluator(manifest=load_manifest("quantgate.toml"), profile="full", device="cpu")
variant = sys.argv[1] if len(sys.argv) > 1 else None
loaded = ev.checkpoint("demo", variant)
tokenizer = ev.reference_tokenizer("demo")
mc = next_line_items([json.loads(x) for x in (TASKS / "code_next_line_mc.jsonl").read_text().splitlines()])
gen = line_end_items([json.loads(x) for x in (TASKS / "code_line_end_gen.jsonl").read_text().splitlines()])


def show(name, result, started):
    k, n = sum(result["correct"]), len(result["correct"])
    print(json.dumps({"variant": variant or "reference", "task": name, "accuracy": round(k / n, 4),
                      "interval": [round(x, 4) for x in (wilson_interval(k, n).low, wilson_interval(k, n).high)],
                      "chance": result.get("chance", 0.0), "items": n,
                      "seconds": round(time.perf_counter() - started, 1)}), flush=True)


for scoring in ("acc", "acc_norm", "acc_pmi"):
    started = time.perf_counter()
    show(f"code_next_line_mc/{scoring}", score_choices(loaded.backend, tokenizer, mc, scoring=scoring, max_length=256,
                                                       batch_size=8), started)
started = time.perf_counter()
show("code_line_end_gen", score_generation(loaded.backend, tokenizer, gen, extract=rest_of_line, max_new_tokens=12,
                                           max_length=256, stop_ids=newline_token_ids(tokenizer)), started)
