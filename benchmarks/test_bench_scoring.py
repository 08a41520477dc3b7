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
