"""quantgate: a pytest quality gate for quantized LLM checkpoints.

Import-light on purpose: the pytest plugin loads this package at every pytest start-up,
so torch and transformers are imported only inside the functions that need them.
"""

__version__ = "0.1.0"
