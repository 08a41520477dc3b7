"""Pictures of a run's verdicts (matplotlib, PNG and SVG), beside the Markdown summary.

- `quality-distribution`: per model, relative perplexity and mean KL divergence to FP16 with their 95%
  intervals per variant and corpus, variants ordered by declared bits, the acceptability table's expected
  range shaded and its bound drawn per variant, each point marked by its verdict; size on disk in a panel of
  its own (never drawn as the bit width).
- `quality-tasks`: each task's score drop (FP16 minus variant, with its interval) per variant, against the
  capability's maximum drop.
- `quality-gguf-ladder`: the GGUF quantization types (by the table's row) under each scoring backend.

matplotlib is imported here only (the `plots` extra); without it the run says so and writes no pictures.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

VERDICT_STYLE = {  # verdict -> (colour, marker)
    "pass": ("#1a7f37", "o"), "pass (marginal)": ("#bf8700", "o"), "FAIL": ("#cf222e", "X"),
    "REVERSAL": ("#8250df", "v"), "xfail (problematic)": ("#6e7781", "s"),
}
OTHER_STYLE = ("#57606a", "d")  # cannot test, error, skipped
CORPUS_OFFSETS = (-0.15, 0.15, 0.0, -0.3, 0.3)
FORMATS = ("png", "svg")
HATCHES = ("", "//", "..", "xx", "\\\\")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "path", "figure.dpi": 110, "font.size": 9})
    return plt


def _variant_order(records) -> list[str]:
    """Variants by declared bits, highest first (then by name), as the summary's ladder reads."""
    bits = {}
    for r in records:
        bits.setdefault(r.variant, r.bits if r.bits is not None else 0)
    return sorted(bits, key=lambda v: (-bits[v], v))


def _label(records, variant: str) -> str:
    r = next(r for r in records if r.variant == variant)
    return f"{variant}\n{r.format} {r.bits}-bit" if r.bits is not None else variant


def _interval(record, key: str):
    dist = record.distribution or {}
    if key == "ppl":
        return dist.get("ppl_ratio_interval")
    return dist.get("kl_interval") or record.interval


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, format=fmt, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        paths.append(path)
    return paths


def _points(ax, records, order, value, interval, rows_by_label, band):
    """One point per (variant, corpus) with its interval, the table's expected range shaded and the bound."""
    corpora = sorted({r.corpus for r in records})
    for i, variant in enumerate(order):
        mine = [r for r in records if r.variant == variant]
        if not mine:
            continue
        row = rows_by_label.get(mine[0].table_row)
        if band and row is not None:
            high = row.high if row.high is not None else row.low
            ax.fill_between([i - 0.4, i + 0.4], row.low, high, color="#ddf4ff", zorder=0, lw=0)
        bounds = {r.bound for r in mine if r.bound is not None}
        for b in bounds:
            ax.hlines(b, i - 0.4, i + 0.4, colors="#cf222e", linestyles="--", lw=1, zorder=1)
        for r in mine:
            y = value(r)
            if y is None:
                continue
            x = i + CORPUS_OFFSETS[corpora.index(r.corpus) % len(CORPUS_OFFSETS)]
            colour, marker = VERDICT_STYLE.get(r.verdict, OTHER_STYLE)
            lo_hi = interval(r)
            if lo_hi:
                ax.vlines(x, lo_hi[0], lo_hi[1], colors=colour, lw=1.2, zorder=2)
            ax.scatter([x], [y], c=colour, marker=marker, s=28, zorder=3, edgecolors="white", linewidths=0.5)


def _legend(ax, verdicts, corpora):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=VERDICT_STYLE.get(v, OTHER_STYLE)[0], marker=VERDICT_STYLE.get(v, OTHER_STYLE)[1],
                      ls="", label=v) for v in verdicts]
    handles.append(Line2D([], [], color="#cf222e", ls="--", label="bound"))
    handles.append(Line2D([], [], color="#ddf4ff", lw=6, label="table's expected range"))
    ax.legend(handles=handles, loc="upper left", fontsize=7, title=f"corpora, left to right: {', '.join(corpora)}",
              title_fontsize=7)


def distribution_figure(records, rows, model: str):
    plt = _pyplot()
    mine = [r for r in records if r.model == model and r.metric in ("relative_perplexity", "kl_divergence")]
    order = _variant_order(mine)
    rows_by_label = {row.describe(): row for row in rows}
    fig, (ppl, kl, size) = plt.subplots(3, 1, figsize=(max(7.0, 0.55 * len(order) + 2), 8.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 3, 1.4]})
    ratios = [r for r in mine if r.metric == "relative_perplexity"]
    _points(ppl, ratios, order, lambda r: r.ratio, lambda r: _interval(r, "ppl"), rows_by_label, band=True)
    ppl.axhline(1.0, color="#57606a", lw=0.8)
    ppl.set_ylabel("perplexity / FP16's")
    ppl.set_title(f"{model}: relative perplexity and KL divergence to FP16 (95% intervals)")
    kls = [r for r in mine if r.metric == "kl_divergence"]
    _points(kl, kls, order, lambda r: r.value if r.value and r.value > 0 else None, lambda r: _interval(r, "kl"),
            rows_by_label, band=False)
    kl.set_yscale("log")
    kl.set_ylabel("mean KL (nats/token)")
    sizes = {r.variant: r.size_bytes for r in mine if r.size_bytes}
    size.bar(range(len(order)), [sizes.get(v, 0) / 1e6 for v in order], color="#8c959f")
    size.set_ylabel("size on disk (MB)")
    size.set_xticks(range(len(order)), [_label(mine, v) for v in order], rotation=60, ha="right", fontsize=7)
    _legend(ppl, sorted({r.verdict for r in mine}), sorted({r.corpus for r in mine}))
    for ax in (ppl, kl, size):
        ax.grid(axis="y", alpha=0.3)
    return fig


def tasks_figure(records, model: str):
    plt = _pyplot()
    mine = [r for r in records if r.model == model and r.metric == "task_score_drop"]
    order = _variant_order(mine)
    tasks = sorted({r.corpus for r in mine})
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * len(order) + 2), 4.5))
    width = 0.8 / max(1, len(tasks))
    for k, task in enumerate(tasks):
        for i, variant in enumerate(order):
            r = next((r for r in mine if r.variant == variant and r.corpus == task), None)
            dist = (r.distribution or {}) if r else {}
            if r is None or dist.get("drop") is None:
                continue
            x = i - 0.4 + width * (k + 0.5)
            colour, _ = VERDICT_STYLE.get(r.verdict, OTHER_STYLE)
            interval = dist.get("drop_interval")
            err = [[dist["drop"] - interval[0]], [interval[1] - dist["drop"]]] if interval else None
            ax.bar(x, dist["drop"], width * 0.9, color=colour, alpha=0.6, hatch=HATCHES[k % len(HATCHES)],
                   edgecolor="#24292f", linewidth=0.4, yerr=err, ecolor="#24292f", capsize=2)
            if r.bound is not None:
                ax.hlines(r.bound, x - width / 2, x + width / 2, colors="#cf222e", linestyles="--", lw=1)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="white", edgecolor="#24292f", hatch=HATCHES[k % len(HATCHES)], label=task)
                       for k, task in enumerate(tasks)], fontsize=7, loc="upper left", title="tasks, left to right",
              title_fontsize=7)
    ax.axhline(0, color="#57606a", lw=0.8)
    ax.set_xticks(range(len(order)), [_label(mine, v) for v in order], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("score drop (FP16 - variant)")
    caps = sorted({f"{r.corpus.removeprefix('task:')} ({r.capability})" for r in mine if r.capability})
    ax.set_title(f"{model}: task score drop per variant; red dashes: the capability's maximum drop\n{'; '.join(caps)}")
    ax.grid(axis="y", alpha=0.3)
    return fig


def gguf_figure(records, model: str):
    """Relative perplexity of each GGUF type (the table's row) under each backend, per corpus."""
    plt = _pyplot()
    mine = [r for r in records if r.model == model and r.format == "gguf" and r.metric == "relative_perplexity"
            and r.ratio is not None]
    types = sorted({r.table_row for r in mine}, key=lambda t: -max(r.bits or 0 for r in mine if r.table_row == t))
    series = defaultdict(dict)
    for r in mine:
        series[(r.backend, r.corpus)][r.table_row] = r
    fig, ax = plt.subplots(figsize=(7, 4))
    backends = sorted({backend for backend, _ in series})
    for (backend, corpus), points in sorted(series.items()):
        xs = [i for i, t in enumerate(types) if t in points]
        k = backends.index(backend)
        ax.plot(xs, [points[types[i]].ratio for i in xs], marker="os^D"[k % 4], ls=("-", "--", ":", "-.")[k % 4],
                label=f"{corpus}, {backend}")
    ax.axhline(1.0, color="#57606a", lw=0.8)
    ax.set_xticks(range(len(types)), [t.split(",")[0] for t in types])
    ax.set_ylabel("perplexity / FP16's")
    ax.set_title(f"{model}: the GGUF ladder under both scoring backends")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return fig


def write_plots(records, rows, out_dir: Path) -> list[Path]:
    """Every figure the records allow, per model, as PNG and SVG in out_dir; returns the files written."""
    plt = _pyplot()
    written = []
    for model in dict.fromkeys(r.model for r in records):
        mine = [r for r in records if r.model == model]
        figures = []
        if any(r.metric in ("relative_perplexity", "kl_divergence") for r in mine):
            figures.append(("quality-distribution", distribution_figure(records, rows, model)))
        if any(r.metric == "task_score_drop" for r in mine):
            figures.append(("quality-tasks", tasks_figure(records, model)))
        if {r.backend for r in mine if r.format == "gguf"} >= {"transformers", "llama.cpp"}:
            figures.append(("quality-gguf-ladder", gguf_figure(records, model)))
        for name, fig in figures:
            written += _save(fig, out_dir, f"{name}-{model}")
            plt.close(fig)
    return written
