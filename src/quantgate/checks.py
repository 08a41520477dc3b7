"""Quality checks as the gate's tests call them: measure, compare, record, then pass or fail."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

from .ablation import reversal_partners
from .errors import CannotTest, DeviceUnavailable, QuantgateError
from .evaluation import Evaluator
from .gate import FAIL, REVERSAL, XFAIL, judge, judge_metric
from .metrics import RELATIVE_PERPLEXITY, TASK_SCORE_DROP
from .overlap import calibration_overlap
from .protocol import environment_changes
from .report import Record, RunReport
from .thresholds import TableRow, choose_bound, distribution_bound, drop_bound, find_row


@dataclass(frozen=True)
class Case:
    model: str
    variant: str
    corpus: str

    @property
    def id(self) -> str:
        return f"{self.model}/{self.variant}/{self.corpus}"


@dataclass(frozen=True)
class MetricCase:
    """A case and one metric registered beyond the built-in ones (quality_tests: test_registered_metric)."""

    case: Case
    metric: str

    @property
    def id(self) -> str:
        return f"{self.case.id}/{self.metric}"


@dataclass(frozen=True)
class TaskCase:
    model: str
    variant: str
    task: str

    @property
    def id(self) -> str:
        return f"{self.model}/{self.variant}/{self.task}"


@contextmanager
def recorded_outcome(record: Record):
    """Measuring a case: a missing device or library is a skip, other problems keep their class
    (CannotTest: exit 125 under --quality-bisect); the record says which, in one line."""
    try:
        yield
    except DeviceUnavailable as exc:  # e.g. a CUDA-only format on a CPU machine
        record.verdict, record.detail = "skipped", str(exc).splitlines()[0]
        pytest.skip(str(exc))
    except CannotTest as exc:
        record.verdict, record.detail = "cannot test", str(exc).splitlines()[0]
        raise
    except QuantgateError as exc:
        record.detail = str(exc).splitlines()[0]
        raise


FLIPS_SHOWN = 8  # flipped item ids quoted in a failure message (all of them are in --quality-json)


class Gate:
    def __init__(self, evaluator: Evaluator, table: list[TableRow], report: RunReport,
                 capabilities: dict[str, float] | None = None):
        self.evaluator, self.table, self.report = evaluator, table, report
        self.capabilities = capabilities or {}

    def _record(self, case: Case, metric: str) -> tuple[Record, object]:
        variant = self.evaluator.variant(case.model, case.variant)
        record = Record(model=case.model, variant=case.variant, corpus=case.corpus, metric=metric,
                        format=variant.format, bits=variant.bits, group_size=variant.group_size, desc_act=variant.desc_act,
                        scheme=variant.scheme, outlier_handling=variant.outlier_handling, calibration=variant.calibration,
                        backend=variant.backend, verdict="error")
        self.report.records.append(record)
        return record, variant

    def _measure(self, case: Case, record: Record):
        """(baseline, comparison or None, plain measurement or None), as skips/failures that say why."""
        ev = self.evaluator
        with recorded_outcome(record):
            variant = ev.variant(case.model, case.variant)
            ev.require_backend(case.model, case.variant)
            baseline = ev.comparable_baseline(case.model, case.corpus, variant.backend)
            changes = environment_changes(baseline.environment, ev.environment())
            if changes:
                self.report.environment_changes[os.path.relpath(baseline.path, ev.manifest.root)] = changes
            if baseline.topk_ids is None and record.metric == "relative_perplexity":
                return baseline, None, ev.measure(case.model, case.variant, case.corpus)  # an older baseline schema
            comparison = ev.compare(case.model, case.variant, case.corpus, baseline)
            return baseline, comparison, comparison.measurement

    def relative_perplexity(self, case: Case) -> None:
        ev = self.evaluator
        ref = ev.model(case.model)
        record, variant = self._record(case, RELATIVE_PERPLEXITY.name)
        try:
            bound = choose_bound(self.table, variant.format, variant.bits,
                                 variant_override=variant.max_ratio, model_overrides=ref.thresholds)
        except QuantgateError as exc:
            record.detail = str(exc).splitlines()[0]
            raise
        record.bound, record.bound_source = bound.value, bound.source
        record.table_row = bound.row.describe() if bound.row else None
        baseline, comparison, m = self._measure(case, record)
        stats = comparison.stats if comparison else None
        tolerance = variant.reversal_tolerance if variant.reversal_tolerance is not None else ref.reversal_tolerance
        overlap = calibration_overlap(ev.workspace, case.model, case.variant, case.corpus)
        j = judge(variant=f"{case.model}/{case.variant}", corpus=case.corpus, value=m.perplexity, baseline=baseline.perplexity,
                  bound=bound, reversal_tolerance=tolerance, tokens=m.scores.n,
                  baseline_source=os.path.relpath(baseline.path, ev.manifest.root), protocol_line=protocol_line(m),
                  ratio_interval=stats.ppl_ratio_interval if stats else None, rule=ev.manifest.exceedance,
                  noise_log_ratio=baseline.noise_log_ratio, calibration=overlap, partners=reversal_partners(
                      ref.variants, self.report.records, case.model, case.variant, case.corpus))
        record.verdict, record.value, record.baseline, record.ratio = j.verdict, m.perplexity, baseline.perplexity, j.ratio
        record.calibration_overlap = overlap.share if overlap is not None else None
        record_measurement(record, m, ev.reference_parameters(case.model))
        record_text_measures(record, m, baseline)
        record.note = j.note
        if stats:
            record.distribution, record.windows = stats.as_dict(), stats.windows
        if j.note:
            import warnings

            warnings.warn(pytest.PytestWarning(j.message), stacklevel=2)
        enforce(j, record)

    def kl_divergence(self, case: Case) -> None:
        self.metric(case, "kl_divergence")

    def top1_agreement(self, case: Case) -> None:
        self.metric(case, "top1_agreement")

    def metric(self, case: Case, name: str) -> None:
        """A registered metric (metrics.py) of the variant's paired comparison with FP16, against its bound:
        the manifest variant's, else the table row's, else the metric's default."""
        from .metrics import get_metric
        from .thresholds import Bound

        spec = get_metric(name)
        record, variant = self._record(case, name)
        record.higher_is_better = spec.higher_is_better
        row = find_row(self.table, variant.format, variant.bits)
        bound = distribution_bound(row, spec.bound_key, getattr(variant, spec.bound_key, None))
        if bound.value is None and spec.default_bound is not None:
            bound = Bound(spec.default_bound, f"metric {name!r} default", row)
        record.bound, record.bound_source = bound.value, bound.source
        record.table_row = row.describe() if row else None
        baseline, comparison, m = self._measure(case, record)
        st = comparison.stats
        value, interval = spec.compute(st)
        details = spec.details(st)
        marginal = row is not None and row.acceptable == "Marginal"
        limit = bound.value
        if name == "top1_agreement" and limit is not None and baseline.noise_top1:
            limit -= baseline.noise_top1  # the reference's own top-1 flips on re-scoring (GPU)
            details.append(f"noise     : minimum lowered by {baseline.noise_top1:.4g}, the reference's own top-1 "
                           "disagreement on re-scoring")
        j = judge_metric(variant=f"{case.model}/{case.variant}", corpus=case.corpus, metric=spec.label,
                         value=value, interval=interval, bound=limit, higher_is_better=spec.higher_is_better,
                         rule=self.evaluator.manifest.exceedance,
                         row_text=f"{row.describe() if row else 'none'} ({bound.source})", details=details,
                         marginal=marginal, problematic=row is not None and row.acceptable == "Problematic")
        record.verdict, record.value = j.verdict, value
        record.interval = None if interval is None else [interval.low, interval.high]
        record.tokens_scored, record.protocol_fingerprint, record.note = st.tokens, m.protocol.fingerprint, j.note
        enforce(j, record)

    def task_score(self, case: TaskCase) -> None:
        """The variant's task score against FP16's, paired by item, within the capability's max drop."""
        ev = self.evaluator
        variant = ev.variant(case.model, case.variant)
        spec = ev.manifest.tasks[case.task]
        record = Record(model=case.model, variant=case.variant, corpus=f"task:{case.task}", metric=TASK_SCORE_DROP.name,
                        format=variant.format, bits=variant.bits, group_size=variant.group_size,
                        desc_act=variant.desc_act, scheme=variant.scheme, outlier_handling=variant.outlier_handling,
                        calibration=variant.calibration, backend=variant.backend, verdict="error",
                        capability=spec.capability)
        self.report.records.append(record)
        row = find_row(self.table, variant.format, variant.bits)
        with recorded_outcome(record):
            bound = drop_bound(self.capabilities, spec.capability, variant.max_drop)
            ev.require_backend(case.model, case.variant)
            baseline = ev.comparable_task_baseline(case.model, case.task, variant.backend)
            result, cmp = ev.compare_task(case.model, case.variant, case.task, baseline)
        problematic = row is not None and row.acceptable == "Problematic" and spec.capability not in variant.max_drop
        limit = None if problematic else bound.value
        record.bound, record.bound_source = bound.value, bound.source
        record.table_row = row.describe() if row else None
        record.value, record.baseline = cmp.variant_score, cmp.reference_score
        record.interval = [cmp.drop_interval.low, cmp.drop_interval.high]
        record.tokens_scored, record.eval_seconds = cmp.items, round(result.seconds, 3)
        record.protocol_fingerprint = baseline.fingerprint
        record.distribution = {**cmp.as_dict(), "scoring": spec.scoring, "task": case.task}

        details = task_details(cmp, spec, baseline, os.path.relpath(baseline.path, ev.manifest.root))
        j = judge_metric(variant=f"{case.model}/{case.variant}", corpus=f"task {case.task}",
                         metric=f"{spec.capability} score drop", value=cmp.drop, interval=cmp.drop_interval,
                         bound=limit, higher_is_better=TASK_SCORE_DROP.higher_is_better, rule=ev.manifest.exceedance,
                         row_text=f"{row.describe() if row else 'none'}; max drop from {bound.source}",
                         details=details, marginal=row is not None and row.acceptable == "Marginal",
                         problematic=problematic)
        note = j.note
        if cmp.gained and len(cmp.gained) > len(cmp.lost) and cmp.mcnemar_p < 0.05:
            note = (f"the variant scores significantly better than FP16 ({len(cmp.gained)} gained vs {len(cmp.lost)} "
                    f"lost, p = {cmp.mcnemar_p:.3g}): investigate before trusting it")
            import warnings

            warnings.warn(pytest.PytestWarning(f"{case.id}: {note}"), stacklevel=2)
        record.verdict, record.note = j.verdict, note
        enforce(j, record)


def enforce(j, record: Record) -> None:
    """The verdict at pytest's edge: a failure or a reversal fails the test, an open-ended row xfails it."""
    if j.outcome in (FAIL, REVERSAL):
        record.detail = j.message.splitlines()[0]
        pytest.fail(j.message, pytrace=False)
    if j.outcome == XFAIL:
        pytest.xfail(j.message)


def protocol_line(m) -> str:
    """The protocol of a measurement, in one line of a failure message."""
    p = m.protocol
    line = (f"{p.fingerprint} (corpus {p.corpus} {p.text_sha256[:12]}, max_length {p.max_length}, "
            f"stride {p.stride}, token_cap {p.token_cap}, {p.backend}, {p.dtype}, {p.device_class}, {p.scoring_rule})")
    if m.description.get("tokenizer", "own") != "own":
        line += f"; tokenizer: {m.description['tokenizer']}"  # the variant's option
    return line


def record_measurement(record: Record, m, parameters: int | None) -> None:
    """What the record keeps of a measurement: protocol, tokens, kernels, tokenizer, size and timings."""
    record.protocol_fingerprint, record.tokens_scored = m.protocol.fingerprint, m.scores.n
    record.kernels = m.description.get("kernels", [])
    record.placement = m.description.get("placement")
    record.tokenizer = m.description.get("tokenizer")
    record.size_bytes, record.load_seconds = m.description.get("size_bytes"), m.description.get("load_seconds")
    if record.size_bytes and parameters:
        record.bits_per_weight = round(record.size_bytes * 8 / parameters, 3)
    record.eval_seconds = round(m.seconds, 3)


def record_text_measures(record: Record, m, baseline) -> None:
    """Bits per byte and word perplexity, FP16's and the variant's, on the text the scored tokens cover."""
    if m.text is None:
        return
    fp16 = m.text_measures(float(np.sum(baseline.logprobs, dtype=np.float64)))
    variant = m.text_measures()
    record.text = {"bytes": m.text.bytes, "words": m.text.words}
    record.bits_per_byte = {"fp16": fp16["bits_per_byte"], "variant": variant["bits_per_byte"]}
    record.word_perplexity = {"fp16": fp16["word_perplexity"], "variant": variant["word_perplexity"]}


def task_details(cmp, spec, baseline, baseline_source: str) -> list[str]:
    """A task check's message lines: scores, flipped items (the first FLIPS_SHOWN named) and the baseline."""
    def listed(ids: tuple[str, ...]) -> str:
        shown = ", ".join(ids[:FLIPS_SHOWN])
        return (shown + (f", ... ({len(ids) - FLIPS_SHOWN} more)" if len(ids) > FLIPS_SHOWN else "")) or "none"

    return [f"scores    : FP16 {cmp.reference_score:.4f}, variant {cmp.variant_score:.4f} over {cmp.items} "
            f"items ({spec.scoring}, {spec.schema}, {spec.shots}-shot)",
            f"flipped   : {len(cmp.lost)} lost, {len(cmp.gained)} gained (exact McNemar p = {cmp.mcnemar_p:.3g})",
            f"lost      : {listed(cmp.lost)}",
            f"gained    : {listed(cmp.gained)}",
            f"baseline  : {baseline_source} (task protocol {baseline.fingerprint})"]
