"""The decisions: a variant's metrics against their bounds, and why, in words.

Outcomes
- pass      within the bound (a Marginal row is marked as such in the summary);
- fail      beyond the bound, under the declared exceedance rule (below);
- xfail     the row is open-ended (Problematic, "1.30+") and the manifest gives no bound:
            expected to be bad, numbers still reported;
- reversal  the variant's perplexity is *significantly* below FP16's (the whole 95% interval of
            the ratio lies below 1) by more than the reversal tolerance: not a win but a sign of a
            protocol, calibration or outlier-handling effect to investigate (the article "When
            4-Bit Quantization Beats FP16 Perplexity"). It fails so that someone looks. A
            significant reversal within the tolerance passes with a note; a ratio below 1 whose
            interval reaches 1 is noise and is not reported.

Floating-point tolerance: the same float32 computation on two CPUs (other BLAS kernels, other
vector widths, other summation orders) does not give bit-identical numbers. Measured on the demo
model, the FP16 reference re-scored against its own baseline under other kernel paths moved the
perplexity ratio by at most 4.9e-8 and the mean KL by at most 5e-12 (another CPU: 4.3e-12).
A ratio within FLOAT_LOG_RATIO_TOL = 2^-20 (9.5e-7, 16 float32 units of roundoff, 20 times the
largest difference measured) of the baseline is the same perplexity: the bounds and the reversal
line are widened by it, so such a difference is never a reversal, a note or a failure, while a
0.1% reversal is still reported. Per token, two log-probs within FLOAT_TOKEN_TOL = 2^-14 are the
same prediction (a near-tie at the top counts as agreement). A device whose reruns move more (CUDA
kernels) adds its measured noise floor on top (`noise_log_ratio`).

Near-ties (top-1 agreement): a token where the variant's most likely next token is one that FP16
itself rated within TIE_WIDTH = 0.04 nats of its own first choice counts as agreement; the flip is
explained by the reference's near-tie, not by the variant. Why 0.04: rounding the reference to
BF16, the noise floor, moves the gap between two log-probs with a standard deviation of about
2 * sqrt(KL) (second-order expansion of the KL divergence), and the BF16 row's KL figure, 2.5e-5,
makes that 0.01 nats; 0.04 is four of those standard deviations. Measured: every flip of the demo's
BF16 copy lies within 0.016 nats, of the second model's within 0.022. One width for every row: the
rows' own minimums already budget the flips their quantization makes; a width grown with each
row's KL figure would excuse every flip the demo's 4-bit variants make, and top-1 would gate
nothing. How many flips a model's near-ties cause depends on the model (how flat its distributions
are), so a figure measured on Llama-3-8B is only portable for the flips that are not near-ties:
the table's min_top1 bounds those. A flip to a token outside FP16's stored top-k is never excused.

Exceedance rule (`[quantgate] exceedance` in the manifest):
- "point" (default): a metric fails when its point estimate is beyond the bound. The message
  says whether that is significant (the whole 95% interval is beyond the bound) or within
  noise (the interval reaches back over the bound). On CPU every number is deterministic, so
  the same commit always gets the same verdict; "within noise" says more tokens would settle it.
- "interval": a metric fails only when the whole interval is beyond the bound; a point
  estimate beyond it whose interval is not passes, with a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .stats import Interval
from .thresholds import Bound

PASS, FAIL, XFAIL, REVERSAL = "pass", "fail", "xfail", "reversal"
FLOAT_LOG_RATIO_TOL = 2.0 ** -20  # module docstring: floating-point tolerance
FLOAT_TOKEN_TOL = 2.0 ** -14
TIE_WIDTH = 0.04  # nats; module docstring: near-ties
EXCEEDANCE_RULES = ("point", "interval")


@dataclass(frozen=True)
class Judgement:
    outcome: str
    ratio: float
    bound: float | None
    marginal: bool
    message: str
    note: str | None = None  # reported, not failing: a small significant reversal, a noisy exceedance

    @property
    def verdict(self) -> str:
        if self.outcome == PASS and self.marginal:
            return "pass (marginal)"
        return {PASS: "pass", FAIL: "FAIL", XFAIL: "xfail (problematic)", REVERSAL: "REVERSAL"}[self.outcome]


def exceedance(value: float, interval: Interval | None, bound: float, *, higher_is_better: bool) -> tuple[bool, bool]:
    """(point estimate beyond the bound, whole interval beyond it)."""
    if higher_is_better:
        return value < bound, interval is not None and interval.high < bound
    return value > bound, interval is not None and interval.low > bound


def decide_exceedance(value: float, interval: Interval | None, bound: float, *, higher_is_better: bool,
                      rule: str) -> tuple[bool, str | None]:
    """(fails, significance wording) under the declared rule; wording is None when within the bound."""
    if rule not in EXCEEDANCE_RULES:
        raise ValueError(f"exceedance rule {rule!r} is not one of {EXCEEDANCE_RULES}")
    beyond, significant = exceedance(value, interval, bound, higher_is_better=higher_is_better)
    if not beyond:
        return False, None
    if interval is None:
        return True, "no interval available (point estimate rule)"
    side = "below" if higher_is_better else "above"
    if significant:
        return True, f"significant: the whole 95% interval {interval} is {side} the bound"
    wording = f"within noise: the 95% interval {interval} reaches back over the bound"
    return rule == "point", wording


def _reversal_advice(calibration, partners: str = "") -> str:
    """What to check about a reversal; with the variant's calibration overlap measured (overlap.py), its verdict;
    then its ablation partners (ablation.py), which point at a factor when they do not reverse."""
    return _overlap_advice(calibration) + (f" {partners}" if partners else "")


def _overlap_advice(calibration) -> str:
    if calibration is not None and calibration.attributed:
        return ("Attributed to calibration on the evaluation text: " + calibration.describe()
                + "; measure it on text the calibration did not see.")
    advice = "Investigate before trusting it: same protocol on both sides? outlier handling? "
    if calibration is None:
        return advice + "calibration data overlapping the evaluation text?"
    return advice + f"(not calibration overlap: {calibration.describe()})"


def judge(*, variant: str, corpus: str, value: float, baseline: float, bound: Bound,
          reversal_tolerance: float, tokens: int, baseline_source: str, protocol_line: str,
          ratio_interval: Interval | None = None, rule: str = "point", noise_log_ratio: float = 0.0,
          calibration=None, partners: str = "") -> Judgement:
    """noise_log_ratio: how far re-scoring the reference moved log(perplexity) on this device (the
    baseline's measured noise floor; 0 on CPU). Bounds and the reversal line widen by it and by the
    floating-point tolerance. calibration: an overlap.CalibrationOverlap, shown and blamed above its share."""
    ratio = value / baseline
    if not math.isfinite(ratio):
        raise ValueError(f"{variant} on {corpus}: relative perplexity {ratio} is not finite")
    slack = math.exp(noise_log_ratio + FLOAT_LOG_RATIO_TOL)
    bound = Bound(None if bound.value is None else bound.value * slack, bound.source, bound.row)
    row = bound.row
    marginal = row is not None and row.acceptable == "Marginal"
    note = None
    # Without an interval (no paired scores) the old rule applies: the tolerance alone decides.
    one = 1.0 / slack  # below this, lower than FP16 by more than the device's own noise
    significant_reversal = ratio < one if ratio_interval is None else ratio_interval.high < one
    interval_text = "" if ratio_interval is None else f", 95% interval {ratio_interval}"
    if significant_reversal and ratio < (1.0 - reversal_tolerance) / slack:
        outcome = REVERSAL
        headline = (f"{variant} on {corpus}: PERPLEXITY REVERSAL, the quantized model scores "
                    f"{(1 - ratio) * 100:.2f}% below FP16{interval_text} (tolerance {reversal_tolerance * 100:.2f}%). "
                    + _reversal_advice(calibration, partners))
    elif bound.value is None:
        outcome = XFAIL
        headline = (f"{variant} on {corpus}: relative perplexity {ratio:.4f}{interval_text}; the table row is "
                    f"open-ended ({row.expected if row else '?'}), so this variant is expected to fail")
    else:
        from .metrics import RELATIVE_PERPLEXITY

        fails, wording = decide_exceedance(ratio, ratio_interval, bound.value, rule=rule,
                                           higher_is_better=RELATIVE_PERPLEXITY.higher_is_better)
        if fails:
            outcome = FAIL
            headline = (f"{variant} on {corpus}: relative perplexity {ratio:.4f} exceeds bound {bound.value:.4g} "
                        f"({wording})")
        else:
            outcome = PASS
            headline = f"{variant} on {corpus}: relative perplexity {ratio:.4f} within bound {bound.value:.4g}"
            if wording:
                note = f"point estimate beyond the bound, {wording}; passes under the interval rule"
    if outcome == PASS and significant_reversal and ratio_interval is not None:
        note = (f"significant reversal: {(1 - ratio) * 100:.2f}% below FP16{interval_text}, within the "
                f"{reversal_tolerance * 100:.2f}% tolerance. " + _reversal_advice(calibration, partners))
    bound_text = "none (open-ended row)" if bound.value is None else f"{bound.value:.4g} ({bound.source})"
    message = "\n".join([
        headline,
        f"  value     : {value:.4f} (perplexity of {variant}, {tokens:,} tokens scored)",
        f"  baseline  : {baseline:.4f} (FP16, {baseline_source})",
        f"  ratio     : {ratio:.4f}{interval_text}",
        f"  bound     : {bound_text} (exceedance rule: {rule})",
        f"  table row : {row.describe() if row else 'none'}",
        f"  protocol  : {protocol_line}",
        *([f"  noise     : bound and reversal line widened by x{math.exp(noise_log_ratio):.6f}, the reference's own re-scoring spread "
           "on this device"] if noise_log_ratio else []),
        *([f"  calibration: {calibration.describe()}"] if calibration is not None else []),
        *([f"  note      : {note}"] if note else []),
    ])
    return Judgement(outcome=outcome, ratio=ratio, bound=bound.value, marginal=marginal, message=message, note=note)


def judge_metric(*, variant: str, corpus: str, metric: str, value: float, interval: Interval | None,
                 bound: float | None, higher_is_better: bool, rule: str, row_text: str, details: list[str],
                 marginal: bool = False, problematic: bool = False) -> Judgement:
    """KL divergence (lower is better) or top-1 agreement (higher is better) against its bound."""
    interval_text = "" if interval is None else f", 95% interval {interval}"
    note = None
    if not math.isfinite(value):
        outcome = FAIL
        headline = f"{variant} on {corpus}: {metric} is {value} (not a number): the comparison is broken"
    elif bound is None and problematic:
        outcome = XFAIL
        headline = (f"{variant} on {corpus}: {metric} {value:.6g}{interval_text}; the row is Problematic and has no "
                    "bound, so this variant is expected to fail")
    elif bound is None:
        outcome = PASS
        headline = f"{variant} on {corpus}: {metric} {value:.6g}{interval_text}; reported, not gated (no bound set)"
        note = "no bound set in the acceptability table or the manifest"
    else:
        fails, wording = decide_exceedance(value, interval, bound, higher_is_better=higher_is_better, rule=rule)
        relation = "below the minimum" if higher_is_better else "exceeds the bound"
        if fails:
            outcome = FAIL
            headline = f"{variant} on {corpus}: {metric} {value:.6g} {relation} {bound:.6g} ({wording})"
        else:
            outcome = PASS
            headline = f"{variant} on {corpus}: {metric} {value:.6g} within {bound:.6g}"
            if wording:
                note = f"point estimate beyond the bound, {wording}; passes under the interval rule"
    message = "\n".join([
        headline,
        f"  value     : {value:.6g}{interval_text}",
        f"  bound     : {'none' if bound is None else format(bound, '.6g')} (exceedance rule: {rule})",
        f"  table row : {row_text}",
        *[f"  {d}" for d in details],
        *([f"  note      : {note}"] if note else []),
    ])
    return Judgement(outcome=outcome, ratio=value, bound=bound, marginal=marginal, message=message, note=note)
