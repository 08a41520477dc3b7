"""Bits per byte and word perplexity: the text the scored tokens cover, counted in UTF-8 bytes and words."""

import math

import numpy as np
import pytest
import tinyzoo

from quantgate.corpus import Corpus, TokenizedCorpus, tokenize
from quantgate.textmetrics import TextSize, scored_text, text_size


def _hand_corpus() -> TokenizedCorpus:
    corpus = Corpus(name="t", source="hand", documents=("héllo wörld", "ab cd"), joiner="\n")
    # tokens: "hé" "llo" " wörld" "\n" "ab" " cd"
    return TokenizedCorpus(corpus=corpus, ids=np.arange(6), doc_starts=np.array([0, 4]), tokenizer_sha256="-",
                           char_starts=np.array([0, 2, 5, 11, 12, 14]), char_end=len(corpus.text))


def test_a_hand_counted_case():
    tok = _hand_corpus()
    assert scored_text(tok, np.arange(1, 6)) == ["llo wörld\nab cd"]
    size = text_size(tok, np.arange(1, 6))
    assert size == TextSize(bytes=16, words=4)  # "ö" is two bytes
    assert size.bits_per_byte(-8.0) == pytest.approx(8.0 / (16 * math.log(2)))
    assert size.word_perplexity(-8.0) == pytest.approx(math.exp(2.0))
    # positions in two runs: two pieces, each from its first token to where the next token starts
    assert scored_text(tok, np.array([1, 2, 4])) == ["llo wörld", "ab"]
    assert text_size(tok, np.array([1, 2, 4])) == TextSize(bytes=len("llo wörld".encode()) + 2, words=3)


def test_a_corpus_scored_from_its_first_token_covers_all_its_bytes_and_words(tiny_zoo_template):
    """With BOS prepended every real token is scored (positions 1..n-1): the covered text is the whole text. Under
    a token cap it is the text up to where the first token left out starts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo_template / "models" / "reference")
    docs = (*tinyzoo.CODE_DOCS[:5], "def f(x):\n    return x  # ünïcode ≥ 2", *tinyzoo.PROSE_DOCS[:5], "a b  c\n")
    corpus = Corpus(name="c", source="test", documents=docs, joiner="\n\n")
    whole = tokenize(corpus, tokenizer, add_bos=True, token_cap=None)
    size = text_size(whole, np.arange(1, len(whole.ids)))
    assert size == TextSize(bytes=len(corpus.text.encode("utf-8")), words=len(corpus.text.split()))
    capped = tokenize(corpus, tokenizer, add_bos=False, token_cap=12)
    full = tokenize(corpus, tokenizer, add_bos=False, token_cap=None)
    assert capped.span_text(0, 12) == corpus.text[:int(full.char_starts[12])]
    assert tokenizer.decode(capped.ids) == capped.span_text(0, 12)


def test_no_offsets_no_measures():
    tok = TokenizedCorpus(corpus=Corpus("t", "hand", ("a",), ""), ids=np.arange(1), doc_starts=np.array([0]),
                          tokenizer_sha256="-")
    assert text_size(tok, np.arange(1)) is None
    assert TextSize(bytes=0, words=0).bits_per_byte(-1.0) is None and TextSize(0, 0).word_perplexity(-1.0) is None
