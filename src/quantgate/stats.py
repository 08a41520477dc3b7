"""Paired comparisons of a variant's next-token distributions with the FP16 reference's.

Pure functions over per-token arrays (numpy only). The reference keeps, per scored token, its
top-k log-probabilities and the log of the mass outside them; the variant is scored at the same
k token ids. KL divergence over those k tokens plus one "rest" bucket is a coarse-graining of
the full distributions, so by the data-processing inequality it is a LOWER BOUND of the full KL
divergence; it is reported as such.

Intervals are 95%. Per-token values are correlated within a passage, so means get a block
bootstrap whose blocks are the scoring windows (each scored token belongs to one window), with
a fixed seed: the same inputs give the same interval on every run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
MIN_BLOCKS = 10  # fewer windows than this: no bootstrap interval (resamples would barely differ)
BOOTSTRAP_SEED = 20261122
# Two-sided 5% test with 80% power: the smallest true change that is detected 4 times in 5.
Z_POWER = Z95 + 0.8416212335729143
REST_FLOOR_LOG = math.log(1e-6)
VARIANT_REST_FLOOR_LOG = math.log(1e-7)


def rest_logprob(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(top-k log-probs))) per row, in float64; -inf when the top k hold all the mass."""
    mass = np.exp(np.asarray(topk_logprobs, dtype=np.float64)).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.log1p(-np.minimum(mass, 1.0))


def kl_topk_rest(ref_topk: np.ndarray, ref_rest: np.ndarray, var_at_ref: np.ndarray,
                 var_rest: np.ndarray) -> np.ndarray:
    """Per-token KL(reference || variant) over the reference's top-k tokens plus the rest bucket.

    ref_topk, var_at_ref: (n, k) log-probs of the same token ids under each model;
    ref_rest, var_rest: (n,) log of the mass outside those ids. A lower bound of the full KL.
    """
    p = np.asarray(ref_topk, dtype=np.float64)
    q = np.asarray(var_at_ref, dtype=np.float64)
    pr = np.asarray(ref_rest, dtype=np.float64)
    qr = np.asarray(var_rest, dtype=np.float64)
    kl = (np.exp(p) * (p - q)).sum(axis=1)
    # float32 log-probs resolve the top-k's total mass to about 1e-7: the variant's rest is floored at
    # 1e-7, and a reference rest below 1e-6 (rounding, not mass) only ever lowers the result, so the
    # bound stays a lower bound of the full KL.
    finite = np.isfinite(pr)
    term = np.zeros_like(pr)
    term[finite] = np.exp(pr[finite]) * (pr[finite] - np.maximum(qr[finite], VARIANT_REST_FLOOR_LOG))
    kl += np.where(pr > REST_FLOOR_LOG, term, np.minimum(term, 0.0))
    return np.maximum(kl, 0.0)  # >= 0 exactly; rounding can leave -1e-9


def kl_full(ref_logprobs: np.ndarray, var_logprobs: np.ndarray) -> np.ndarray:
    """Per-token full KL(reference || variant) from complete (n, vocab) log-prob rows."""
    p = np.asarray(ref_logprobs, dtype=np.float64)
    q = np.asarray(var_logprobs, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # 0 * (-inf - x): a token the reference rules out adds nothing
        terms = np.where(np.isfinite(p), np.exp(p) * (p - q), 0.0)
    return np.maximum(terms.sum(axis=1), 0.0)


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"[{self.low:.6g}, {self.high:.6g}]"


def wilson_interval(successes: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of a binomial proportion (tokens counted as independent trials)."""
    if n <= 0:
        return Interval(float("nan"), float("nan"))
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def block_sums(values: np.ndarray, block_sizes: np.ndarray) -> np.ndarray:
    """Sum of `values` over consecutive blocks of the given sizes (which must cover values exactly)."""
    block_sizes = np.asarray(block_sizes, dtype=np.int64)
    if block_sizes.sum() != len(values):
        raise ValueError(f"blocks cover {int(block_sizes.sum())} values, got {len(values)}")
    starts = np.concatenate([[0], np.cumsum(block_sizes)[:-1]])
    return np.add.reduceat(np.asarray(values, dtype=np.float64), starts) if len(values) else np.zeros(0)


def bootstrap_block_means(values: np.ndarray, block_sizes: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                          seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Token-weighted means of `values` over `resamples` block-bootstrap resamples (fixed seed)."""
    sums = block_sums(values, block_sizes)
    sizes = np.asarray(block_sizes, dtype=np.float64)
    picks = block_picks(len(sums), resamples=resamples, seed=seed)
    return sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)


def block_picks(blocks: int, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, blocks) indices of the blocks each bootstrap resample draws: the same for every series of
    as many blocks, so two variants scored on the same windows are resampled together (`paired_difference`)."""
    return np.random.default_rng(seed).integers(0, blocks, size=(resamples, blocks))


def count_difference_interval(n: int, plus: int, minus: int, *, resamples: int = BOOTSTRAP_RESAMPLES,
                              seed: int = BOOTSTRAP_SEED) -> Interval:
    """Paired bootstrap of (plus - minus) / n over n items of which `plus` count +1, `minus` -1 and the rest 0:
    only how many resampled items are +1 or -1 matters, so a multinomial draw of those counts is the bootstrap."""
    counts = np.random.default_rng(seed).multinomial(n, [plus / n, minus / n, 1 - (plus + minus) / n], size=resamples)
    return percentile_interval((counts[:, 0] - counts[:, 1]) / n)


def percentile_interval(samples: np.ndarray) -> Interval:
    low, high = np.percentile(samples, [2.5, 97.5])
    return Interval(float(low), float(high))


@dataclass(frozen=True)
class PairedComparison:
    """Everything the gate says about one variant against the reference on one corpus."""

    tokens: int
    blocks: int
    kl_kind: str  # "lower bound (top-k + rest)" or "exact"
    top_k: int | None
    kl_mean: float
    kl_interval: Interval | None
    kl_p99: float
    kl_p999: float
    kl_max: float
    top1: float  # near-ties excused (gate.TIE_WIDTH): what the gate judges
    top1_interval: Interval  # Wilson (binomial), widened to the block bootstrap's where that is wider
    ppl_ratio: float
    ppl_ratio_interval: Interval | None
    ppl_ratio_se_log: float  # bootstrap standard error of log(ratio)
    delta_p: dict  # distribution of p_variant(correct) - p_reference(correct), as llama.cpp prints it
    top1_plain: float = math.nan  # the variant's top token is FP16's, no near-tie excused (llama.cpp's "same top")
    tie_flips: int = 0  # tokens whose top token changed to one FP16 rated within the tie width of its own
    near_ties: float = 0.0  # share of tokens whose FP16 first and second choices lie within the tie width
    # per scoring window: tokens, and the sums of NLL_variant - NLL_reference and of KL over them. Two variants
    # scored on the same windows pair through these window by window (`paired_difference`); not in as_dict
    windows: dict = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("windows")
        for key in ("kl_interval", "top1_interval", "ppl_ratio_interval"):
            value = getattr(self, key)
            d[key] = None if value is None else [value.low, value.high]
        return d


DELTA_P_PERCENTILES = (99.9, 99, 95, 90, 75, 50, 25, 10, 5, 1, 0.1)


def delta_p_summary(ref_target: np.ndarray, var_target: np.ndarray) -> dict:
    """Change in the probability of the correct token: mean, RMS, extremes and percentiles."""
    dp = np.exp(np.asarray(var_target, dtype=np.float64)) - np.exp(np.asarray(ref_target, dtype=np.float64))
    out = {"mean": float(dp.mean()), "rms": float(np.sqrt((dp * dp).mean())),
           "max": float(dp.max()), "min": float(dp.min())}
    for q, v in zip(DELTA_P_PERCENTILES, np.percentile(dp, DELTA_P_PERCENTILES), strict=True):
        out[f"p{q:g}"] = float(v)
    return out


def near_tie_flips(ref_topk_ids: np.ndarray, ref_topk_logprobs: np.ndarray, choice: np.ndarray,
                   same_top1: np.ndarray, width: float) -> np.ndarray:
    """Per token: the variant's top token is not FP16's, but one FP16 itself rated within `width` nats of
    its own first choice (a near-tie). A choice outside FP16's stored top-k is never a near-tie."""
    ref_topk_logprobs = np.asarray(ref_topk_logprobs, np.float64)
    at = np.asarray(ref_topk_ids) == np.asarray(choice)[:, None]
    ref_at_choice = np.where(at, ref_topk_logprobs, -np.inf).max(axis=1)
    return ~np.asarray(same_top1, bool) & (ref_topk_logprobs[:, 0] - ref_at_choice <= width)


def near_tie_share(ref_topk_logprobs: np.ndarray, width: float) -> float:
    """Share of tokens whose reference first and second choices lie within `width` nats."""
    lp = np.asarray(ref_topk_logprobs, np.float64)
    return float(np.mean(lp[:, 0] - lp[:, 1] <= width)) if lp.ndim == 2 and lp.shape[1] > 1 and len(lp) else 0.0


def compare(*, ref_target: np.ndarray, var_target: np.ndarray, kl: np.ndarray, same_top1: np.ndarray,
            block_sizes: np.ndarray, kl_kind: str, top_k: int | None, tie_flip: np.ndarray | None = None,
            near_ties: float = 0.0) -> PairedComparison:
    """Paired statistics over the same scored tokens under both models.

    ref_target / var_target: log p(correct token) per token; kl: per-token KL divergence;
    same_top1: bool per token; block_sizes: tokens per scoring window, in order; tie_flip: bool per
    token, a flip to one of FP16's near-ties (`near_tie_flips`), counted as agreement in `top1`.
    """
    n = len(ref_target)
    if not (len(var_target) == len(kl) == len(same_top1) == n) or n == 0:
        raise ValueError("paired arrays must be non-empty and of equal length")
    nll_diff = np.asarray(ref_target, np.float64) - np.asarray(var_target, np.float64)  # NLL_var - NLL_ref
    kl = np.asarray(kl, np.float64)
    if not (np.isfinite(nll_diff).all() and np.isfinite(kl).all()):
        raise ValueError("paired scores or KL divergences are not finite")
    log_ratio = float(nll_diff.mean())
    plain = int(np.count_nonzero(same_top1))
    tie_flip = np.zeros(n, bool) if tie_flip is None else np.asarray(tie_flip, bool) & ~np.asarray(same_top1, bool)
    if len(tie_flip) != n:
        raise ValueError("paired arrays must be non-empty and of equal length")
    same_top1 = np.asarray(same_top1, bool) | tie_flip
    agree = int(np.count_nonzero(same_top1))
    top1_interval = wilson_interval(agree, n)
    enough = len(block_sizes) >= MIN_BLOCKS
    if enough:
        boot_log_ratio = bootstrap_block_means(nll_diff, block_sizes)
        boot_top1 = percentile_interval(bootstrap_block_means(np.asarray(same_top1, np.float64), block_sizes))
        # tokens within a window are correlated: never claim more certainty than the block bootstrap gives
        top1_interval = Interval(min(top1_interval.low, boot_top1.low), max(top1_interval.high, boot_top1.high))
    kl_p99, kl_p999 = np.percentile(kl, [99, 99.9])
    return PairedComparison(
        tokens=n, blocks=len(block_sizes), kl_kind=kl_kind, top_k=top_k,
        kl_mean=float(np.mean(kl)),
        kl_interval=percentile_interval(bootstrap_block_means(kl, block_sizes)) if enough else None,
        kl_p99=float(kl_p99), kl_p999=float(kl_p999), kl_max=float(np.max(kl)),
        top1=agree / n, top1_interval=top1_interval,
        ppl_ratio=math.exp(log_ratio),
        ppl_ratio_interval=Interval(*np.exp(np.percentile(boot_log_ratio, [2.5, 97.5]))) if enough else None,
        ppl_ratio_se_log=float(np.std(boot_log_ratio, ddof=1)) if enough else float("nan"),
        delta_p=delta_p_summary(ref_target, var_target),
        top1_plain=plain / n, tie_flips=int(np.count_nonzero(tie_flip)), near_ties=near_ties,
        windows=window_sums(nll_diff, kl, block_sizes),
    )


def window_sums(nll_diff: np.ndarray, kl: np.ndarray, block_sizes: np.ndarray) -> dict:
    """Per window: its token count and the sums of NLL_variant - NLL_reference and of KL (JSON-ready lists, to
    10 significant digits: a summary's paired differences need no more, and a full run's JSON stays small)."""
    return {"tokens": [int(b) for b in block_sizes],
            "nll_diff": [float(f"{v:.10g}") for v in block_sums(nll_diff, block_sizes)],
            "kl": [float(f"{v:.10g}") for v in block_sums(kl, block_sizes)]}


@dataclass(frozen=True)
class PairedDifference:
    """B against A, both measured against the same reference on the same windows: the difference of their
    perplexity ratios (B - A) and of their mean KL divergences, with 95% intervals from one block bootstrap
    that resamples the same windows for both (the pairing cancels what the two share: the text's hard parts)."""

    ratio_difference: float
    ratio_interval: Interval | None
    kl_difference: float
    kl_interval: Interval | None


def paired_difference(a: dict, b: dict) -> PairedDifference | None:
    """From two variants' `windows` (see PairedComparison); None when they were not scored on the same windows."""
    if not a or not b or a.get("tokens") != b.get("tokens") or not a.get("tokens"):
        return None
    sizes = np.asarray(a["tokens"], dtype=np.float64)
    total = sizes.sum()
    nll = {k: np.asarray(w["nll_diff"], np.float64) for k, w in (("a", a), ("b", b))}
    kl = {k: np.asarray(w["kl"], np.float64) for k, w in (("a", a), ("b", b))}
    ratio_difference = math.exp(nll["b"].sum() / total) - math.exp(nll["a"].sum() / total)
    kl_difference = float((kl["b"].sum() - kl["a"].sum()) / total)
    if len(sizes) < MIN_BLOCKS:
        return PairedDifference(ratio_difference, None, kl_difference, None)
    picks = block_picks(len(sizes))  # the picks of every other bootstrap of this corpus's windows
    tokens = sizes[picks].sum(axis=1)
    boot_ratio = np.exp(nll["b"][picks].sum(axis=1) / tokens) - np.exp(nll["a"][picks].sum(axis=1) / tokens)
    boot_kl = (kl["b"][picks].sum(axis=1) - kl["a"][picks].sum(axis=1)) / tokens
    return PairedDifference(ratio_difference, percentile_interval(boot_ratio), kl_difference,
                            percentile_interval(boot_kl))


def detectable_ratio_change(se_log_ratio: float) -> float:
    """Smallest relative perplexity change detected with 80% power at 5% (two-sided), given the
    standard error of log(ratio): exp((z_0.975 + z_0.8) * se) - 1."""
    return math.expm1(Z_POWER * se_log_ratio)


@dataclass(frozen=True)
class TaskComparison:
    """A variant's per-item task results against FP16's, paired by item."""

    items: int
    reference_score: float
    variant_score: float
    drop: float  # reference - variant, in score points (0.05 = five points lost)
    drop_interval: Interval  # paired bootstrap over items, 95%
    lost: tuple[str, ...]  # items FP16 got right and the variant got wrong
    gained: tuple[str, ...]  # the other way round
    mcnemar_p: float  # exact two-sided McNemar test on the flipped items

    def as_dict(self) -> dict:
        return {"items": self.items, "reference_score": self.reference_score, "variant_score": self.variant_score,
                "drop": self.drop, "drop_interval": [self.drop_interval.low, self.drop_interval.high],
                "lost": len(self.lost), "gained": len(self.gained), "mcnemar_p": self.mcnemar_p,
                "lost_items": list(self.lost), "gained_items": list(self.gained)}


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: under 'no change' each flipped item is lost or gained with
    probability 1/2, so the smaller count is binomial(lost + gained, 1/2)."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def paired_drop(ids: list[str], reference: list[bool], variant: list[bool], *,
                resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> TaskComparison:
    """Score drop with a paired bootstrap interval. Items are resampled with replacement; only how many
    resampled items were lost or gained matters, so a multinomial draw of those counts is the bootstrap."""
    ref = np.asarray(reference, dtype=bool)
    var = np.asarray(variant, dtype=bool)
    if not (len(ids) == len(ref) == len(var)) or not len(ids):
        raise ValueError(f"paired items must line up and be non-empty ({len(ids)}, {len(ref)}, {len(var)})")
    lost_mask, gained_mask = ref & ~var, ~ref & var
    n = len(ids)
    lost, gained = int(lost_mask.sum()), int(gained_mask.sum())
    return TaskComparison(
        items=n, reference_score=float(ref.mean()), variant_score=float(var.mean()), drop=(lost - gained) / n,
        drop_interval=count_difference_interval(n, lost, gained, resamples=resamples, seed=seed),
        lost=tuple(i for i, m in zip(ids, lost_mask, strict=True) if m),
        gained=tuple(i for i, m in zip(ids, gained_mask, strict=True) if m),
        mcnemar_p=mcnemar_exact_p(lost, gained))


def paired_task_difference(items: int, a: tuple[set, set], b: tuple[set, set], *,
                           resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, Interval]:
    """Score of B minus score of A on the same items, from each one's (lost, gained) item ids against the same
    reference: an item's B - A is (gained by B - lost by B) - (gained by A - lost by A), one of -1, 0, +1.
    The interval is the paired bootstrap over items (a multinomial draw of the +1 and -1 counts, as in
    `paired_drop`)."""
    if items <= 0:
        raise ValueError("no items to pair")
    ids = set().union(*a, *b)
    step = {i: (i in b[1]) - (i in b[0]) - ((i in a[1]) - (i in a[0])) for i in ids}
    up, down = sum(v > 0 for v in step.values()), sum(v < 0 for v in step.values())
    return (up - down) / items, count_difference_interval(items, up, down, resamples=resamples, seed=seed)
