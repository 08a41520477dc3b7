"""Does a checkpoint's own tokenizer give the reference's token ids the reference's meaning?

The gate feeds every backend the reference tokenizer's ids, so two things must hold for a
variant that ships its own tokenizer (a GGUF always does):
- the vocabularies are identical string for string: otherwise the same id means another token,
  and nothing can be compared;
- the same tokens are *special* (matched whole, never split by the BPE): otherwise the variant's
  own tokenizer cuts the same text differently (transformers reads a GGUF's
  `tokenizer.ggml.unknown_token_id` as a special token: "!=" becomes "!", "=").
The second is what a user of the file meets, not what the gate scores. When the vocabularies are
identical, the variant may be scored with the reference's tokenizer (`tokenizer = "reference"` on
the variant), and its results say so. Both backends run this same audit from the file itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import TokenizerMismatch

SHOWN = 3  # differing tokens quoted in a message
GGUF_SPECIAL_KEYS = ("bos", "eos", "unknown", "seperator", "padding", "cls", "mask")  # gguf-py's spelling


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    special: dict[int, str]  # id -> why it is special there
    source: str


def reference_vocabulary(tokenizer, source: str) -> Vocabulary:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = {i: "added token" + (" (special)" if getattr(t, "special", False) else "")
               for i, t in tokenizer.added_tokens_decoder.items()}
    for i in tokenizer.all_special_ids:
        special.setdefault(i, "special token")
    return Vocabulary(tokens=tokens, special=special, source=source)


def gguf_vocabulary(path: Path) -> Vocabulary:
    """Tokens, and the ids read as special, from a GGUF's metadata (as transformers and llama.cpp read it)."""
    from gguf import TokenType

    from .gguf_build import gguf_reader

    reader = gguf_reader(path)

    def field(key):
        f = reader.get_field(key)
        if f is None:
            return None
        return [f.contents(i) for i in range(len(f.data))] if len(f.data) > 1 or key.endswith(("tokens", "token_type")) else f.contents()

    tokens = field("tokenizer.ggml.tokens")
    if tokens is None:
        raise TokenizerMismatch(f"{path}: the GGUF has no tokenizer.ggml.tokens: it carries no vocabulary to check")
    types = field("tokenizer.ggml.token_type") or [int(TokenType.NORMAL)] * len(tokens)
    ordinary = {int(TokenType.NORMAL), int(TokenType.UNUSED), int(TokenType.BYTE)}
    special = {i: f"token type {TokenType(t).name}" for i, t in enumerate(types) if int(t) not in ordinary}
    for name in GGUF_SPECIAL_KEYS:
        value = field(f"tokenizer.ggml.{name}_token_id")
        if value is not None and int(value) not in special:
            special[int(value)] = f"tokenizer.ggml.{name}_token_id"
    return Vocabulary(tokens=list(tokens), special=special, source=str(path))


def audit(reference: Vocabulary, own: Vocabulary, *, what: str, use_reference: bool) -> str:
    """Raise TokenizerMismatch naming the cause, or return how the variant's text is tokenized ("own" or
    "reference (...)"). Identical strings are required in any case; differing special tokens are allowed
    only with use_reference."""
    n = len(reference.tokens)
    ours = own.tokens[:n]
    differ = [i for i, (a, b) in enumerate(zip(reference.tokens, ours, strict=False)) if a != b]
    if differ or len(ours) < n:
        i = differ[0] if differ else len(ours)
        raise TokenizerMismatch(
            f"{what}: the vocabulary in {own.source} differs from the reference tokenizer's "
            f"({len(differ) + max(0, n - len(ours))} of {n} ids; first id {i}: {ours[i] if i < len(ours) else None!r} "
            f"vs {reference.tokens[i]!r}): the same ids would mean other tokens. Re-export the checkpoint with the "
            "reference's tokenizer")
    only_own = sorted(set(own.special) - set(reference.special))
    only_ref = sorted(set(reference.special) - set(own.special))
    if not (only_own or only_ref):
        return "reference (identical to its own)" if use_reference else "own"
    lines = [f"token {i} {own.tokens[i]!r} is special in {Path(own.source).name} ({own.special[i]}) and ordinary "
             "in the reference tokenizer" for i in only_own[:SHOWN]]
    lines += [f"token {i} {reference.tokens[i]!r} is special in the reference tokenizer ({reference.special[i]}) "
              f"and ordinary in {Path(own.source).name}" for i in only_ref[:SHOWN]]
    more = len(only_own) + len(only_ref) - len(lines)
    cause = "; ".join(lines) + (f"; and {more} more" if more > 0 else "")
    if use_reference:
        return f"reference (its own differs: {cause})"
    raise TokenizerMismatch(
        f"{what}: its tokenizer ({own.source}) treats other tokens as special than the reference's, so it cuts "
        f"the same text into other tokens: {cause}. The vocabularies are identical string for string, so the "
        f"reference's ids mean the same tokens in this checkpoint: to score it with the reference's tokenizer, set "
        f'tokenizer = "reference" on the variant in quantgate.toml (its results then say so); or fix the '
        f"checkpoint's special tokens")
