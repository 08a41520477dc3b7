"""A re-baseline killed at any moment leaves the old baseline or the new one, whole.

`quantgate baseline --force` runs in a subprocess that kills itself with SIGKILL right after its
k-th write, rename or removal under baselines/ (each file written and fsynced, each os.replace,
each unlink: whatever the store does, for every k up to the number a whole run makes), and is
killed at 10 random moments while it writes; every time, the stored baseline must read back (hashes, summary,
sizes all consistent) and be either the old measurement or the new one."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from quantgate import baselines as bl

# Runs the CLI with os.fsync / os.replace / os.unlink counted: those on files under baselines/ are the
# store's steps. KILL_AT=k: SIGKILL right after the k-th; the count is printed at exit (a whole run).
FAULTS = """
import os, signal, sys
from quantgate.cli import main
root, kill_at, count = os.path.realpath(sys.argv[1]), int(os.environ.get("KILL_AT", "0")), 0
def step(target):
    global count
    if os.path.realpath(target).startswith(root):
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink
def fsync(fd):
    real_fsync(fd)
    step(os.readlink(f"/proc/self/fd/{fd}"))
def replace(src, dst, **kw):
    real_replace(src, dst, **kw)
    step(dst)
def unlink(path, **kw):
    real_unlink(path, **kw)
    step(path)
os.fsync, os.replace, os.unlink = fsync, replace, unlink
status = main(sys.argv[2:])
print(f"steps {count}", file=sys.stderr)
sys.exit(status)
"""


def rebaseline(manifest, **env):
    return subprocess.Popen([sys.executable, "-c", FAULTS, str(manifest.parent / "baselines"), "baseline",
                             "--manifest", str(manifest), "--corpus", "code", "--profile", "fast", "--force"],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def state(path):
    """(tokens scored, arrays sha256) of the baseline at `path`, read as the gate reads it."""
    stored = bl.read_baseline(path)
    arrays = json.loads(path.read_text())["arrays"]["file"]
    return stored.protocol.tokens_scored, hashlib.sha256((path.parent / arrays).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def project(tiny_zoo_template, tmp_path_factory):
    """A tiny project with an old baseline (token_cap 400) and a manifest that now asks for 360."""
    from quantgate import cli

    root = tmp_path_factory.mktemp("kill") / "project"
    shutil.copytree(tiny_zoo_template, root)
    manifest = root / "quantgate.toml"
    assert cli.main(["baseline", "--manifest", str(manifest), "--corpus", "code", "--profile", "fast"]) == 0
    manifest.write_text(manifest.read_text().replace("token_cap = 400", "token_cap = 360"))
    path = root / "baselines" / "tiny" / "code.fast.json"
    old = state(path)
    saved = root.parent / "old-baselines"
    shutil.copytree(root / "baselines", saved)
    started = time.perf_counter()
    proc = rebaseline(manifest)  # the new measurement, once, to know what "new" looks like
    assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    seconds = time.perf_counter() - started
    steps = int(proc.stderr.read().decode().rsplit("steps ", 1)[1].split()[0])
    new = state(path)
    assert old[0] != new[0] and steps >= 4
    restore_from(saved, root)
    started = time.perf_counter()
    proc = rebaseline(manifest, KILL_AT="1")  # when the first write comes (before it: imports and measuring)
    assert proc.wait() == -signal.SIGKILL
    first_write = time.perf_counter() - started
    return {"root": root, "manifest": manifest, "path": path, "saved": saved, "old": old, "new": new,
            "seconds": seconds, "first_write": first_write, "steps": steps}


def restore_from(saved, root):
    shutil.rmtree(root / "baselines")
    shutil.copytree(saved, root / "baselines")


def restore(project):
    restore_from(project["saved"], project["root"])


def test_a_kill_after_each_write_rename_or_removal_leaves_a_whole_baseline(project):
    seen = []
    for k in range(1, project["steps"] + 1):
        restore(project)
        proc = rebaseline(project["manifest"], KILL_AT=str(k))
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]  # it did reach step k
        now = state(project["path"])  # raises if the baseline is unreadable or inconsistent
        assert now in (project["old"], project["new"]), f"after step {k}"
        seen.append("new" if now == project["new"] else "old")
    assert seen[0] == "old" and seen[-1] == "new"  # the commit happened somewhere in between


def test_kills_at_10_random_moments_of_the_writing_leave_a_whole_baseline(project):
    """Killed at random moments between just before its first write and just after a whole run's end (before
    the first write nothing under baselines/ has changed; the step test above covers each boundary)."""
    rng = random.Random(0)
    seen = []
    for _ in range(10):
        restore(project)
        proc = rebaseline(project["manifest"])
        time.sleep(rng.uniform(project["first_write"] * 0.9, project["seconds"] * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = state(project["path"])  # raises if the baseline is unreadable or inconsistent
        assert now in (project["old"], project["new"])
        seen.append("new" if now == project["new"] else "old")
    assert "old" in seen  # some kills came before the commit


def test_baseline_runs_at_once_on_one_store_leave_complete_readable_baselines(project):
    """Four `quantgate baseline --force` runs on one store at the same moment (two of them on the same baseline,
    one on every profile): each ends well, and every stored baseline reads back whole, its arrays present."""
    restore(project)
    manifest = str(project["manifest"])
    runs = [["--corpus", "code", "--profile", "fast"], ["--corpus", "code", "--profile", "fast"],
            ["--corpus", "prose", "--profile", "fast"], ["--all-profiles"]]
    procs = [subprocess.Popen([sys.executable, "-m", "quantgate.cli", "baseline", "--manifest", manifest, "--force", *r],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in runs]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    stored = sorted((project["root"] / "baselines").rglob("*.json"))
    assert {p.name for p in stored} >= {"code.fast.json", "prose.fast.json", "code.full.json", "prose.full.json"}
    for path in stored:
        if path.parent.name == "tasks":
            continue
        state(path)  # raises if unreadable, inconsistent, or its arrays file is gone
    assert state(project["path"]) == project["new"]
    leftovers = [p for p in (project["root"] / "baselines").rglob("*") if p.is_file() and ".tmp" in p.name]
    assert not leftovers, leftovers
