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
    """The demo's code task (fast tier: 100 items, 4 choices): each context forwarded once and shared by its
    choices (loglikelihood_grouped) against one request per (context, choice), timed side by side in this run."""
    from quantgate.backends.base import ScoringBackend
    from quantgate.tasks.multiple_choice import with_shots

    tokenizer = evaluator.reference_tokenizer("demo")
    groups = [(tokenizer(with_shots(item, ()), add_special_tokens=False)["input_ids"],
               [tokenizer(c, add_special_tokens=False)["input_ids"] for c in item.choices]) for item in code_task.items]
    kwargs = dict(max_length=256, batch_size=4)
    plain = _min_seconds(lambda: ScoringBackend.loglikelihood_grouped(backend, groups, **kwargs), rounds=2)
    shared_result = benchmark.pedantic(backend.loglikelihood_grouped, args=(groups,), kwargs=kwargs, rounds=2,
                                       iterations=1)
    shared = benchmark.stats.stats.min
    benchmark.extra_info.update(plain_seconds=round(plain, 3), shared_seconds=round(shared, 3),
                                speedup=round(plain / shared, 2))
    assert [len(g) for g in shared_result] == [len(c) for _, c in groups]
    assert plain / shared >= 1.5, f"shared context only {plain / shared:.2f}x faster than plain requests"


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
