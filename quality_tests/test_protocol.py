"""quantgate's protocol checks, as the installed quantgate defines them (quantgate/quality_tests/protocol.py)."""

from quantgate.quality_tests.protocol import *  # noqa: F401,F403
