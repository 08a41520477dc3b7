"""Task kinds: a registry. A manifest task's `schema` names its kind.

A kind says how a dataset's records become items, what the model is shown and what counts as right
(the task protocol's fingerprint is taken over that), which scoring rules it accepts, and how a
loaded model scores the items (`score` returns per-item ids, correctness and answers). Everything
else (loading the records, item caps, the baseline, the paired comparison, the verdict, the
report) is the same for every kind, so a team's own task kind is one `register_task_kind` call, in
a module the manifest names under `[quantgate] plugins`:

    from quantgate.tasks.kinds import ScoredItems, TaskKind, register_task_kind
    register_task_kind(TaskKind(name="my_kind", scorings=("acc",), items=my_items, score=my_score))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import QuantgateError


@dataclass
class ScoredItems:
    ids: list[str]
    correct: list[bool]
    answers: list[Any]  # chosen index (multiple choice), output text (generation), execution status (code)
    extra: dict[str, Any] = field(default_factory=dict)


def _render_item(item, shots: Sequence) -> list:
    """An item with .id, .prompt and .answer (and .choices when it has them)."""
    choices = getattr(item, "choices", None)
    return [item.id, item.prompt, *([list(choices)] if choices is not None else []), item.answer]


@dataclass(frozen=True)
class TaskKind:
    name: str  # the manifest's `schema`
    scorings: tuple[str, ...]  # accepted `scoring` values; the first is the default
    items: Callable[[Sequence[dict]], list]  # dataset records -> items (each with an `id`, or a dict's "task_id")
    score: Callable[..., ScoredItems]  # (task, backend, tokenizer, settings) -> per-item outcome
    render: Callable[[Any, Sequence], list] = _render_item  # (item, its shots) -> what the fingerprint covers
    takes_shots: bool = True
    generates: bool = False  # its protocol records max_new_tokens
    items_with_shots: Callable[[Sequence[dict], Sequence[dict]], list] | None = None  # shots kept inside the items
    family: str = "custom"  # "multiple_choice", "generation" or "execution" for the built-in kinds


_REGISTRY: dict[str, TaskKind] = {}


def register_task_kind(kind: TaskKind) -> TaskKind:
    if kind.name in _REGISTRY and _REGISTRY[kind.name] is not kind:
        raise QuantgateError(f"task kind {kind.name!r} is already registered")
    if not kind.scorings:
        raise QuantgateError(f"task kind {kind.name!r} declares no scoring rule")
    _REGISTRY[kind.name] = kind
    return kind


def _builtins() -> None:
    from . import builtin_kinds  # noqa: F401  (registers the built-in kinds)


def task_kind(name: str) -> TaskKind:
    _builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QuantgateError(f"no task kind {name!r} is registered (known: {', '.join(sorted(_REGISTRY))})") from None


def task_kind_names() -> tuple[str, ...]:
    _builtins()
    return tuple(_REGISTRY)


def humaneval_render(item: dict, shots: Sequence) -> list:
    return [item["task_id"], item["prompt"], hashlib.sha256(item["test"].encode()).hexdigest()[:16]]
