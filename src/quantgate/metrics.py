"""Metrics over a variant's paired comparison with FP16: a registry.

Each metric declares its name (the record's `metric`, the test id's last part), whether higher is
better, how it is computed from the paired statistics (`stats.PairedComparison`) with its 95%
interval, which acceptability-table column or manifest variant key bounds it, and what its failure
message adds. The gate judges every registered metric the same way (`checks.Gate.metric`), so a
team's own metric is one `register_metric` call, e.g. in its conftest.py:

    from quantgate.metrics import Metric, register_metric
    register_metric(Metric(name="kl_p99", higher_is_better=False, bound_key="max_kl_p99",
                           compute=lambda st: (st.kl_p99, None), default_bound=0.01))

Relative perplexity and task scores have rules of their own (reversals, capabilities) in `gate.py`
and `checks.py`; the built-in distribution metrics below are registered like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import QuantgateError
from .stats import Interval, PairedComparison


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    bound_key: str  # a TableRow attribute or manifest variant key holding the bound (e.g. "max_kl")
    compute: Callable[[PairedComparison], tuple[float, Interval | None]]
    details: Callable[[PairedComparison], list[str]] = lambda st: []
    default_bound: float | None = None  # when neither the table row nor the manifest sets one
    builtin: bool = False  # has a test function of its own in quality_tests/ (test ids kept stable)

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")


_REGISTRY: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    if not metric.name.replace("_", "").isalnum():
        raise QuantgateError(f"metric name {metric.name!r}: letters, digits and underscores only (it is part of test ids)")
    if metric.name in _REGISTRY and _REGISTRY[metric.name] is not metric:
        raise QuantgateError(f"metric {metric.name!r} is already registered")
    _REGISTRY[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QuantgateError(f"no metric {name!r} is registered (known: {', '.join(sorted(_REGISTRY))})") from None


def registered(*, builtin: bool | None = None) -> list[Metric]:
    return [m for m in _REGISTRY.values() if builtin is None or m.builtin == builtin]


def _kl_details(st: PairedComparison) -> list[str]:
    return [f"kind      : {st.kl_kind} of the full KL divergence, over {st.tokens:,} tokens",
            f"tail      : p99 {st.kl_p99:.4g}, p99.9 {st.kl_p999:.4g}, max {st.kl_max:.4g}",
            f"ppl ratio : {st.ppl_ratio:.4f}, 95% interval {st.ppl_ratio_interval}"]


def _top1_details(st: PairedComparison) -> list[str]:
    from .gate import TIE_WIDTH

    return [f"agreement : the variant's most likely next token is FP16's, or one FP16 rated within {TIE_WIDTH:g} nats "
            f"of its own (a near-tie), on {st.top1 * 100:.2f}% of {st.tokens:,} tokens (Wilson interval)",
            f"near-ties : {st.tie_flips:,} of the {round((1 - st.top1_plain) * st.tokens):,} flips were near-ties "
            f"(plain agreement {st.top1_plain:.6g}); FP16's first two choices lie within {TIE_WIDTH:g} nats on "
            f"{st.near_ties * 100:.2f}% of tokens",
            f"ppl ratio : {st.ppl_ratio:.4f}, 95% interval {st.ppl_ratio_interval}"]


KL_DIVERGENCE = register_metric(Metric(name="kl_divergence", higher_is_better=False, bound_key="max_kl",
                                       compute=lambda st: (st.kl_mean, st.kl_interval), details=_kl_details,
                                       builtin=True))
TOP1_AGREEMENT = register_metric(Metric(name="top1_agreement", higher_is_better=True, bound_key="min_top1",
                                        compute=lambda st: (st.top1, st.top1_interval), details=_top1_details,
                                        builtin=True))
# Relative perplexity and the task score drop are judged by rules of their own (gate.judge: reversals; checks:
# capabilities), but their names, directions and bounds live here like every other metric's.
RELATIVE_PERPLEXITY = register_metric(Metric(name="relative_perplexity", higher_is_better=False, bound_key="max_ratio",
                                             compute=lambda st: (st.ppl_ratio, st.ppl_ratio_interval), builtin=True))
TASK_SCORE_DROP = register_metric(Metric(name="task_score_drop", higher_is_better=False, bound_key="max_drop",
                                         compute=lambda cmp: (cmp.drop, cmp.drop_interval), builtin=True))
