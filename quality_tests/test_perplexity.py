"""quantgate's perplexity checks, as the installed quantgate defines them (quantgate/quality_tests/perplexity.py)."""

from quantgate.quality_tests.perplexity import *  # noqa: F401,F403
