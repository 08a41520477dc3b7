"""Multiple-choice tasks scored by log-likelihood (lm-evaluation-harness style).

Each item is a prompt and its choices; the model picks the choice whose continuation it finds
most likely: raw (sum of log-probs, `acc`), divided by the continuation's length in bytes
(`acc_norm`), or minus the choice's log-likelihood after a neutral prompt (`acc_pmi`, pointwise
mutual information: it stops generic, frequent continuations from winning by being frequent).
k-shot prompts put k solved examples (from a separate split) before the question.
The number of shots, the template and the scoring rule are part of the task's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .. import progress

LETTERS = "ABCD"
SCORING_RULES = ("acc", "acc_norm", "acc_pmi")
NEUTRAL_PROMPT = "\n"  # the acc_pmi baseline context


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    prompt: str  # the question as the model sees it, without shots
    choices: tuple[str, ...]  # continuations appended to the prompt
    answer: int


def mmlu_items(records: Sequence[dict]) -> list[ChoiceItem]:
    """`cais/mmlu` schema: question, subject, choices (4 strings), answer (index)."""
    items = []
    for i, r in enumerate(records):
        body = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, r["choices"], strict=True))
        subject = str(r.get("subject", "")).replace("_", " ")
        items.append(ChoiceItem(id=f"{r.get('subject', 'mmlu')}/{i}",
                                prompt=f"The following is a question about {subject}.\n\n{r['question']}\n{body}\nAnswer:",
                                choices=tuple(f" {letter}" for letter in LETTERS), answer=int(r["answer"])))
    return items


def ceval_items(records: Sequence[dict]) -> list[ChoiceItem]:
    """`ceval/ceval-exam` schema (its `val` split: the test split has no public answers):
    id, question, A, B, C, D, answer (a letter), explanation."""
    items = []
    for r in records:
        body = "\n".join(f"{letter}. {r[letter]}" for letter in LETTERS)
        items.append(ChoiceItem(id=str(r["id"]), prompt=f"{r['question']}\n{body}\n答案：",
                                choices=tuple(LETTERS), answer=LETTERS.index(str(r["answer"]).strip())))
    return items


def next_line_items(records: Sequence[dict]) -> list[ChoiceItem]:
    """The demo's code task (fixtures/demo_tasks): preceding lines, and candidate next lines."""
    return [ChoiceItem(id=r["id"], prompt=r["context"], choices=tuple("\n" + c for c in r["choices"]),
                       answer=int(r["answer"])) for r in records]


def with_shots(item: ChoiceItem, shots: Sequence[ChoiceItem]) -> str:
    solved = "".join(f"{s.prompt}{s.choices[s.answer]}\n\n" for s in shots)
    return solved + item.prompt


def fingerprint(items: Sequence[ChoiceItem], *, shots: int, template: str, scoring: str) -> str:
    digest = hashlib.sha256(json.dumps({"items": [[i.id, i.prompt, list(i.choices), i.answer] for i in items],
                                        "shots": shots, "template": template, "scoring": scoring},
                                       ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def score_choices(backend, tokenizer, items: Sequence[ChoiceItem], *, shots: Sequence[ChoiceItem] = (),
                  item_shots: Sequence[Sequence[ChoiceItem]] | None = None, scoring: str = "acc", max_length: int,
                  batch_size: int) -> dict[str, Any]:
    """Per item: the chosen index and whether it is right. The prompt is encoded once per item and each
    choice separately, so every model sees the very same ids. `shots` go before every item;
    `item_shots` gives each item its own (MMLU: examples of the item's subject)."""
    if scoring not in SCORING_RULES:
        raise ValueError(f"scoring must be one of {SCORING_RULES}, got {scoring!r}")
    from ..tokencache import encode_texts

    prompts = [with_shots(item, item_shots[n] if item_shots is not None else shots) for n, item in enumerate(items)]
    contexts = encode_texts(tokenizer, prompts)
    choices = iter(encode_texts(tokenizer, [c for item in items for c in item.choices]))
    groups = [(context, [next(choices) for _ in item.choices]) for context, item in zip(contexts, items, strict=True)]
    # the context forwarded once per item, shared by its choices (backends/hf.py)
    results = backend.loglikelihood_grouped(groups, max_length=max_length, batch_size=batch_size)
    scores = np.array([ll for group in results for ll, _ in group])
    if scoring == "acc_pmi":  # every choice under the one neutral prompt: one group, each distinct choice once
        (neutral,) = encode_texts(tokenizer, [NEUTRAL_PROMPT])
        distinct = list(dict.fromkeys(tuple(c) for _, conts in groups for c in conts))
        with progress.quiet():  # not an item of the task
            (prior,) = backend.loglikelihood_grouped([(neutral, [list(c) for c in distinct])], max_length=max_length,
                                                     batch_size=batch_size)
        by_choice = dict(zip(distinct, (ll for ll, _ in prior), strict=True))
        scores = scores - np.array([by_choice[tuple(c)] for _, conts in groups for c in conts])
    if scoring == "acc_norm":
        lengths = np.array([len(c.encode("utf-8")) for item in items for c in item.choices], dtype=np.float64)
        scores = scores / lengths
    chosen, start = [], 0
    for item in items:
        chosen.append(int(np.argmax(scores[start:start + len(item.choices)])))
        start += len(item.choices)
    correct = [c == item.answer for c, item in zip(chosen, items, strict=True)]
    return {"ids": [i.id for i in items], "chosen": chosen, "correct": correct,
            "accuracy": float(np.mean(correct)) if correct else float("nan"),
            "chance": float(np.mean([1 / len(i.choices) for i in items])) if items else float("nan")}
