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


def _drafted(backend, contexts, drafts, **kwargs):
    """generate_batch with drafts, counting the model's forward passes and decoding calls."""
    calls = {"generate": 0}
    generate = backend.model.generate

    def counting(*args, **kw):
        calls["generate"] += 1
        return generate(*args, **kw)

    backend.model.generate = counting
    try:
        return backend.generate_batch(contexts, drafts=drafts, **kwargs), calls["generate"]
    finally:
        del backend.model.generate


def test_drafts_change_no_output_and_a_right_one_needs_no_decoding(tiny):
    """Drafts checked in one pass (speculative decoding's check) give what plain greedy decoding gives, whatever
    they are: the model's own continuation, one wrong from a token on, empty, too long, random ids or absent.
    A right draft ends without a single decoding step."""
    backend, tok = tiny.backend, tiny.tokenizer
    prompts = ["def f3(x, y):\n    total =", "The river", "import numpy as np\nx = np.", "a", "class A:\n    def"]
    contexts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stop = tok("\n", add_special_tokens=False)["input_ids"]
    kwargs = dict(max_new_tokens=6, max_length=64, stop=stop)
    for batch_size in (1, 3):
        plain = backend.generate_batch(contexts, batch_size=batch_size, **kwargs)
        assert _drafted(backend, contexts, plain, batch_size=batch_size, **kwargs) == (plain, 0)
        rng = np.random.default_rng(batch_size)
        wrong = [p[:1] + [(p[1] + 1) % len(tok)] + p[2:] if len(p) > 1 else [] for p in plain]
        others = [wrong, [[] for _ in plain], [p + p + p for p in plain], [None, *plain[1:]],
                  [list(rng.integers(0, len(tok), size=4)) for _ in plain]]
        for drafts in others:
            assert _drafted(backend, contexts, drafts, batch_size=batch_size, **kwargs)[0] == plain


def test_settling_a_draft_keeps_its_tokens_while_they_are_the_models():
    from quantgate.backends.hf import _settle

    # best[k] is the model's top token after draft[:k]
    assert _settle([5, 6, 9], [5, 6], max_new_tokens=4, stop=[9]) == ([5, 6], True)  # draft, then a stop token
    assert _settle([5, 7, 9], [5, 6], max_new_tokens=4, stop=[9]) == ([5, 7], False)  # off the draft at 6: decode on
    assert _settle([5, 6, 8], [5, 6], max_new_tokens=4, stop=[9]) == ([5, 6, 8], False)  # past the draft
    assert _settle([5, 6, 8], [5, 6], max_new_tokens=2, stop=[9]) == ([5, 6], True)  # the budget reached
    assert _settle([5, 7], [5, 6], max_new_tokens=2, stop=[9]) == ([5, 7], True)  # the budget reached off the draft
    assert _settle([9], [], max_new_tokens=4, stop=[9]) == ([], True)


def test_drafts_are_not_used_where_a_decoding_step_is_not_the_top_token(tiny):
    """A generation config that moves a step off the top token (here a suppressed token; a repetition penalty
    likewise) makes the draft check wrong, so such a model decodes step by step: the output is the config's."""
    backend, tok = tiny.backend, tiny.tokenizer
    contexts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("The river", "a b a b a")]
    kwargs = dict(max_new_tokens=6, max_length=64, stop=tok("\n", add_special_tokens=False)["input_ids"], batch_size=2)
    plain = backend.generate_batch(contexts, **kwargs)
    backend.model.generation_config.suppress_tokens = [plain[0][0]]
    try:
        suppressed = backend.generate_batch(contexts, **kwargs)
        assert suppressed[0][0] != plain[0][0]
        assert _drafted(backend, contexts, plain, **kwargs) == (suppressed, 1)
    finally:
        backend.model.generation_config.suppress_tokens = None


def test_scored_generation_with_the_references_answers_as_drafts(tiny):
    """score_generation with drafts (item id -> the reference's output text): the same outputs as without."""
    backend, tok = tiny.backend, tiny.tokenizer
    items = [GenerationItem(f"g{n}", p, "") for n, p in enumerate(["def f3(x, y):\n    tot", "The riv", "import nu"])]
    kwargs = dict(extract=rest_of_line, max_new_tokens=5, max_length=64,
                  stop_ids=tok("\n", add_special_tokens=False)["input_ids"], batch_size=2)
    plain = score_generation(backend, tok, items, **kwargs)
    drafts = dict(zip(plain["ids"], plain["outputs"], strict=True))
    assert score_generation(backend, tok, items, drafts=drafts, **kwargs) == plain
    assert score_generation(backend, tok, items, drafts={"g0": "zzz", "g2": 3}, **kwargs) == plain
