"""Token ids computed once per (tokenizer, text): in memory for the process, on disk across processes.

A corpus, a task's prompts and choices, the ids of a vocabulary that decode to a newline: the gate needs
them for every variant, `quantgate baseline` needs them again, and so does every pytest-xdist worker. Each is
keyed by a hash of the tokenizer's whole definition (its `tokenizer.json`: vocabulary, merges, normalizer,
pre-tokenizer, added tokens; and the `tokenizers` version that runs it), the texts and the options, so two
tokenizers that share a vocabulary but split differently never share an entry. A tokenizer without such a
definition (a slow, Python-only one) is not cached on disk.

Files are written to a temporary name and renamed into place, so processes sharing the directory never read
half an entry; an entry that does not read back is computed again and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

_root: Path | None = None
_memo: dict[str, tuple[np.ndarray, ...]] = {}
_definitions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its definition's hash


def use(root: Path | None) -> None:
    """Where entries are kept (the manifest's `cache_dir`); None keeps them in memory only."""
    global _root
    _root = Path(root) if root is not None else None


def root() -> Path | None:
    return _root


def clear_memory() -> None:
    _memo.clear()
    _definitions.clear()


def definition(tokenizer) -> str | None:
    """sha256 of everything that decides how the tokenizer cuts text; None when that cannot be read."""
    if tokenizer not in _definitions:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            _definitions[tokenizer] = None
        else:
            import tokenizers

            options = [type(tokenizer).__name__, tokenizers.__version__, getattr(tokenizer, "split_special_tokens", None)]
            payload = json.dumps(options) + "\n" + backend.to_str()
            _definitions[tokenizer] = hashlib.sha256(payload.encode("utf-8")).hexdigest()
    return _definitions[tokenizer]


def cached(tokenizer, what: str, inputs, compute: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """`compute()` once per (tokenizer definition, what, inputs); the arrays it returns are kept."""
    tok = definition(tokenizer)
    if tok is None:
        return compute()
    key = hashlib.sha256(json.dumps([tok, what, inputs], ensure_ascii=False).encode("utf-8")).hexdigest()
    if key in _memo:
        return _memo[key]
    value = _read(key)
    if value is None:
        value = tuple(np.asarray(a) for a in compute())
        _write(key, value)
    _memo[key] = value
    return value


def _path(key: str) -> Path | None:
    return None if _root is None else _root / "tokens" / key[:2] / f"{key}.npz"


def _read(key: str) -> tuple[np.ndarray, ...] | None:
    path = _path(key)
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return tuple(data[f"a{i}"] for i in range(len(data.files)))
    except Exception:  # a damaged entry is recomputed and replaced, never trusted
        return None


def _write(key: str, value: tuple[np.ndarray, ...]) -> None:
    path = _path(key)
    if path is None:
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **{f"a{i}": a for i, a in enumerate(value)})
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache directory costs time, never a result
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _ragged(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter((t for x in lists for t in x), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text's ids without special tokens, as `tokenizer(text, add_special_tokens=False)` gives them."""
    texts = list(texts)

    def compute():
        return _ragged([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])

    flat, lengths = cached(tokenizer, "texts", texts, compute)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    ids = flat.tolist()
    return [ids[bounds[i]:bounds[i + 1]] for i in range(len(texts))]


def encode_with_offsets(tokenizer, text: str, encode: Callable[[], dict]) -> tuple[np.ndarray, np.ndarray]:
    """A whole corpus: its ids and each token's first character; `encode()` tokenizes it on a miss."""
    def compute():
        enc = encode()
        return (np.asarray(enc["input_ids"], dtype=np.int64),
                np.asarray([start for start, _ in enc["offset_mapping"]], dtype=np.int64))

    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return cached(tokenizer, "corpus", [digest, len(text)], compute)


def newline_ids(tokenizer) -> list[int]:
    """Every token id whose text contains a newline (byte-level BPE merges newlines with indentation)."""
    def compute():
        size = len(tokenizer)
        pieces = tokenizer.batch_decode([[i] for i in range(size)])
        return (np.asarray([i for i, p in enumerate(pieces) if "\n" in p], dtype=np.int64),)

    (ids,) = cached(tokenizer, "newline_ids", [], compute)  # the definition holds the added tokens
    return ids.tolist()
