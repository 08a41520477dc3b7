"""KL divergence (bound and exact), top-1 agreement, paired intervals, and the power figure."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantgate.divergence import exact_kl, kl_bound_from_baseline, windows_for
from quantgate.stats import (
    bootstrap_block_means,
    compare,
    detectable_ratio_change,
    kl_full,
    wilson_interval,
)


def log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 60), k=st.integers(1, 8), spread=st.floats(0.1, 8.0))
def test_top_k_plus_rest_never_exceeds_the_full_kl(seed, vocab, k, spread):
    rng = np.random.default_rng(seed)
    p = log_softmax(rng.normal(0, spread, (5, vocab)))
    q = log_softmax(p + rng.normal(0, 0.5, (5, vocab)))
    k = min(k, vocab)
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    bound = kl_bound_from_baseline(np.take_along_axis(p, top, 1).astype(np.float32),
                                   np.take_along_axis(q, top, 1).astype(np.float32))
    exact = kl_full(p, q)
    assert (bound <= exact + 1e-5).all()
    if k == vocab:  # nothing left outside the top k: the bound is the full KL
        np.testing.assert_allclose(bound, exact, atol=1e-5)


@pytest.fixture(scope="module")
def models():
    import tinyzoo
    import torch

    from quantgate.backends.hf import TransformersBackend

    reference = tinyzoo.make_model(vocab_size=97, seed=3)  # peaked: a few tokens hold most of the mass
    variant = tinyzoo.make_model(vocab_size=97, seed=3)
    with torch.no_grad():
        layer = variant.model.layers[0].mlp.down_proj.weight
        layer.add_(torch.randn(layer.shape, generator=torch.Generator().manual_seed(1)) * layer.std() * 0.3)
    return TransformersBackend(reference, "cpu"), TransformersBackend(variant, "cpu")


def test_exact_mode_and_the_bound_agree_where_the_top_k_hold_the_mass(models):
    ref, var = models
    ids = np.random.default_rng(0).integers(0, 97, size=300).astype(np.int64)
    windows = windows_for(len(ids), 64, 32, None)
    loose = exact_kl(ref, var, ids, windows, 4, top_k=4)
    tight = exact_kl(ref, var, ids, windows, 4, top_k=16)
    np.testing.assert_array_equal(loose["exact"], tight["exact"])
    assert (loose["bound"] <= loose["exact"] + 1e-6).all() and (tight["bound"] <= tight["exact"] + 1e-6).all()
    assert loose["bound"].mean() < tight["bound"].mean()
    assert tight["bound"].mean() > 0.95 * tight["exact"].mean()  # close once the top k hold most of the mass


def test_bound_from_a_baseline_equals_the_bound_computed_with_both_models_resident(models):
    """The gate's path (reference top-k stored, variant gathered at those ids) gives the exact mode's bound."""
    ref, var = models
    ids = np.random.default_rng(1).integers(0, 97, size=200).astype(np.int64)
    kwargs = dict(max_length=64, stride=32, batch_size=3)
    stored = ref.loglikelihood_rolling(ids, top_k=6, **kwargs)
    gathered = var.loglikelihood_rolling(ids, gather_ids=stored.topk_ids, **kwargs)
    bound = kl_bound_from_baseline(stored.topk_logprobs, gathered.gathered)
    both = exact_kl(ref, var, ids, windows_for(len(ids), 64, 32, None), 3, top_k=6)
    np.testing.assert_allclose(bound, both["bound"], rtol=1e-4, atol=1e-7)
    assert (gathered.argmax == np.argmax(gathered.gathered, 1)).mean() < 1.01  # argmax is returned per token
    assert gathered.block_sizes.sum() == gathered.n


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(90, 100).low, wilson_interval(90, 100).high
    assert (round(low, 4), round(high, 4)) == (0.8256, 0.9448)  # Wilson (1927) score interval, z = 1.96
    assert wilson_interval(100, 100).high == 1.0 and wilson_interval(0, 100).low == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_is_deterministic_and_centred():
    values = np.random.default_rng(0).normal(1.0, 1.0, 4000)
    sizes = np.full(40, 100)
    a, b = bootstrap_block_means(values, sizes), bootstrap_block_means(values, sizes)
    np.testing.assert_array_equal(a, b)
    assert abs(a.mean() - values.mean()) < 0.01
    # block means of iid values: the bootstrap SE matches sigma / sqrt(n)
    assert abs(a.std() - 1 / math.sqrt(4000)) < 0.004


def test_compare_reports_a_reversal_interval_below_one_and_power():
    rng = np.random.default_rng(0)
    ref = -rng.exponential(3.0, 6000)
    var = ref + 0.01 + rng.normal(0, 0.02, 6000)  # every token a little more likely under the variant
    c = compare(ref_target=ref, var_target=var, kl=np.full(6000, 1e-3), same_top1=np.ones(6000, bool),
                block_sizes=np.full(60, 100), kl_kind="exact", top_k=None)
    assert c.ppl_ratio < 1 and c.ppl_ratio_interval.high < 1
    assert c.top1 == 1.0 and c.kl_mean == pytest.approx(1e-3)
    assert c.delta_p["mean"] > 0 and set(c.delta_p) >= {"p99.9", "p1", "rms", "max", "min"}
    assert 0 < detectable_ratio_change(c.ppl_ratio_se_log) < 0.01


def test_a_tiny_reference_rest_never_lifts_the_bound_above_the_full_kl():
    """Reference rest mass 9e-7 (below float32 resolution), the variant's 1.07e-4: the review's counterexample."""
    p_top = np.array([[math.log(0.5), math.log(0.5 - 9e-7)]])
    q_top = np.array([[math.log(0.5), math.log(0.5 - 1.07e-4)]])
    full_p = np.log(np.array([[0.5, 0.5 - 9e-7, 9e-7]]))
    full_q = np.log(np.array([[0.5, 0.5 - 1.07e-4, 1.07e-4]]))
    assert kl_bound_from_baseline(p_top, q_top)[0] <= kl_full(full_p, full_q)[0] + 1e-12


def test_full_kl_ignores_tokens_the_reference_rules_out():
    p = np.array([[0.0, -np.inf]])
    q = np.log(np.array([[0.9, 0.1]]))
    assert kl_full(p, q)[0] == pytest.approx(-math.log(0.9))


def test_too_few_windows_give_no_bootstrap_interval():
    c = compare(ref_target=np.full(40, -2.0), var_target=np.full(40, -2.1), kl=np.full(40, 1e-3),
                same_top1=np.ones(40, bool), block_sizes=np.full(4, 10), kl_kind="exact", top_k=None)
    assert c.ppl_ratio_interval is None and c.kl_interval is None and c.as_dict()["kl_interval"] is None
    assert c.top1_interval.low < 1.0  # the binomial interval is still there


def test_correlated_top1_misses_widen_the_interval_beyond_the_binomial_one():
    same = np.ones(2000, bool)
    same[:200] = False  # all misses in the first two windows: strongly clustered
    c = compare(ref_target=np.zeros(2000) - 1, var_target=np.zeros(2000) - 1, kl=np.zeros(2000), same_top1=same,
                block_sizes=np.full(20, 100), kl_kind="exact", top_k=None)
    binomial = wilson_interval(1800, 2000)
    assert c.top1_interval.low < binomial.low - 0.02


def test_a_tie_at_the_top_counts_as_agreement():
    from types import SimpleNamespace

    from quantgate.measurement import same_top1

    scores = SimpleNamespace(argmax=np.array([3, 5]), gathered=np.array([[-0.7, -1.0], [-0.9, -1.0]], np.float32),
                             max_logprob=np.array([-0.7, -0.5], np.float32))
    baseline = SimpleNamespace(topk_ids=np.array([[4, 3], [6, 5]]))
    assert same_top1(scores, baseline).tolist() == [True, False]


def test_a_flip_to_a_token_fp16_nearly_chose_is_a_near_tie_and_counts_as_agreement():
    from quantgate.gate import TIE_WIDTH
    from quantgate.stats import near_tie_flips, near_tie_share

    ids = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]])
    lp = np.array([[-1.0, -1.0 - TIE_WIDTH / 2, -3.0],  # the variant picks 2: a near-tie
                   [-1.0, -1.0 - 2 * TIE_WIDTH, -3.0],  # picks 2: FP16 preferred 1 by more than the width
                   [-1.0, -1.01, -1.02],                # picks 9, outside FP16's top-k: never a near-tie
                   [-1.0, -1.01, -1.02]])               # picks 1: agreement, not a flip
    choice, same = np.array([2, 2, 9, 1]), np.array([False, False, False, True])
    assert near_tie_flips(ids, lp, choice, same, TIE_WIDTH).tolist() == [True, False, False, False]
    assert near_tie_share(lp, TIE_WIDTH) == 0.75
    c = compare(ref_target=np.zeros(4) - 1, var_target=np.zeros(4) - 1, kl=np.zeros(4), same_top1=same,
                block_sizes=np.array([4]), kl_kind="exact", top_k=None,
                tie_flip=near_tie_flips(ids, lp, choice, same, TIE_WIDTH), near_ties=0.75)
    assert (c.top1, c.top1_plain, c.tie_flips) == (0.5, 0.25, 1)
