"""Per variant, what a run spends besides scoring: its checks' wall time (JUnit) minus its scoring time (the
records' eval_seconds, once per corpus measurement and per task). Loading, audits, hashing, tokenizing and the
checks' own work are what remains; the recipe builds happen before the checks and are not counted.

    pytest -m quality quality_tests -p no:cacheprovider --quality-profile fast \
        --junitxml /tmp/fast.xml --quality-json /tmp/fast.json
    python benchmarks/fixed_cost.py /tmp/fast.xml /tmp/fast.json [the run's output, for its per-run costs]

Given the run's output (`... > run.log 2>&1`), it also lists what each process paid once for all its variants
before the first check: the "quantgate: prepared" lines (the reference tokenizers and the corpora's token ids).
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def wall_by_variant(junit: str) -> dict[str, float]:
    wall: dict[str, float] = defaultdict(float)
    for case in ET.parse(junit).getroot().iter("testcase"):
        m = re.search(r"\[([^/\]]+)/([^/\]]+)/", case.get("name", ""))
        if m:
            wall[f"{m.group(1)}/{m.group(2)}"] += float(case.get("time", 0))
    return dict(wall)


def scoring_by_variant(report: str) -> dict[str, float]:
    seen, scoring = set(), defaultdict(float)
    for r in json.load(open(report))["records"]:
        key = (r["model"], r["variant"], r["corpus"])
        if r.get("eval_seconds") is None or key in seen:
            continue
        seen.add(key)
        scoring[f"{r['model']}/{r['variant']}"] += r["eval_seconds"]
    return dict(scoring)


def per_run(log: str) -> list[str]:
    """The preparation lines of a run's output: one per process (an xdist worker's carry its [gwN])."""
    return [line.strip() for line in open(log, errors="replace") if "quantgate: prepared" in line]


def main(junit: str, report: str, log: str | None = None) -> None:
    wall, scoring = wall_by_variant(junit), scoring_by_variant(report)
    rows = sorted((v, wall[v], scoring.get(v, 0.0)) for v in wall)
    print(f"{'variant':40} {'checks':>8} {'scoring':>8} {'fixed':>7}")
    for v, w, s in rows:
        print(f"{v:40} {w:8.2f} {s:8.2f} {w - s:7.2f}")
    fixed = sorted(w - s for _, w, s in rows)
    print(f"fixed cost per variant: median {fixed[len(fixed) // 2]:.2f} s, largest {fixed[-1]:.2f} s, "
          f"{sum(f <= 3 for f in fixed)} of {len(fixed)} at most 3 s")
    if log is not None:
        print("paid once per process, before its first check:")
        for line in per_run(log):
            print(f"  {line}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
