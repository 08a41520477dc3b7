"""Ablations: pairs of one model's variants that differ in exactly one declared method factor, side by side.

The factors are the manifest's method fields: format, bits, group size, desc_act, calibration and
outlier handling (a scheme follows from the bits and the format, so it is not one). Two variants on
the same backend whose declared factors agree but for one are an ablation of that factor; an
outlier handling that names desc_act ("activation-order (desc_act)") restates the desc_act factor
rather than adding one. For each pair the summary shows, per corpus, both ratios to FP16 with their
intervals (each paired with FP16 token by token), their difference, both KL divergences and each
variant's measured scoring speed with its device and kernels; per task, both scores; and for a
reversal, which partners reverse as well. The difference is of the two point ratios: the pair itself
is not paired token by token (their scores may come from different workers or shards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Record

FACTORS = ("format", "bits", "group_size", "desc_act", "calibration", "outlier_handling")


@dataclass(frozen=True)
class Pair:
    model: str
    backend: str
    factor: str
    first: str  # variant names, in name order
    second: str
    values: tuple  # the factor's value for each


def _differing(a: Record, b: Record) -> list[str]:
    differ = [f for f in FACTORS if getattr(a, f) != getattr(b, f)]
    if set(differ) == {"desc_act", "outlier_handling"} and any("desc_act" in str(r.outlier_handling) for r in (a, b)):
        return ["desc_act"]
    return differ


def find_pairs(records: list[Record]) -> list[Pair]:
    variants = {(r.model, r.backend or "", r.variant): r for r in records if r.metric == "relative_perplexity"}
    pairs = []
    keys = sorted(variants)  # an error record may have no backend: "" sorts with the rest
    for i, (model, backend, first) in enumerate(keys):
        for model2, backend2, second in keys[i + 1:]:
            if (model2, backend2) != (model, backend):
                continue
            a, b = variants[(model, backend, first)], variants[(model, backend, second)]
            differ = _differing(a, b)
            if len(differ) == 1:
                pairs.append(Pair(model, backend, differ[0], first, second,
                                  (getattr(a, differ[0]), getattr(b, differ[0]))))
    return pairs


def _reverses(r: Record | None) -> bool:
    interval = (r.distribution or {}).get("ppl_ratio_interval") if r else None
    return bool(interval) and interval[1] < 1.0


def _speed(r: Record | None, device: str) -> str:
    if not r or not r.eval_seconds or not r.tokens_scored:
        return "-"
    return f"{r.tokens_scored / r.eval_seconds:,.0f} tok/s ({device}; {', '.join(r.kernels) or r.backend})"


def markdown(records: list[Record], device: str) -> list[str]:
    pairs = find_pairs(records)
    if not pairs:
        return []
    by = {(r.model, r.backend, r.variant, r.metric, r.corpus): r for r in records}
    lines = ["", "Ablations: variants that differ in one declared factor (ratios each paired with FP16; the difference "
             "is of the point ratios):", "",
             "| factor | variant A | variant B | corpus | ratio A | ratio B | B - A | KL A | KL B | speed A | speed B |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    reversals = []
    for p in pairs:
        for corpus in sorted({r.corpus for r in records if r.model == p.model and r.variant == p.first
                              and r.metric == "relative_perplexity"}):
            a, b = (by.get((p.model, p.backend, v, "relative_perplexity", corpus)) for v in (p.first, p.second))
            ka, kb = (by.get((p.model, p.backend, v, "kl_divergence", corpus)) for v in (p.first, p.second))
            if not (a and b) or a.ratio is None or b.ratio is None:  # one side not measured (cannot test, error)
                continue
            cells = [_ratio(a), _ratio(b), f"{b.ratio - a.ratio:+.4f}", _kl(ka), _kl(kb), _speed(a, device),
                     _speed(b, device)]
            lines.append(_row(p, corpus, cells))
            for one, other in ((a, b), (b, a)):
                if _reverses(one):
                    reversals.append(f"- {one.model}/{one.variant} reverses on {corpus}; its {p.factor} partner "
                                     f"{other.variant} {'also reverses' if _reverses(other) else 'does not'}")
        tasks = sorted({r.corpus for r in records if r.model == p.model and r.variant == p.first
                        and r.metric == "task_score_drop"})
        scores = [[by.get((p.model, p.backend, v, "task_score_drop", t)) for t in tasks] for v in (p.first, p.second)]
        if tasks and all(r is not None and r.value is not None for side in scores for r in side):
            names = [t.removeprefix("task:") for t in tasks]
            lines.append(_row(p, "tasks", [", ".join(f"{n} {r.value:.3f}" for n, r in zip(names, side, strict=True))
                                           for side in scores]
                              + [", ".join(f"{b.value - a.value:+.3f}" for a, b in zip(*scores, strict=True))]
                              + ["-"] * 4))
    if reversals:
        lines += ["", "Reversals and their ablation partners (a partner that does not reverse points at the factor):",
                  "", *dict.fromkeys(reversals)]
    return lines


def _row(p: Pair, corpus: str, cells: list[str]) -> str:
    return (f"| {p.factor} | {p.model}/{p.first} ({p.values[0]}) | {p.model}/{p.second} ({p.values[1]}) | {corpus} | "
            + " | ".join(cells) + " |")


def _ratio(r: Record) -> str:
    interval = (r.distribution or {}).get("ppl_ratio_interval")
    return f"{r.ratio:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def _kl(r: Record | None) -> str:
    return "-" if r is None or r.value is None else f"{r.value:.2e}"
