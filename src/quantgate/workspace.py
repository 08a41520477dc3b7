"""What is measured, and under which protocol: the manifest's models, corpora and tasks, loaded once.

Corpora are read and tokenized once per (model, corpus, settings) (token ids also kept on disk across
processes, tokencache.py), task items loaded once per
item cap, the reference checkpoint hashed once per session (gigabytes for real models). The
protocols built here (a corpus's, a task's) are what baselines are compared under.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import DEFAULT_BACKEND, get_backend
from .corpus import Corpus, TokenizedCorpus, load_corpus, tokenize
from .errors import QuantgateError
from .manifest import Manifest, ProtocolSettings, ReferenceModel, Variant, protocol_settings
from .protocol import Protocol, TaskProtocol, environment

REFERENCE = None  # variant name used for the FP16 reference itself


@dataclass
class Workspace:
    manifest: Manifest
    profile: str
    device: str
    _corpora: dict[str, Corpus | QuantgateError] = field(default_factory=dict)  # a load that failed, once
    _tokenizers: dict[str, Any] = field(default_factory=dict)
    _tokenized: dict[tuple, TokenizedCorpus] = field(default_factory=dict)
    _tasks: dict[tuple, Any] = field(default_factory=dict)
    _hashes: dict[tuple[str, str], Any] = field(default_factory=dict)  # (what, model) -> hash or parameter count

    def __post_init__(self) -> None:
        from . import tokencache

        tokencache.use(self.manifest.cache_dir)

    def model(self, name: str) -> ReferenceModel:
        return self.manifest.models[name]

    def variant(self, model: str, name: str) -> Variant:
        return next(v for v in self.model(model).variants if v.name == name)

    def settings(self, model: str, profile: str | None = None) -> ProtocolSettings:
        return protocol_settings(self.model(model), profile or self.profile, self.manifest.default_profile)

    def backend_of(self, model: str, variant: str | None) -> str:
        return DEFAULT_BACKEND if variant is REFERENCE else self.variant(model, variant).backend

    def placement(self, model: str, variant: str | None, backend: str):
        """Where the case's layers go (placement.py): the variant's keys over its model's that the backend takes."""
        from .placement import Placement

        engine, ref = get_backend(backend), self.model(model)
        inherited = Placement(**{k: getattr(ref.placement, k) for k in ref.placement.keys() if k in engine.placement_keys})
        return inherited if variant is REFERENCE else self.variant(model, variant).placement.over(inherited)

    def require_backend(self, model: str, variant: str | None) -> None:
        """Fail fast (as a skip) when a variant's backend or format library is missing, before looking for baselines."""
        if variant is not REFERENCE:
            v = self.variant(model, variant)
            get_backend(v.backend).require(v.format, f"variant {model}/{variant}")

    def corpus(self, name: str) -> Corpus:
        if name not in self._corpora:
            try:
                self._corpora[name] = load_corpus(self.manifest.corpora[name])
            except QuantgateError as exc:  # the hub was retried already: the run's other checks say so at once
                self._corpora[name] = exc
        loaded = self._corpora[name]
        if isinstance(loaded, QuantgateError):
            raise loaded.with_traceback(None)
        return loaded

    def reference_tokenizer(self, model: str):
        if model not in self._tokenizers:
            from .checkpoints.loading import load_tokenizer

            self._tokenizers[model] = load_tokenizer(self.model(model).path)
        return self._tokenizers[model]

    def tokenized(self, model: str, corpus: str, settings: ProtocolSettings) -> TokenizedCorpus:
        key = (model, corpus, settings.add_bos, settings.token_cap)
        if key not in self._tokenized:
            self._tokenized[key] = tokenize(self.corpus(corpus), self.reference_tokenizer(model),
                                            add_bos=settings.add_bos, token_cap=settings.token_cap)
        return self._tokenized[key]

    def stream(self, model: str, corpus: str, settings: ProtocolSettings) -> TokenizedCorpus:
        """The ids the model reads under the settings' preset (presets.py); the default's are `tokenized`'s."""
        from .presets import DEFAULT, get_preset

        if settings.preset == DEFAULT:
            return self.tokenized(model, corpus, settings)
        key = (model, corpus, settings.preset, settings.max_length, settings.token_cap)
        if key not in self._tokenized:
            self._tokenized[key] = get_preset(settings.preset).stream(self.corpus(corpus), self.reference_tokenizer(model),
                                                                       settings)
        return self._tokenized[key]

    def windows(self, model: str, corpus: str, settings: ProtocolSettings) -> list:
        """The windows the preset scores over `stream`."""
        from .presets import get_preset

        return get_preset(settings.preset).windows(self.stream(model, corpus, settings), settings)

    def task(self, model: str, name: str, profile: str | None = None):
        """The task's items under a profile's item cap, loaded once per session."""
        from .tasks.suite import load_task

        cap = self.settings(model, profile).task_items
        if (name, cap) not in self._tasks:
            self._tasks[(name, cap)] = load_task(self.manifest.tasks[name], cap)
        return self._tasks[(name, cap)]

    def _once(self, what: str, model: str, compute):
        if (what, model) not in self._hashes:
            self._hashes[(what, model)] = compute()
        return self._hashes[(what, model)]

    def reference_sha256(self, model: str) -> str:
        """Hash of the reference checkpoint's files, once per session (GBs for real models)."""
        from .baselines import checkpoint_sha256

        return self._once("sha256", model, lambda: checkpoint_sha256(self.model(model).path))

    def reference_parameters(self, model: str) -> int | None:
        """Parameter count of the FP16 reference, from its safetensors headers (no weights read)."""
        return self._once("parameters", model, lambda: parameter_count(self.model(model).path))

    def tokenizer_sha256(self, model: str) -> str:
        from .corpus import tokenizer_fingerprint

        return self._once("tokenizer", model, lambda: tokenizer_fingerprint(self.reference_tokenizer(model)))

    def protocol(self, model: str, corpus: str, profile: str | None = None, backend: str = DEFAULT_BACKEND) -> Protocol:
        from .presets import get_preset

        s = self.settings(model, profile)
        tok = self.stream(model, corpus, s)
        source = self.corpus(corpus)
        scored = require_windows(self.windows(model, corpus, s), len(tok.ids), s,
                                 what=f"corpus {corpus!r} ({source.source})", model=model)
        return Protocol(
            corpus=corpus, corpus_source=source.source, text_sha256=source.text_sha256, documents=len(source.documents),
            joiner=self.manifest.corpora[corpus].joiner.encode("unicode_escape").decode("ascii"),  # one line in diffs
            tokenizer_sha256=tok.tokenizer_sha256, tokens_sha256=tok.tokens_sha256,
            add_bos=s.add_bos, max_length=s.max_length, stride=s.stride, token_cap=s.token_cap,
            scoring_rule=get_preset(s.preset).rule, **get_backend(backend).numerics(s.dtype, self.device),
            tokens_scored=scored, backend=backend,
        )

    def task_protocol(self, model: str, name: str, profile: str | None = None,
                      backend: str = DEFAULT_BACKEND) -> TaskProtocol:
        from .tasks.suite import task_protocol

        s = self.settings(model, profile)
        return task_protocol(self.task(model, name, profile), tokenizer_sha256=self.tokenizer_sha256(model),
                             settings=s, backend=backend, **get_backend(backend).numerics(s.dtype, self.device))

    def environment(self) -> dict[str, Any]:
        return environment(self.device)


def prepare(ws: Workspace, models) -> dict[str, list[str]]:
    """Before the first check: each model's reference tokenizer and its corpora's token ids, which all its
    variants share (a run pays them once, not its first variant). Returns the corpora made ready per model; a
    tokenizer or corpus that fails is left for the checks that need it to raise (the workspace keeps a corpus's
    failure, so it is not tried twice)."""
    ready: dict[str, list[str]] = {}
    for model in dict.fromkeys(models):
        ready[model] = []
        for corpus in ws.model(model).corpora:
            try:
                ws.stream(model, corpus, ws.settings(model))
            except Exception:  # noqa: BLE001 - raised again, with its own message, by the checks
                continue
            ready[model].append(corpus)
    return ready


def require_windows(windows: list, tokens: int, s: ProtocolSettings, *, what: str, model: str) -> int:
    """Tokens scored in the windows; an error when the corpus is too short to score, or to bootstrap."""
    from .stats import MIN_BLOCKS

    scored = sum(w.n_scored for w in windows)
    if scored == 0:
        raise QuantgateError(f"{what} gives {tokens} token(s) with {model}'s tokenizer: nothing to score (a "
                             "prediction needs 2 tokens)")
    windows = len(windows)
    if windows < MIN_BLOCKS:
        rule = f"stride {s.stride}" if s.preset == "hf-sliding" else f"preset {s.preset!r}"
        raise QuantgateError(
            f"{what} gives {tokens:,} token(s) with {model}'s tokenizer: {scored:,} scored in {windows} window(s) of "
            f"max_length {s.max_length}, {rule}. The gate needs at least {MIN_BLOCKS} windows to put a "
            f"confidence interval on a change (paired block bootstrap), so with this corpus it could not tell a broken "
            f"variant from noise. Use a longer text, or a smaller max_length and stride for {model} "
            f"([models.{model}.protocol])")
    return scored


def parameter_count(path: Path) -> int | None:
    """Parameters of a checkpoint from its safetensors headers (no weights read); None without safetensors files."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as fh:
            total += sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())
    return total
