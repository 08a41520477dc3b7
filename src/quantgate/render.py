"""A run's Markdown: plain functions over its records (report.RunReport holds the data and delegates here).

`markdown` is the summary the plugin prints and `quantgate report` renders; each section is a function of
the records that returns its lines, empty when the run has nothing for it. `excerpt_markdown`,
`acceptability_markdown` and `capabilities_markdown` are the tables the README and docs embed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Record, RunReport


def markdown(report: RunReport) -> str:
    """The run's summary: relative perplexity per (variant, corpus), then every section the run has rows for."""
    records = report.records
    lines = [f"## quantgate summary (profile `{report.profile}`, device `{report.device}`)", ""]
    lines += perplexity_table(records)
    lines += text_measures(records)
    lines += backends_side_by_side(records)
    lines += distributions(records)
    lines += other_metrics(records)
    lines += tasks(records)
    lines += methods(records)
    lines += ablations(records, report.device)
    lines += builds(report.builds)
    lines += environment_changes(report.environment_changes)
    return "\n".join(lines) + "\n"


def _num(x: float | None, fmt: str) -> str:
    """A number in `fmt`, or "-" when there is none."""
    return "-" if x is None else format(x, fmt)


def perplexity_table(records: list[Record]) -> list[str]:
    """The summary table: one row per relative perplexity record, with its bound, verdict and size."""
    head = ["variant", "format", "bits", "backend", "corpus", "PPL", "FP16 PPL", "relative PPL", "bound", "verdict",
            "size MB", "bits/weight"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r.metric != "relative_perplexity":
            continue
        verdict = r.verdict if not r.detail or r.value is not None else f"{r.verdict}: {r.detail}"
        lines.append("| " + " | ".join([
            f"{r.model}/{r.variant}", r.format, "-" if r.bits is None else str(r.bits), r.backend or "-", r.corpus,
            _num(r.value, ".3f"), _num(r.baseline, ".3f"), _num(r.ratio, ".4f"),
            "none" if r.bound is None else f"{r.bound:.4g}", verdict.replace("\n", " ").replace("|", "/"),
            _num(None if r.size_bytes is None else r.size_bytes / 1e6, ".1f"), _num(r.bits_per_weight, ".2f"),
        ]) + " |")
    return lines


def text_measures(records: list[Record]) -> list[str]:
    """Bits per byte and word perplexity beside token perplexity: the same scores on the text's own scale, so
    models with other tokenizers compare (textmetrics.py); reported, not gated."""
    rows = [r for r in records if r.metric == "relative_perplexity" and r.bits_per_byte]
    if not rows:
        return []
    lines = ["", "Tokenizer-independent measures (the text the scored tokens cover; not gated):", "",
             "| variant | backend | corpus | bytes | words | FP16 bits/byte | bits/byte | FP16 word PPL | word PPL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        text, bpb, wppl = r.text or {}, r.bits_per_byte, r.word_perplexity or {}
        lines.append(f"| {r.model}/{r.variant} | {r.backend or '-'} | {r.corpus} | {text.get('bytes', '-'):,} | "
                     f"{text.get('words', '-'):,} | {_num(bpb.get('fp16'), '.4f')} | {_num(bpb.get('variant'), '.4f')} | "
                     f"{_num(wppl.get('fp16'), '.6g')} | {_num(wppl.get('variant'), '.6g')} |")
    return lines


def methods(records: list[Record]) -> list[str]:
    """How each variant was quantized (scheme, group size, desc_act, outlier handling, calibration)."""
    by_variant = {(r.model, r.variant): r for r in records if r.scheme or r.calibration or r.outlier_handling}
    if not by_variant:
        return []
    overlap: dict[tuple, dict[str, float]] = {}
    for r in records:  # the calibration text's share of each evaluation corpus's n-grams (overlap.py)
        if r.metric == "relative_perplexity" and r.calibration_overlap is not None:
            overlap.setdefault((r.model, r.variant), {})[r.corpus] = r.calibration_overlap
    lines = ["", "| variant | scheme | group size | desc_act | outlier handling | calibration | calibration overlap "
             "(8-grams of each corpus) |", "|---|---|---|---|---|---|---|"]
    for (model, variant), r in by_variant.items():
        shares = ", ".join(f"{c} {v:.2%}" for c, v in sorted(overlap.get((model, variant), {}).items())) or "-"
        lines.append(f"| {model}/{variant} | {r.scheme or '-'} | {r.group_size or '-'} | "
                     f"{'-' if r.desc_act is None else r.desc_act} | {r.outlier_handling or '-'} | {r.calibration or '-'} "
                     f"| {shares} |")
    return lines


def ablations(records: list[Record], device: str) -> list[str]:
    """Pairs of variants that differ in one declared factor, side by side (ablation.py)."""
    from .ablation import markdown as ablation_markdown

    return ablation_markdown(records, device)


def builds(differences: dict[str, str]) -> list[str]:
    """The builds that differ from the recorded ones ("model/variant" -> how), reported, not gated."""
    if not differences:
        return []
    lines = ["", "Builds that differ from the recorded ones (their numbers differ from those documented; "
             "reported, not gated):"]
    lines += [f"- `{variant}`: {words}" for variant, words in sorted(differences.items())]
    return lines


def environment_changes(changes: dict[str, list[str]]) -> list[str]:
    """How the environment differs from each baseline's (baseline path -> changes), reported, not gated."""
    if not changes:
        return []
    lines = ["", "Environment differs from the baselines' (reported, not gated):"]
    for where, words in changes.items():
        lines.append(f"- `{where}`: " + "; ".join(words))
    return lines


def distributions(records: list[Record]) -> list[str]:
    """Paired statistics against FP16 per (variant, corpus), the KL / top-1 verdicts, and the gate's power."""
    rows = [r for r in records if r.metric == "relative_perplexity" and r.distribution]
    if not rows:
        return []
    from .gate import TIE_WIDTH

    verdicts = {(r.model, r.variant, r.corpus, r.metric): r.verdict for r in records}
    kind = rows[0].distribution.get("kl_kind", "")
    bound_words = ", a lower bound of the full KL" if kind.startswith("lower bound") else ""
    lines = ["", f"Next-token distributions against FP16 (95% intervals; KL divergence: {kind}{bound_words}; "
             f"top-1: share of tokens whose most likely next token is FP16's or one FP16 rated within {TIE_WIDTH:g} nats of its own, "
             "a near-tie; plain: no near-tie excused):", "",
             "| variant | backend | corpus | relative PPL [95% CI] | mean KL [95% CI] | KL p99 / p99.9 | "
             "top-1 [95% CI] | mean Δp | KL verdict | top-1 verdict | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_distribution_row(r, verdicts) for r in rows]
    lines += _noise_floor(rows)
    lines += _power(rows)
    return lines


def _distribution_row(r: Record, verdicts: dict[tuple, str]) -> str:
    """One (variant, corpus) row of the distributions table, with its KL and top-1 verdicts."""
    d = r.distribution
    lo, hi = d["ppl_ratio_interval"] or (math.nan, math.nan)
    klo, khi = d["kl_interval"] or (math.nan, math.nan)
    tlo, thi = d["top1_interval"]
    return (f"| {r.model}/{r.variant} | {r.backend or '-'} | {r.corpus} | {d['ppl_ratio']:.4f} [{lo:.4f}, {hi:.4f}] | "
            f"{d['kl_mean']:.2e} [{klo:.2e}, {khi:.2e}] | {d['kl_p99']:.2e} / {d['kl_p999']:.2e} | "
            f"{d['top1']:.4f} [{tlo:.4f}, {thi:.4f}] (plain {d.get('top1_plain', math.nan):.4f}) | "
            f"{d['delta_p']['mean'] * 100:+.3f}% | "
            f"{verdicts.get((r.model, r.variant, r.corpus, 'kl_divergence'), '-')} | "
            f"{verdicts.get((r.model, r.variant, r.corpus, 'top1_agreement'), '-')} | "
            f"{(r.note or '').split('. ')[0].replace('|', '/') or '-'} |")


def _noise_floor(rows: list[Record]) -> list[str]:
    """The BF16 copies' distances from FP16: differences of that size say nothing about quantization."""
    floor = [r for r in rows if r.format == "bf16"]
    if not floor:
        return []
    return ["", "Noise floor (a BF16 copy of the FP16 reference, no quantization): " + "; ".join(
        f"{r.model}/{r.corpus}: KL {r.distribution['kl_mean']:.2e}, top-1 {r.distribution['top1']:.4f} "
        f"(plain {r.distribution.get('top1_plain', math.nan):.4f}), "
        f"relative PPL {r.distribution['ppl_ratio']:.4f}" for r in floor)
        + ". Differences of this size say nothing about quantization."]


def _power(rows: list[Record]) -> list[str]:
    """The smallest relative perplexity change the run can detect, per (backend, corpus, protocol)."""
    lines = ["", "Power: the smallest relative perplexity change this run can detect (two-sided 5%, 80% power), "
             "from the median paired standard error of log(ratio) over its variants:", ""]
    from .stats import detectable_ratio_change

    groups: dict[tuple, list[Record]] = {}
    for r in rows:
        groups.setdefault((r.backend, r.corpus, r.protocol_fingerprint), []).append(r)
    for (backend, corpus, fingerprint), members in groups.items():
        ses = sorted(m.distribution["ppl_ratio_se_log"] for m in members
                     if math.isfinite(m.distribution["ppl_ratio_se_log"]))
        if not ses:
            continue
        se = ses[len(ses) // 2]
        d = members[0].distribution
        lines.append(f"- {corpus} ({backend}, protocol {fingerprint}): {d['tokens']:,} tokens in {d['blocks']} "
                     f"windows; detectable change {detectable_ratio_change(se) * 100:.2f}% "
                     f"(paired SE of log ratio {se:.2e}, median of {len(members)} variants)")
    return lines


def other_metrics(records: list[Record]) -> list[str]:
    """Records of metrics registered beyond the built-in ones (metrics.register_metric)."""
    shown = {"relative_perplexity", "kl_divergence", "top1_agreement", "task_score_drop"}
    rows = [r for r in records if r.metric not in shown]
    if not rows:
        return []
    lines = ["", "Registered metrics:", "", "| variant | corpus | metric | value [95% CI] | bound | verdict |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        interval = "" if not r.interval else f" [{r.interval[0]:.4g}, {r.interval[1]:.4g}]"
        value = "-" if r.value is None else f"{r.value:.6g}{interval}"
        bound = "none" if r.bound is None else f"{'>=' if r.higher_is_better else '<='} {r.bound:.4g}"
        lines.append(f"| {r.model}/{r.variant} | {r.corpus} | {r.metric} | {value} | {bound} | {r.verdict} |")
    return lines


def tasks(records: list[Record]) -> list[str]:
    """Task scores against FP16 per (variant, task), then capabilities ranked by what each variant lost."""
    rows = [r for r in records if r.metric == "task_score_drop"]
    if not rows:
        return []
    lines = ["", "Task scores against FP16, paired by item (drop = FP16 score - variant score, in points; "
             "95% paired bootstrap interval; exact McNemar test on the flipped items):", "",
             "| variant | backend | task | capability | FP16 | variant | drop [95% CI] | lost / gained | "
             "McNemar p | max drop | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_task_row(r) for r in rows]
    lines += capability_ranking(rows)
    return lines


def _task_row(r: Record) -> str:
    """One (variant, task) row of the task table; a task that could not be scored says why."""
    d = r.distribution
    if not d:
        return (f"| {r.model}/{r.variant} | {r.backend or '-'} | {r.corpus.removeprefix('task:')} | "
                f"{r.capability or '-'} | - | - | - | - | - | - | {r.verdict}: {r.detail or ''} |")
    lo, hi = d["drop_interval"]
    return (f"| {r.model}/{r.variant} | {r.backend or '-'} | {d['task']} | {r.capability} | "
            f"{d['reference_score']:.3f} | {d['variant_score']:.3f} | {d['drop']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
            f"{d['lost']} / {d['gained']} | {d['mcnemar_p']:.3g} | "
            f"{'none' if r.bound is None else format(r.bound, 'g')} | {r.verdict} |")


def capability_ranking(rows: list[Record]) -> list[str]:
    """Which capability suffers most: per variant, capabilities by their drop (mean over their tasks)."""
    drops: dict[tuple[str, str], dict[str, list[float]]] = {}
    significant: set[tuple[str, str, str]] = set()
    for r in rows:
        if r.distribution:
            drops.setdefault((r.model, r.variant), {}).setdefault(r.capability or "-", []).append(r.distribution["drop"])
            if r.distribution["drop"] > 0 and r.distribution["mcnemar_p"] < 0.05:
                significant.add((r.model, r.variant, r.capability or "-"))
    if not drops:
        return []
    capabilities = sorted({c for per in drops.values() for c in per})
    mean = {key: {c: sum(v) / len(v) for c, v in per.items()} for key, per in drops.items()}
    lines = ["", "Which capability suffers most: each variant's drop per capability (points, mean over the "
             "capability's tasks); the ranking lists the capabilities that lost anything, most first "
             "(* = a significant loss, McNemar p < 0.05):", "",
             "| variant | " + " | ".join(capabilities) + " | ranking (most lost first) |",
             "|---|" + "---|" * (len(capabilities) + 1)]
    for (model, variant), per in mean.items():
        lost = sorted((c for c in per if per[c] > 0), key=lambda c: -per[c])
        ranking = " > ".join(c + ("*" if (model, variant, c) in significant else "") for c in lost) or "nothing lost"
        cells = [f"{per[c]:+.3f}" if c in per else "-" for c in capabilities]
        lines.append(f"| {model}/{variant} | " + " | ".join(cells) + f" | {ranking} |")
    overall = {c: [m[c] for m in mean.values() if c in m] for c in capabilities}
    order = sorted(capabilities, key=lambda c: -sum(overall[c]) / len(overall[c]))
    worst = {c: sum(1 for m in mean.values() if max(m.values()) > 0 and max(m, key=m.get) == c) for c in capabilities}
    lines += ["", "Over all variants: " + "; ".join(
        f"{c} lost {sum(overall[c]) / len(overall[c]):+.3f} on average (the most lost for {worst[c]} of "
        f"{len(mean)} variants)" for c in order) + f"; significant losses: {len(significant)}."]
    return lines


def backends_side_by_side(records: list[Record]) -> list[str]:
    """The same file scored by several backends (GGUF: dequantized by transformers and by llama.cpp)."""
    by_file: dict[tuple, dict[str, Record]] = {}
    for r in records:
        if r.metric == "relative_perplexity" and r.ratio is not None and r.backend:
            key = (r.model, r.format, r.bits, r.scheme, r.size_bytes, r.corpus)
            by_file.setdefault(key, {})[r.backend] = r
    shared = {k: v for k, v in by_file.items() if len(v) > 1}
    if not shared:
        return []
    backends = sorted({b for v in shared.values() for b in v})
    lines = ["", "The same file under each backend (each against its own reference: FP16 for transformers, "
             "the F16 GGUF for llama.cpp):", "",
             "| model | file | corpus | " + " | ".join(f"relative PPL ({b})" for b in backends) + " | spread |",
             "|" + "---|" * (4 + len(backends))]
    for (model, fmt, bits, scheme, _size, corpus), recs in shared.items():
        ratios = [recs[b].ratio for b in backends if b in recs]
        cells = [f"{recs[b].ratio:.4f}" if b in recs else "-" for b in backends]
        lines.append(f"| {model} | {fmt} {scheme or bits} | {corpus} | " + " | ".join(cells)
                     + f" | {max(ratios) - min(ratios):.4f} |")
    return lines


def excerpt_markdown(records: list[Record]) -> str:
    """Verdict counts per model and metric: the README's short demo summary."""
    kinds = ("pass", "pass (marginal)", "xfail (problematic)", "FAIL", "REVERSAL")
    lines = ["| model | metric | checks | " + " | ".join(kinds) + " | other |", "|---|---|---|" + "---|" * (len(kinds) + 1)]
    groups: dict[tuple[str, str], list[str]] = {}
    for r in records:
        groups.setdefault((r.model, r.metric), []).append(r.verdict)
    for (model, metric), verdicts in groups.items():
        counts = [sum(v == k for v in verdicts) for k in kinds]
        lines.append(f"| {model} | {metric} | {len(verdicts)} | " + " | ".join(map(str, counts))
                     + f" | {len(verdicts) - sum(counts)} |")
    return "\n".join(lines) + "\n"


def acceptability_markdown(records: list[Record], rows) -> str:
    """The acceptability table with the measured ratios of the run beside each row's expected range."""
    lines = ["| row | expected (source table) | acceptable | bound | measured relative PPL | max KL / min top-1 | "
             "measured KL (worst) / top-1 (worst) | verdicts |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        hits = [r for r in records if r.metric == "relative_perplexity" and (r.format, r.bits) == (row.format, row.bits)]
        measured = "<br>".join(f"{r.variant} / {r.corpus}: {r.ratio:.4f}" for r in hits if r.ratio is not None) or "not in this run"
        dists = [r.distribution for r in hits if r.distribution]
        worst = (f"{max(d['kl_mean'] for d in dists):.2e} / {min(d['top1'] for d in dists):.4f}" if dists else "-")
        checked = [r for r in records if (r.format, r.bits) == (row.format, row.bits)]
        verdicts = ", ".join(sorted({r.verdict for r in checked})) or "-"
        bound = "none" if row.high is None else f"{row.high:g}"
        dist_bounds = ("none" if row.max_kl is None else f"{row.max_kl:g}") + " / " + (
            "none" if row.min_top1 is None else f"{row.min_top1:g}")
        lines.append(f"| {row.label} | {row.expected} | {row.acceptable} | {bound} | {measured} | {dist_bounds} | "
                     f"{worst} | {verdicts} |")
    return "\n".join(lines) + "\n"


def capabilities_markdown(records: list[Record], max_drops: dict[str, float]) -> str:
    """Each capability's max drop beside the largest drop the run measured for it."""
    lines = ["", "| capability | max drop (points) | measured: largest drop, variant / task [95% CI] | verdicts |",
             "|---|---|---|---|"]
    for capability, bound in sorted(max_drops.items()):
        hits = [r for r in records if r.metric == "task_score_drop" and r.capability == capability and r.distribution]
        worst = max(hits, key=lambda r: r.distribution["drop"], default=None)
        measured = "not in this run" if worst is None else (
            f"{worst.distribution['drop']:+.3f}, {worst.variant} / {worst.distribution['task']} "
            f"[{worst.interval[0]:+.3f}, {worst.interval[1]:+.3f}]")
        verdicts = ", ".join(sorted({r.verdict for r in hits})) or "-"
        lines.append(f"| {capability} | {bound:g} | {measured} | {verdicts} |")
    return "\n".join(lines) + "\n"
