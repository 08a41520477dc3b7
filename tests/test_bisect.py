"""`git bisect run pytest -m quality --quality-bisect` finds a planted bad commit and skips an untestable one."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tinyzoo

from quantgate import cli

REPO = Path(__file__).resolve().parents[1]

VARIANT = """
[[models.tiny.variants]]
name = "candidate"
format = "fp16"
bits = 16
path = "models/candidate"
max_ratio = 1.05
max_kl = 0.05
min_top1 = 0.9
"""


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def commit(repo, message, *, candidate=None):
    """One commit; candidate = name of the model copied in as the variant, 'missing' to delete it."""
    target = repo / "models" / "candidate"
    if candidate:
        shutil.rmtree(target, ignore_errors=True)
        if candidate != "missing":
            shutil.copytree(repo / "models" / candidate, target)
    with open(repo / "CHANGELOG", "a") as fh:
        fh.write(message + "\n")
    # Forget the index's stat cache: copytree keeps mtimes, so a same-size file swapped in within the
    # same second can look unchanged to `git add` (racy git) and the planted commit would not plant anything.
    git(repo, "rm", "-r", "-q", "--cached", "--ignore-unmatch", "models/candidate")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_bisect_finds_the_planted_bad_commit(tiny_zoo_template, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_zoo_template, repo)
    manifest = tinyzoo.write_manifest(repo, variants=VARIANT)
    (repo / "quality_tests").mkdir()
    shutil.copy(REPO / "quality_tests" / "test_perplexity.py", repo / "quality_tests")
    (repo / ".gitignore").write_text("reports/\n__pycache__/\n")
    assert cli.main(["baseline", "--manifest", str(manifest)]) == 0
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")

    history = {"good0": commit(repo, "good 0", candidate="close")}
    for i in range(1, 4):
        history[f"good{i}"] = commit(repo, f"good {i}")
    history["missing"] = commit(repo, "checkpoint not committed", candidate="missing")
    history["restored"] = commit(repo, "checkpoint restored", candidate="close")
    history["bad"] = commit(repo, "planted: swap in a damaged checkpoint", candidate="worse")
    history["bad+1"] = commit(repo, "after 1")
    history["bad+2"] = commit(repo, "after 2")

    weights = {k: git(repo, "ls-tree", "-r", history[k], "models/candidate") for k in ("restored", "bad")}
    assert weights["restored"] != weights["bad"], "the planted commit must change the checkpoint"

    git(repo, "bisect", "start", history["bad+2"], history["good0"])
    run = subprocess.run(
        ["git", "bisect", "run", sys.executable, "-m", "pytest", "-m", "quality", "--quality-bisect", "-q",
         "-p", "no:cacheprovider", "quality_tests"],
        cwd=repo, capture_output=True, text=True, timeout=600)
    log = git(repo, "bisect", "log")
    git(repo, "bisect", "reset")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{history['bad']} is the first bad commit" in run.stdout
    assert f"# skip: [{history['missing']}]" in log  # the commit with no checkpoint exited 125
