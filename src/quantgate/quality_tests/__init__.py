"""The gate's quality checks, defined once, in the installed quantgate.

A project's test module imports them (`quantgate init` writes `quality_tests/test_quality.py`):

    from quantgate.quality_tests import *  # noqa: F401,F403

pytest collects the imported test functions as the module's own, so the checks a project runs are always
those of the quantgate it has installed: they cannot drift from it as copied files would. Their syrupy
snapshots live beside the importing module (`quality_tests/__snapshots__/test_quality.ambr`).
"""

from .perplexity import test_kl_divergence, test_registered_metric, test_relative_perplexity, test_top1_agreement
from .protocol import test_protocol_snapshot
from .task_scores import test_task_protocol_snapshot, test_task_score

__all__ = ["test_relative_perplexity", "test_kl_divergence", "test_top1_agreement", "test_registered_metric",
           "test_protocol_snapshot", "test_task_score", "test_task_protocol_snapshot"]
