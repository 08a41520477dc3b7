"""Generation tasks scored by exact match: GSM8K-style answers and the demo's next line of code.

Decoding is greedy (deterministic on CPU). A generation ends at max_new_tokens, before a token
the task forbids (the next-line task stops at the first newline), and is then cut at the first
of the task's stop strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class GenerationItem:
    id: str
    prompt: str
    answer: str  # the reference answer, already normalised by the task's extractor


def normalise_number(text: str) -> str:
    value = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", value):
        value = value.split(".")[0]
    return value


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: after '####' if present, else the last number."""
    marked = re.search(r"####\s*(" + NUMBER.pattern + ")", text)
    if marked:
        return normalise_number(marked.group(1))
    numbers = NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


def gsm8k_items(records: Sequence[dict], shots: Sequence[dict] = ()) -> list[GenerationItem]:
    """`gsm8k` (config `main`) schema: question, answer (worked solution ending in '#### N')."""
    prefix = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return [GenerationItem(id=f"gsm8k/{i}", prompt=f"{prefix}Question: {r['question']}\nAnswer:",
                           answer=gsm8k_answer(r["answer"]) or "") for i, r in enumerate(records)]


def line_end_items(records: Sequence[dict]) -> list[GenerationItem]:
    """The demo's code task (fixtures/demo_tasks): preceding lines and the start of the next one;
    write the rest of that line exactly."""
    return [GenerationItem(id=r["id"], prompt=r["context"] + "\n" + r["prefix"], answer=r["answer"].rstrip())
            for r in records]


def rest_of_line(text: str) -> str:
    """A continuation up to the end of its line."""
    return text.split("\n", 1)[0].rstrip()


def newline_token_ids(tokenizer) -> list[int]:
    """Every token id whose text contains a newline (byte-level BPE merges newlines with indentation)."""
    from ..tokencache import newline_ids

    return newline_ids(tokenizer)


def draft_tokens(tokenizer, items: Sequence[GenerationItem], contexts: Sequence[Sequence[int]],
                 drafts: Mapping[str, Any]) -> list[list[int] | None]:
    """Each item's draft text (the reference's answer) as the tokens that would follow its prompt: the ids of
    prompt + draft after the prompt's own when those come first, else the draft's ids alone; None without one."""
    from ..tokencache import encode_texts

    have = [i for i, item in enumerate(items) if isinstance(drafts.get(item.id), str)]
    joined = encode_texts(tokenizer, [items[i].prompt + drafts[items[i].id] for i in have])
    out: list[list[int] | None] = [None] * len(items)
    apart = []  # the prompt's tokens merged with the draft's: the draft tokenized alone
    for i, both in zip(have, joined, strict=True):
        n = len(contexts[i])
        if both[:n] == list(contexts[i]):
            out[i] = both[n:]
        else:
            apart.append(i)
    for i, own in zip(apart, encode_texts(tokenizer, [drafts[items[i].id] for i in apart]), strict=True):
        out[i] = own
    return out


def score_generation(backend, tokenizer, items: Sequence[GenerationItem], *, extract: Callable[[str], Any],
                     max_new_tokens: int, max_length: int, stop_ids: Sequence[int] = (),
                     stop_strings: Sequence[str] = (), batch_size: int = 1,
                     drafts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Greedy outputs, cut and judged. `drafts` (item id -> the reference's output) lets the backend check a
    guessed continuation in one pass instead of decoding it step by step; the outputs are the model's own."""
    from ..tokencache import encode_texts

    contexts = encode_texts(tokenizer, [item.prompt for item in items])
    guesses = draft_tokens(tokenizer, items, contexts, drafts) if drafts else None
    generated = backend.generate_batch(contexts, max_new_tokens=max_new_tokens, max_length=max_length,
                                       stop=list(dict.fromkeys(stop_ids)), batch_size=batch_size,
                                       **({"drafts": guesses} if guesses is not None else {}))
    outputs, correct = [], []
    for item, tokens in zip(items, generated, strict=True):
        text = tokenizer.decode(tokens)
        cut = min([text.index(s) for s in stop_strings if s in text], default=len(text))
        text = text[:cut]
        outputs.append(text)
        correct.append(extract(text) == item.answer)
    return {"ids": [i.id for i in items], "outputs": outputs, "correct": correct,
            "accuracy": sum(correct) / len(correct) if correct else float("nan")}
