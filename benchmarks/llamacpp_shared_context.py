"""An experiment kept for its finding: llama.cpp multiple choice with each context decoded once and its
continuations beside it (one llama_decode per item, each continuation a sequence of its own sharing the
context's cells, as llama.cpp's perplexity tool scores HellaSwag endings) against the backend's path (one decode
per (context, continuation)), side by side in one process, for the demo's GGUF variants scored by llama.cpp.

Finding: llama.cpp's CPU kernels give a token's logits that depend on where the token sits in the batch (rows
that fall in a different tile of the matrix kernels), so the shared form moves some log-likelihoods by up to
0.24 nats and flips answers; the backend therefore keeps one decode per request (see docs/tasks.md).

    python benchmarks/llamacpp_shared_context.py [fast|full] [variant ...]

Per variant and multiple-choice task: the time of each path (the better of 2 rounds), the largest absolute and
relative difference between their log-likelihoods, and the items whose chosen answer differs, each with its
margin (the chosen choice's lead over the runner-up, in the task's scoring rule).
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

from quantgate.evaluation import Evaluator
from quantgate.manifest import load_manifest
from quantgate.tasks.multiple_choice import NEUTRAL_PROMPT, with_shots
from quantgate.tokencache import encode_texts

REPO = Path(__file__).resolve().parents[1]
profile = sys.argv[1] if len(sys.argv) > 1 else "full"
ev = Evaluator(manifest=load_manifest(REPO / "quantgate.toml"), profile=profile, device="cpu")
variants = sys.argv[2:] or [v.name for v in ev.model("demo").variants if v.backend == "llama.cpp"]
tok = ev.reference_tokenizer("demo")
settings = ev.settings("demo")


def groups_of(task):
    contexts = encode_texts(tok, [with_shots(i, ()) for i in task.items])
    choices = iter(encode_texts(tok, [c for i in task.items for c in i.choices]))
    groups = [(c, [next(choices) for _ in i.choices]) for c, i in zip(contexts, task.items, strict=True)]
    if task.spec.scoring == "acc_pmi":
        (neutral,) = encode_texts(tok, [NEUTRAL_PROMPT])
        groups.append((neutral, list(dict.fromkeys(tuple(x) for _, cs in groups for x in cs))))
    return groups


SEQUENCES = 8


def sequences(backend, n_tokens: int):
    lc = backend._lc
    size = -(-n_tokens // 256) * 256
    if getattr(backend, "_experiment", None) is None or backend._experiment[2] < size:
        params = lc.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = size
        params.n_seq_max, params.kv_unified = SEQUENCES, True
        params.n_threads = params.n_threads_batch = backend.n_threads
        params.flash_attn_type = backend.flash_attn_type
        params.type_k = params.type_v = lc.GGML_TYPE_F16
        backend._experiment = (lc.llama_init_from_model(backend._model, params), lc.llama_batch_init(size, 0, SEQUENCES), size)
    return backend._experiment[0], backend._experiment[1]


def beside(backend, context, conts):
    lc = backend._lc
    tails = [c[:-1] for c in conts]
    ctx, batch = sequences(backend, len(context) + sum(map(len, tails)))
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    n = 0
    for pos, token in enumerate(context):
        batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, len(conts)
        for seq in range(len(conts)):
            batch.seq_id[n][seq] = seq
        batch.logits[n] = pos == len(context) - 1
        n += 1
    for seq, tail in enumerate(tails):
        for k, token in enumerate(tail):
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, len(context) + k, 1
            batch.seq_id[n][0], batch.logits[n] = seq, True
            n += 1
    batch.n_tokens = n
    assert lc.llama_decode(ctx, batch) == 0
    rows = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(1 + sum(map(len, tails)), backend.n_vocab)).copy()
    out, first = [], 1
    for cont, tail in zip(conts, tails, strict=True):
        logprobs = torch.log_softmax(torch.from_numpy(np.concatenate([rows[:1], rows[first:first + len(tail)]])).double(), -1)
        first += len(tail)
        target = torch.as_tensor(cont)
        out.append((float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(1) == target).all())))
    return out


def shared_form(backend, groups, *, max_length, batch_size):
    out = []
    for context, conts in groups:
        if not (context and conts and len(context) + max(map(len, conts)) <= max_length):
            out.extend(backend.loglikelihood_grouped([(context, conts)], max_length=max_length, batch_size=batch_size))
            continue
        out.append([r for k in range(0, len(conts), SEQUENCES)
                    for r in beside(backend, [int(t) for t in context], [[int(t) for t in c] for c in conts[k:k + SEQUENCES]])])
    return out


def chosen(results, groups, scoring):
    scores = [np.array([ll for ll, _ in r]) for r in results]
    if scoring == "acc_pmi":
        prior = dict(zip(groups[-1][1], (ll for ll, _ in results[-1]), strict=True))
        scores = [s - np.array([prior[tuple(c)] for c in g[1]]) for s, g in zip(scores[:-1], groups[:-1], strict=True)]
    return [(int(np.argmax(s)), float(np.sort(s)[-1] - np.sort(s)[-2])) for s in scores]


for variant in variants:
    backend = ev.checkpoint("demo", variant).backend
    plain_fn = backend.loglikelihood_grouped

    def shared_fn(groups, backend=backend, **kwargs):
        return shared_form(backend, groups, **kwargs)
    for name in ev.model("demo").tasks:
        task = ev.task("demo", name)
        if task.spec.schema not in ("next_line", "cloze", "mmlu", "ceval"):
            continue
        groups = groups_of(task)
        times, got = {"plain": [], "shared": []}, {}
        for _ in range(2):
            for label, fn in (("plain", plain_fn), ("shared", shared_fn)):
                started = time.perf_counter()
                got[label] = fn(groups, max_length=settings.max_length, batch_size=settings.batch_size)
                times[label].append(time.perf_counter() - started)
        a = np.array([ll for r in got["shared"] for ll, _ in r])
        b = np.array([ll for r in got["plain"] for ll, _ in r])
        flags = [g for r in got["shared"] for _, g in r] == [g for r in got["plain"] for _, g in r]
        picks_s, picks_p = chosen(got["shared"], groups, task.spec.scoring), chosen(got["plain"], groups, task.spec.scoring)
        differ = [(task.items[i].id, round(min(ps[1], pp[1]), 6)) for i, (ps, pp) in enumerate(zip(picks_s, picks_p, strict=True))
                  if ps[0] != pp[0]]
        plain, shared = min(times["plain"]), min(times["shared"])
        print(f"{variant} {name}: plain {plain:.2f}s, shared {shared:.2f}s ({plain / shared:.2f}x); "
              f"max |diff| {np.abs(a - b).max():.2e}, max rel {np.max(np.abs(a - b) / np.abs(b)):.2e}; "
              f"greedy flags equal: {flags}; answers differing: {len(differ)} {differ}", flush=True)
    ev.release()
