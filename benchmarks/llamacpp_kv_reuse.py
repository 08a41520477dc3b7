"""An experiment kept for its finding: llama.cpp multiple choice with each context decoded once and each of its
continuations decoded after it from the KV cache (the cells after the context removed before the next one, as
llama.cpp's own prompt cache reuses a prefix), against the backend's path (one decode of context and
continuation together per request), on the demo's GGUF files and the first 100 items of its two
multiple-choice tasks.

Finding (this project's 2-core CPU, 199 items): 2.1 to 2.3x faster, but log-likelihoods move by up to 0.21 nats
(7.8e-3 on the F16 file) and one answer flips on Q8_0: llama.cpp's CPU logits depend on how the batch that
computes them is made up, so the backend keeps one decode per request (docs/tasks.md). The other sharing form,
continuations side by side in one decode, is benchmarks/llamacpp_shared_context.py.

    python benchmarks/llamacpp_kv_reuse.py fixtures/demo_zoo/reference build/zoo/demo/gguf-*/model-*.gguf
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from quantgate.backends.base import ScoringBackend
from quantgate.backends.llamacpp import LlamaCppBackend

REPO = Path(__file__).resolve().parents[1]


def kv_reuse(backend: LlamaCppBackend, groups, *, max_length: int) -> list[list[tuple[float, bool]]]:
    """Each context once, then each continuation from its cached cells; (log-likelihood, greedy) per continuation."""
    lc, out = backend._lc, []
    for context, conts in groups:
        assert len(context) + max(map(len, conts)) <= max_length
        ctx = backend._context(len(context) + max(map(len, conts)))
        memory = lc.llama_get_memory(ctx)
        lc.llama_memory_clear(memory, True)
        head = backend._decode_last(ctx, list(context), 0)[None]
        results = []
        for cont in conts:
            lc.llama_memory_seq_rm(memory, 0, len(context), -1)
            rows = [head]
            if len(cont) > 1:
                rows.append(_decode_rows(backend, ctx, list(cont[:-1]), len(context)))
            dist = torch.log_softmax(torch.from_numpy(np.concatenate(rows)).double(), dim=-1)
            target = torch.as_tensor(list(cont))
            results.append((float(dist.gather(1, target[:, None]).sum()), bool((dist.argmax(dim=1) == target).all())))
        out.append(results)
    return out


def _decode_rows(backend, ctx, tokens, start):
    lc, batch = backend._lc, backend._batch
    for i, token in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, True
    batch.n_tokens = len(tokens)
    assert lc.llama_decode(ctx, batch) == 0
    return np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(tokens), backend.n_vocab)).copy()


def task_groups(tokenizer, items: int = 100):
    groups = []
    for name, sep in (("code_next_line_mc.jsonl", "\n"), ("prose_cloze_mc.jsonl", " ")):
        for line in (REPO / "fixtures" / "demo_tasks" / name).read_text().splitlines()[:items]:
            r = json.loads(line)
            groups.append((tokenizer(r["context"])["input_ids"], [tokenizer(sep + c)["input_ids"] for c in r["choices"]]))
    return groups


def main(reference: str, ggufs: list[str]) -> None:
    from transformers import AutoTokenizer

    groups = [(c, cs) for c, cs in task_groups(AutoTokenizer.from_pretrained(reference)) if len(c) + max(map(len, cs)) <= 256]
    print(f"{len(groups)} items whose context and longest choice fit in 256 tokens")
    for gguf in ggufs:
        backend = LlamaCppBackend(Path(gguf))
        started = time.perf_counter()
        new = kv_reuse(backend, groups, max_length=256)
        t_new = time.perf_counter() - started
        started = time.perf_counter()
        old = ScoringBackend.loglikelihood_grouped(backend, groups, max_length=256, batch_size=4)
        t_old = time.perf_counter() - started
        pairs = [(a, o) for g1, g2 in zip(new, old, strict=True) for a, o in zip(g1, g2, strict=True)]
        worst = max(abs(a[0] - o[0]) for a, o in pairs)
        flips = sum(int(np.argmax([a[0] for a in g1])) != int(np.argmax([o[0] for o in g2])) for g1, g2 in zip(new, old, strict=True))
        print(f"{Path(gguf).name}: largest |difference| {worst:.2e} nats, {flips} answers differ; "
              f"KV reuse {t_new:.2f}s, one decode per request {t_old:.2f}s ({t_old / t_new:.2f}x)")
        backend.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
