"""The acceptability table (data, not code) and how a variant's bound is chosen."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import QuantgateError

VERDICTS = ("Yes", "Usually", "Marginal", "Problematic")


@dataclass(frozen=True)
class TableRow:
    label: str
    format: str
    bits: int
    expected: str
    low: float
    high: float | None  # None: open-ended range, no bound
    acceptable: str
    max_kl: float | None = None  # mean KL divergence (lower bound, top-k + rest) to FP16
    min_top1: float | None = None  # share of tokens whose most likely next token is FP16's

    def describe(self) -> str:
        return f"{self.label}, expected {self.expected}, acceptable: {self.acceptable}"


@dataclass(frozen=True)
class Bound:
    value: float | None
    source: str  # "table", "manifest variant", "manifest model"
    row: TableRow | None


def load_table(path: Path | None = None) -> list[TableRow]:
    text = Path(path).read_text() if path else resources.files("quantgate").joinpath("data/acceptability.toml").read_text()
    where = path or "quantgate/data/acceptability.toml"
    rows = []
    for i, raw in enumerate(tomllib.loads(text).get("row", [])):
        try:
            row = TableRow(label=raw["label"], format=raw["format"], bits=int(raw["bits"]),
                           expected=raw["expected"], low=float(raw["low"]),
                           high=float(raw["high"]) if "high" in raw else None, acceptable=raw["acceptable"],
                           max_kl=float(raw["max_kl"]) if "max_kl" in raw else None,
                           min_top1=float(raw["min_top1"]) if "min_top1" in raw else None)
        except KeyError as exc:
            raise QuantgateError(f"{where}: row {i} lacks {exc}") from None
        if row.acceptable not in VERDICTS:
            raise QuantgateError(f"{where}: row {i} has acceptable={row.acceptable!r}, not one of {VERDICTS}")
        rows.append(row)
    keys = [(r.format, r.bits) for r in rows]
    if len(set(keys)) != len(keys):
        raise QuantgateError(f"{where}: (format, bits) repeats")
    return rows


def load_capabilities(path: Path | None = None) -> dict[str, float]:
    """capability -> maximum task-score drop (absolute points, 0.05 = five), from the table's [capability.*]."""
    text = Path(path).read_text() if path else resources.files("quantgate").joinpath("data/acceptability.toml").read_text()
    where = path or "quantgate/data/acceptability.toml"
    out = {}
    for name, entry in tomllib.loads(text).get("capability", {}).items():
        drop = entry.get("max_drop") if isinstance(entry, dict) else None
        if not isinstance(drop, (int, float)) or isinstance(drop, bool) or not 0 <= drop <= 1:
            raise QuantgateError(f"{where}: [capability.{name}] needs max_drop between 0 and 1, got {drop!r}")
        out[name] = float(drop)
    return out


def drop_bound(capabilities: dict[str, float], capability: str, variant_override: dict[str, float]) -> Bound:
    """The largest task-score drop allowed for a capability: variant override, then the table."""
    if capability in variant_override:
        return Bound(variant_override[capability], f"manifest variant max_drop[{capability!r}]", None)
    if capability not in capabilities:
        raise QuantgateError(f"the acceptability table sets no max_drop for capability {capability!r}; add "
                             f"[capability.{capability}] to it or give the variant max_drop = {{ {capability} = ... }}")
    return Bound(capabilities[capability], f"acceptability table [capability.{capability}]", None)


def find_row(rows: list[TableRow], fmt: str, bits: int) -> TableRow | None:
    return next((r for r in rows if r.format == fmt and r.bits == bits), None)


def choose_bound(rows: list[TableRow], fmt: str, bits: int, *, variant_override: float | None,
                 model_overrides: dict[str, float]) -> Bound:
    """Variant override, then model override ("format/bits"), then the table's upper end."""
    row = find_row(rows, fmt, bits)
    if variant_override is not None:
        return Bound(float(variant_override), "manifest variant max_ratio", row)
    key = f"{fmt}/{bits}"
    if key in model_overrides:
        return Bound(model_overrides[key], f"manifest model thresholds[{key!r}]", row)
    if row is None:
        raise QuantgateError(
            f"the acceptability table has no row for format {fmt!r} at {bits} bits; "
            f"give the variant a max_ratio in quantgate.toml")
    return Bound(row.high, "acceptability table", row)


def distribution_bound(row: TableRow | None, metric: str, variant_override: float | None) -> Bound:
    """The KL divergence ("max_kl") or top-1 agreement ("min_top1") bound: variant override, then table row."""
    if variant_override is not None:
        return Bound(float(variant_override), f"manifest variant {metric}", row)
    return Bound(None if row is None else getattr(row, metric, None), "acceptability table", row)
