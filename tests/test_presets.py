"""Protocol presets: each peer's perplexity loop, transcribed from its own code, against the gate's preset.

The oracles below are the peers' loops written out plainly (one forward per window or chunk, straight torch);
the gate's presets run on its engine (batched windows, output layer only where needed). They must agree to
1e-6 relative on the tiny model. tox's `peers` env runs the real lm-evaluation-harness and llama-perplexity.
"""

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import tinyzoo

from quantgate.corpus import Corpus
from quantgate.perplexity import Window
from quantgate.presets import PRESETS, get_preset, special_prefix


@pytest.fixture(scope="module")
def tiny(tiny_zoo_template):
    from quantgate.checkpoints.loading import load_checkpoint

    return load_checkpoint(tiny_zoo_template / "models" / "reference", fmt="fp16", dtype="float32", device="cpu",
                           what="tiny")


@pytest.fixture(scope="module")
def corpus():
    docs = (*tinyzoo.CODE_DOCS[:6], "", "x = 1  # ünïcode\n", *tinyzoo.PROSE_DOCS[:6])
    return Corpus(name="mix", source="test", documents=docs, joiner="\n")


@pytest.fixture(scope="module", params=["own", "with-bos"])
def tokenizer(request, tiny):
    """The tiny tokenizer as it is (no special tokens by default, as GPT-2's), and one that adds a BOS (as Llama's)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    if request.param == "own":
        return tiny.tokenizer
    tok = copy.deepcopy(tiny.tokenizer)
    bos = tok.convert_ids_to_tokens(tok.bos_token_id)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    assert special_prefix(tok) == [tok.bos_token_id]
    return tok


def _settings(**kw):
    base = dict(max_length=32, stride=16, add_bos=False, token_cap=None, batch_size=3, preset="hf-sliding")
    return SimpleNamespace(**{**base, **kw})


def _gate(tiny, tokenizer, corpus, settings):
    preset = get_preset(settings.preset)
    stream = preset.stream(corpus, tokenizer, settings)
    windows = preset.windows(stream, settings)
    scores = tiny.backend.loglikelihood_rolling(stream.ids, max_length=settings.max_length, stride=settings.stride,
                                                batch_size=settings.batch_size, windows=windows)
    return scores, preset.text(stream, scores.positions)


def _logprobs(model, ids):
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.as_tensor([ids])).logits[0].double(), dim=-1)


def test_the_presets_are_registered_and_hf_sliding_keeps_the_rule_of_every_stored_baseline():
    from quantgate.protocol import SCORING_RULE

    assert set(PRESETS) == {"hf-sliding", "lm-eval", "gptq-paper", "llama.cpp"}
    assert get_preset("hf-sliding").rule == SCORING_RULE  # the fingerprints of today's baselines do not move
    assert len({p.rule for p in PRESETS.values()}) == 4


def test_windows_small_enough_to_check_by_hand():
    from quantgate.presets import _chunks

    # gptq-paper: 10 tokens, seqlen 4 -> two chunks, each scoring its last 3 tokens; tokens 8 and 9 are dropped
    assert _chunks(10, 4, 1) == [Window(0, 4, 1), Window(4, 8, 5)]
    # llama.cpp: n_ctx 4 -> first = 2: each chunk scores its token 3 (predicted by 2)
    assert _chunks(10, 4, 4 // 2 + 1) == [Window(0, 4, 3), Window(4, 8, 7)]


def test_lm_eval_windows_follow_its_rolling_windows_made_disjoint():
    """A document of 10 tokens behind a prefix at position 0, max_length 4: the first window reads the prefix and
    3 tokens and scores 4; the next score 4 and 2 more, each reading the 4 tokens before its last target."""
    from quantgate.corpus import TokenizedCorpus
    from quantgate.presets import _lmeval_windows

    stream = TokenizedCorpus(corpus=Corpus("c", "t", ("d",), "\n"), ids=np.arange(11), doc_starts=np.array([0]),
                             tokenizer_sha256="-")
    windows = _lmeval_windows(stream, _settings(max_length=4))
    assert windows == [Window(0, 5, 1), Window(4, 9, 5), Window(6, 11, 9)]
    assert [t for w in windows for t in range(w.score_from, w.end)] == list(range(1, 11))  # every token once


def _lm_eval_oracle(model, tokenizer, docs, max_length):
    """lm_eval.utils.get_rolling_token_windows(context_len=1) + make_disjoint_window, then HFLM's
    `(context + continuation)[-(max_length + 1):][:-1]` input, per document; word and byte counts per document."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total, tokens, words, size = 0.0, 0, 0, 0
    for doc in docs:
        toks = tokenizer(doc, add_special_tokens=False)["input_ids"]
        words += len(re.split(r"\s+", doc))
        size += len(doc.encode("utf-8"))
        pairs, predicted = [], 0
        if toks:
            first = min(max_length, len(toks))
            pairs.append(([prefix] + toks[:first - 1], toks[:first]))
            predicted = first
        while predicted < len(toks):
            n = min(len(toks) - predicted, max_length)
            end = predicted + n
            pairs.append((toks[end - max_length - 1:end - 1], toks[end - n:end]))
            predicted += n
        for context, continuation in pairs:
            context = context[:len(context) - (len(continuation) - 1)]
            inputs = (context + continuation)[-(max_length + 1):][:-1]
            rows = _logprobs(model, inputs)[-len(continuation):]
            total += float(rows[range(len(continuation)), continuation].sum())
            tokens += len(continuation)
    return total, tokens, words, size


def _gptq_oracle(model, tokenizer, docs, seqlen):
    """IST-DASLab/gptq llama.py `llama_eval`: nsamples = numel // seqlen; mean loss of each chunk (its first token
    unscored) times seqlen; ppl = exp(sum / (nsamples * seqlen))."""
    ids = tokenizer("\n\n".join(docs))["input_ids"]
    nlls = []
    for i in range(len(ids) // seqlen):
        batch = ids[i * seqlen:(i + 1) * seqlen]
        rows = _logprobs(model, batch)[:-1]
        loss = -float(rows[range(seqlen - 1), batch[1:]].mean())
        nlls.append(loss * seqlen)
    return math.exp(sum(nlls) / (len(nlls) * seqlen))


def _llamacpp_oracle(model, tokenizer, text, n_ctx):
    """llama.cpp tools/perplexity `perplexity()`: tokens with the vocabulary's BOS; n_chunk = n_tokens / n_ctx; the
    chunk's first token overwritten by BOS when the vocabulary adds one; logits j in [n_ctx/2, n_ctx - 1) scored."""
    tokens = tokenizer(text)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    nll, count, first = 0.0, 0, n_ctx // 2
    for i in range(len(tokens) // n_ctx):
        batch = tokens[i * n_ctx:(i + 1) * n_ctx]
        if add_bos:
            batch[0] = tokenizer.bos_token_id
        rows = _logprobs(model, batch)
        for j in range(first, n_ctx - 1):
            nll -= float(rows[j, tokens[i * n_ctx + j + 1]])
            count += 1
    return math.exp(nll / count)


def test_lm_eval_preset_matches_its_loop(tiny, tokenizer, corpus):
    scores, text = _gate(tiny, tokenizer, corpus, _settings(preset="lm-eval"))
    total, tokens, words, size = _lm_eval_oracle(tiny.model, tokenizer, corpus.documents, 32)
    assert scores.n == tokens
    assert scores.logprobs.sum() == pytest.approx(total, rel=1e-6)
    assert (text.words, text.bytes) == (words, size)  # the empty document counts one word, as re.split gives
    assert text.word_perplexity(scores.logprobs.sum()) == pytest.approx(math.exp(-total / words), rel=1e-6)


def test_gptq_paper_preset_matches_its_loop(tiny, tokenizer, corpus):
    scores, _ = _gate(tiny, tokenizer, corpus, _settings(preset="gptq-paper"))
    assert scores.perplexity == pytest.approx(_gptq_oracle(tiny.model, tokenizer, corpus.documents, 32), rel=1e-6)


def test_llama_cpp_preset_matches_its_loop(tiny, tokenizer, corpus):
    scores, _ = _gate(tiny, tokenizer, corpus, _settings(preset="llama.cpp"))
    assert scores.perplexity == pytest.approx(_llamacpp_oracle(tiny.model, tokenizer, corpus.text, 32), rel=1e-6)


def test_llama_cpp_preset_overwrites_each_chunk_start_with_bos_when_the_tokenizer_adds_one(tokenizer, corpus):
    preset = get_preset("llama.cpp")
    stream = preset.stream(corpus, tokenizer, _settings(preset="llama.cpp"))
    plain = tokenizer(corpus.text, add_special_tokens=False)["input_ids"]
    starts = stream.ids[::32][:len(stream.ids) // 32].tolist()
    if special_prefix(tokenizer):
        assert set(starts) == {tokenizer.bos_token_id} and stream.ids[1:32].tolist() == plain[:31]
    else:
        assert stream.ids.tolist() == plain
    short = Corpus(name="short", source="test", documents=("a b c",), joiner="\n")
    with pytest.raises(Exception, match="at least 2 x max_length"):
        preset.stream(short, tokenizer, _settings(preset="llama.cpp"))


def test_the_presets_give_different_perplexities_of_one_model_and_text(tiny, tokenizer, corpus):
    """The point of naming them: the same model and text, four numbers."""
    values = {name: _gate(tiny, tokenizer, corpus, _settings(preset=name))[0].perplexity for name in PRESETS}
    assert len({round(v, 6) for v in values.values()}) == 4, values
