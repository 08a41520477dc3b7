"""One evaluation session, shared by the pytest plugin and the CLI so that a baseline and a gate
measurement go through exactly the same code.

The stages, each a module with one job:
  workspace.py    what is measured, under which protocol (models, corpora, tasks, hashes)
  store.py        the FP16 baselines of corpora and tasks: path, verified read, status, atomic write
  residency.py    the build step, then one resident checkpoint at a time, audited on load
  measurement.py  scores and per-item outcomes, and their paired comparison with a baseline
`Evaluator` wires them together and is what the gate (checks.py) and the CLI call.
"""

from __future__ import annotations

from .backends import DEFAULT_BACKEND
from .errors import DeviceUnavailable
from .manifest import Manifest
from .measurement import Comparison, Measurement, Measurer
from .residency import Residency
from .store import BaselineStore, Subject
from .workspace import REFERENCE, Workspace

__all__ = ["REFERENCE", "Comparison", "Evaluator", "Measurement", "resolve_device"]


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


class Evaluator:
    def __init__(self, manifest: Manifest, profile: str, device: str, exact_kl: bool = False):
        self.workspace = Workspace(manifest=manifest, profile=profile, device=device)
        self.residency = Residency(self.workspace)
        self.measurer = Measurer(self.workspace, self.residency, exact_kl=exact_kl)
        ws = self.workspace
        # what is measured
        self.manifest, self.device = manifest, device
        self.model, self.variant, self.settings, self.corpus = ws.model, ws.variant, ws.settings, ws.corpus
        self.reference_tokenizer, self.tokenized, self.task = ws.reference_tokenizer, ws.tokenized, ws.task
        self.backend_of, self.require_backend, self.environment = ws.backend_of, ws.require_backend, ws.environment
        self.protocol, self.task_protocol = ws.protocol, ws.task_protocol
        self.reference_sha256, self.reference_parameters = ws.reference_sha256, ws.reference_parameters
        # loading and measuring
        self.build, self.checkpoint, self.release = self.residency.build, self.residency.checkpoint, self.residency.release
        self.build_notes, self.build_failures = self.residency.build_notes, self.residency.build_failures
        self.measure, self.run_task, self.compare_task = self.measurer.measure, self.measurer.run_task, self.measurer.compare_task
        self.noise_floor = self.measurer.noise_floor

    @property
    def profile(self) -> str:
        return self.workspace.profile

    @profile.setter
    def profile(self, value: str) -> None:
        self.workspace.profile = value

    @property
    def store(self) -> BaselineStore:
        return BaselineStore(self.manifest.baselines_dir, self.profile, self.manifest.default_profile)

    def comparable_baseline(self, model: str, corpus: str, backend: str = DEFAULT_BACKEND):
        """The stored corpus baseline, refused unless its protocol and reference checkpoint match ours. Each backend
        has its own: llama.cpp's reference is the F16 GGUF scored by llama.cpp, so that differences between kernels
        are not blamed on quantization."""
        return self.store.comparable(Subject(model, corpus, "corpus", backend), self.protocol(model, corpus, backend=backend),
                                     self.reference_sha256(model), self.model(model).path)

    def comparable_task_baseline(self, model: str, name: str, backend: str = DEFAULT_BACKEND):
        return self.store.comparable(Subject(model, name, "task", backend), self.task_protocol(model, name, backend=backend),
                                     self.reference_sha256(model), self.model(model).path)

    def compare(self, model: str, variant: str, corpus: str, baseline) -> Comparison:
        """A variant against a corpus baseline, paired by token (measurement.Measurer.compare); KL divergence
        needs the baseline's top-k rows with the manifest's k."""
        subject = Subject(model, corpus, "corpus", self.backend_of(model, variant))
        baseline.require_distributions(self.settings(model).top_k, self.store.command(subject))
        return self.measurer.compare(model, variant, corpus, baseline)
