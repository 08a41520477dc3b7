"""Generation with the reference's answers as drafts against plain greedy decoding, on every variant.

    python benchmarks/drafted_decoding.py [variant ...] [--model demo] [--rounds 2]

For each transformers variant (all of the model's by default), in this process, each generation task scored
twice, alternating: plainly (`run_task`, step-by-step decoding) and as the gate scores a variant against its
baseline (the baseline's answers as drafts, checked in one pass: backends/hf.py `generate_batch`). It prints,
per variant and task, both times (the smallest over the rounds), how many drafts held to the end, and every
item whose output differs between the two, with the variant's margin there (its top log-probability less the
runner-up's, decoding the item alone step by step, at the first token where that decoding leaves the text both
outputs share): a difference is only allowed at a near-tie.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def margin(backend, tokenizer, context, one: str, other: str) -> float:
    """The model's step-by-step greedy decoding of `context` (one row) at the first step where its text leaves
    the prefix that the outputs `one` and `other` share: its top two log-probabilities' gap there."""
    import torch

    with torch.inference_mode():
        out = backend.model.generate(input_ids=torch.as_tensor([list(context)]), max_new_tokens=12, do_sample=False,
                                     attention_mask=torch.ones((1, len(context)), dtype=torch.long),
                                     output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(context):].tolist()
    for k in range(len(tokens)):
        text = tokenizer.decode(tokens[:k + 1])
        if not (one.startswith(text) and other.startswith(text)):
            top = torch.log_softmax(out.scores[k][0].float(), -1).topk(2).values
            return float(top[0] - top[1])
    return float("nan")


def main() -> None:
    from quantgate.evaluation import Evaluator
    from quantgate.manifest import load_manifest
    from quantgate.tasks.kinds import task_kind
    from quantgate.tokencache import encode_texts

    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ev = Evaluator(manifest=load_manifest(REPO / "quantgate.toml"), profile="full", device="cpu")
    spec = ev.model(args.model)
    variants = args.variants or [v.name for v in spec.variants if ev.backend_of(args.model, v.name) == "transformers"]
    tasks = [t for t in spec.tasks if task_kind(ev.task(args.model, t).spec.schema).family == "generation"]
    tokenizer = ev.reference_tokenizer(args.model)
    print("| variant | task | plain (s) | drafted (s) | ratio | output as the reference's | outputs differing (margin) |")
    print("|---|---|---|---|---|---|---|")
    for variant in variants:
        for task in tasks:
            baseline = ev.comparable_task_baseline(args.model, task, "transformers")
            drafts = dict(zip(baseline.ids, baseline.answers, strict=True))
            times: dict[str, float] = {}
            results = {}
            for _ in range(args.rounds):
                for label, kwargs in (("plain", {}), ("drafted", {"drafts": drafts})):
                    started = time.perf_counter()
                    results[label] = ev.run_task(args.model, variant, task, **kwargs)
                    times[label] = min(times.get(label, float("inf")), time.perf_counter() - started)
            plain, drafted = results["plain"], results["drafted"]
            held = sum(a == drafts[i] for i, a in zip(plain.ids, plain.answers, strict=True))
            items = {i.id: i for i in ev.task(args.model, task).items}
            backend = ev.checkpoint(args.model, variant).backend
            differ = []
            for item_id, a, b in zip(plain.ids, plain.answers, drafted.answers, strict=True):
                if a != b:
                    context = encode_texts(tokenizer, [items[item_id].prompt])[0]
                    differ.append(f"{item_id} ({margin(backend, tokenizer, context, a, b):.1e})")
            print(f"| {variant} | {task} | {times['plain']:.2f} | {times['drafted']:.2f} | "
                  f"{times['plain'] / times['drafted']:.2f}x | {held}/{len(plain.ids)} | {', '.join(differ) or 'none'} |",
                  flush=True)
        ev.release()


if __name__ == "__main__":
    main()
