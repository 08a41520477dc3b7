"""quantgate's task_scores checks, as the installed quantgate defines them (quantgate/quality_tests/task_scores.py)."""

from quantgate.quality_tests.task_scores import *  # noqa: F401,F403
