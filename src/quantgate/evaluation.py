"""One evaluation session: corpora tokenized once, one model resident at a time.

Shared by the pytest plugin and the CLI so that a baseline and a gate measurement go
through exactly the same code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import baselines as bl
from .checkpoints.loading import LoadedCheckpoint, load_checkpoint, load_tokenizer, release
from .corpus import Corpus, TokenizedCorpus, load_corpus, tokenize
from .errors import DeviceUnavailable, ProtocolMismatch, QuantgateError, TokenizerMismatch
from .manifest import Manifest, ProtocolSettings, ReferenceModel, Variant, protocol_settings
from .perplexity import TokenScores, count_scored
from .protocol import SCORING_RULE, Protocol, device_class, environment
from .stats import PairedComparison

REFERENCE = None  # variant name used for the FP16 reference itself


def resolve_device(requested: str | None) -> str:
    if requested and requested != "auto":
        if requested.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise DeviceUnavailable(f"device {requested!r} requested but CUDA is not available here")
        return requested
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


@dataclass
class Measurement:
    model: str
    variant: str | None
    corpus: str
    protocol: Protocol
    scores: TokenScores
    doc_starts: Any
    description: dict[str, Any]
    seconds: float

    @property
    def perplexity(self) -> float:
        return self.scores.perplexity


@dataclass
class Comparison:
    measurement: Measurement
    stats: PairedComparison


@dataclass
class Evaluator:
    manifest: Manifest
    profile: str
    device: str
    exact_kl: bool = False  # opt-in: full-distribution KL with the reference resident beside the variant
    _corpora: dict[str, Corpus] = field(default_factory=dict)
    _tokenizers: dict[str, Any] = field(default_factory=dict)
    _tokenized: dict[tuple, TokenizedCorpus] = field(default_factory=dict)
    _resident: tuple[tuple[str, str | None], LoadedCheckpoint] | None = None
    _reference_sha: dict[str, str] = field(default_factory=dict)
    _reference_params: dict[str, int | None] = field(default_factory=dict)
    _comparisons: dict[tuple, Comparison] = field(default_factory=dict)
    _tasks: dict[tuple, Any] = field(default_factory=dict)
    _tokenizer_sha: dict[str, str] = field(default_factory=dict)
    _task_comparisons: dict[tuple, Any] = field(default_factory=dict)
    # "model/variant" -> why a recipe build's numbers differ from those made with the recorded build
    build_notes: dict[str, str] = field(default_factory=dict)
    build_failures: dict[tuple[str, str], Exception] = field(default_factory=dict)

    # -- what is measured -------------------------------------------------------------
    def model(self, name: str) -> ReferenceModel:
        return self.manifest.models[name]

    def variant(self, model: str, name: str) -> Variant:
        return next(v for v in self.model(model).variants if v.name == name)

    def settings(self, model: str, profile: str | None = None) -> ProtocolSettings:
        return protocol_settings(self.model(model), profile or self.profile, self.manifest.default_profile)

    def corpus(self, name: str) -> Corpus:
        if name not in self._corpora:
            self._corpora[name] = load_corpus(self.manifest.corpora[name])
        return self._corpora[name]

    def reference_tokenizer(self, model: str):
        if model not in self._tokenizers:
            self._tokenizers[model] = load_tokenizer(self.model(model).path)
        return self._tokenizers[model]

    def tokenized(self, model: str, corpus: str, settings: ProtocolSettings) -> TokenizedCorpus:
        key = (model, corpus, settings.add_bos, settings.token_cap)
        if key not in self._tokenized:
            self._tokenized[key] = tokenize(self.corpus(corpus), self.reference_tokenizer(model),
                                            add_bos=settings.add_bos, token_cap=settings.token_cap)
        return self._tokenized[key]

    def backend_of(self, model: str, variant: str | None) -> str:
        return "transformers" if variant is REFERENCE else self.variant(model, variant).backend

    def require_backend(self, model: str, variant: str | None) -> None:
        """Fail fast (as a skip) when a variant's backend or format library is missing, before looking for baselines."""
        if variant is REFERENCE:
            return
        v, what = self.variant(model, variant), f"variant {model}/{variant}"
        if v.backend == "llama.cpp":
            from .backends.llamacpp import require_llama_cpp

            require_llama_cpp(what)
        else:
            from .checkpoints.loading import require_format_library

            require_format_library(v.format, what)

    def protocol(self, model: str, corpus: str, profile: str | None = None, backend: str = "transformers") -> Protocol:
        s = self.settings(model, profile)
        tok = self.tokenized(model, corpus, s)
        spec = self.manifest.corpora[corpus]
        scored = count_scored(len(tok.ids), s.max_length, s.stride)
        if scored == 0:
            raise QuantgateError(f"corpus {corpus!r} ({self.corpus(corpus).source}) gives {len(tok.ids)} token(s) with "
                                 f"{model}'s tokenizer: nothing to score (a prediction needs 2 tokens)")
        from .perplexity import plan_windows
        from .stats import MIN_BLOCKS

        windows = len(plan_windows(len(tok.ids), s.max_length, s.stride))
        if windows < MIN_BLOCKS:
            raise QuantgateError(
                f"corpus {corpus!r} ({self.corpus(corpus).source}) gives {len(tok.ids):,} token(s) with {model}'s "
                f"tokenizer: {scored:,} scored in {windows} window(s) of max_length {s.max_length}, stride {s.stride}. "
                f"The gate needs at least {MIN_BLOCKS} windows to put a confidence interval on a change (paired block "
                f"bootstrap), so with this corpus it could not tell a broken variant from noise. Use a longer text, "
                f"or a smaller max_length and stride for {model} ([models.{model}.protocol])")
        return Protocol(
            corpus=corpus, corpus_source=self.corpus(corpus).source,
            text_sha256=self.corpus(corpus).text_sha256, documents=len(self.corpus(corpus).documents),
            joiner=spec.joiner.encode("unicode_escape").decode("ascii"),  # readable in snapshot diffs
            tokenizer_sha256=tok.tokenizer_sha256, tokens_sha256=tok.tokens_sha256,
            add_bos=s.add_bos, max_length=s.max_length, stride=s.stride, token_cap=s.token_cap,
            scoring_rule=SCORING_RULE, **self._numerics(s, backend),
            tokens_scored=scored, backend=backend,
        )

    def _numerics(self, settings: ProtocolSettings, backend: str) -> dict[str, str]:
        """dtype and device class of a protocol. llama.cpp computes in its own (mixed) precision on the
        CPU, whatever the manifest says."""
        if backend == "transformers":
            return {"dtype": settings.dtype, "device_class": device_class(self.device)}
        from .backends.llamacpp import NUMERICS

        return {"dtype": "native", "device_class": "cpu", "kernels": ", ".join(f"{k}={v}" for k, v in NUMERICS.items())}

    def reference_sha256(self, model: str) -> str:
        """Hash of the reference checkpoint's files, once per session (GBs for real models)."""
        if model not in self._reference_sha:
            self._reference_sha[model] = bl.checkpoint_sha256(self.model(model).path)
        return self._reference_sha[model]

    def reference_parameters(self, model: str) -> int | None:
        """Parameter count of the FP16 reference, from its safetensors headers (no weights read)."""
        if model not in self._reference_params:
            files = sorted(Path(self.model(model).path).glob("*.safetensors"))
            total = None
            if files:
                from safetensors import safe_open

                total = 0
                for f in files:
                    with safe_open(str(f), framework="numpy") as fh:
                        total += sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())
            self._reference_params[model] = total
        return self._reference_params[model]

    # -- baselines ----------------------------------------------------------------------
    def baseline_path(self, model: str, corpus: str, backend: str = "transformers") -> Path:
        return bl.baseline_path(self.manifest.baselines_dir, model, corpus, self.profile, backend)

    def baseline_command(self, model: str, corpus: str, backend: str = "transformers", *, task: str | None = None) -> str:
        """The command that (re-)measures one baseline: a corpus's, or with `task`, a task's."""
        profile = "" if self.profile == self.manifest.default_profile else f" --profile {self.profile}"
        which = "" if backend == "transformers" else f" --backend {backend}"
        what = f"--task {task}" if task else f"--corpus {corpus}"
        return f"quantgate baseline --model {model} {what}{profile}{which}"

    def comparable_baseline(self, model: str, corpus: str, backend: str = "transformers") -> bl.Baseline:
        """The stored baseline, refused unless its protocol and reference checkpoint match ours.

        Each backend has its own: llama.cpp's reference is the F16 GGUF scored by llama.cpp, so
        that differences between kernels are not blamed on quantization."""
        command = self.baseline_command(model, corpus, backend)
        baseline = bl.read_baseline(self.baseline_path(model, corpus, backend), create_hint=command)
        ours = self.protocol(model, corpus, backend=backend)
        if not ours.matches(baseline.protocol):
            diffs = ours.differences(baseline.protocol)
            fields = ", ".join(d.split(":", 1)[0] for d in diffs)
            raise ProtocolMismatch("\n".join([
                f"refusing to compare {model}/{corpus}: the protocol differs from the baseline's in {fields}",
                f"  manifest protocol : {ours.fingerprint}",
                f"  baseline protocol : {baseline.protocol.fingerprint} ({baseline.path})",
                "  current != baseline:",
                *(f"    {d}" for d in diffs),
                f"  Restore the protocol, or re-baseline on purpose: {command} --force",
            ]))
        recorded = baseline.provenance.get("reference_sha256")
        current = self.reference_sha256(model)
        if recorded != current:
            raise ProtocolMismatch(
                f"refusing to compare {model}/{corpus}: the reference checkpoint {self.model(model).path} changed since "
                f"the baseline was measured (sha256 {str(recorded)[:12]} -> {current[:12]}); re-baseline: "
                f"{command} --force")
        return baseline

    # -- models -------------------------------------------------------------------------
    def build(self, pairs) -> Iterator[tuple[str, str, str]]:
        """The build step, before anything is measured: every recipe variant among (model, variant) pairs is
        built (or found cached). Yields (model, variant, what happened); a failed build is kept and raised by
        the checks of that variant (BuildFailed: cannot test here), never counted as a quality failure."""
        from .zoo import build_variant

        for model, variant in dict.fromkeys(pairs):
            v = self.variant(model, variant)
            if v.recipe is None or v.path is not None:
                continue
            started = time.perf_counter()
            try:
                _, record = build_variant(self.manifest, self.model(model), v)
            except (QuantgateError, OSError) as exc:  # BuildFailed, a missing builder library or reference
                from .errors import BuildFailed

                failure = exc if isinstance(exc, QuantgateError) else BuildFailed(f"{model}/{variant}: cannot build it: {exc}")
                self.build_failures[(model, variant)] = failure
                yield model, variant, f"FAILED: {str(failure).splitlines()[0]}"
                continue
            yield model, variant, "cached" if record is None else f"built in {time.perf_counter() - started:.1f}s"

    def checkpoint(self, model: str, variant: str | None, backend: str | None = None) -> LoadedCheckpoint:
        if (model, variant) in self.build_failures:
            raise self.build_failures[(model, variant)]
        backend = backend or self.backend_of(model, variant)
        key = (model, variant, backend)
        if self._resident and self._resident[0] == key:
            return self._resident[1]
        self.release()  # one model resident at a time
        ref = self.model(model)
        settings = self.settings(model)
        if variant is REFERENCE and backend == "llama.cpp":
            from .zoo import reference_gguf

            path, fmt, what = reference_gguf(self.manifest, ref, self.reference_sha256(model)), "gguf", f"reference {model} (F16 GGUF)"
        elif variant is REFERENCE:
            path, fmt, what = ref.path, ref.format, f"reference {model}"
        else:
            v = self.variant(model, variant)
            from .zoo import compare_with_recorded, variant_path

            path, fmt, what = variant_path(self.manifest, ref, v), v.format, f"variant {model}/{variant}"
            if path is not None and path.exists():  # a missing one is refused by the loader (cannot test)
                from .checkpoints.declared import audit_declared
                from .checkpoints.loading import gguf_file

                audit_declared(gguf_file(path, what) if fmt == "gguf" else path, fmt=fmt, bits=v.bits,
                               group_size=v.group_size, desc_act=v.desc_act, what=what)
            if v.recipe is not None and v.path is None:
                status, words = compare_with_recorded(self.manifest, ref, v, path)
                if status not in ("same", "not recorded"):
                    self.build_notes[f"{model}/{variant}"] = words
        loaded = load_checkpoint(path, fmt=fmt, dtype=settings.dtype, device=self.device, what=what,
                                 tokenizer_path=ref.path, backend=backend)
        if variant is not REFERENCE:
            v = self.variant(model, variant)
            loaded.description.update(bits=v.bits, group_size=v.group_size, desc_act=v.desc_act,
                                      scheme=v.scheme, calibration=v.calibration)
        self._resident = (key, loaded)
        return loaded

    def release(self) -> None:
        if self._resident:
            release(self._resident[1])
            self._resident = None

    def measure(self, model: str, variant: str | None, corpus: str, backend: str | None = None, *,
                top_k: int = 0, gather_ids=None) -> Measurement:
        backend_name = backend or self.backend_of(model, variant)
        settings = self.settings(model)
        protocol = self.protocol(model, corpus, backend=backend_name)
        reference_tokens = self.tokenized(model, corpus, settings)
        loaded = self.checkpoint(model, variant, backend_name)
        if loaded.description["tokenizer_from"] != str(self.model(model).path):
            self._check_tokenizer(model, variant, corpus, loaded, settings, reference_tokens)
        backend = loaded.backend
        started = time.perf_counter()
        scores = backend.loglikelihood_rolling(reference_tokens.ids, max_length=settings.max_length,
                                               stride=settings.stride, batch_size=settings.batch_size,
                                               top_k=top_k, gather_ids=gather_ids)
        seconds = time.perf_counter() - started
        return Measurement(model=model, variant=variant, corpus=corpus, protocol=protocol, scores=scores,
                           doc_starts=reference_tokens.doc_starts,
                           description={**loaded.description, **backend.describe()}, seconds=seconds)

    def compare(self, model: str, variant: str, corpus: str, baseline: bl.Baseline) -> Comparison:
        """Measure a variant at the baseline's top-k ids and compare it with the baseline, paired by token.

        Cached per (model, variant, corpus, profile): the perplexity, KL and top-1 checks of one case
        share one scoring pass."""
        key = (model, variant, corpus, self.profile)
        if key in self._comparisons:
            return self._comparisons[key]
        from .divergence import kl_bound_from_baseline
        from .stats import compare

        top_k = self.settings(model).top_k
        baseline.require_distributions(top_k, self.baseline_command(model, corpus, self.backend_of(model, variant)))
        m = self.measure(model, variant, corpus, gather_ids=baseline.topk_ids)
        if self.exact_kl:
            kl, kind = self._exact_kl(model, variant, corpus), "exact"
        else:
            kl, kind = kl_bound_from_baseline(baseline.topk_logprobs, m.scores.gathered), f"lower bound (top-{top_k} + rest)"
        from .gate import TIE_WIDTH
        from .stats import near_tie_flips, near_tie_share

        ref_target = baseline.logprobs.astype(np.float64)
        same = self._same_top1(m.scores, baseline)
        stats = compare(ref_target=ref_target, var_target=m.scores.logprobs, kl=kl, same_top1=same,
                        block_sizes=m.scores.block_sizes, kl_kind=kind, top_k=top_k,
                        tie_flip=near_tie_flips(baseline.topk_ids, baseline.topk_logprobs, m.scores.argmax, same, TIE_WIDTH),
                        near_ties=near_tie_share(baseline.topk_logprobs, TIE_WIDTH))
        self._comparisons[key] = Comparison(measurement=m, stats=stats)
        return self._comparisons[key]

    @staticmethod
    def _same_top1(scores: TokenScores, baseline: bl.Baseline) -> np.ndarray:
        """The variant's top token is FP16's, ties included: FP16's top token has the variant's maximum log-prob,
        to within the floating-point tolerance of a log-prob (gate.FLOAT_TOKEN_TOL)."""
        from .gate import FLOAT_TOKEN_TOL

        return (scores.argmax == baseline.topk_ids[:, 0]) | (scores.gathered[:, 0] >= scores.max_logprob - FLOAT_TOKEN_TOL)

    def noise_floor(self, model: str, corpus: str, backend: str, first: Measurement, reruns: int) -> dict:
        """How far re-scoring the reference moves its numbers (non-deterministic GPU kernels).

        With reruns == 0 the floor is recorded as zero: CPU scoring is bit-for-bit deterministic
        (tests/test_kl_gate.py runs the gate twice), so there is nothing to measure."""
        if reruns <= 0:
            return {"reruns": 0, "log_ratio": 0.0, "top1_disagreement": 0.0,
                    "why": f"not measured: {self.device} scoring is deterministic"}
        log_ratio, disagreement = 0.0, 0.0
        for _ in range(reruns):
            again = self.measure(model, REFERENCE, corpus, backend=backend)
            log_ratio = max(log_ratio, abs(again.scores.mean_nll - first.scores.mean_nll))
            disagreement = max(disagreement, float(np.mean(again.scores.argmax != first.scores.topk_ids[:, 0])))
        return {"reruns": reruns, "log_ratio": log_ratio, "top1_disagreement": disagreement,
                "why": f"largest change over {reruns} re-scoring(s) of the reference on {self.device}"}

    def _exact_kl(self, model: str, variant: str, corpus: str) -> np.ndarray:
        """Per-token full KL(reference || variant): the reference loaded beside the resident variant."""
        from .divergence import exact_kl, windows_for

        backend = self.backend_of(model, variant)
        settings, ref = self.settings(model), self.model(model)
        if backend == "llama.cpp":
            from .zoo import reference_gguf

            path, fmt = reference_gguf(self.manifest, ref, self.reference_sha256(model)), "gguf"
        else:
            path, fmt = ref.path, ref.format
        reference = load_checkpoint(path, fmt=fmt, dtype=settings.dtype, device=self.device,
                                    what=f"reference {model} (exact KL)", tokenizer_path=ref.path, backend=backend)
        try:
            ids = self.tokenized(model, corpus, settings).ids
            windows = windows_for(len(ids), settings.max_length, settings.stride, None)
            return exact_kl(reference.backend, self.checkpoint(model, variant, backend).backend, ids, windows,
                            settings.batch_size, settings.top_k, with_bound=False)["exact"]
        finally:
            release(reference)

    def _check_tokenizer(self, model, variant, corpus, loaded, settings, reference_tokens) -> None:
        """The variant must give the reference's token ids the reference's meaning (checkpoints/tokenizer_audit.py).

        A GGUF's vocabulary and special tokens are read from the file itself, whichever backend scores it;
        a checkpoint with its own tokenizer files must also cut the corpus into the reference's ids, unless
        the variant asks for the reference's tokenizer. How the text was tokenized goes into the description."""
        from .checkpoints.tokenizer_audit import audit, gguf_vocabulary, reference_vocabulary

        what = f"{model}/{variant or 'reference'}"
        source = loaded.description["tokenizer_from"]
        use_reference = variant is not REFERENCE and self.variant(model, variant).tokenizer == "reference"
        reference = reference_vocabulary(self.reference_tokenizer(model), str(self.model(model).path))
        if str(source).endswith(".gguf"):
            own = gguf_vocabulary(Path(source))
        else:
            own = reference_vocabulary(loaded.tokenizer, str(source))
        loaded.description["tokenizer"] = audit(reference, own, what=what, use_reference=use_reference)
        if use_reference or loaded.tokenizer is None:
            return
        own_ids = tokenize(self.corpus(corpus), loaded.tokenizer, add_bos=settings.add_bos, token_cap=settings.token_cap)
        if own_ids.tokens_sha256 != reference_tokens.tokens_sha256:
            first = next((i for i, (a, b) in enumerate(zip(own_ids.ids, reference_tokens.ids, strict=False)) if a != b),
                         min(len(own_ids.ids), len(reference_tokens.ids)))
            raise TokenizerMismatch(
                f"{what}: its tokenizer ({source}) turns corpus {corpus!r} into different token ids than the "
                f"reference's ({len(own_ids.ids)} vs {len(reference_tokens.ids)} tokens, first difference at token "
                f"{first}): perplexities would not be comparable. The vocabularies and special tokens agree, so "
                f"the split rules differ (pre-tokenizer, merges or normalizer); if the reference's ids are what you "
                f'mean to score, set tokenizer = "reference" on the variant in quantgate.toml')

    # -- tasks ----------------------------------------------------------------------------
    def task(self, model: str, name: str, profile: str | None = None):
        """The task's items under a profile's item cap, loaded once per session."""
        from .tasks.suite import load_task

        cap = self.settings(model, profile).task_items
        key = (name, cap)
        if key not in self._tasks:
            self._tasks[key] = load_task(self.manifest.tasks[name], cap)
        return self._tasks[key]

    def task_protocol(self, model: str, name: str, profile: str | None = None,
                      backend: str = "transformers") -> dict[str, Any]:
        from .corpus import tokenizer_fingerprint
        from .tasks.suite import task_protocol

        s = self.settings(model, profile)
        if model not in self._tokenizer_sha:  # hashes the whole vocabulary: once per session
            self._tokenizer_sha[model] = tokenizer_fingerprint(self.reference_tokenizer(model))
        return task_protocol(self.task(model, name, profile), tokenizer_sha256=self._tokenizer_sha[model], settings=s,
                             backend=backend, **self._numerics(s, backend))

    def task_baseline_path(self, model: str, name: str, backend: str = "transformers") -> Path:
        from .tasks.baseline import task_baseline_path

        return task_baseline_path(self.manifest.baselines_dir, model, name, self.profile, backend)

    def comparable_task_baseline(self, model: str, name: str, backend: str = "transformers"):
        """The stored task baseline, refused unless its task protocol and reference checkpoint match ours."""
        from .protocol import fingerprint_of
        from .tasks.baseline import read_task_baseline

        command = self.baseline_command(model, "", backend, task=name)
        baseline = read_task_baseline(self.task_baseline_path(model, name, backend), create_hint=command)
        ours = self.task_protocol(model, name, backend=backend)
        if ours != baseline.protocol:
            keys = sorted(set(ours) | set(baseline.protocol))
            diffs = [f"{k}: {ours.get(k)!r} != {baseline.protocol.get(k)!r}" for k in keys
                     if ours.get(k) != baseline.protocol.get(k)]
            raise ProtocolMismatch("\n".join([
                f"refusing to compare {model}/task {name}: its protocol differs from the baseline's in "
                + ", ".join(d.split(":", 1)[0] for d in diffs),
                f"  manifest task protocol : {fingerprint_of(ours)}",
                f"  baseline task protocol : {baseline.fingerprint} ({baseline.path})",
                "  current != baseline:", *(f"    {d}" for d in diffs),
                f"  Restore the task, or re-baseline on purpose: {command} --force"]))
        if baseline.provenance.get("reference_sha256") != self.reference_sha256(model):
            raise ProtocolMismatch(f"refusing to compare {model}/task {name}: the reference checkpoint changed since "
                                   f"the task baseline was measured; re-baseline: {command} --force")
        return baseline

    def run_task(self, model: str, variant: str | None, name: str, backend: str | None = None):
        """Score a task with one checkpoint (loaded, or already resident), fed the reference tokenizer's ids."""
        from .tasks.suite import run_task

        backend_name = backend or self.backend_of(model, variant)
        settings = self.settings(model)
        loaded = self.checkpoint(model, variant, backend_name)
        if loaded.description["tokenizer_from"] != str(self.model(model).path):
            corpus = self.model(model).corpora[0]
            self._check_tokenizer(model, variant, corpus, loaded, settings, self.tokenized(model, corpus, settings))
        return run_task(self.task(model, name), loaded.backend, self.reference_tokenizer(model), settings)

    def compare_task(self, model: str, variant: str, name: str, baseline):
        """A variant's task result against the FP16 baseline's, item by item; cached per case."""
        from .stats import paired_drop

        key = (model, variant, name, self.profile)
        if key not in self._task_comparisons:
            result = self.run_task(model, variant, name)
            if result.ids != baseline.ids:
                raise ProtocolMismatch(f"{model}/{variant} task {name}: items differ from the baseline's "
                                       f"({len(result.ids)} vs {len(baseline.ids)})")
            self._task_comparisons[key] = (result, paired_drop(result.ids, baseline.correct, result.correct))
        return self._task_comparisons[key]

    def environment(self) -> dict[str, Any]:
        return environment(self.device)
