"""Calibration text overlapping evaluation text.

A variant calibrated on the text it is evaluated on (WikiText used for both is the known case) can
score below FP16 there: the quantizer fitted its rounding to those very sequences. When a variant's
`calibration` names a corpus of the manifest, the gate measures the share of each evaluation
corpus's token n-grams (every position's, in the reference's tokens as scored) that also occur in
the calibration text, shows it beside the variant, and above the declared share
(`[quantgate] calibration_overlap`) attributes a perplexity reversal on that corpus to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N = 8  # tokens per n-gram: long enough that shared boilerplate is rare, short enough to catch a planted passage


@dataclass(frozen=True)
class CalibrationOverlap:
    calibration: str  # the calibration corpus's name
    corpus: str  # the evaluation corpus's
    share: float  # of the evaluation n-grams found in the calibration text
    threshold: float  # the declared share at and above which a reversal is attributed to it
    n: int = N

    @property
    def attributed(self) -> bool:
        return self.share >= self.threshold

    def describe(self) -> str:
        return (f"calibration text {self.calibration!r} holds {self.share:.1%} of corpus {self.corpus!r}'s "
                f"{self.n}-grams (declared share {self.threshold:.0%})")


def _hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit polynomial hash per n-gram (wrapping arithmetic; a collision needs 2^32 n-grams to be likely)."""
    ids = np.asarray(ids, dtype=np.uint64)
    if len(ids) < n:
        return np.zeros(0, dtype=np.uint64)
    out = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    base = np.uint64(1_000_003)
    with np.errstate(over="ignore"):
        for k in range(n):
            out = out * base + ids[k:len(ids) - n + 1 + k] + np.uint64(1)
    return out


def ngram_share(evaluation: np.ndarray, calibration: np.ndarray, n: int = N) -> float:
    """The share of the evaluation stream's n-grams (by position) that occur anywhere in the calibration stream."""
    ev = _hashes(evaluation, n)
    if ev.size == 0:
        return 0.0
    return float(np.isin(ev, np.unique(_hashes(calibration, n))).mean())


def calibration_overlap(ws, model: str, variant: str, corpus: str) -> CalibrationOverlap | None:
    """How much of the corpus (as scored) the variant's calibration text holds, when its `calibration` names a
    corpus of the manifest; None otherwise. `ws` is the run's workspace (its token streams are cached)."""
    import dataclasses

    calibration = ws.variant(model, variant).calibration
    if calibration not in ws.manifest.corpora:
        return None
    settings = ws.settings(model)
    whole = ws.tokenized(model, calibration, dataclasses.replace(settings, token_cap=None))
    share = ngram_share(ws.stream(model, corpus, settings).ids, whole.ids)
    return CalibrationOverlap(calibration, corpus, share, ws.manifest.calibration_overlap)
