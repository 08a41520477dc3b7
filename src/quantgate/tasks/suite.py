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
from typing import Any, Sequence

from ..errors import QuantgateError
from ..manifest import CorpusSpec, ProtocolSettings, TaskSpec
from ..protocol import fingerprint_of
from .generation import GenerationItem, gsm8k_answer, gsm8k_items, line_end_items, newline_token_ids, rest_of_line
from .multiple_choice import ChoiceItem, ceval_items, mmlu_items, next_line_items, with_shots

TASK_RULE = "per-item-correctness/greedy/v1"  # bump when scoring code changes what a score means
# Where a HumanEval completion ends (the Codex paper's stop sequences): the next top-level statement.
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
GSM8K_STOPS = ("\n\nQuestion:", "Question:", "\n\n")


@dataclass(frozen=True)
class LoadedTask:
    spec: TaskSpec
    source: str  # datasets builder / hub id, split, files (as for corpora)
    items: tuple[Any, ...]  # ChoiceItem | GenerationItem | a HumanEval problem dict
    shots: tuple[Any, ...] = ()

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


def _cloze_items(records: Sequence[dict]) -> list[ChoiceItem]:
    """The demo's prose task: a passage cut before a word, and candidate words (the true one among them)."""
    return [ChoiceItem(id=r["id"], prompt=r["context"], choices=tuple(" " + c for c in r["choices"]),
                       answer=int(r["answer"])) for r in records]


def _build(schema: str, records: Sequence[dict]) -> list:
    try:
        if schema == "mmlu":
            return mmlu_items(records)
        if schema == "ceval":
            return ceval_items(records)
        if schema == "next_line":
            return next_line_items(records)
        if schema == "cloze":
            return _cloze_items(records)
        if schema == "line_end":
            return line_end_items(records)
        if schema == "humaneval":
            return [{k: r[k] for k in ("task_id", "prompt", "test", "entry_point")} for r in records]
        if schema == "gsm8k":
            return gsm8k_items(records)
    except (KeyError, ValueError, TypeError) as exc:
        raise QuantgateError(f"records do not follow the {schema!r} schema: {type(exc).__name__} {exc}") from None
    raise ValueError(f"unknown task schema {schema!r}")


def load_task(spec: TaskSpec, item_cap: int | None = None) -> LoadedTask:
    from ..corpus import describe_source

    records = _records(spec.source, spec.source.split)
    cap = min(x for x in (spec.limit, item_cap, len(records)) if x is not None)
    try:
        items = _build(spec.schema, records[:cap])
        shots: list = []
        if spec.shots:
            shot_records = _records(spec.source, spec.shots_split)
            if spec.schema == "gsm8k":  # solved examples are worked solutions, kept whole in the prompt
                items = gsm8k_items(records[:cap], shots=shot_records[:spec.shots])
            else:
                shots = _shots_for(spec, items, _build(spec.schema, shot_records))
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
    out = []
    for n, item in enumerate(task.items):
        if isinstance(item, ChoiceItem):
            prompt = with_shots(item, task.shots[n] if task.shots else ())
            out.append([item.id, prompt, list(item.choices), item.answer])
        elif isinstance(item, GenerationItem):
            out.append([item.id, item.prompt, item.answer])
        else:
            out.append([item["task_id"], item["prompt"], hashlib.sha256(item["test"].encode()).hexdigest()[:16]])
    return out


def task_protocol(task: LoadedTask, *, tokenizer_sha256: str, settings: ProtocolSettings, backend: str,
                  dtype: str, device_class: str, kernels: str = "") -> dict[str, Any]:
    spec = task.spec
    items_sha = hashlib.sha256(json.dumps(rendered(task), ensure_ascii=False).encode()).hexdigest()
    return {"task": spec.name, "schema": spec.schema, "source": task.source, "items": len(task.items),
            "items_sha256": items_sha, "shots": spec.shots, "scoring": spec.scoring,
            "max_length": settings.max_length,
            "max_new_tokens": spec.max_new_tokens if spec.kind != "multiple_choice" else None,
            "tokenizer_sha256": tokenizer_sha256, "backend": backend, "dtype": dtype, "device_class": device_class,
            "rule": TASK_RULE, **({"kernels": kernels} if kernels else {})}


def task_fingerprint(protocol: dict[str, Any]) -> str:
    return fingerprint_of(protocol)


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


def run_task(task: LoadedTask, backend, tokenizer, settings: ProtocolSettings) -> TaskResult:
    """Score every item of a task with one loaded model. Greedy decoding: deterministic on CPU."""
    from .generation import score_generation
    from .multiple_choice import score_choices

    spec = task.spec
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if spec.kind == "multiple_choice":
        out = score_choices(backend, tokenizer, task.items, item_shots=task.shots or None, scoring=spec.scoring,
                            max_length=settings.max_length, batch_size=settings.batch_size)
        answers = out["chosen"]
        extra["chance"] = out["chance"]
    elif spec.kind == "generation":
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        if spec.schema == "line_end":
            out = score_generation(backend, tokenizer, task.items, extract=rest_of_line,
                                   max_new_tokens=spec.max_new_tokens, max_length=settings.max_length,
                                   stop_ids=[*newline_token_ids(tokenizer), *eos])
        else:
            out = score_generation(backend, tokenizer, task.items, extract=gsm8k_answer,
                                   max_new_tokens=spec.max_new_tokens, max_length=settings.max_length,
                                   stop_ids=eos, stop_strings=GSM8K_STOPS)
        answers = out["outputs"]
    else:
        from .humaneval import execute

        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        completions = []
        for problem in task.items:
            context = tokenizer(problem["prompt"], add_special_tokens=False)["input_ids"]
            text = tokenizer.decode(backend.generate_until(context, max_new_tokens=spec.max_new_tokens,
                                                           max_length=settings.max_length, stop=eos))
            cut = min([text.index(s) for s in HUMANEVAL_STOPS if s in text], default=len(text))
            completions.append(text[:cut])
        problems = {p["task_id"]: p for p in task.items}
        results = execute(problems, [(p["task_id"], c) for p, c in zip(task.items, completions, strict=True)])
        out = {"ids": [r.task_id for r in results], "correct": [r.passed for r in results]}
        answers = [r.outcome.status for r in results]
        extra["completions"] = completions
    return TaskResult(task=spec.name, capability=spec.capability, ids=list(out["ids"]),
                      correct=[bool(c) for c in out["correct"]], answers=list(answers),
                      seconds=time.perf_counter() - started, extra=extra)
