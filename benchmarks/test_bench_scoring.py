"""Benchmarks of the evaluation hot path (pytest-benchmark): `./run.sh bench`.

Scoring throughput of the demo model per batch size, and the cost of tokenizing a corpus
once. Figures quoted in the README come from these runs.
"""

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "fixtures" / "demo_zoo" / "reference"
TOKENS = 8192

pytestmark = pytest.mark.skipif(not (REFERENCE / "model.safetensors").exists(), reason="demo model not trained")


@pytest.fixture(scope="module")
def evaluator():
    from quantgate.evaluation import Evaluator
    from quantgate.manifest import load_manifest

    return Evaluator(manifest=load_manifest(REPO / "quantgate.toml"), profile="fast", device="cpu")


@pytest.fixture(scope="module")
def stream(evaluator):
    return evaluator.tokenized("demo", "code", evaluator.settings("demo")).ids[:TOKENS]


@pytest.fixture(scope="module")
def backend(evaluator):
    from quantgate.backends.hf import TransformersBackend

    loaded = evaluator.checkpoint("demo", None)
    return TransformersBackend(loaded.model, "cpu")


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_score_8k_tokens(benchmark, backend, stream, batch_size):
    benchmark.extra_info["tokens"] = TOKENS
    scores = benchmark.pedantic(backend.loglikelihood_rolling, args=(stream,),
                                kwargs=dict(max_length=256, stride=128, batch_size=batch_size),
                                rounds=3, iterations=1)
    assert scores.n == TOKENS - 1 and np.isfinite(scores.logprobs).all()


def test_tokenize_corpus_once(benchmark, evaluator):
    from quantgate.corpus import tokenize

    corpus = evaluator.corpus("prose")
    tokenizer = evaluator.reference_tokenizer("demo")
    result = benchmark(tokenize, corpus, tokenizer, add_bos=False, token_cap=None)
    assert len(result.doc_starts) == len(corpus.documents)


@pytest.fixture(scope="module")
def code_task(evaluator):
    return evaluator.task("demo", "code-next-line")  # the fast tier's 100 items, 4 choices each


def test_multiple_choice_requests(benchmark, backend, evaluator, code_task):
    """400 (context, choice) log-likelihoods, the demo's code task on the fast tier (batched longest first)."""
    from quantgate.tasks.multiple_choice import with_shots

    tokenizer = evaluator.reference_tokenizer("demo")
    requests = [(tokenizer(with_shots(item, ()), add_special_tokens=False)["input_ids"],
                 tokenizer(choice, add_special_tokens=False)["input_ids"])
                for item in code_task.items for choice in item.choices]
    benchmark.extra_info["requests"] = len(requests)
    results = benchmark.pedantic(backend.loglikelihood, args=(requests,), kwargs=dict(max_length=256, batch_size=4),
                                 rounds=2, iterations=1)
    assert len(results) == len(requests) and all(np.isfinite(ll) for ll, _ in results)


def _min_seconds(fn, rounds: int) -> float:
    import time

    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def test_multiple_choice_shared_context_against_plain_requests(benchmark, backend, evaluator, code_task):
    """The demo's code task (fast tier: 100 items, 4 choices): each context and its choices packed in one row and
    forwarded once (loglikelihood_grouped) against one request per (context, choice), and against its limit: a plain
    forward of the very same rows (the items' own tokens, each once; same batches, same output-layer columns, no
    mask and no scoring), all timed side by side in this run."""
    from quantgate.backends.base import ScoringBackend
    from quantgate.tasks.multiple_choice import with_shots

    tokenizer = evaluator.reference_tokenizer("demo")
    groups = [(tokenizer(with_shots(item, ()), add_special_tokens=False)["input_ids"],
               [tokenizer(c, add_special_tokens=False)["input_ids"] for c in item.choices]) for item in code_task.items]
    kwargs = dict(max_length=256, batch_size=4)
    plain = _min_seconds(lambda: ScoringBackend.loglikelihood_grouped(backend, groups, **kwargs), rounds=2)
    limit = _min_seconds(lambda: _forward_rows(backend, groups, batch_size=4), rounds=2)
    shared_result = benchmark.pedantic(backend.loglikelihood_grouped, args=(groups,), kwargs=kwargs, rounds=2,
                                       iterations=1)
    shared = benchmark.stats.stats.min
    benchmark.extra_info.update(plain_seconds=round(plain, 3), shared_seconds=round(shared, 3),
                                limit_seconds=round(limit, 3), speedup=round(plain / shared, 2),
                                of_limit=round(limit / shared, 2))
    assert [len(g) for g in shared_result] == [len(c) for _, c in groups]
    assert plain / shared >= 2.0, f"shared context only {plain / shared:.2f}x faster than plain requests"
    assert limit / shared >= 0.8, f"shared context at {limit / shared:.2f} of a plain forward of its rows"


def _forward_rows(backend, groups, *, batch_size: int) -> None:
    """The rows loglikelihood_grouped forwards (context + every choice, longest first), through the model as they
    are: causal attention, no position ids, the output layer from the first choice-predicting column on."""
    import torch

    rows = sorted(([*ctx, *(t for c in conts for t in c)], len(ctx)) for ctx, conts in groups)[::-1]
    with torch.inference_mode():
        for first in range(0, len(rows), batch_size):
            chunk = rows[first:first + batch_size]
            ids = torch.zeros((len(chunk), max(len(r) for r, _ in chunk)), dtype=torch.long)
            for n, (row, _) in enumerate(chunk):
                ids[n, :len(row)] = torch.as_tensor(row)
            lo = min(n for _, n in chunk) - 1
            backend.model(input_ids=ids, logits_to_keep=torch.arange(lo, ids.shape[1]))


def test_generation_side_by_side_against_one_at_a_time(benchmark, backend, evaluator):
    """The demo's line-end task (first 64 items): rows decoded side by side (generate_batch, 4 a pass, the demo
    manifest's batch_size) against one generate_until per item, timed in this run."""
    from quantgate.tasks.generation import newline_token_ids

    tokenizer = evaluator.reference_tokenizer("demo")
    items = evaluator.task("demo", "code-line-end").items[:64]
    contexts = [tokenizer(i.prompt, add_special_tokens=False)["input_ids"] for i in items]
    stop = [*newline_token_ids(tokenizer), tokenizer.eos_token_id]
    kwargs = dict(max_new_tokens=12, max_length=256, stop=stop)
    alone = _min_seconds(lambda: [backend.generate_until(c, **kwargs) for c in contexts], rounds=2)
    batched = benchmark.pedantic(backend.generate_batch, args=(contexts,), kwargs={**kwargs, "batch_size": 4},
                                 rounds=2, iterations=1)
    benchmark.extra_info.update(alone_seconds=round(alone, 3), speedup=round(alone / benchmark.stats.stats.min, 2))
    assert batched == [backend.generate_until(c, **kwargs) for c in contexts]


def test_generation_with_the_references_answers_as_drafts(benchmark, backend, evaluator):
    """The demo's line-end task (the fast tier's items) as the gate scores a variant against its baseline: the
    baseline's answers as drafts, checked in one pass (generate_batch with drafts), against step-by-step decoding
    of the same rows (generate_batch alone), timed in this run. Here the variant is the reference itself, so
    every draft holds: the ratio is the most drafts can give; docs/speed.md has it for every variant."""
    from quantgate.tasks.generation import draft_tokens, newline_token_ids

    tokenizer = evaluator.reference_tokenizer("demo")
    items = evaluator.task("demo", "code-line-end").items
    baseline = evaluator.comparable_task_baseline("demo", "code-line-end")
    contexts = [tokenizer(i.prompt, add_special_tokens=False)["input_ids"] for i in items]
    drafts = draft_tokens(tokenizer, items, contexts, dict(zip(baseline.ids, baseline.answers, strict=True)))
    stop = [*newline_token_ids(tokenizer), tokenizer.eos_token_id]
    kwargs = dict(max_new_tokens=12, max_length=256, stop=stop, batch_size=4)
    plain = _min_seconds(lambda: backend.generate_batch(contexts, **kwargs), rounds=2)
    drafted = benchmark.pedantic(backend.generate_batch, args=(contexts,), kwargs={**kwargs, "drafts": drafts},
                                 rounds=2, iterations=1)
    benchmark.extra_info.update(plain_seconds=round(plain, 3), speedup=round(plain / benchmark.stats.stats.min, 2))
    assert drafted == backend.generate_batch(contexts, **kwargs)


def test_perplexity_scoring_against_a_plain_forward_pass(benchmark, backend, stream):
    """The perplexity engine (loglikelihood_rolling: windows, forward, log-softmax of the scored rows, gathers)
    against the forward passes alone over the same windows and batches (the model's logits, nothing more),
    interleaved round by round in this run: the engine keeps at least 0.9 of the plain forward's speed."""
    import time

    import torch

    from quantgate.perplexity import plan_windows

    windows = plan_windows(len(stream), 256, 128)
    ids = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    batches = [windows[i:i + 4] for i in range(0, len(windows), 4)]

    def plain():
        with torch.inference_mode():
            for batch in batches:
                width = max(w.end - w.begin for w in batch)
                inputs = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros_like(inputs)
                for row, w in enumerate(batch):
                    inputs[row, :w.end - w.begin] = ids[w.begin:w.end]
                    mask[row, :w.end - w.begin] = 1
                _ = backend.model(input_ids=inputs, attention_mask=mask).logits  # every position's logits

    def engine():
        return backend.loglikelihood_rolling(stream, max_length=256, stride=128, batch_size=4, top_k=8)

    engine(), plain()  # warm both
    forward, scoring = float("inf"), float("inf")
    for _ in range(3):
        started = time.perf_counter()
        plain()
        forward = min(forward, time.perf_counter() - started)
        started = time.perf_counter()
        engine()
        scoring = min(scoring, time.perf_counter() - started)
    benchmark.pedantic(engine, rounds=1, iterations=1)
    benchmark.extra_info.update(forward_seconds=round(forward, 3), engine_seconds=round(scoring, 3),
                                ratio=round(forward / scoring, 3), windows=len(windows))
    assert forward / scoring >= 0.9, f"the engine runs at {forward / scoring:.2f} of a plain forward pass"


def test_token_cache_hit_against_tokenizing(benchmark, evaluator, tmp_path):
    """A corpus's ids read from the on-disk token cache (a new process: memory cleared) against tokenizing it,
    side by side in this run."""

    from quantgate import tokencache
    from quantgate.corpus import tokenize

    corpus = evaluator.corpus("prose")
    tokenizer = evaluator.reference_tokenizer("demo")
    previous = tokencache.root()
    tokencache.use(tmp_path)
    try:
        def cold():
            tokencache.use(None)
            tokencache.clear_memory()
            try:
                return tokenize(corpus, tokenizer, add_bos=False, token_cap=None)
            finally:
                tokencache.use(tmp_path)

        def hit():
            tokencache.clear_memory()
            return tokenize(corpus, tokenizer, add_bos=False, token_cap=None)

        hit()  # fills the cache
        tokenizing = _min_seconds(cold, rounds=3)
        result = benchmark.pedantic(hit, rounds=3, iterations=1)
        reading = benchmark.stats.stats.min
    finally:
        tokencache.use(previous)
        tokencache.clear_memory()
    benchmark.extra_info.update(tokenize_seconds=round(tokenizing, 4), cache_seconds=round(reading, 4),
                                speedup=round(tokenizing / reading, 1))
    assert np.array_equal(result.ids, cold().ids)
    assert tokenizing / reading >= 2, f"reading the cache is only {tokenizing / reading:.1f}x faster than tokenizing"
