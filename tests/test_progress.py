"""The live progress line: every scoring path moves it by exactly what it did (tokens, items), work outside the
stage's count moves nothing, it costs nothing when off, and on a real terminal it reaches the user while
pytest captures the tests' output."""

import io
import os
import re
import select
import subprocess
import sys

import numpy as np
import pytest

from quantgate import progress
from quantgate.backends.base import ScoringBackend


@pytest.fixture
def live():
    stream = io.StringIO()
    progress.use(stream)
    yield stream
    progress.use(None)


@pytest.fixture(scope="module")
def tiny(tiny_zoo_template):
    from quantgate.checkpoints.loading import load_checkpoint

    return load_checkpoint(tiny_zoo_template / "models" / "reference", fmt="fp16", dtype="float32", device="cpu",
                           what="tiny")


def _count() -> int:
    return progress._bars[-1].n


def test_scoring_a_corpus_counts_every_scored_token_once(live, tiny):
    from quantgate.perplexity import count_scored

    ids = np.arange(300) % 50
    expected = count_scored(len(ids), 64, 32)
    with progress.stage("tiny: corpus", total=expected, unit="tok"):
        scores = tiny.backend.loglikelihood_rolling(ids, max_length=64, stride=32, batch_size=3)
        assert _count() == expected == scores.n
    assert "tiny: corpus" in live.getvalue() and not progress._bars


def _groups(tok):
    prompts = ["def f(x):\n    return", "The river", "import os\nos.", "class A:\n    def"]
    choices = [" x", " y + 1", " z", " path"]
    return [(tok(p, add_special_tokens=False)["input_ids"], [tok(c, add_special_tokens=False)["input_ids"] for c in choices])
            for p in prompts]


class _Generic(ScoringBackend):
    """The generic (flattened, one window at a time) path over the same model, as a backend without KV sharing."""

    def __init__(self, inner):
        self.inner = inner

    def iter_logprobs(self, ids, windows, batch_size):
        return self.inner.iter_logprobs(ids, windows, batch_size)


@pytest.mark.parametrize("generic", [False, True], ids=["shared-context", "generic"])
def test_multiple_choice_and_generation_count_items(live, tiny, generic):
    backend = _Generic(tiny.backend) if generic else tiny.backend
    groups = _groups(tiny.tokenizer) * 20
    with progress.stage("tiny: task", total=len(groups), unit="item"):
        backend.loglikelihood_grouped(groups, max_length=64, batch_size=4)
        assert _count() == len(groups)
    contexts = [g[0] for g in groups[:7]]
    with progress.stage("tiny: generation", total=len(contexts), unit="item"):
        backend.generate_batch(contexts, max_new_tokens=3, max_length=64, stop=[], batch_size=3)
        assert _count() == len(contexts)


def test_the_neutral_prompt_of_acc_pmi_is_not_an_item(live, tiny):
    from quantgate.tasks.multiple_choice import ChoiceItem, score_choices

    items = [ChoiceItem(id=str(i), prompt=f"x = {i}\ny =", choices=(" 1", " x", " y", " 2"), answer=1) for i in range(9)]
    with progress.stage("tiny: pmi", total=len(items), unit="item"):
        score_choices(tiny.backend, tiny.tokenizer, items, scoring="acc_pmi", max_length=64, batch_size=4)
        assert _count() == len(items)


def test_off_it_draws_nothing_and_keeps_no_state(tiny):
    progress.use(None)
    with progress.stage("nothing", total=5, unit="tok"):
        tiny.backend.loglikelihood_rolling(np.arange(100) % 50, max_length=64, stride=32, batch_size=2)
        assert not progress._bars


def test_a_terminal_sees_the_live_line_while_pytest_captures(tmp_path, tiny_zoo_template):
    """A real run in a pseudo-terminal: the live line (stage, count of total, rate) is drawn during the checks
    although pytest captures their output; the per-variant line follows."""
    import shutil

    import tinyzoo

    from quantgate import cli

    project = tmp_path / "project"
    shutil.copytree(tiny_zoo_template, project)
    manifest = tinyzoo.write_manifest(project, variants=tinyzoo.GOOD_VARIANTS)
    tests = project / "quality_tests"
    tests.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(repo, "quality_tests", "test_perplexity.py"), tests)
    assert cli.main(["baseline", "--manifest", str(manifest), "--corpus", "code"]) == 0
    main, secondary = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-m", "quality", "-p", "no:cacheprovider",
                             "-k", "relative_perplexity and close and code"], cwd=project,
                            stdin=secondary, stdout=secondary, stderr=secondary,
                            env={**os.environ, "COLUMNS": "150", "TQDM_MININTERVAL": "0"})
    os.close(secondary)
    out = b""
    while True:
        ready, _, _ = select.select([main], [], [], 300)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(main)
    text = out.decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]
    assert re.search(r"tiny/close: loading", text), text[-3000:]
    assert re.search(r"tiny/close: code: .*[\d.]+k?/[\d.]+k? \[.*tok/s\]", text), text[-3000:]
    assert "quantgate: tiny/close:" in text
