"""A manifest task end to end: its records loaded through `datasets`, turned into items, scored.

A task's protocol is everything that changes its score: the rendered prompts (template and shots
included), choices and answers, the scoring rule, the token budget, the tokenizer and the
backend, dtype and device class. Its fingerprint is compared with the baseline's, like a
corpus protocol: a task scored differently is refused, never compared.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import QuantgateError
from ..manifest import CorpusSpec, ProtocolSettings, TaskSpec
from ..protocol import TaskProtocol
from .kinds import task_kind

TASK_RULE = "per-item-correctness/greedy/v1"  # bump when scoring code changes what a score means


@dataclass(frozen=True)
class LoadedTask:
    spec: TaskSpec
    source: str  # datasets builder / hub id, split, files (as for corpora)
    items: tuple[Any, ...]  # ChoiceItem | GenerationItem | a HumanEval problem dict
    shots: tuple[Any, ...] = ()
    # What the reference answered, by item id (its task baseline's answers), when a variant is scored against
    # one. Not part of the protocol: a kind may use them to go faster (generation checks them as drafts), never
    # to change an outcome.
    drafts: Mapping[str, Any] | None = None

    @property
    def ids(self) -> list[str]:
        return [item_id(i) for i in self.items]


def item_id(item) -> str:
    return item["task_id"] if isinstance(item, dict) else item.id


def _records(spec: CorpusSpec, split: str) -> list[dict]:
    import datasets

    from ..corpus import CorpusUnavailable, describe_source, resolve_data_files

    datasets.disable_progress_bars()
    kwargs: dict = {"path": spec.path, "split": split}
    if spec.config:
        kwargs["name"] = spec.config
    if spec.revision:
        kwargs["revision"] = spec.revision
    try:
        if spec.data_files:
            kwargs["data_files"] = resolve_data_files(spec)
        return list(datasets.load_dataset(**kwargs))
    except (FileNotFoundError, ConnectionError, ValueError) as exc:
        raise CorpusUnavailable(f"task {spec.name!r} could not be loaded ({describe_source(spec)}, split {split!r}): "
                                f"{exc}") from exc
    except CorpusUnavailable as exc:
        raise CorpusUnavailable(f"task {spec.name!r}: {str(exc).split(': ', 1)[-1]}") from exc


def _items(spec: TaskSpec, records: Sequence[dict], shots: Sequence[dict] | None = None) -> list:
    """Records -> items by the task's kind (tasks/kinds.py); shots kept inside the items when the kind says so."""
    kind = task_kind(spec.schema)
    try:
        if shots is not None:
            return kind.items_with_shots(records, shots)
        return kind.items(records)
    except (KeyError, ValueError, TypeError) as exc:
        raise QuantgateError(f"records do not follow the {spec.schema!r} schema: {type(exc).__name__} {exc}") from None


def load_task(spec: TaskSpec, item_cap: int | None = None) -> LoadedTask:
    from ..corpus import describe_source

    records = _records(spec.source, spec.source.split)
    cap = min(x for x in (spec.limit, item_cap, len(records)) if x is not None)
    try:
        items = _items(spec, records[:cap])
        shots: list = []
        if spec.shots:
            shot_records = _records(spec.source, spec.shots_split)
            if task_kind(spec.schema).items_with_shots is not None:  # e.g. GSM8K's worked solutions, kept whole
                items = _items(spec, records[:cap], shot_records[:spec.shots])
            else:
                shots = _shots_for(spec, items, _items(spec, shot_records))
    except QuantgateError as exc:
        raise QuantgateError(f"task {spec.name!r} ({describe_source(spec.source)}): {exc}") from None
    if not items:
        raise QuantgateError(f"task {spec.name!r} ({describe_source(spec.source)}) has no items")
    ids = [item_id(i) for i in items]
    if len(set(ids)) != len(ids):
        raise QuantgateError(f"task {spec.name!r}: item ids repeat; per-item comparison needs unique ids")
    return LoadedTask(spec=spec, source=describe_source(spec.source), items=tuple(items), shots=tuple(shots))


def _shots_for(spec: TaskSpec, items: list, pool: list) -> list:
    """One list of solved examples per item: the first `shots` of the pool from the item's subject
    (MMLU ids are "subject/n"), else the first `shots` of the pool."""
    if len(pool) < spec.shots:
        raise QuantgateError(f"split {spec.shots_split!r} has {len(pool)} examples for {spec.shots} shots")
    by_subject: dict[str, list] = {}
    for s in pool:
        by_subject.setdefault(s.id.split("/")[0], []).append(s)
    out = []
    for item in items:
        same = by_subject.get(item.id.split("/")[0], [])
        out.append(tuple(same[:spec.shots]) if len(same) >= spec.shots else tuple(pool[:spec.shots]))
    return out


def rendered(task: LoadedTask) -> list:
    """What the model is shown and what counts as right, item by item (the fingerprint's input)."""
    render = task_kind(task.spec.schema).render
    return [render(item, task.shots[n] if task.shots else ()) for n, item in enumerate(task.items)]


def task_protocol(task: LoadedTask, *, tokenizer_sha256: str, settings: ProtocolSettings, backend: str,
                  dtype: str, device_class: str, kernels: str = "") -> TaskProtocol:
    spec = task.spec
    items_sha = hashlib.sha256(json.dumps(rendered(task), ensure_ascii=False).encode()).hexdigest()
    return TaskProtocol(task=spec.name, schema=spec.schema, source=task.source, items=len(task.items),
                        items_sha256=items_sha, shots=spec.shots, scoring=spec.scoring, max_length=settings.max_length,
                        max_new_tokens=spec.max_new_tokens if task_kind(spec.schema).generates else None,
                        tokenizer_sha256=tokenizer_sha256, backend=backend, dtype=dtype, device_class=device_class,
                        rule=TASK_RULE, kernels=kernels)


@dataclass
class TaskResult:
    task: str
    capability: str
    ids: list[str]
    correct: list[bool]
    answers: list[Any]  # chosen index (multiple choice), output text (generation), execution status (code)
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_task(task: LoadedTask, backend, tokenizer, settings: ProtocolSettings,
             drafts: Mapping[str, Any] | None = None) -> TaskResult:
    """Score every item of a task with one loaded model, as its kind says. Greedy decoding: deterministic on CPU.
    `drafts`: the reference's answers by item id (LoadedTask.drafts)."""
    from dataclasses import replace

    if drafts is not None:
        task = replace(task, drafts=dict(drafts))
    spec = task.spec
    started = time.perf_counter()
    out = task_kind(spec.schema).score(task, backend, tokenizer, settings)
    return TaskResult(task=spec.name, capability=spec.capability, ids=list(out.ids),
                      correct=[bool(c) for c in out.correct], answers=list(out.answers),
                      seconds=time.perf_counter() - started, extra=out.extra)
