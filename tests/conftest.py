import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

XDIST_ENVIRONMENT = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")


def pytest_configure(config):
    """On pytest-xdist workers (`./run.sh test`: one per core), each worker keeps to its own share of the cores, as
    the quality runs' workers do, and so do the processes its tests start (they inherit it): torch and llama.cpp
    then start one thread per core of the share instead of one per core of the machine, so the workers' threads
    do not outnumber the cores and spin against each other."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput:
        from quantgate.parallel import bind_cpu_worker, worker_index

        bind_cpu_worker(worker_index(workerinput), int(workerinput.get("workercount", 1)))


@pytest.fixture(autouse=True)
def _not_an_xdist_worker(monkeypatch):
    """When this suite itself runs on pytest-xdist workers (`./run.sh test`), the inner runs it drives (pytester, in
    process or as subprocesses) must not inherit the worker's environment: syrupy reads PYTEST_XDIST_WORKER from it,
    takes an inner serial run for a worker and then neither prints nor finishes its snapshot report."""
    for name in XDIST_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_zoo_template(tmp_path_factory) -> Path:
    """Built once per session; tests copy it so they can break their own copy."""
    import datasets  # noqa: F401  imported out here: pytester's in-process runs drop modules
    import tinyzoo  # imported inside them, and pyarrow cannot register datasets' types twice

    root = tmp_path_factory.mktemp("tinyzoo-template")
    tinyzoo.build(root)
    return root


@pytest.fixture
def tiny_project(tiny_zoo_template, tmp_path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(tiny_zoo_template, root)
    return root
