"""The decision: a variant's relative perplexity against its bound, and why, in words.

Outcomes
- pass      ratio <= bound (a Marginal row is marked as such in the summary);
- fail      ratio > bound;
- xfail     the row is open-ended (Problematic, "1.30+") and the manifest gives no bound:
            expected to be bad, numbers still reported;
- reversal  the variant is *better* than FP16 by more than the reversal tolerance: not a
            win but a sign of a protocol, calibration or outlier-handling effect to
            investigate (seed 001). It fails the test so that someone looks.
"""

from __future__ import annotations

from dataclasses import dataclass

from .thresholds import Bound

PASS, FAIL, XFAIL, REVERSAL = "pass", "fail", "xfail", "reversal"


@dataclass(frozen=True)
class Judgement:
    outcome: str
    ratio: float
    bound: float | None
    marginal: bool
    message: str

    @property
    def verdict(self) -> str:
        if self.outcome == PASS and self.marginal:
            return "pass (marginal)"
        return {PASS: "pass", FAIL: "FAIL", XFAIL: "xfail (problematic)", REVERSAL: "REVERSAL"}[self.outcome]


def judge(*, variant: str, corpus: str, value: float, baseline: float, bound: Bound,
          reversal_tolerance: float, tokens: int, baseline_source: str, protocol_line: str) -> Judgement:
    ratio = value / baseline
    row = bound.row
    marginal = row is not None and row.acceptable == "Marginal"
    if ratio < 1.0 - reversal_tolerance:
        outcome = REVERSAL
        headline = (f"{variant} on {corpus}: PERPLEXITY REVERSAL, the quantized model scores "
                    f"{(1 - ratio) * 100:.2f}% below FP16 (tolerance {reversal_tolerance * 100:.2f}%). "
                    f"Investigate before trusting it: same protocol on both sides? outlier handling? "
                    f"calibration data overlapping the evaluation text?")
    elif bound.value is None:
        outcome = XFAIL
        headline = (f"{variant} on {corpus}: relative perplexity {ratio:.4f}; the table row is "
                    f"open-ended ({row.expected if row else '?'}), so this variant is expected to fail")
    elif ratio > bound.value:
        outcome = FAIL
        headline = f"{variant} on {corpus}: relative perplexity {ratio:.4f} exceeds bound {bound.value:.4g}"
    else:
        outcome = PASS
        headline = f"{variant} on {corpus}: relative perplexity {ratio:.4f} within bound {bound.value:.4g}"
    bound_text = "none (open-ended row)" if bound.value is None else f"{bound.value:.4g} ({bound.source})"
    message = "\n".join([
        headline,
        f"  value     : {value:.4f} (perplexity of {variant}, {tokens:,} tokens scored)",
        f"  baseline  : {baseline:.4f} (FP16, {baseline_source})",
        f"  ratio     : {ratio:.4f}",
        f"  bound     : {bound_text}",
        f"  table row : {row.describe() if row else 'none'}",
        f"  protocol  : {protocol_line}",
    ])
    return Judgement(outcome=outcome, ratio=ratio, bound=bound.value, marginal=marginal, message=message)
