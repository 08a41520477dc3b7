"""Quality checks as the gate's tests call them: measure, compare, record, then pass or fail."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from .errors import CannotTest, DeviceUnavailable, QuantgateError
from .evaluation import Evaluator
from .gate import FAIL, REVERSAL, XFAIL, judge
from .protocol import environment_changes
from .report import Record, RunReport
from .thresholds import TableRow, choose_bound


@dataclass(frozen=True)
class Case:
    model: str
    variant: str
    corpus: str

    @property
    def id(self) -> str:
        return f"{self.model}/{self.variant}/{self.corpus}"


class Gate:
    def __init__(self, evaluator: Evaluator, table: list[TableRow], report: RunReport):
        self.evaluator, self.table, self.report = evaluator, table, report

    def relative_perplexity(self, case: Case) -> None:
        ev = self.evaluator
        ref = ev.model(case.model)
        variant = ev.variant(case.model, case.variant)
        record = Record(model=case.model, variant=case.variant, corpus=case.corpus, metric="relative_perplexity",
                        format=variant.format, bits=variant.bits, group_size=variant.group_size, desc_act=variant.desc_act,
                        scheme=variant.scheme, outlier_handling=variant.outlier_handling, calibration=variant.calibration,
                        backend=variant.backend, verdict="error")
        self.report.records.append(record)
        try:
            bound = choose_bound(self.table, variant.format, variant.bits,
                                 variant_override=variant.max_ratio, model_overrides=ref.thresholds)
            record.bound, record.bound_source = bound.value, bound.source
            record.table_row = bound.row.describe() if bound.row else None
            ev.require_backend(case.model, case.variant)
            baseline = ev.comparable_baseline(case.model, case.corpus, variant.backend)
            baseline_file = os.path.relpath(baseline.path, ev.manifest.root)
            changes = environment_changes(baseline.environment, ev.environment())
            if changes:
                self.report.environment_changes[baseline_file] = changes
            m = ev.measure(case.model, case.variant, case.corpus)
        except DeviceUnavailable as exc:  # e.g. a CUDA-only format on a CPU machine
            record.verdict, record.detail = "skipped", str(exc).splitlines()[0]
            pytest.skip(str(exc))
        except CannotTest as exc:
            record.verdict, record.detail = "cannot test", str(exc).splitlines()[0]
            raise
        except QuantgateError as exc:
            record.detail = str(exc).splitlines()[0]
            raise
        p = m.protocol
        protocol_line = (f"{p.fingerprint} (corpus {p.corpus} {p.text_sha256[:12]}, max_length {p.max_length}, "
                         f"stride {p.stride}, token_cap {p.token_cap}, {p.backend}, {p.dtype}, {p.device_class}, "
                         f"{p.scoring_rule})")
        tolerance = variant.reversal_tolerance if variant.reversal_tolerance is not None else ref.reversal_tolerance
        j = judge(variant=f"{case.model}/{case.variant}", corpus=case.corpus, value=m.perplexity, baseline=baseline.perplexity,
                  bound=bound, reversal_tolerance=tolerance, tokens=m.scores.n,
                  baseline_source=baseline_file, protocol_line=protocol_line)
        record.verdict, record.value, record.baseline, record.ratio = j.verdict, m.perplexity, baseline.perplexity, j.ratio
        record.protocol_fingerprint, record.tokens_scored = p.fingerprint, m.scores.n
        record.kernels = m.description.get("kernels", [])
        record.size_bytes, record.load_seconds = m.description.get("size_bytes"), m.description.get("load_seconds")
        parameters = ev.reference_parameters(case.model)
        if record.size_bytes and parameters:
            record.bits_per_weight = round(record.size_bytes * 8 / parameters, 3)
        record.eval_seconds = round(m.seconds, 3)
        if j.outcome in (FAIL, REVERSAL):
            record.detail = j.message.splitlines()[0]
            pytest.fail(j.message, pytrace=False)
        if j.outcome == XFAIL:
            pytest.xfail(j.message)
