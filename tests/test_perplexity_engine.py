"""The sliding-window engine: window plan properties and scores against independent oracles."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantgate.perplexity import count_scored, plan_windows, scored_positions

lengths = st.tuples(st.integers(0, 600), st.integers(2, 80)).flatmap(
    lambda nl: st.tuples(st.just(nl[0]), st.just(nl[1]), st.integers(1, nl[1])))


@given(lengths)
def test_no_token_is_scored_twice_and_windows_fit(args):
    n, max_length, stride = args
    windows = plan_windows(n, max_length, stride)
    positions = scored_positions(windows)
    assert len(np.unique(positions)) == len(positions)
    for w in windows:
        assert 0 <= w.begin < w.score_from < w.end <= n
        assert w.end - w.begin <= max_length


@given(lengths.filter(lambda a: a[2] < a[1]))
def test_overlapping_windows_score_every_token_after_the_first_exactly_once(args):
    n, max_length, stride = args
    positions = scored_positions(plan_windows(n, max_length, stride))
    assert positions.tolist() == list(range(1, n))
    assert count_scored(n, max_length, stride) == max(n - 1, 0)


@given(st.integers(0, 600), st.integers(2, 80))
def test_stride_equal_to_max_length_is_disjoint_chunks(n, max_length):
    windows = plan_windows(n, max_length, max_length)
    chunks = [(b, min(b + max_length, n)) for b in range(0, n, max_length)]
    # each chunk scores all its tokens but its first (no context); one-token chunks score nothing
    assert [(w.begin, w.end) for w in windows] == [c for c in chunks if c[1] - c[0] >= 2]
    assert all(w.score_from == w.begin + 1 for w in windows)


def test_context_per_window_is_at_least_max_length_minus_stride():
    for w in plan_windows(1000, 64, 16)[1:]:
        assert w.score_from - w.begin >= 64 - 16


@pytest.mark.parametrize("bad", [(10, 1, 1), (10, 8, 0), (10, 8, 9)])
def test_invalid_plans_are_refused(bad):
    with pytest.raises(ValueError):
        plan_windows(*bad)


# -- scoring with a real transformers model --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    import tinyzoo

    return tinyzoo.make_model(vocab_size=97, seed=3)


@pytest.fixture(scope="module")
def stream():
    return np.random.default_rng(0).integers(0, 97, size=333).astype(np.int64)


def _backend(model):
    from quantgate.backends.hf import TransformersBackend

    return TransformersBackend(model, "cpu")


def hf_recipe_nll_sum(model, ids, max_length, stride):
    """The HF 'perplexity of fixed-length models' loop, with labels, weighted by scored tokens."""
    import torch

    total, count, prev_end = 0.0, 0, 0
    t = torch.as_tensor(ids).unsqueeze(0)
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        inputs = t[:, begin:end]
        labels = inputs.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids=inputs, labels=labels).loss
        n_valid = int((labels[:, 1:] != -100).sum())
        total += float(loss) * n_valid
        count += n_valid
        prev_end = end
        if end == len(ids):
            break
    return total, count


@pytest.mark.parametrize("max_length,stride", [(64, 32), (64, 64), (50, 7), (333, 100)])
def test_engine_matches_the_hf_recipe_with_labels(tiny_model, stream, max_length, stride):
    scores = _backend(tiny_model).loglikelihood_rolling(stream, max_length=max_length, stride=stride, batch_size=3)
    total, count = hf_recipe_nll_sum(tiny_model, stream, max_length, stride)
    assert scores.n == count
    assert -scores.logprobs.sum() == pytest.approx(total, rel=1e-5)


def test_disjoint_windows_equal_scoring_each_chunk_alone(tiny_model, stream):
    import torch

    scores = _backend(tiny_model).loglikelihood_rolling(stream, max_length=40, stride=40, batch_size=4)
    expected = []
    for begin in range(0, len(stream), 40):
        chunk = torch.as_tensor(stream[begin:begin + 40]).unsqueeze(0)
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(input_ids=chunk).logits[0, :-1].float(), -1)
        expected.extend(logp.gather(1, chunk[0, 1:].unsqueeze(1)).squeeze(1).tolist())
    np.testing.assert_allclose(scores.logprobs, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(batch_size=st.integers(2, 12), max_length=st.integers(8, 70), data=st.data())
def test_batch_size_does_not_change_the_result(tiny_model, stream, batch_size, max_length, data):
    stride = data.draw(st.integers(max(1, max_length // 4), max_length))  # bounded window count: speed only
    stream = stream[:data.draw(st.integers(2, 180))]
    backend = _backend(tiny_model)
    one = backend.loglikelihood_rolling(stream, max_length=max_length, stride=stride, batch_size=1)
    many = backend.loglikelihood_rolling(stream, max_length=max_length, stride=stride, batch_size=batch_size)
    np.testing.assert_array_equal(one.positions, many.positions)
    np.testing.assert_allclose(one.logprobs, many.logprobs, rtol=1e-5, atol=1e-5)


class _Uniform:
    """A 'model' whose next-token distribution is uniform: logits all equal."""

    def __init__(self, vocab):
        self.vocab = vocab

    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask=None):
        import torch

        class Out:
            logits = torch.full((*input_ids.shape, self.vocab), 3.0)

        return Out()


@given(vocab=st.integers(2, 5000), n=st.integers(2, 200), max_length=st.integers(2, 40), data=st.data())
@settings(max_examples=25, deadline=None)
def test_uniform_predictor_has_perplexity_equal_to_vocabulary_size(vocab, n, max_length, data):
    from quantgate.backends.hf import TransformersBackend

    stride = data.draw(st.integers(1, max_length))
    ids = np.zeros(n, dtype=np.int64)
    scores = TransformersBackend(_Uniform(vocab), "cpu").loglikelihood_rolling(
        ids, max_length=max_length, stride=stride, batch_size=4)
    if scores.n:
        # log-softmax runs in float32: exact up to its rounding
        assert scores.perplexity == pytest.approx(vocab, rel=1e-6)
        assert scores.mean_nll == pytest.approx(math.log(vocab), rel=1e-6, abs=1e-7)


def test_non_finite_logits_are_an_error_naming_the_token(tiny_model, stream):
    import torch

    from quantgate.backends.hf import TransformersBackend
    from quantgate.errors import NonFiniteScores

    class NaNAfter:
        def eval(self):
            return self

        def __call__(self, input_ids, attention_mask=None):
            out = tiny_model(input_ids=input_ids)
            out.logits[:, 5:, :] = torch.nan
            return out

    with pytest.raises(NonFiniteScores, match="non-finite log-probabilities .first at token 6"):
        TransformersBackend(NaNAfter(), "cpu").loglikelihood_rolling(stream, max_length=64, stride=64, batch_size=2)


def test_top_k_of_each_next_token_distribution(tiny_model, stream):
    import torch

    scores = _backend(tiny_model).loglikelihood_rolling(stream, max_length=48, stride=16, batch_size=5, top_k=3)
    assert scores.topk_ids.shape == scores.topk_logprobs.shape == (scores.n, 3)
    assert (np.diff(scores.topk_logprobs, axis=1) <= 0).all()  # best first
    # the scored token's log-prob is never above the best one, and equals it when it is the argmax
    assert (scores.logprobs <= scores.topk_logprobs[:, 0] + 1e-6).all()
    t = 200  # spot-check one position against a direct forward pass over its window
    i = int(np.searchsorted(scores.positions, t))
    window = plan_windows(len(stream), 48, 16)
    w = next(w for w in window if w.score_from <= t < w.end)
    with torch.no_grad():
        logits = tiny_model(input_ids=torch.as_tensor(stream[w.begin:t]).unsqueeze(0)).logits[0, -1].float()
    expect = torch.log_softmax(logits, -1).topk(3)
    assert scores.topk_ids[i].tolist() == expect.indices.tolist()
    np.testing.assert_allclose(scores.topk_logprobs[i], expect.values.numpy(), rtol=1e-5, atol=1e-5)
    assert _backend(tiny_model).loglikelihood_rolling(stream, max_length=48, stride=16, batch_size=5).topk_ids is None


def test_loglikelihood_matches_rolling_scores_and_reports_greedy(tiny_model, stream):
    """loglikelihood(context, continuation) is the sum of the same per-token log-probs, batched or not."""
    backend = _backend(tiny_model)
    context, continuation = stream[:40].tolist(), stream[40:45].tolist()
    rolling = backend.loglikelihood_rolling(stream[:45], max_length=64, stride=64, batch_size=1)
    (total, greedy), = backend.loglikelihood([(context, continuation)], max_length=64, batch_size=1)
    assert total == pytest.approx(rolling.logprobs[-5:].sum(), abs=1e-5)
    assert greedy == bool((rolling.argmax[-5:] == np.asarray(continuation)).all())
    # the model's own greedy continuation is greedy by definition, and batching changes nothing
    own = backend.generate_until(context, max_new_tokens=4, max_length=64)
    batch = backend.loglikelihood([(context, own), (context, continuation), (context[:10], own)], max_length=64,
                                  batch_size=3)
    assert batch[0][1] is True and batch[1][0] == pytest.approx(total, abs=1e-5)
    assert len(own) == 4
    stop_at = own[2]
    assert backend.generate_until(context, max_new_tokens=4, max_length=64, stop=[stop_at]) == own[:own.index(stop_at)]


def test_the_output_layer_runs_only_where_a_scored_token_is_predicted(tiny_model, stream):
    """At stride = max_length / 2 about half of each window predicts a scored token: the output layer sees only
    those positions (logits_to_keep), and the scores are those of the full output, token for token."""
    backend = _backend(tiny_model)
    assert backend._keeps_logits
    widths = []
    hook = tiny_model.lm_head.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    try:
        kept = backend.loglikelihood_rolling(stream, max_length=64, stride=32, batch_size=3, top_k=4)
    finally:
        hook.remove()
    backend._keeps_logits = False
    full = backend.loglikelihood_rolling(stream, max_length=64, stride=32, batch_size=3, top_k=4)
    assert max(widths) == 63 and min(widths) <= 33  # the first batch holds the first window (all scored)
    np.testing.assert_allclose(kept.logprobs, full.logprobs, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(kept.argmax, full.argmax)
    np.testing.assert_allclose(kept.topk_logprobs, full.topk_logprobs, rtol=0, atol=1e-6)


def test_a_window_longer_than_learned_positions_is_a_clear_error():
    """GPT-2 style learned position embeddings end at n_positions: a longer window is an IndexError inside torch;
    the gate names the window, the config's positions and the manifest key instead."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from quantgate.backends.hf import TransformersBackend
    from quantgate.errors import QuantgateError

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    backend = TransformersBackend(model, "cpu")
    ids = list(range(1, 41))
    assert backend.loglikelihood_rolling(ids, max_length=16, stride=8, batch_size=2).n == 39
    with pytest.raises(QuantgateError, match=r"a window of 32 tokens is longer than the 16 positions its config.json "
                                             r"allows: set \[protocol\] max_length to at most 16"):
        backend.loglikelihood_rolling(ids, max_length=32, stride=16, batch_size=2)
