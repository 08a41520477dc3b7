"""`quantgate compare OLD.json NEW.json`: what changed between two runs of the gate.

Pairs the records of two `--quality-json` files by (model, variant, corpus or task, metric) and
says, per pair, whether it is a new failure, a fix, another verdict, a value that moved beyond
the metric's tolerance, or unchanged; cases only one run has are added or removed. A pair whose
protocol fingerprints differ measured other things: it is incomparable, named, and its numbers
are not compared. Environment differences between the runs are listed.

Tolerances (a value within them is unchanged; the compared value is the ratio for relative
perplexity, the metric's value otherwise):
- relative perplexity, KL divergence: relative 2^-20, the gate's floating-point tolerance
  (gate.FLOAT_LOG_RATIO_TOL): the same computation on two CPUs differs by less;
- top-1 agreement and task scores: exact, they are counts over the same tokens or items.
Exit status (cli): 1 when a check that passed in OLD fails in NEW, else 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .report import Record, RunReport

PASSING = ("pass", "pass (marginal)")
FAILING = ("FAIL", "REVERSAL", "error")
RELATIVE_TOLERANCE = {"relative_perplexity": 2.0 ** -20, "kl_divergence": 2.0 ** -20}  # others: exact
ORDER = ("new failure", "incomparable", "fixed", "verdict changed", "moved", "added", "removed", "unchanged")


@dataclass(frozen=True)
class Change:
    key: tuple[str, str, str, str]  # model, variant, corpus (or task:name), metric
    kind: str  # one of ORDER
    old: Record | None
    new: Record | None
    detail: str

    @property
    def case(self) -> str:
        return "/".join(self.key)


@dataclass
class RunComparison:
    changes: list[Change] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)  # "package: old -> new"
    profiles: tuple[str, str] = ("", "")

    @property
    def new_failures(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "new failure"]

    def exit_status(self) -> int:
        return 1 if self.new_failures else 0

    def counts(self) -> dict[str, int]:
        return {kind: sum(c.kind == kind for c in self.changes) for kind in ORDER}


def _value(r: Record) -> float | None:
    return r.ratio if r.metric == "relative_perplexity" and r.ratio is not None else r.value


def _same(metric: str, a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    tol = RELATIVE_TOLERANCE.get(metric, 0.0)
    return abs(a - b) <= tol * max(abs(a), abs(b))


def _show(r: Record) -> str:
    v = _value(r)
    text = "-" if v is None else f"{v:.6g}"
    if r.interval:
        text += f" [{r.interval[0]:.6g}, {r.interval[1]:.6g}]"
    elif r.distribution and r.distribution.get("ppl_ratio_interval") and r.metric == "relative_perplexity":
        lo, hi = r.distribution["ppl_ratio_interval"]
        text += f" [{lo:.6g}, {hi:.6g}]"
    return f"{text} ({r.verdict})"


def pair(old: Record | None, new: Record | None) -> Change:
    """One (model, variant, corpus, metric) across the two runs."""
    r = new or old
    key = (r.model, r.variant, r.corpus, r.metric)
    if old is None:
        return Change(key, "added", None, new, f"new case: {_show(new)}")
    if new is None:
        return Change(key, "removed", old, None, f"gone: was {_show(old)}")
    if (old.protocol_fingerprint and new.protocol_fingerprint
            and old.protocol_fingerprint != new.protocol_fingerprint):
        return Change(key, "incomparable", old, new, f"protocol {old.protocol_fingerprint} -> {new.protocol_fingerprint}: "
                      "measured under another protocol, values not compared")
    moved = f"{_show(old)} -> {_show(new)}"
    if old.verdict in PASSING and new.verdict in FAILING:
        return Change(key, "new failure", old, new, moved + (f": {new.detail}" if new.detail else ""))
    if old.verdict in FAILING and new.verdict in PASSING:
        return Change(key, "fixed", old, new, moved)
    if old.verdict != new.verdict:
        return Change(key, "verdict changed", old, new, moved)
    if not _same(r.metric, _value(old), _value(new)):
        return Change(key, "moved", old, new, moved)
    return Change(key, "unchanged", old, new, _show(new))


def compare_runs(old: RunReport, new: RunReport) -> RunComparison:
    def index(report: RunReport) -> dict[tuple, Record]:
        return {(r.model, r.variant, r.corpus, r.metric): r for r in report.records}

    a, b = index(old), index(new)
    keys = list(a) + [k for k in b if k not in a]
    changes = sorted((pair(a.get(k), b.get(k)) for k in keys), key=lambda c: ORDER.index(c.kind))
    env_keys = sorted(set(old.environment) | set(new.environment))
    environment = [f"{k}: {old.environment.get(k, '-')} -> {new.environment.get(k, '-')}"
                   for k in env_keys if old.environment.get(k) != new.environment.get(k)]
    return RunComparison(changes=changes, environment=environment, profiles=(old.profile, new.profile))


def markdown(result: RunComparison, old_name: str, new_name: str) -> str:
    counts = result.counts()
    lines = [f"## quantgate compare: {old_name} -> {new_name}", "",
             ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or "no cases in either run", ""]
    if result.profiles[0] != result.profiles[1]:
        lines += [f"Profiles differ: {result.profiles[0]} -> {result.profiles[1]}.", ""]
    shown = [c for c in result.changes if c.kind != "unchanged"]
    if shown:
        lines += ["| change | case | old -> new |", "|---|---|---|"]
        lines += [f"| {c.kind} | {c.case} | {c.detail.replace('|', '/')} |" for c in shown]
        lines.append("")
    lines.append("Tolerances: relative perplexity and KL divergence, relative 2^-20 (the gate's floating-point "
                 "tolerance); top-1 agreement and task scores, exact.")
    if result.environment:
        lines += ["", "Environment differences (reported, not compared):", *[f"- {e}" for e in result.environment]]
    return "\n".join(lines) + "\n"


def to_json(result: RunComparison) -> str:
    return json.dumps({
        "counts": result.counts(),
        "exit_status": result.exit_status(),
        "profiles": list(result.profiles),
        "environment": result.environment,
        "changes": [{"case": c.case, "model": c.key[0], "variant": c.key[1], "corpus": c.key[2], "metric": c.key[3],
                     "change": c.kind, "old": None if c.old is None else {"value": _value(c.old), "verdict": c.old.verdict,
                                                                         "interval": c.old.interval},
                     "new": None if c.new is None else {"value": _value(c.new), "verdict": c.new.verdict,
                                                        "interval": c.new.interval},
                     "detail": c.detail} for c in result.changes],
    }, indent=2) + "\n"
