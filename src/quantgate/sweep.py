"""`quantgate sweep`: one model's perplexity, FP16 and variants, under a grid of protocols.

The absolute perplexity moves with the scoring rule, the window and the stride (each peer tool
reports another number for the same model and text); the ratio of a variant to FP16 measured under
one protocol moves far less. The sweep shows both, per grid point: the presets (presets.py) at each
`max_length`, and for `hf-sliding` each stride. Each variant's FP16 is scored on the variant's own
backend (llama.cpp variants against the F16 GGUF on llama.cpp), as the gate pairs them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from .backends import get_backend
from .presets import DEFAULT, get_preset


@dataclass(frozen=True)
class GridPoint:
    preset: str
    max_length: int
    stride: int  # hf-sliding's; the other presets have none (recorded as max_length)

    @property
    def label(self) -> str:
        return f"{self.preset} {self.max_length}" + (f"/{self.stride}" if self.preset == DEFAULT else "")


@dataclass(frozen=True)
class SweepRow:
    point: GridPoint
    variant: str  # "reference" for FP16 (on llama.cpp: "reference (llama.cpp)")
    backend: str
    perplexity: float
    tokens: int
    bits_per_byte: float | None
    ratio: float | None  # against FP16 on the same backend and grid point


def grid(presets: Sequence[str], max_lengths: Sequence[int], strides: Sequence[float]) -> list[GridPoint]:
    """Every preset at every max_length; hf-sliding also at every stride, given as a fraction of max_length."""
    points = []
    for name in presets:
        get_preset(name)
        for length in max_lengths:
            if name == DEFAULT:
                points += [GridPoint(name, length, max(1, round(length * f))) for f in strides]
            else:
                points.append(GridPoint(name, length, length))
    return points


def run_sweep(evaluator, model: str, corpus: str, variants: Sequence[str], points: Sequence[GridPoint]) -> list[SweepRow]:
    """Each checkpoint loaded once and scored at every grid point; the reference once per backend used."""
    base = evaluator.settings(model)
    text, tokenizer = evaluator.corpus(corpus), evaluator.reference_tokenizer(model)
    backends = {v: evaluator.backend_of(model, v) for v in variants}
    scored: dict[tuple[str | None, str, GridPoint], tuple] = {}
    for variant, backend in [*((None, b) for b in dict.fromkeys(backends.values())), *backends.items()]:
        loaded = evaluator.checkpoint(model, variant, backend)
        try:
            for point in points:
                settings = replace(base, preset=point.preset, max_length=point.max_length, stride=point.stride)
                rule = get_preset(point.preset)
                stream = rule.stream(text, tokenizer, settings)
                scores = loaded.backend.loglikelihood_rolling(stream.ids, max_length=point.max_length,
                                                              stride=point.stride, batch_size=base.batch_size,
                                                              windows=rule.windows(stream, settings))
                size = rule.text(stream, scores.positions)
                bpb = size.bits_per_byte(float(scores.logprobs.sum())) if size is not None else None
                scored[(variant, backend, point)] = (scores.perplexity, scores.n, bpb)
        finally:
            evaluator.release()
    rows = []
    for point in points:
        for variant, backend in [*((None, b) for b in dict.fromkeys(backends.values())), *backends.items()]:
            ppl, n, bpb = scored[(variant, backend, point)]
            reference = scored[(None, backend, point)][0]
            name = variant or get_backend(backend).label("reference")
            rows.append(SweepRow(point, name, backend,
                                 ppl, n, bpb, None if variant is None else ppl / reference))
    return rows


def markdown(rows: Sequence[SweepRow], *, model: str, corpus: str) -> str:
    """Perplexity per checkpoint and grid point, each variant's ratio beside it, and how far each moves."""
    variants = list(dict.fromkeys(r.variant for r in rows))
    points = list(dict.fromkeys(r.point for r in rows))
    by = {(r.point, r.variant): r for r in rows}
    head = ["protocol", *(f"{v} ppl" for v in variants), *(f"{v} ratio" for v in variants if by[(points[0], v)].ratio is not None)]
    lines = [f"Model `{model}`, corpus `{corpus}`.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [p.label, *(f"{by[(p, v)].perplexity:.4g}" for v in variants),
                 *(f"{by[(p, v)].ratio:.4f}" for v in variants if by[(p, v)].ratio is not None)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| checkpoint | perplexity, lowest to highest | spread | ratio, lowest to highest | spread |",
              "|---|---|---|---|---|"]
    for v in variants:
        ppl = [by[(p, v)].perplexity for p in points]
        ratios = [by[(p, v)].ratio for p in points if by[(p, v)].ratio is not None]
        ratio_cells = (f"{min(ratios):.4f} to {max(ratios):.4f} | {100 * (max(ratios) / min(ratios) - 1):.2f}%"
                       if ratios else "- | -")
        lines.append(f"| {v} | {min(ppl):.4g} to {max(ppl):.4g} | {100 * (max(ppl) / min(ppl) - 1):.1f}% | {ratio_cells} |")
    return "\n".join(lines) + "\n"


def figure(rows: Sequence[SweepRow], out_dir: Path, *, model: str, corpus: str) -> list[Path]:
    """On one scale, in percent: left, each checkpoint's perplexity against its own median over the grid (how far
    the absolute number moves with the protocol); right, each variant's ratio to FP16 minus 1 (how far the ratio
    moves)."""
    from statistics import median

    from .plots import _pyplot, _save

    plt = _pyplot()
    points = list(dict.fromkeys(r.point for r in rows))
    variants = list(dict.fromkeys(r.variant for r in rows))
    by = {(r.point, r.variant): r for r in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    x = range(len(points))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, v in enumerate(variants):  # one colour per checkpoint on both sides
        ppl = [by[(p, v)].perplexity for p in points]
        middle = median(ppl)
        style = dict(marker="o", label=v, color=colors[k % len(colors)])
        left.plot(x, [100 * (q / middle - 1) for q in ppl], **style)
        if by[(points[0], v)].ratio is not None:
            right.plot(x, [100 * (by[(p, v)].ratio - 1) for p in points], **style)
    left.set_ylabel("percent")
    left.set_title(f"{model} on {corpus}: perplexity, % from its median over the grid", fontsize=9)
    right.set_title("ratio to FP16 under the same protocol, % above 1", fontsize=9)
    for ax in (left, right):
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(list(x), [p.label for p in points], rotation=45, ha="right")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths = _save(fig, out_dir, f"sweep-{model}-{corpus}")
    plt.close(fig)
    return paths
