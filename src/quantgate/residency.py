"""Loading a case: recipe variants built in a step of their own, then one resident model at a time.

The build step runs before anything is measured; a failed build is kept and raised by that
variant's checks (BuildFailed: cannot test here), never counted as a quality failure. A loaded
variant is audited before it scores: its declared format (checkpoints/declared.py), how its build
compares with the recorded one, and that its tokenizer gives the reference's token ids their
meaning (checkpoints/tokenizer_audit.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import progress
from .backends import get_backend
from .checkpoints.loading import LoadedCheckpoint, load_checkpoint, release
from .corpus import tokenize
from .errors import QuantgateError, TokenizerMismatch
from .workspace import REFERENCE, Workspace


@dataclass
class Residency:
    ws: Workspace
    build_notes: dict[str, str] = field(default_factory=dict)  # "model/variant" -> how its build differs from the recorded
    build_failures: dict[tuple[str, str], Exception] = field(default_factory=dict)
    _resident: tuple[tuple, LoadedCheckpoint] | None = None

    def build(self, pairs) -> Iterator[tuple[str, str, str]]:
        """Every recipe variant among (model, variant) pairs built (or found cached): (model, variant, what happened)."""
        from .zoo import BuildBusy, build_variant

        for model, variant in dict.fromkeys(pairs):
            v = self.ws.variant(model, variant)
            if v.recipe is None or v.path is not None:
                continue
            started = time.perf_counter()
            try:
                with progress.stage(f"{model}/{variant}: building"):
                    # another process building it now (an xdist worker): on to the next; its first check waits
                    _, record = build_variant(self.ws.manifest, self.ws.model(model), v, wait=False)
            except BuildBusy:
                yield model, variant, "another process is building it; its checks wait for that build"
                continue
            except (QuantgateError, OSError) as exc:  # BuildFailed, a missing builder library or reference
                from .errors import BuildFailed

                failure = exc if isinstance(exc, QuantgateError) else BuildFailed(f"{model}/{variant}: cannot build it: {exc}")
                self.build_failures[(model, variant)] = failure
                yield model, variant, f"FAILED: {str(failure).splitlines()[0]}"
                continue
            yield model, variant, "cached" if record is None else f"built in {time.perf_counter() - started:.1f}s"

    def checkpoint(self, model: str, variant: str | None, backend: str | None = None) -> LoadedCheckpoint:
        """The case's checkpoint, loaded (and audited) unless it is the one resident; the previous one is freed."""
        if (model, variant) in self.build_failures:
            raise self.build_failures[(model, variant)]
        backend = backend or self.ws.backend_of(model, variant)
        key = (model, variant, backend)
        if self._resident and self._resident[0] == key:
            return self._resident[1]
        self.release()  # one model resident at a time
        ref = self.ws.model(model)
        if variant is REFERENCE:
            path, fmt, what = get_backend(backend).reference(self.ws.manifest, ref, self.ws.reference_sha256(model))
        else:
            path, fmt, what = self._variant_source(model, variant)
        with progress.stage(f"{model}/{variant or 'reference'}: loading"):
            loaded = load_checkpoint(path, fmt=fmt, dtype=self.ws.settings(model).dtype, device=self.ws.device,
                                     what=what, tokenizer_path=ref.path, backend=backend,
                                     placement=self.ws.placement(model, variant, backend))
        if variant is not REFERENCE:
            v = self.ws.variant(model, variant)
            loaded.description.update(bits=v.bits, group_size=v.group_size, desc_act=v.desc_act,
                                      scheme=v.scheme, calibration=v.calibration)
        self._resident = (key, loaded)
        return loaded

    def _variant_source(self, model: str, variant: str) -> tuple[Path | None, str, str]:
        """(path, format, label) of a variant, its declared format audited and its build compared with the recorded."""
        from .zoo import compare_with_recorded, variant_path

        ref, v = self.ws.model(model), self.ws.variant(model, variant)
        path, what = variant_path(self.ws.manifest, ref, v), f"variant {model}/{variant}"
        if path is not None and path.exists():  # a missing one is refused by the loader (cannot test)
            from .checkpoints.declared import audit_declared
            from .checkpoints.loading import gguf_file

            audit_declared(gguf_file(path, what) if v.format == "gguf" else path, fmt=v.format, bits=v.bits,
                           group_size=v.group_size, desc_act=v.desc_act, what=what)
        if v.recipe is not None and v.path is None:
            status, words = compare_with_recorded(self.ws.manifest, ref, v, path)
            if status not in ("same", "not recorded"):
                self.build_notes[f"{model}/{variant}"] = words
        return path, v.format, what

    def release(self) -> None:
        if self._resident:
            release(self._resident[1])
            self._resident = None

    def check_tokenizer(self, model: str, variant: str | None, loaded: LoadedCheckpoint,
                        corpus: str | None = None) -> None:
        """A checkpoint with a tokenizer of its own must give the reference's token ids their meaning."""
        if loaded.description["tokenizer_from"] != str(self.ws.model(model).path):
            check_tokenizer(self.ws, model, variant, corpus or self.ws.model(model).corpora[0], loaded)


def check_tokenizer(ws: Workspace, model: str, variant: str | None, corpus: str, loaded: LoadedCheckpoint) -> None:
    """checkpoints/tokenizer_audit.py: a GGUF's vocabulary and special tokens are read from the file itself,
    whichever backend scores it; a checkpoint with its own tokenizer files must also cut the corpus into the
    reference's ids, unless the variant asks for the reference's tokenizer. How the text was tokenized goes
    into the description. Once per load for the vocabulary and once per corpus for the ids: what passed stays
    passed while the checkpoint is resident, and a refusal is raised again by each check that asks."""
    from .checkpoints.tokenizer_audit import audit, gguf_vocabulary, reference_vocabulary

    what, settings = f"{model}/{variant or 'reference'}", ws.settings(model)
    source = loaded.description["tokenizer_from"]
    use_reference = variant is not REFERENCE and ws.variant(model, variant).tokenizer == "reference"
    if "tokenizer" not in loaded.description:
        reference = reference_vocabulary(ws.reference_tokenizer(model), str(ws.model(model).path))
        own = gguf_vocabulary(Path(source)) if str(source).endswith(".gguf") else reference_vocabulary(loaded.tokenizer, str(source))
        loaded.description["tokenizer"] = audit(reference, own, what=what, use_reference=use_reference)
    if use_reference or loaded.tokenizer is None or corpus in loaded.audited:
        return
    reference_ids = ws.tokenized(model, corpus, settings)
    own_ids = tokenize(ws.corpus(corpus), loaded.tokenizer, add_bos=settings.add_bos, token_cap=settings.token_cap)
    if own_ids.tokens_sha256 != reference_ids.tokens_sha256:
        first = next((i for i, (a, b) in enumerate(zip(own_ids.ids, reference_ids.ids, strict=False)) if a != b),
                     min(len(own_ids.ids), len(reference_ids.ids)))
        raise TokenizerMismatch(
            f"{what}: its tokenizer ({source}) turns corpus {corpus!r} into different token ids than the "
            f"reference's ({len(own_ids.ids)} vs {len(reference_ids.ids)} tokens, first difference at token "
            f"{first}): perplexities would not be comparable. The vocabularies and special tokens agree, so "
            f"the split rules differ (pre-tokenizer, merges or normalizer); if the reference's ids are what you "
            f'mean to score, set tokenizer = "reference" on the variant in quantgate.toml')
    loaded.audited.add(corpus)
