"""Ablations: pairs of one model's variants that differ in exactly one declared method factor, side by side.

The factors are the manifest's method fields: format, bits, group size, desc_act, calibration and
outlier handling (a scheme follows from the bits and the format, so it is not one). Two variants on
the same backend whose declared factors agree but for one are an ablation of that factor; an
outlier handling that names desc_act ("activation-order (desc_act)") restates the desc_act factor
rather than adding one. For each pair the summary shows, per corpus, both ratios to FP16 with their
intervals, the paired difference B - A of the ratios and of the KL divergences with 95% intervals,
and each variant's measured scoring speed with its device and kernels; per task, both scores and the
paired difference. For a reversal, which partners reverse as well.

Where the pairing happens: each relative perplexity record carries its per-window sums (`Record.windows`)
and each task record its lost and gained items, so two variants pair window by window (item by item)
wherever their records meet: the end of a run, after xdist's workers handed theirs to the controller, or
`quantgate report` over shards' merged JSON. A reversal's own message, written when its check runs, names
its partners and the status of those already measured in that process; the record's note (JSON, summary)
gets every partner's status once the run has them all (`annotate_reversals`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .stats import paired_difference, paired_task_difference

if TYPE_CHECKING:
    from .report import Record

PARTNERS = "Ablation partners: "
FACTORS = ("format", "bits", "group_size", "desc_act", "calibration", "outlier_handling")


@dataclass(frozen=True)
class Pair:
    model: str
    backend: str
    factor: str
    first: str  # variant names, in name order
    second: str
    values: tuple  # the factor's value for each


def _differing(a: Any, b: Any) -> list[str]:
    differ = [f for f in FACTORS if getattr(a, f, None) != getattr(b, f, None)]  # a factor not stated is None
    if set(differ) == {"desc_act", "outlier_handling"} and any("desc_act" in str(r.outlier_handling) for r in (a, b)):
        return ["desc_act"]
    return differ


def pairs_among(variants: dict[tuple[str, str, str], Any]) -> list[Pair]:
    """Pairs among (model, backend, name) -> anything with the FACTORS as attributes (records, manifest variants)."""
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
                                  (getattr(a, differ[0], None), getattr(b, differ[0], None))))
    return pairs


def find_pairs(records: list[Record]) -> list[Pair]:
    return pairs_among({(r.model, r.backend or "", r.variant): r for r in records if r.metric == "relative_perplexity"})


def partners(pairs: list[Pair], variant: str) -> list[tuple[str, str]]:
    """(factor, partner) for each pair `variant` is in."""
    return [(p.factor, p.second if p.first == variant else p.first) for p in pairs if variant in (p.first, p.second)]


def reverses(r: Record | None) -> bool:
    interval = (r.distribution or {}).get("ppl_ratio_interval") if r else None
    return bool(interval) and interval[1] < 1.0


def partner_status(r: Record | None) -> str:
    if r is None or r.ratio is None:
        return "not measured yet"
    return ("also reverses" if reverses(r) else "does not reverse") + f" ({_ratio(r)})"


def partners_sentence(named: list[tuple[str, str]], status: dict[str, str]) -> str:
    """'Ablation partners: g64 (group_size) does not reverse (...); act (desc_act) also reverses (...).'"""
    if not named:
        return ""
    return PARTNERS + "; ".join(f"{name} ({factor}) {status.get(name, 'not measured yet')}"
                                             for factor, name in named) + "."


def reversal_partners(variants, records: list[Record], model: str, variant: str, corpus: str) -> str:
    """When a check runs: the variant's ablation partners among the manifest's `variants` (same backend), with the
    status of those already measured on the corpus in this process's `records`."""
    backend = next(v.backend for v in variants if v.name == variant)
    named = partners(pairs_among({(model, v.backend, v.name): v for v in variants}), variant)  # pairs share a backend
    measured = {r.variant: r for r in records
                if (r.model, r.corpus, r.metric, r.backend) == (model, corpus, "relative_perplexity", backend)}
    return partners_sentence(named, {n: partner_status(measured.get(n)) for _, n in named})


def annotate_reversals(records: list[Record]) -> None:
    """At the end of a run: each reversing record's note says which of its ablation partners reverse too."""
    pairs = find_pairs(records)
    ppl = {(r.model, r.backend or "", r.variant, r.corpus): r for r in records if r.metric == "relative_perplexity"}
    for r in ppl.values():
        if not reverses(r):
            continue
        named = partners([p for p in pairs if (p.model, p.backend) == (r.model, r.backend or "")], r.variant)
        sentence = partners_sentence(named, {n: partner_status(ppl.get((r.model, r.backend or "", n, r.corpus)))
                                             for _, n in named})
        if sentence:  # replaces the one its check wrote (or a shard's), which knew fewer partners
            note = (r.note or "").split(PARTNERS)[0].rstrip()
            r.note = f"{note} {sentence}" if note else sentence


def markdown(records: list[Record], device: str) -> list[str]:
    pairs = find_pairs(records)
    if not pairs:
        return []
    by = {(r.model, r.backend, r.variant, r.metric, r.corpus): r for r in records}
    lines, reversals = [], []
    for p in pairs:
        for corpus in sorted({r.corpus for r in records if r.model == p.model and r.variant == p.first
                              and r.metric == "relative_perplexity"}):
            a, b = (by.get((p.model, p.backend, v, "relative_perplexity", corpus)) for v in (p.first, p.second))
            ka, kb = (by.get((p.model, p.backend, v, "kl_divergence", corpus)) for v in (p.first, p.second))
            if not (a and b) or a.ratio is None or b.ratio is None:  # one side not measured (cannot test, error)
                continue
            diff = paired_difference(a.windows or {}, b.windows or {})
            cells = [_ratio(a), _ratio(b),
                     _signed(diff.ratio_difference, diff.ratio_interval, ".4f") if diff
                     else f"{b.ratio - a.ratio:+.4f} (unpaired)",
                     _kl(ka), _kl(kb), _signed(diff.kl_difference, diff.kl_interval, ".2e") if diff else "-",
                     _speed(a, device), _speed(b, device)]
            lines.append(_row(p, corpus, cells))
            for one, other in ((a, b), (b, a)):
                if reverses(one):
                    reversals.append(f"- {one.model}/{one.variant} reverses on {corpus}; its {p.factor} partner "
                                     f"{other.variant} {'also reverses' if reverses(other) else 'does not'}")
        lines += _task_row(p, records, by)
    if not lines:  # pairs declared, but no pair has both sides measured (a corpus that could not be loaded ...)
        return []
    lines = ["", "Ablations: variants that differ in one declared factor. Ratios and KL are each paired with FP16; "
             "B - A is paired window by window (tasks: item by item), 95% intervals:", "",
             "| factor | variant A | variant B | corpus | ratio A | ratio B | ratio B - A | KL A | KL B | KL B - A | "
             "speed A | speed B |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|", *lines]
    if reversals:
        lines += ["", "Reversals and their ablation partners (a partner that does not reverse points at the factor):",
                  "", *dict.fromkeys(reversals)]
    return lines


def _task_row(p: Pair, records: list[Record], by: dict) -> list[str]:
    tasks = sorted({r.corpus for r in records if r.model == p.model and r.variant == p.first
                    and r.metric == "task_score_drop"})
    scores = [[by.get((p.model, p.backend, v, "task_score_drop", t)) for t in tasks] for v in (p.first, p.second)]
    if not tasks or not all(r is not None and r.value is not None for side in scores for r in side):
        return []
    names = [t.removeprefix("task:") for t in tasks]
    diffs = []
    for a, b in zip(*scores, strict=True):
        da, db = a.distribution or {}, b.distribution or {}
        if "lost_items" in da and "lost_items" in db and da.get("items") == db.get("items"):
            d, interval = paired_task_difference(da["items"], (set(da["lost_items"]), set(da["gained_items"])),
                                                 (set(db["lost_items"]), set(db["gained_items"])))
            diffs.append(_signed(d, interval, ".3f"))
        else:
            diffs.append(f"{b.value - a.value:+.3f} (unpaired)")
    return [_row(p, "tasks", [", ".join(f"{n} {r.value:.3f}" for n, r in zip(names, side, strict=True))
                              for side in scores]
                 + [", ".join(f"{n} {d}" for n, d in zip(names, diffs, strict=True))] + ["-"] * 5)]


def _row(p: Pair, corpus: str, cells: list[str]) -> str:
    return (f"| {p.factor} | {p.model}/{p.first} ({p.values[0]}) | {p.model}/{p.second} ({p.values[1]}) | {corpus} | "
            + " | ".join(cells) + " |")


def _signed(value: float, interval, fmt: str) -> str:
    text = format(value, "+" + fmt)
    return text + (f" [{format(interval.low, '+' + fmt)}, {format(interval.high, '+' + fmt)}]" if interval else "")


def _ratio(r: Record) -> str:
    interval = (r.distribution or {}).get("ppl_ratio_interval")
    return f"{r.ratio:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def _kl(r: Record | None) -> str:
    return "-" if r is None or r.value is None else f"{r.value:.2e}"


def _speed(r: Record | None, device: str) -> str:
    if not r or not r.eval_seconds or not r.tokens_scored:
        return "-"
    return f"{r.tokens_scored / r.eval_seconds:,.0f} tok/s ({device}; {', '.join(r.kernels) or r.backend})"
