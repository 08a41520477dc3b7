"""How far task scoring is from its floor: the forward passes its items' own tokens need, and nothing else.

    python benchmarks/task_floor.py [variant ...] [--model demo] [--rounds 3]

For each variant (transformers backends), in this process: every task of the model scored as the gate scores it
(`run_task`), against the same task with the backend's work cut down to plain forward passes over the very same
batches:

- multiple choice: each packed row (context + every choice, the same rows and batches as the packed path)
  through the model with causal attention, no 4-D mask, no position ids and no scoring, the output layer from
  the same column on;
- generation: with drafts (the task baseline's answers, as the gate passes them), one plain forward of each
  prompt and its draft, the same rows and padding, every draft taken as the answer: no check, no decoding step;
  without drafts, only the prompts' forward pass (prefill, the output layer at the last position), the same
  rows and left padding, no decoding step at all.

So the floor is what a task would take if scoring, masking and decoding were free. A side-by-side speed-up
target beyond "the old code's time / floor" cannot be met without forwarding fewer tokens (another protocol or
other items). Rounds alternate actual and floor; each figure is the smallest over the rounds.
"""

from __future__ import annotations

import argparse
import inspect
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def floor_only(backend):
    """The backend's model passes without the work around them (see the module's docstring)."""
    import torch

    from quantgate.backends import hf

    packed, generate = hf._packed, backend.model.generate

    def plain_rows(b, groups):
        rows = [[*ctx, *(t for c in conts for t in c)] for ctx, conts in groups]
        ids = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
        for n, row in enumerate(rows):
            ids[n, :len(row)] = torch.as_tensor(row)
        lo = min(len(ctx) for ctx, _ in groups) - 1
        with torch.inference_mode():
            b.model(input_ids=ids.to(b.device), logits_to_keep=torch.arange(lo, ids.shape[1], device=b.device))
        return [[(0.0, False)] * len(conts) for _, conts in groups]

    def prefill(input_ids, attention_mask, **_):
        backend.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
        return input_ids

    def plain_drafts(b, rows, drafts, kept, *, max_new_tokens, stop, batch_size):
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i]) + len(drafts[i])))
        for begin in range(0, len(order), max(1, batch_size)):
            chunk = order[begin:begin + max(1, batch_size)]
            width = max(len(rows[i]) + len(drafts[i]) for i in chunk)
            ids, mask = torch.zeros((len(chunk), width), dtype=torch.long), torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                seq = rows[i] + drafts[i]
                ids[row, :len(seq)], mask[row, :len(seq)] = torch.as_tensor(seq), 1
            lo = min(len(rows[i]) for i in chunk) - 1
            with torch.inference_mode():
                b.model(input_ids=ids.to(b.device), attention_mask=mask.to(b.device),
                        logits_to_keep=torch.arange(lo, width, device=b.device))
        for i, draft in enumerate(drafts):
            kept[i] = list(draft)
        return []  # every row taken as settled: no decoding step

    check = hf._check_drafts
    hf._packed, backend.model.generate, hf._check_drafts = plain_rows, prefill, plain_drafts
    try:
        yield
    finally:
        hf._packed, backend.model.generate, hf._check_drafts = packed, generate, check


def main() -> None:
    from quantgate.evaluation import Evaluator
    from quantgate.manifest import load_manifest

    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*", default=["fp16"])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ev = Evaluator(manifest=load_manifest(REPO / "quantgate.toml"), profile="full", device="cpu")
    print("| variant | task | scoring (s) | floor (s) | floor / scoring |")
    print("|---|---|---|---|---|")
    for variant in args.variants:
        name = None if variant == "fp16" else variant
        loaded = ev.checkpoint(args.model, name)
        actual, floor = {}, {}
        for task in ev.model(args.model).tasks:
            kwargs = {}
            if "drafts" in inspect.signature(ev.run_task).parameters:  # as the gate scores it (compare_task)
                baseline = ev.comparable_task_baseline(args.model, task, ev.backend_of(args.model, name))
                kwargs["drafts"] = dict(zip(baseline.ids, baseline.answers, strict=True))
            ev.run_task(args.model, name, task, **kwargs)  # warm: tokens cached, first passes paid
            for _ in range(args.rounds):
                started = time.perf_counter()
                ev.run_task(args.model, name, task, **kwargs)
                actual[task] = min(actual.get(task, float("inf")), time.perf_counter() - started)
                with floor_only(loaded.backend):
                    started = time.perf_counter()
                    ev.run_task(args.model, name, task, **kwargs)
                    floor[task] = min(floor.get(task, float("inf")), time.perf_counter() - started)
            print(f"| {variant} | {task} | {actual[task]:.2f} | {floor[task]:.2f} | {floor[task] / actual[task]:.2f} |",
                  flush=True)
        a, f = sum(actual.values()), sum(floor.values())
        print(f"| {variant} | all | {a:.2f} | {f:.2f} | {f / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
