"""Errors quantgate raises. Each one names the problem; the class says how a gate treats it.

`CannotTest` means "this commit cannot be judged here" (exit 125 under --quality-bisect,
so `git bisect run` skips it). Every other `QuantgateError` is a real "bad" outcome.
"""

from __future__ import annotations


class QuantgateError(Exception):
    """Base class: a problem quantgate detected and can explain."""


class ManifestError(QuantgateError):
    """The manifest (quantgate.toml) is malformed; the message names the file and key."""

    def __init__(self, path, key: str, problem: str):
        self.path, self.key, self.problem = path, key, problem
        super().__init__(f"{path}: [{key}] {problem}")


class CannotTest(QuantgateError):
    """The measurement cannot be made or compared here; it says nothing about quality."""


class CheckpointMissing(CannotTest):
    pass


class DeviceUnavailable(CannotTest):
    """The check needs hardware this machine lacks (e.g. a CUDA-only kernel): skipped, with the reason."""


class BackendUnavailable(DeviceUnavailable):
    """The check needs an optional native library that is not installed here (e.g. llama-cpp-python)."""


class BuildFailed(CannotTest):
    """A recipe variant could not be built here: says nothing about its quality (125 under --quality-bisect)."""


class ProtocolMismatch(CannotTest):
    """A measurement and a baseline were (or would be) made under different protocols."""


class BaselineMissing(QuantgateError):
    pass


class BaselineFormatError(QuantgateError):
    """A baseline file is corrupt, malformed or of a schema this version cannot read."""


class LoadAuditError(QuantgateError):
    """A checkpoint did not load whole: missing/unexpected weights, wrong shapes, NaN/Inf."""


class TokenizerMismatch(QuantgateError):
    """A variant tokenizes the corpus differently from its reference: perplexities are not comparable."""


class NonFiniteScores(QuantgateError):
    """A model produced NaN or Inf log-probabilities."""
