"""Task scoring, the batched forms against the one-request-at-a-time forms, side by side in one process.

    python benchmarks/task_scoring_paths.py [fast|full] [variant ...]

For the demo reference (or each variant named): each multiple-choice task scored with a shared context
(loglikelihood_grouped) and with one request per choice (the base class's flattening, as the gate scored
before), the better of 2 rounds each, with the largest log-likelihood difference between the two and the
greedy flags that differ; then, for the reference, every task run through the gate's path, its answers
checked item by item against the stored baseline's.
"""

import json
import sys
import time
from pathlib import Path

from quantgate.backends.base import ScoringBackend
from quantgate.evaluation import Evaluator
from quantgate.manifest import load_manifest
from quantgate.tasks.multiple_choice import with_shots

REPO = Path(__file__).resolve().parents[1]
profile = sys.argv[1] if len(sys.argv) > 1 else "full"
variants = sys.argv[2:] or [None]
ev = Evaluator(manifest=load_manifest(REPO / "quantgate.toml"), profile=profile, device="cpu")
tok = ev.reference_tokenizer("demo")
settings = ev.settings("demo")
for variant, name in ((v, n) for v in variants for n in ("code-next-line", "prose-cloze")):
    backend = ev.checkpoint("demo", variant).backend
    task = ev.task("demo", name)
    groups = [(tok(with_shots(i, ()), add_special_tokens=False)["input_ids"],
               [tok(c, add_special_tokens=False)["input_ids"] for c in i.choices]) for i in task.items]
    times: dict[str, list[float]] = {"plain": [], "shared": []}
    got = {}
    for _ in range(2):
        for label, fn in (("plain", ScoringBackend.loglikelihood_grouped), ("shared", type(backend).loglikelihood_grouped)):
            started = time.perf_counter()
            got[label] = [r for g in fn(backend, groups, max_length=settings.max_length, batch_size=settings.batch_size)
                          for r in g]
            times[label].append(time.perf_counter() - started)
    plain, shared = min(times["plain"]), min(times["shared"])
    delta = max(abs(a - b) for (a, _), (b, _) in zip(got["shared"], got["plain"], strict=True))
    flags = sum(a != b for (_, a), (_, b) in zip(got["shared"], got["plain"], strict=True))
    print(f"{variant or 'reference'} {name}: {len(groups)} items, {sum(len(c) for c, _ in groups):,} context and "
          f"{sum(len(x) for _, cs in groups for x in cs):,} choice tokens; plain {plain:.2f}s, shared {shared:.2f}s, "
          f"{plain / shared:.2f}x; largest log-likelihood difference {delta:.2e}, greedy flags differing {flags}")
for name in ev.model("demo").tasks if variants == [None] else ():
    stored = json.loads((REPO / "baselines" / "demo" / "tasks" / f"{name}.{profile}.json").read_text())
    started = time.perf_counter()
    result = ev.run_task("demo", None, name)
    differ = [i for i, a, b in zip(result.ids, result.answers, stored["items"], strict=True) if a != b["answer"]]
    print(f"{name}: {time.perf_counter() - started:.1f}s, score {result.score} (stored {stored['summary']['score']}), "
          f"answers differing from the stored baseline's: {len(differ)} {differ[:5]}")
