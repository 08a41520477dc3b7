"""Task loaders on the real schemas (local copies) and the scoring rules, on the tiny model."""

import json

import numpy as np
import pytest

from quantgate.tasks.generation import GenerationItem, gsm8k_answer, gsm8k_items, rest_of_line, score_generation
from quantgate.tasks.multiple_choice import ChoiceItem, ceval_items, fingerprint, mmlu_items, score_choices

MMLU = [{"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"],
         "answer": 1}]
CEVAL = [{"id": 0, "question": "1+1等于几？", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B", "explanation": ""}]
GSM8K = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
         {"question": "A shirt costs $1,200. Two cost?", "answer": "2 * 1200 = 2400\n#### 2,400"}]


def load_local(tmp_path, name, records):
    """Through `datasets`, as a user's local copy of the hub dataset would be read."""
    from datasets import load_dataset

    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return list(load_dataset("json", data_files=str(path), split="train"))


def test_mmlu_and_ceval_schemas_become_lettered_questions(tmp_path):
    (m,) = mmlu_items(load_local(tmp_path, "mmlu", MMLU))
    assert m.prompt.endswith("What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:") and "elementary mathematics" in m.prompt
    assert (m.choices, m.answer) == ((" A", " B", " C", " D"), 1)
    (c,) = ceval_items(load_local(tmp_path, "ceval", CEVAL))
    assert c.prompt == "1+1等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：" and (c.choices, c.answer) == (("A", "B", "C", "D"), 1)


def test_gsm8k_answers_are_extracted_and_normalised(tmp_path):
    items = gsm8k_items(load_local(tmp_path, "gsm8k", GSM8K))
    assert [i.answer for i in items] == ["7", "2400"]
    assert gsm8k_answer("so she pays $2,400.") == "2400" and gsm8k_answer("7.0 apples") == "7"
    assert gsm8k_answer("no number here") is None
    shot = gsm8k_items(GSM8K[1:], shots=GSM8K[:1])[0]
    assert shot.prompt.startswith("Question: Tom has") and shot.prompt.endswith("Two cost?\nAnswer:")


def test_fingerprint_covers_shots_template_and_scoring():
    items = [ChoiceItem("a", "q", ("x", "y"), 0)]
    base = fingerprint(items, shots=0, template="t", scoring="acc")
    assert len({base, fingerprint(items, shots=5, template="t", scoring="acc"),
                fingerprint(items, shots=0, template="u", scoring="acc"),
                fingerprint(items, shots=0, template="t", scoring="acc_norm")}) == 4


@pytest.fixture(scope="module")
def tiny(tiny_zoo_template):
    from quantgate.checkpoints.loading import load_checkpoint

    return load_checkpoint(tiny_zoo_template / "models" / "reference", fmt="fp16", dtype="float32", device="cpu",
                           what="tiny")


def test_the_models_own_continuation_wins_and_is_generated(tiny):
    backend, tok = tiny.backend, tiny.tokenizer
    prompt = "def f3(x, y):\n    total ="
    own = tok.decode(backend.generate_until(tok(prompt, add_special_tokens=False)["input_ids"], max_new_tokens=4,
                                            max_length=64))
    item = ChoiceItem("own", prompt, (own, own + " river river"), 0)  # a strict extension adds negative log-probs
    for scoring in ("acc", "acc_norm", "acc_pmi"):
        result = score_choices(backend, tok, [item], scoring=scoring, max_length=64, batch_size=2)
        assert result["ids"] == ["own"] and result["chance"] == 0.5
        if scoring == "acc":
            assert result["correct"] == [True]  # raw sums: the extension can only be less likely
    gen = score_generation(backend, tok, [GenerationItem("g", prompt, rest_of_line(own))], extract=rest_of_line,
                           max_new_tokens=4, max_length=64)
    assert gen["correct"] == [True] and gen["accuracy"] == 1.0


def test_scoring_is_deterministic(tiny):
    items = [ChoiceItem(str(i), f"In the year {1900 + i} the river", (" rose", " fell", " sang"), 0) for i in range(6)]
    runs = [score_choices(tiny.backend, tiny.tokenizer, items, scoring="acc_pmi", max_length=64, batch_size=4)
            for _ in range(2)]
    assert runs[0] == runs[1] and np.isfinite(runs[0]["accuracy"])


def _shared_context_groups(tok):
    groups = []
    for n, prompt in enumerate(["def f3(x, y):\n    total =", "The river", "import numpy as np\nx = np.", "a"]):
        context = tok(prompt, add_special_tokens=False)["input_ids"]
        conts = [tok(c, add_special_tokens=False)["input_ids"] for c in (" x", " y + 1", " river river river", "\n")]
        groups.append((context, conts[: 2 + n % 3]))
    long_context = tok("word " * 80, add_special_tokens=False)["input_ids"]
    groups.append((long_context, [tok(" end", add_special_tokens=False)["input_ids"]]))
    # many continuations of one context (acc_pmi's neutral prompt): scored in parts of similar length
    many = [tok(" " + "x" * (1 + k % 7) + " y" * (k % 5), add_special_tokens=False)["input_ids"] for k in range(75)]
    groups.append((tok("\n", add_special_tokens=False)["input_ids"], many))
    return groups


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_shared_context_scores_as_the_plain_requests_do(tiny, attention):
    """loglikelihood_grouped (each context and its continuations packed in one row under a 4-D mask, boolean for
    SDPA, additive for eager attention) against loglikelihood on each (context, continuation): the same
    log-likelihoods within 1e-5, the same greedy flags; a group that does not fit in max_length takes the plain
    path (cut from the left)."""
    from quantgate.backends.hf import TransformersBackend

    tiny.backend.model.set_attn_implementation(attention)
    try:
        backend, tok = TransformersBackend(tiny.backend.model, "cpu"), tiny.tokenizer
        groups = _shared_context_groups(tok)
        _assert_as_plain(backend, groups)
        assert backend._packs is True
    finally:
        tiny.backend.model.set_attn_implementation("sdpa")


def test_a_model_that_ignores_the_packing_mask_gets_plain_requests(tiny, monkeypatch):
    """An attention that ignores a 4-D mask (FlashAttention's) would let a packed continuation see the ones before
    it: the first packed group is checked against the plain path, and on a mismatch the backend warns and scores
    every continuation with its own copy of the context."""
    import torch

    from quantgate.backends import hf

    # a plain causal mask over the whole row, as an attention that drops the 4-D mask would apply
    monkeypatch.setattr(hf, "_mask", lambda model, visible: torch.ones(visible.shape[0], visible.shape[-1]))
    backend = hf.TransformersBackend(tiny.backend.model, "cpu")
    groups = _shared_context_groups(tiny.tokenizer)
    with pytest.warns(UserWarning, match="does not honour a 4-D mask"):
        _assert_as_plain(backend, groups)
    assert backend._packs is False


def _assert_as_plain(backend, groups):
    from quantgate.backends.base import ScoringBackend

    for batch_size in (1, 3):
        shared = backend.loglikelihood_grouped(groups, max_length=64, batch_size=batch_size)
        plain = ScoringBackend.loglikelihood_grouped(backend, groups, max_length=64, batch_size=batch_size)
        assert [len(g) for g in shared] == [len(c) for _, c in groups]
        for got, want in zip(shared, plain, strict=True):
            assert [g for _, g in got] == [w for _, w in want]
            assert np.allclose([v for v, _ in got], [v for v, _ in want], rtol=0, atol=1e-5)


def test_decoding_side_by_side_gives_each_row_what_it_gets_alone(tiny):
    """generate_batch (left-padded rows, each ending at its own stop token) against generate_until per context."""
    backend, tok = tiny.backend, tiny.tokenizer
    prompts = ["def f3(x, y):\n    total =", "The river", "import numpy as np\nx = np.", "a", "class A:\n    def"]
    contexts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stop = tok("\n", add_special_tokens=False)["input_ids"]
    alone = [backend.generate_until(c, max_new_tokens=6, max_length=64, stop=stop) for c in contexts]
    for batch_size in (2, 5):
        assert backend.generate_batch(contexts, max_new_tokens=6, max_length=64, stop=stop,
                                      batch_size=batch_size) == alone
