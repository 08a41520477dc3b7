"""The built-in task kinds: multiple choice (MMLU, C-Eval, the demo's next-line and cloze tasks),
generation (GSM8K, the demo's line ends) and execution (HumanEval)."""

from __future__ import annotations

from typing import Sequence

from ..tokencache import encode_texts
from .generation import gsm8k_answer, gsm8k_items, line_end_items, newline_token_ids, rest_of_line
from .kinds import ScoredItems, TaskKind, humaneval_render, register_task_kind
from .multiple_choice import ChoiceItem, ceval_items, mmlu_items, next_line_items, with_shots

CHOICE_SCORINGS = ("acc", "acc_norm", "acc_pmi")
# Where a HumanEval completion ends (the Codex paper's stop sequences): the next top-level statement.
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
GSM8K_STOPS = ("\n\nQuestion:", "Question:", "\n\n")


def cloze_items(records: Sequence[dict]) -> list[ChoiceItem]:
    """The demo's prose task: a passage cut before a word, and candidate words (the true one among them)."""
    return [ChoiceItem(id=r["id"], prompt=r["context"], choices=tuple(" " + c for c in r["choices"]),
                       answer=int(r["answer"])) for r in records]


def _render_choice(item: ChoiceItem, shots: Sequence) -> list:
    return [item.id, with_shots(item, shots), list(item.choices), item.answer]


def _score_choices(task, backend, tokenizer, settings) -> ScoredItems:
    from .multiple_choice import score_choices

    out = score_choices(backend, tokenizer, task.items, item_shots=task.shots or None, scoring=task.spec.scoring,
                        max_length=settings.max_length, batch_size=settings.batch_size)
    return ScoredItems(ids=list(out["ids"]), correct=list(out["correct"]), answers=list(out["chosen"]),
                       extra={"chance": out["chance"]})


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _score_line_end(task, backend, tokenizer, settings) -> ScoredItems:
    from .generation import score_generation

    out = score_generation(backend, tokenizer, task.items, extract=rest_of_line, max_new_tokens=task.spec.max_new_tokens,
                           max_length=settings.max_length, stop_ids=[*newline_token_ids(tokenizer), *_eos(tokenizer)],
                           batch_size=settings.batch_size, drafts=task.drafts)
    return ScoredItems(ids=list(out["ids"]), correct=list(out["correct"]), answers=list(out["outputs"]))


def _score_gsm8k(task, backend, tokenizer, settings) -> ScoredItems:
    from .generation import score_generation

    out = score_generation(backend, tokenizer, task.items, extract=gsm8k_answer, max_new_tokens=task.spec.max_new_tokens,
                           max_length=settings.max_length, stop_ids=_eos(tokenizer), stop_strings=GSM8K_STOPS,
                           batch_size=settings.batch_size, drafts=task.drafts)
    return ScoredItems(ids=list(out["ids"]), correct=list(out["correct"]), answers=list(out["outputs"]))


def _humaneval_items(records: Sequence[dict]) -> list[dict]:
    return [{k: r[k] for k in ("task_id", "prompt", "test", "entry_point")} for r in records]


def _score_humaneval(task, backend, tokenizer, settings) -> ScoredItems:
    """Greedy completions cut at the next top-level statement, run against the problem's tests in the sandbox."""
    from .humaneval import execute

    contexts = encode_texts(tokenizer, [problem["prompt"] for problem in task.items])
    completions = []
    for tokens in backend.generate_batch(contexts, max_new_tokens=task.spec.max_new_tokens,
                                         max_length=settings.max_length, stop=_eos(tokenizer),
                                         batch_size=settings.batch_size):
        text = tokenizer.decode(tokens)
        cut = min([text.index(s) for s in HUMANEVAL_STOPS if s in text], default=len(text))
        completions.append(text[:cut])
    problems = {p["task_id"]: p for p in task.items}
    results = execute(problems, [(p["task_id"], c) for p, c in zip(task.items, completions, strict=True)])
    return ScoredItems(ids=[r.task_id for r in results], correct=[r.passed for r in results],
                       answers=[r.outcome.status for r in results], extra={"completions": completions})


for _name, _items in (("mmlu", mmlu_items), ("ceval", ceval_items), ("next_line", next_line_items),
                      ("cloze", cloze_items)):
    register_task_kind(TaskKind(name=_name, scorings=CHOICE_SCORINGS, items=_items, score=_score_choices,
                                render=_render_choice, family="multiple_choice"))
register_task_kind(TaskKind(name="gsm8k", scorings=("exact_match",), items=gsm8k_items, score=_score_gsm8k,
                            generates=True, items_with_shots=lambda records, shots: gsm8k_items(records, shots=shots),
                            family="generation"))
register_task_kind(TaskKind(name="line_end", scorings=("exact_match",), items=line_end_items, score=_score_line_end,
                            generates=True, family="generation"))
register_task_kind(TaskKind(name="humaneval", scorings=("pass@1",), items=_humaneval_items, score=_score_humaneval,
                            render=humaneval_render, takes_shots=False, generates=True, family="execution"))
