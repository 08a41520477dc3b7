"""What a run reports: one record per (variant, corpus, metric), as JSON and as Markdown (rendered by render.py)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import render


@dataclass
class Record:
    model: str
    variant: str
    corpus: str
    metric: str
    format: str
    bits: int | None
    verdict: str  # pass / pass (marginal) / FAIL / xfail (problematic) / REVERSAL / cannot test / error
    value: float | None = None
    baseline: float | None = None
    ratio: float | None = None
    bound: float | None = None
    bound_source: str | None = None
    table_row: str | None = None
    higher_is_better: bool = False
    protocol_fingerprint: str | None = None
    tokens_scored: int | None = None
    backend: str | None = None
    kernels: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # how the corpus reached the variant: "own", or "reference (...)" (the variant's option)
    group_size: int | None = None
    desc_act: bool | None = None
    scheme: str | None = None
    outlier_handling: str | None = None
    calibration: str | None = None
    size_bytes: int | None = None
    bits_per_weight: float | None = None  # size on disk x 8 / parameters of the FP16 reference
    load_seconds: float | None = None
    eval_seconds: float | None = None
    detail: str | None = None
    note: str | None = None  # reported without failing: a small significant reversal, a noisy exceedance
    interval: list[float] | None = None  # 95% interval of `value` (KL / top-1 records)
    distribution: dict[str, Any] | None = None  # paired statistics against FP16 (stats.PairedComparison)
    capability: str | None = None  # task records: what the task's score stands for
    placement: dict[str, Any] | None = None  # where its layers went (device_map, offload, n_gpu_layers): not protocol
    # relative perplexity records: the text the scored tokens cover, and per side (fp16, variant) the
    # tokenizer-independent measures on it (textmetrics.py); reported, not gated
    text: dict[str, int] | None = None  # {"bytes", "words"}
    bits_per_byte: dict[str, float | None] | None = None  # {"fp16", "variant"}
    word_perplexity: dict[str, float | None] | None = None  # {"fp16", "variant"}
    calibration_overlap: float | None = None  # share of the corpus's n-grams in the variant's calibration text
    # relative perplexity records: per scoring window, tokens and sums of NLL_variant - NLL_fp16 and of KL
    # (stats.window_sums), so that two variants pair window by window wherever their records meet (ablation.py)
    windows: dict[str, list] | None = None


@dataclass
class RunReport:
    profile: str
    device: str
    records: list[Record] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    environment_changes: dict[str, list[str]] = field(default_factory=dict)  # baseline path -> changes
    builds: dict[str, str] = field(default_factory=dict)  # "model/variant" -> how its build differs from the recorded one
    shard: dict[str, Any] | None = None  # --quality-shard: which part of which run (shard.py), and its exit status

    def to_json(self) -> str:
        from . import __version__

        return json.dumps({
            "quantgate": __version__, "profile": self.profile, "device": self.device,
            "environment": self.environment, "environment_changes": self.environment_changes, "builds": self.builds,
            **({"shard": self.shard} if self.shard is not None else {}),
            "records": [asdict(r) for r in self.records],
        }, indent=2) + "\n"

    def markdown(self) -> str:
        return render.markdown(self)

    def excerpt_markdown(self) -> str:
        return render.excerpt_markdown(self.records)

    def acceptability_markdown(self, rows) -> str:
        return render.acceptability_markdown(self.records, rows)

    def capabilities_markdown(self, max_drops: dict[str, float]) -> str:
        return render.capabilities_markdown(self.records, max_drops)

    @classmethod
    def from_json(cls, text: str) -> "RunReport":
        doc = json.loads(text)
        fields = set(Record.__dataclass_fields__)
        return cls(profile=doc["profile"], device=doc["device"], environment=doc.get("environment", {}),
                   environment_changes=doc.get("environment_changes", {}), builds=doc.get("builds", {}),
                   shard=doc.get("shard"),
                   records=[Record(**{k: v for k, v in r.items() if k in fields}) for r in doc["records"]])

    def write(self, json_path: Path | None, markdown_path: Path | None) -> None:
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(self.to_json())
        text = self.markdown()
        if markdown_path:
            Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
            Path(markdown_path).write_text(text)
        step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if step_summary:
            with open(step_summary, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")


def replace_marked_section(document: str, marker: str, body: str) -> str:
    """Replace the text between <!-- marker:start --> and <!-- marker:end --> (markers kept)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in document or end not in document:
        raise ValueError(f"markers {start} ... {end} not found")
    head, rest = document.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body.rstrip()}\n{end}{tail}"
