"""Measuring a case: a checkpoint's per-token scores on a corpus, or its per-item outcomes on a task,
and the paired comparison of a variant's with the FP16 baseline's (typed values, no verdicts)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import progress
from .baselines import Baseline
from .perplexity import TokenScores
from .presets import get_preset
from .protocol import Protocol
from .residency import Residency
from .stats import PairedComparison
from .textmetrics import TextSize
from .workspace import REFERENCE, Workspace


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
    text: TextSize | None = None  # the text its scored tokens cover (textmetrics.py)

    @property
    def perplexity(self) -> float:
        return self.scores.perplexity

    def text_measures(self, logprob_sum: float | None = None) -> dict[str, float | None]:
        """Bits per byte and word perplexity of these scores (or of another total log-likelihood over the same
        tokens, the baseline's) on the text they cover."""
        total = float(np.sum(self.scores.logprobs, dtype=np.float64)) if logprob_sum is None else logprob_sum
        if self.text is None:
            return {"bits_per_byte": None, "word_perplexity": None}
        return {"bits_per_byte": self.text.bits_per_byte(total), "word_perplexity": self.text.word_perplexity(total)}


@dataclass
class Comparison:
    measurement: Measurement
    stats: PairedComparison


def same_top1(scores: TokenScores, baseline: Baseline) -> np.ndarray:
    """The variant's top token is FP16's, ties included: FP16's top token has the variant's maximum log-prob,
    to within the floating-point tolerance of a log-prob (gate.FLOAT_TOKEN_TOL)."""
    from .gate import FLOAT_TOKEN_TOL

    return (scores.argmax == baseline.topk_ids[:, 0]) | (scores.gathered[:, 0] >= scores.max_logprob - FLOAT_TOKEN_TOL)


def paired_stats(m: Measurement, baseline: Baseline, kl: np.ndarray, kind: str, top_k: int) -> PairedComparison:
    """A variant's measurement against the baseline, paired by token (stats.compare), near-ties counted."""
    from .gate import TIE_WIDTH
    from .stats import compare, near_tie_flips, near_tie_share

    same = same_top1(m.scores, baseline)
    return compare(ref_target=baseline.logprobs.astype(np.float64), var_target=m.scores.logprobs, kl=kl,
                   same_top1=same, block_sizes=m.scores.block_sizes, kl_kind=kind, top_k=top_k,
                   tie_flip=near_tie_flips(baseline.topk_ids, baseline.topk_logprobs, m.scores.argmax, same, TIE_WIDTH),
                   near_ties=near_tie_share(baseline.topk_logprobs, TIE_WIDTH))


@dataclass
class Measurer:
    ws: Workspace
    residency: Residency
    exact_kl: bool = False  # opt-in: full-distribution KL with the reference resident beside the variant
    _comparisons: dict[tuple, Comparison] = field(default_factory=dict)
    _task_comparisons: dict[tuple, Any] = field(default_factory=dict)

    def measure(self, model: str, variant: str | None, corpus: str, backend: str | None = None, *,
                top_k: int = 0, gather_ids=None) -> Measurement:
        backend_name = backend or self.ws.backend_of(model, variant)
        settings = self.ws.settings(model)
        protocol = self.ws.protocol(model, corpus, backend=backend_name)
        reference_tokens = self.ws.stream(model, corpus, settings)
        windows = self.ws.windows(model, corpus, settings)
        loaded = self.residency.checkpoint(model, variant, backend_name)
        self.residency.check_tokenizer(model, variant, loaded, corpus)
        started = time.perf_counter()
        with progress.stage(f"{model}/{variant or 'reference'}: {corpus}", total=protocol.tokens_scored, unit="tok"):
            scores = loaded.backend.loglikelihood_rolling(reference_tokens.ids, max_length=settings.max_length,
                                                          stride=settings.stride, batch_size=settings.batch_size,
                                                          top_k=top_k, gather_ids=gather_ids, windows=windows)
        return Measurement(model=model, variant=variant, corpus=corpus, protocol=protocol, scores=scores,
                           doc_starts=reference_tokens.doc_starts,
                           description={**loaded.description, **loaded.backend.describe()},
                           seconds=time.perf_counter() - started,
                           text=get_preset(settings.preset).text(reference_tokens, scores.positions))

    def compare(self, model: str, variant: str, corpus: str, baseline: Baseline) -> Comparison:
        """A variant measured at the baseline's top-k ids, compared with it token by token; cached per
        (model, variant, corpus, profile): the perplexity, KL and top-1 checks of one case share one pass."""
        key = (model, variant, corpus, self.ws.profile)
        if key not in self._comparisons:
            from .divergence import kl_bound_from_baseline

            top_k = self.ws.settings(model).top_k
            m = self.measure(model, variant, corpus, gather_ids=baseline.topk_ids)
            if self.exact_kl:
                kl, kind = self._exact_kl(model, variant, corpus), "exact"
            else:
                kl, kind = kl_bound_from_baseline(baseline.topk_logprobs, m.scores.gathered), f"lower bound (top-{top_k} + rest)"
            self._comparisons[key] = Comparison(measurement=m, stats=paired_stats(m, baseline, kl, kind, top_k))
        return self._comparisons[key]

    def noise_floor(self, model: str, corpus: str, backend: str, first: Measurement, reruns: int) -> dict:
        """How far re-scoring the reference moves its numbers (non-deterministic GPU kernels).

        With reruns == 0 the floor is recorded as zero: CPU scoring is bit-for-bit deterministic
        (tests/test_kl_gate.py runs the gate twice), so there is nothing to measure."""
        if reruns <= 0:
            return {"reruns": 0, "log_ratio": 0.0, "top1_disagreement": 0.0,
                    "why": f"not measured: {self.ws.device} scoring is deterministic"}
        log_ratio, disagreement = 0.0, 0.0
        for _ in range(reruns):
            again = self.measure(model, REFERENCE, corpus, backend=backend)
            log_ratio = max(log_ratio, abs(again.scores.mean_nll - first.scores.mean_nll))
            disagreement = max(disagreement, float(np.mean(again.scores.argmax != first.scores.topk_ids[:, 0])))
        return {"reruns": reruns, "log_ratio": log_ratio, "top1_disagreement": disagreement,
                "why": f"largest change over {reruns} re-scoring(s) of the reference on {self.ws.device}"}

    def _exact_kl(self, model: str, variant: str, corpus: str) -> np.ndarray:
        """Per-token full KL(reference || variant): the reference loaded beside the resident variant."""
        from .backends import get_backend
        from .checkpoints.loading import load_checkpoint, release
        from .divergence import exact_kl

        backend = self.ws.backend_of(model, variant)
        settings, ref = self.ws.settings(model), self.ws.model(model)
        path, fmt, _ = get_backend(backend).reference(self.ws.manifest, ref, self.ws.reference_sha256(model))
        reference = load_checkpoint(path, fmt=fmt, dtype=settings.dtype, device=self.ws.device,
                                    what=f"reference {model} (exact KL)", tokenizer_path=ref.path, backend=backend)
        try:
            ids = self.ws.stream(model, corpus, settings).ids
            windows = self.ws.windows(model, corpus, settings)
            return exact_kl(reference.backend, self.residency.checkpoint(model, variant, backend).backend, ids, windows,
                            settings.batch_size, settings.top_k, with_bound=False)["exact"]
        finally:
            release(reference)

    def run_task(self, model: str, variant: str | None, name: str, backend: str | None = None, drafts=None):
        """Score a task with one checkpoint (loaded, or already resident), fed the reference tokenizer's ids;
        `drafts`: the reference's answers by item id, to check rather than decode (tasks/generation.py)."""
        from .tasks.suite import run_task

        loaded = self.residency.checkpoint(model, variant, backend or self.ws.backend_of(model, variant))
        self.residency.check_tokenizer(model, variant, loaded)
        task = self.ws.task(model, name)
        with progress.stage(f"{model}/{variant or 'reference'}: {name}", total=len(task.items), unit="item"):
            return run_task(task, loaded.backend, self.ws.reference_tokenizer(model), self.ws.settings(model),
                            drafts=drafts)

    def compare_task(self, model: str, variant: str, name: str, baseline):
        """A variant's task result against the FP16 baseline's, item by item; cached per case."""
        from .errors import ProtocolMismatch
        from .stats import paired_drop

        key = (model, variant, name, self.ws.profile)
        if key not in self._task_comparisons:
            result = self.run_task(model, variant, name, drafts=dict(zip(baseline.ids, baseline.answers, strict=True)))
            if result.ids != baseline.ids:
                raise ProtocolMismatch(f"{model}/{variant} task {name}: items differ from the baseline's "
                                       f"({len(result.ids)} vs {len(baseline.ids)})")
            self._task_comparisons[key] = (result, paired_drop(result.ids, baseline.correct, result.correct))
        return self._task_comparisons[key]
