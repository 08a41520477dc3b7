"""Protocol presets: the perplexity rule of a tool users already trust, run on the gate's own engine.

A preset says how a corpus becomes the token stream the model reads and which windows of it are
scored; `max_length` is the rule's window (its `max_length`, `seqlen` or `n_ctx`). The preset's
rule is recorded in the protocol (`scoring_rule`), so each preset has its own baselines.

- `hf-sliding` (the default): the Hugging Face "Perplexity of fixed-length models" recipe. The
  corpus's documents joined by its joiner, tokenized whole; windows of `max_length` tokens every
  `stride` tokens, each scoring only the tokens the previous one did not (perplexity.py).
- `lm-eval`: lm-evaluation-harness's `loglikelihood_rolling` as its `wikitext` task runs it. Each
  document tokenized alone without special tokens; the first window reads the prefix token (BOS,
  else EOS) and the document's first `max_length - 1` tokens and scores its first `max_length`;
  the next windows score the following `max_length` tokens each, reading the `max_length` tokens
  before their last one (`get_rolling_token_windows` with `context_len=1`, then
  `make_disjoint_window`). Words and bytes are counted on each original document
  (`len(re.split(r"\\s+", doc))`, UTF-8 bytes), as the task's `process_results` does.
- `gptq-paper`: the GPTQ and AWQ repositories' WikiText-2 loop. The documents joined by "\\n\\n",
  tokenized whole with the tokenizer's own special tokens (one BOS for a Llama tokenizer); disjoint
  chunks of `max_length` (`seqlen`) tokens with no context across chunks, each chunk's first token
  unscored, the tokens after the last whole chunk dropped. Their `exp(sum(loss * seqlen) /
  (nsamples * seqlen))` is the token-weighted mean, since every chunk scores `seqlen - 1` tokens.
- `llama.cpp`: the `llama-perplexity` tool. The corpus's text tokenized whole with the tokenizer's
  own special tokens; chunks of `max_length` (`n_ctx`) tokens, at least two; when the tokenizer adds
  a BOS, it overwrites each chunk's first token; the tokens of each chunk's second half are scored,
  each from everything before it in its chunk.

docs/concepts.md ("Protocol presets") links each peer's file and function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .corpus import Corpus, TokenizedCorpus, encode_long, tokenize, tokenizer_fingerprint
from .errors import QuantgateError
from .perplexity import Window, plan_windows
from .protocol import SCORING_RULE
from .textmetrics import TextSize, text_size

DEFAULT = "hf-sliding"


@dataclass(frozen=True)
class Preset:
    name: str
    rule: str  # the protocol's scoring_rule: a baseline is compared only with measurements under the same rule
    stream: Callable[..., TokenizedCorpus]  # (corpus, tokenizer, settings) -> the ids the model reads
    windows: Callable[..., list[Window]]  # (stream, settings) -> the scored windows over them
    text: Callable[..., TextSize | None] = text_size  # (stream, scored positions) -> bytes and words covered
    peer: str = ""


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is registered twice")
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise QuantgateError(f"unknown protocol preset {name!r}; the presets are {sorted(PRESETS)}")
    return PRESETS[name]


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by default (a Llama tokenizer's BOS; none for GPT-2's)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def _whole(corpus: Corpus, tokenizer, prefix: list[int], token_cap: int | None) -> TokenizedCorpus:
    """The text tokenized whole, `prefix` before it, cut at the token cap; offsets kept for the text measures."""
    tokens = tokenize(corpus, tokenizer, add_bos=False, token_cap=None)
    ids = np.concatenate([np.asarray(prefix, dtype=np.int64), tokens.ids]).astype(np.int64)
    starts = np.concatenate([np.zeros(len(prefix), np.int64), tokens.char_starts]).astype(np.int64)
    doc_starts = tokens.doc_starts + len(prefix)
    if token_cap is not None:
        ids, starts, doc_starts = ids[:token_cap], starts[:token_cap], doc_starts[doc_starts < token_cap]
    char_end = int(tokens.char_starts[len(ids) - len(prefix)]) if len(ids) - len(prefix) < len(tokens.ids) else len(corpus.text)
    return TokenizedCorpus(corpus=corpus, ids=ids, doc_starts=doc_starts, tokenizer_sha256=tokens.tokenizer_sha256,
                           char_starts=starts, char_end=char_end)


def _chunks(n_tokens: int, size: int, score_from: int) -> list[Window]:
    return [Window(i * size, (i + 1) * size, i * size + score_from) for i in range(n_tokens // size)]


# hf-sliding ---------------------------------------------------------------------------------------------------


def _hf_stream(corpus, tokenizer, settings) -> TokenizedCorpus:
    return tokenize(corpus, tokenizer, add_bos=settings.add_bos, token_cap=settings.token_cap)


def _hf_windows(stream, settings) -> list[Window]:
    return plan_windows(len(stream.ids), settings.max_length, settings.stride)


# gptq-paper ---------------------------------------------------------------------------------------------------


def _gptq_stream(corpus, tokenizer, settings) -> TokenizedCorpus:
    joined = Corpus(name=corpus.name, source=corpus.source, documents=corpus.documents, joiner="\n\n")
    return _whole(joined, tokenizer, special_prefix(tokenizer), settings.token_cap)


def _gptq_windows(stream, settings) -> list[Window]:
    return _chunks(len(stream.ids), settings.max_length, 1)


# llama.cpp ----------------------------------------------------------------------------------------------------


def _llamacpp_stream(corpus, tokenizer, settings) -> TokenizedCorpus:
    prefix = special_prefix(tokenizer)
    stream = _whole(corpus, tokenizer, prefix, settings.token_cap)
    n_ctx = settings.max_length
    if len(stream.ids) < 2 * n_ctx:
        raise QuantgateError(f"corpus {corpus.name!r}: the llama.cpp preset needs at least 2 x max_length = "
                             f"{2 * n_ctx} tokens (llama-perplexity's own rule), it has {len(stream.ids)}")
    bos = tokenizer.bos_token_id
    if bos is not None and bos in prefix:  # llama-perplexity: tokens[batch_start] = BOS when the vocabulary adds one
        stream.ids[np.arange(len(stream.ids) // n_ctx) * n_ctx] = bos
    return stream


def _llamacpp_windows(stream, settings) -> list[Window]:
    return _chunks(len(stream.ids), settings.max_length, settings.max_length // 2 + 1)


# lm-eval ------------------------------------------------------------------------------------------------------


def _lmeval_prefix(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise QuantgateError("the lm-eval preset needs a prefix token (BOS or EOS); the tokenizer has neither")
    return int(token)


def _lmeval_stream(corpus, tokenizer, settings) -> TokenizedCorpus:
    """[prefix] + the document's own ids, for each document, one after the other (char offsets into the text)."""
    prefix = _lmeval_prefix(tokenizer)
    encoded = encode_long(tokenizer, list(corpus.documents), return_offsets_mapping=True)
    ids, starts, doc_starts, base = [], [], [], 0
    for doc, doc_ids, offsets in zip(corpus.documents, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        doc_starts.append(len(ids))
        ids += [prefix, *doc_ids]
        starts += [base + (offsets[0][0] if offsets else 0), *(base + s for s, _ in offsets)]
        base += len(doc) + len(corpus.joiner)
    ids_a, starts_a, doc_a = np.asarray(ids, np.int64), np.asarray(starts, np.int64), np.asarray(doc_starts, np.int64)
    cap = settings.token_cap
    if cap is not None and cap < len(ids_a):
        char_end = int(starts_a[cap])
        ids_a, starts_a, doc_a = ids_a[:cap], starts_a[:cap], doc_a[doc_a < cap]
    else:
        char_end = len(corpus.text)
    return TokenizedCorpus(corpus=corpus, ids=ids_a, doc_starts=doc_a, tokenizer_sha256=tokenizer_fingerprint(tokenizer),
                           char_starts=starts_a, char_end=char_end)


def _lmeval_windows(stream, settings) -> list[Window]:
    """Per document: lm-evaluation-harness's rolling windows (context_len = 1), made disjoint."""
    length, windows = settings.max_length, []
    bounds = [*stream.doc_starts.tolist(), len(stream.ids)]
    for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
        first, n = begin + 1, end - begin - 1  # the document's first token, its token count
        if n <= 0:
            continue
        predicted = min(length, n)
        windows.append(Window(begin, first + predicted, first))
        while predicted < n:
            stop = predicted + min(n - predicted, length)
            windows.append(Window(first + stop - length - 1, first + stop, first + predicted))
            predicted = stop
    return windows


def _lmeval_text(stream, positions) -> TextSize | None:
    """Words and bytes as the wikitext task counts them: on each document (the covered part under a token cap)."""
    docs, joiner = stream.corpus.documents, len(stream.corpus.joiner)
    words = size = 0
    begin = 0
    for doc in docs:
        end = begin + len(doc)
        if begin >= stream.char_end:
            break
        piece = doc if end <= stream.char_end else doc[:stream.char_end - begin]
        words += len(re.split(r"\s+", piece))
        size += len(piece.encode("utf-8"))
        begin = end + joiner
    return TextSize(bytes=size, words=words)


register_preset(Preset(DEFAULT, SCORING_RULE, _hf_stream, _hf_windows,
                       peer="https://huggingface.co/docs/transformers/perplexity"))
register_preset(Preset("lm-eval", "lm-eval/rolling-loglikelihood/per-document/context-1/v1", _lmeval_stream,
                       _lmeval_windows, _lmeval_text,
                       peer="https://github.com/EleutherAI/lm-evaluation-harness/blob/main/lm_eval/utils.py"))
register_preset(Preset("gptq-paper", "gptq-paper/disjoint-chunks/first-unscored/remainder-dropped/v1", _gptq_stream,
                       _gptq_windows, peer="https://github.com/IST-DASLab/gptq/blob/main/llama.py"))
register_preset(Preset("llama.cpp", "llama.cpp/n_ctx-chunks/bos-overwrite/second-half/v1", _llamacpp_stream,
                       _llamacpp_windows,
                       peer="https://github.com/ggml-org/llama.cpp/blob/master/tools/perplexity/perplexity.cpp"))
