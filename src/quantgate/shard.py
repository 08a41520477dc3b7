"""Shards across machines: `--quality-shard K/N` runs a deterministic part of the cases, whole variants at a
time, and `quantgate merge` joins the shards' JSON reports into one summary, one JSON and one exit status.

Assignment: every (model, variant) goes to one shard, the most expensive first to the least loaded shard (ties:
the lower shard). A variant's cost is its measured time in a previous run's JSON (`--quality-shard-times`,
load and scoring of its checks) when that run has it, else its number of checks; so the same cases, manifest
and times always give the same shards, on every machine of a CI matrix.

A shard's JSON records which shard it is, every case of the whole run and of its own part, the commit and the
manifest's hash: `merge` refuses shards that are missing, repeated, from another commit or manifest, or that
do not partition the run's cases.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import QuantgateError

SPEC = re.compile(r"(\d+)/(\d+)")


@dataclass(frozen=True)
class ShardSpec:
    index: int  # 1-based
    count: int

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        match = SPEC.fullmatch(text.strip())
        if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
            raise QuantgateError(f"--quality-shard {text!r}: use K/N with 1 <= K <= N (e.g. 2/4)")
        return cls(int(match.group(1)), int(match.group(2)))


def group_name(group: tuple[str, str]) -> str:
    return f"{group[0]}/{group[1]}"


def measured_costs(path: Path | None) -> dict[str, float]:
    """Seconds per "model/variant" in a previous run's JSON (the load once, every check's scoring)."""
    if path is None:
        return {}
    try:
        records = json.loads(Path(path).read_text())["records"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QuantgateError(f"--quality-shard-times {path}: not a quantgate JSON report ({exc})") from None
    costs: dict[str, float] = {}
    loads: dict[str, float] = {}
    for r in records:
        name = f"{r.get('model')}/{r.get('variant')}"
        costs[name] = costs.get(name, 0.0) + float(r.get("eval_seconds") or 0.0)
        loads[name] = max(loads.get(name, 0.0), float(r.get("load_seconds") or 0.0))
    return {name: costs[name] + loads[name] for name in costs}


def assign(groups: dict[str, int], count: int, costs: dict[str, float]) -> dict[str, int]:
    """Shard (1-based) of every group; `groups` maps a group to its number of checks."""
    weight = {g: costs.get(g, float(n)) for g, n in groups.items()}
    load = [0.0] * count
    out: dict[str, int] = {}
    for g in sorted(groups, key=lambda g: (-weight[g], g)):
        shard = min(range(count), key=lambda k: (load[k], k))
        out[g] = shard + 1
        load[shard] += weight[g]
    return out


def manifest_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shard_record(spec: ShardSpec, assignment: dict[str, int], manifest: Path, root: Path) -> dict[str, Any]:
    """What a shard's JSON says about itself (RunReport.shard)."""
    from .baselines import git_state

    return {"index": spec.index, "count": spec.count, "all_cases": sorted(assignment),
            "cases": sorted(g for g, k in assignment.items() if k == spec.index),
            "manifest_sha256": manifest_sha256(manifest), **git_state(root)}


def check_shards(shards: Iterable[tuple[Path, dict[str, Any]]]) -> None:
    """Refuse a set of shard reports that cannot be one run: named by file, with what is wrong."""
    shards = list(shards)
    missing = [str(p) for p, doc in shards if not doc.get("shard")]
    if missing:
        raise QuantgateError(f"not a shard's report (run with --quality-shard K/N): {', '.join(missing)}")
    first_path, first = shards[0][0], shards[0][1]["shard"]
    for path, doc in shards[1:]:
        s = doc["shard"]
        for key, words in (("count", "shard count"), ("git_commit", "commit"), ("manifest_sha256", "manifest"),
                           ("all_cases", "cases")):
            if s.get(key) != first.get(key):
                raise QuantgateError(f"{path} and {first_path} come from different runs: their {words} differ "
                                     f"({_short(s.get(key))} vs {_short(first.get(key))})")
        if doc.get("profile") != shards[0][1].get("profile"):
            raise QuantgateError(f"{path} and {first_path}: profiles differ ({doc.get('profile')} vs "
                                 f"{shards[0][1].get('profile')})")
    seen: dict[int, Path] = {}
    for path, doc in shards:
        k = doc["shard"]["index"]
        if k in seen:
            raise QuantgateError(f"shard {k}/{first.get('count')} given twice: {seen[k]} and {path}")
        seen[k] = path
    count = first["count"]
    absent = sorted(set(range(1, count + 1)) - set(seen))
    if absent:
        raise QuantgateError(f"shard(s) {', '.join(f'{k}/{count}' for k in absent)} missing: a merge needs "
                             "every shard of the run")
    covered = [c for _, doc in shards for c in doc["shard"]["cases"]]
    if sorted(covered) != sorted(first["all_cases"]):
        raise QuantgateError("the shards' cases do not partition the run's cases")


def merged_status(statuses: list[int]) -> int:
    """One run's exit status from its shards': a failure anywhere fails it, else the first other non-zero one
    (125, cannot test here, under --quality-bisect), else 0."""
    if 1 in statuses:
        return 1
    return next((s for s in statuses if s != 0), 0)


def _short(value) -> str:
    text = str(value)
    return text[:12] if isinstance(value, str) else (text[:60] + "..." if len(text) > 60 else text)
