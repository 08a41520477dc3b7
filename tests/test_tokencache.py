"""Token ids cached per (tokenizer definition, text): the same ids as the tokenizer's, kept across processes,
never shared between tokenizers that cut text differently, and safe when several processes fill one cache."""

import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from quantgate import tokencache

REFERENCE = Path(__file__).parents[1] / "fixtures" / "demo_zoo" / "reference"
TEXTS = ["def f(x):\n    return x + 1\n", "import os", "", "    \n\n  # comment", "In the beginning"]


@pytest.fixture
def cache(tmp_path):
    previous = tokencache.root()
    tokencache.use(tmp_path / "cache")
    tokencache.clear_memory()
    yield tmp_path / "cache"
    tokencache.use(previous)
    tokencache.clear_memory()


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REFERENCE)


class _Refusing:
    """A tokenizer with the demo's definition that fails if asked to tokenize anything."""

    def __init__(self, tokenizer):
        self.backend_tokenizer = tokenizer.backend_tokenizer
        self.split_special_tokens = getattr(tokenizer, "split_special_tokens", None)

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized again: the cache was not used")

    def __len__(self):
        raise AssertionError("asked for its vocabulary again: the cache was not used")




def _refusing(tokenizer):
    cls = type(type(tokenizer).__name__, (_Refusing,), {})
    return cls(tokenizer)


def test_ids_are_the_tokenizers_own_and_a_new_process_reads_them_from_disk(cache):
    tok = _tokenizer()
    expected = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert tokencache.encode_texts(tok, TEXTS) == expected
    assert list(cache.rglob("*.npz")), "nothing was written to the cache directory"
    tokencache.clear_memory()  # as a new process starts
    assert tokencache.encode_texts(_refusing(tok), TEXTS) == expected


def test_a_corpus_keeps_its_ids_and_document_starts(cache):
    from quantgate.corpus import Corpus, tokenize

    tok = _tokenizer()
    corpus = Corpus(name="c", source="test", documents=tuple(TEXTS * 20), joiner="\n\n")
    first = tokenize(corpus, tok, add_bos=False, token_cap=None)
    tokencache.clear_memory()
    again = tokenize(corpus, tok, add_bos=False, token_cap=None)
    enc = tok(corpus.text, add_special_tokens=False)["input_ids"]
    assert first.ids.tolist() == enc == again.ids.tolist()
    assert np.array_equal(first.doc_starts, again.doc_starts)


def test_the_newline_ids_match_decoding_every_token(cache):
    tok = _tokenizer()
    assert tokencache.newline_ids(tok) == [i for i in range(len(tok)) if "\n" in tok.decode([i])]
    tokencache.clear_memory()
    assert tokencache.newline_ids(_refusing(tok)) == [i for i in range(len(tok)) if "\n" in tok.decode([i])]


def test_a_tokenizer_that_splits_differently_never_reads_anothers_entry(cache):
    from tokenizers import normalizers

    tok = _tokenizer()
    other = _tokenizer()
    other.backend_tokenizer.normalizer = normalizers.Lowercase()  # same vocabulary, different cut
    text = ["In The Beginning GOD"]
    assert tokencache.definition(tok) != tokencache.definition(other)
    ours = tokencache.encode_texts(tok, text)
    theirs = tokencache.encode_texts(other, text)
    assert theirs == [other(text[0], add_special_tokens=False)["input_ids"]] and theirs != ours


def test_a_damaged_entry_is_computed_again_and_replaced(cache):
    tok = _tokenizer()
    expected = tokencache.encode_texts(tok, TEXTS)
    (entry,) = cache.rglob("*.npz")
    entry.write_bytes(entry.read_bytes()[:20])
    tokencache.clear_memory()
    assert tokencache.encode_texts(tok, TEXTS) == expected
    tokencache.clear_memory()
    assert tokencache.encode_texts(_refusing(tok), TEXTS) == expected  # the replacement reads back


def test_without_a_cache_directory_nothing_is_written(tmp_path):
    previous = tokencache.root()
    tokencache.use(None)
    try:
        tok = _tokenizer()
        assert tokencache.encode_texts(tok, TEXTS) == [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    finally:
        tokencache.use(previous)
    assert not list(tmp_path.rglob("*.npz"))


def _fill(root: str) -> list:
    tokencache.use(Path(root))
    return tokencache.encode_texts(_tokenizer(), TEXTS * 50)


def test_processes_filling_one_cache_at_once_leave_one_readable_entry(cache):
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_fill, [str(cache)] * 6)
    assert all(r == results[0] for r in results)
    entries = list(cache.rglob("*.npz"))
    assert len(entries) == 1 and not list(cache.rglob("*.tmp"))
    tokencache.clear_memory()
    assert tokencache.encode_texts(_refusing(_tokenizer()), TEXTS * 50) == results[0]
