"""The protocol presets against the real peers, on the demo model: `tox -e peers` (or run it in an env with lm-eval).

    python benchmarks/peers.py [--corpus prose] [--llama-perplexity PATH] [--json out.json]

- lm-evaluation-harness (pinned in tox's `peers` env) runs a local task with its `wikitext` task's settings:
  `output_type: loglikelihood_rolling` on each document, and the `wikitext` task's own `process_results`
  (word and byte counts on the document) with its aggregations. The documents are the corpus's, the target
  the document itself (the gate's corpora are plain text: no WikiText detokenizing). quantgate's `lm-eval`
  preset scores the same documents with the same model on the transformers backend. Asserted: word
  perplexity, byte perplexity and bits per byte equal to 1e-6 relative.
- llama.cpp's `llama-perplexity` (built from the sources llama-cpp-python vendors:
  benchmarks/build_llama_perplexity.sh) reads the corpus's text from a file, with the demo's F16 GGUF,
  `-c max_length`; quantgate's `llama.cpp` preset scores that GGUF through its llama.cpp backend. Asserted:
  the final perplexity equal to 1e-4 relative (llama-perplexity prints four decimals).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TASK_YAML = """task: quantgate_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: !function utils.doc_to_target
process_results: !function utils.process_results
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

TASK_UTILS = """from lm_eval.tasks.wikitext.preprocess_wikitext import process_results  # the wikitext task's own counts


def doc_to_target(doc):
    return doc["page"]
"""


def gate(evaluator, corpus: str, preset: str, backend=None):
    """(sum of log-likelihoods, tokens scored, TextSize, perplexity) under a preset, the demo's settings otherwise."""
    from quantgate.presets import get_preset

    settings = replace(evaluator.settings("demo"), preset=preset, token_cap=None)
    rule = get_preset(preset)
    stream = rule.stream(evaluator.corpus(corpus), evaluator.reference_tokenizer("demo"), settings)
    windows = rule.windows(stream, settings)
    backend = backend or evaluator.checkpoint("demo", None).backend
    scores = backend.loglikelihood_rolling(stream.ids, max_length=settings.max_length, stride=settings.stride,
                                           batch_size=settings.batch_size, windows=windows)
    return float(scores.logprobs.sum()), scores.n, rule.text(stream, scores.positions), scores.perplexity


def lm_eval_side(evaluator, corpus: str, work: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    docs = evaluator.corpus(corpus).documents
    data = work / "docs.jsonl"
    data.write_text("".join(json.dumps({"page": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    task_dir = work / "task"
    task_dir.mkdir()
    (task_dir / "quantgate_rolling.yaml").write_text(TASK_YAML.format(data=data))
    (task_dir / "utils.py").write_text(TASK_UTILS)
    settings = evaluator.settings("demo")
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(REPO / "fixtures/demo_zoo/reference"), "dtype": settings.dtype,
                                "max_length": settings.max_length},
        tasks=["quantgate_rolling"], task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=settings.batch_size, device="cpu")
    got = out["results"]["quantgate_rolling"]
    return {k: got[f"{k},none"] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")}


def llama_perplexity_side(binary: Path, gguf: Path, text: str, n_ctx: int, work: Path) -> float:
    path = work / "text.txt"
    path.write_text(text, encoding="utf-8")
    for _ in range(3):  # its log thread sometimes loses the last lines at exit (exit status 0): run it again
        run = subprocess.run([str(binary), "-m", str(gguf), "-f", str(path), "-c", str(n_ctx), "-b", str(n_ctx),
                              "-fa", "on", "--no-warmup"], capture_output=True, text=True, check=False)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
        if run.returncode != 0 or found:
            break
    if run.returncode != 0 or not found:
        raise SystemExit(f"llama-perplexity failed ({run.returncode}):\n{(run.stdout + run.stderr)[-3000:]}")
    return float(found.group(1))


def main(argv=None) -> int:
    from quantgate.evaluation import Evaluator
    from quantgate.manifest import load_manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="prose")
    ap.add_argument("--llama-perplexity", type=Path, help="the llama-perplexity binary (skipped without it)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    evaluator = Evaluator(manifest=load_manifest(REPO / "quantgate.toml"), profile="full", device="cpu")
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        total, tokens, text, _ = gate(evaluator, args.corpus, "lm-eval")
        ours = {"word_perplexity": math.exp(-total / text.words), "byte_perplexity": math.exp(-total / text.bytes),
                "bits_per_byte": -total / (text.bytes * math.log(2))}
        theirs = lm_eval_side(evaluator, args.corpus, work)
        for key in ours:
            rel = abs(ours[key] - theirs[key]) / abs(theirs[key])
            rows.append({"peer": "lm-evaluation-harness", "metric": key, "quantgate": ours[key], "peer_value": theirs[key],
                         "relative_difference": rel, "tolerance": 1e-6})
        if args.llama_perplexity:
            from quantgate.backends.llamacpp import LlamaCppBackend
            from quantgate.zoo import reference_gguf

            gguf = reference_gguf(evaluator.manifest, evaluator.model("demo"), evaluator.reference_sha256("demo"))
            _, _, _, ppl = gate(evaluator, args.corpus, "llama.cpp", backend=LlamaCppBackend(gguf))
            peer = llama_perplexity_side(args.llama_perplexity, gguf, evaluator.corpus(args.corpus).text,
                                         evaluator.settings("demo").max_length, work)
            rows.append({"peer": "llama-perplexity", "metric": "perplexity", "quantgate": ppl, "peer_value": peer,
                         "relative_difference": abs(ppl - peer) / peer, "tolerance": 1e-4})
    print(f"| peer | corpus {args.corpus} | quantgate | peer | relative difference | tolerance |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ok = r["relative_difference"] <= r["tolerance"]
        failed |= not ok
        print(f"| {r['peer']} | {r['metric']} | {r['quantgate']:.10g} | {r['peer_value']:.10g} | "
              f"{r['relative_difference']:.2e} | {r['tolerance']:.0e}{'' if ok else ' FAILED'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
