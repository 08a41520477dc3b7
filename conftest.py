"""Repository glue only; the machinery lives in the `quantgate` plugin (src/quantgate/plugin.py)."""

import os

# Nothing in this repository's runs may reach a model or data hub: everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The machinery's end-to-end tests drive inner pytest runs.
pytest_plugins = ["pytester"]
