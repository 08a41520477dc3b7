"""The code-execution sandbox: canonical HumanEval solutions pass, hostile programs are contained."""

import textwrap
import time
import uuid
from pathlib import Path

import pytest

from quantgate.tasks.sandbox import FAILED, PASSED, TIMED_OUT, Limits, run_untrusted

FAST = Limits(timeout_s=3.0)
APPLIED = set(run_untrusted("pass").confinement)  # what this platform allows


def needs(feature):
    return pytest.mark.skipif(feature not in APPLIED, reason=f"this platform does not allow {feature} "
                                                              f"(applied here: {sorted(APPLIED)})")


def leftover_processes(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries the marker (root can read every /proc/*/environ)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def run(source, limits=FAST):
    marker = f"qg-{uuid.uuid4().hex}"
    outcome = run_untrusted(textwrap.dedent(source), limits, marker=marker)
    time.sleep(0.2)  # the kernel reaps a killed namespace asynchronously
    return outcome, leftover_processes(marker)


@needs("landlock")
@needs("pid namespace")
def test_confinement_is_reported():
    outcome, _ = run("print('ok')")
    assert outcome.status == PASSED
    assert {"rlimits", "network namespace", "pid namespace", "landlock"} <= set(outcome.confinement)


def test_infinite_loop_times_out_counts_as_failed_and_leaves_nothing_behind():
    outcome, left = run("while True:\n    pass\n", Limits(timeout_s=1.0))
    assert outcome.status == TIMED_OUT and outcome.seconds < 3 and left == []


@pytest.mark.parametrize("source, error", [
    ("raise RuntimeError('boom')", "RuntimeError: boom"),
    ("def add(a, b):\n    return a - b\nassert add(2, 2) == 4, 'wrong answer'", "AssertionError: wrong answer"),
])
def test_exception_and_wrong_answer_fail(source, error):
    outcome, _ = run(source)
    assert outcome.status == FAILED and error in outcome.stderr_tail


def test_memory_bomb_fails_and_the_host_is_unharmed():
    outcome, left = run("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n", Limits(memory_bytes=256 << 20))
    assert outcome.status == FAILED and "MemoryError" in outcome.stderr_tail and left == []
    assert bytearray(64 << 20)  # this process still allocates


@needs("landlock")
def test_writing_or_deleting_outside_the_working_directory_is_blocked(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    outcome, _ = run(f"""
        import os
        results = []
        for attempt in (lambda: open({str(victim)!r}, 'w').write('owned'), lambda: os.remove({str(victim)!r}),
                        lambda: open({str(tmp_path / 'new.txt')!r}, 'w').write('x')):
            try:
                attempt()
                results.append('done')
            except PermissionError:
                results.append('blocked')
        open('inside.txt', 'w').write('allowed')  # its own directory stays writable
        assert results == ['blocked'] * 3, results
    """)
    assert outcome.status == PASSED, outcome.stderr_tail
    assert victim.read_text() == "untouched" and not (tmp_path / "new.txt").exists()


@needs("landlock")
def test_the_repository_cannot_be_read():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    outcome, _ = run(f"open({str(readme)!r}).read()")
    assert outcome.status == FAILED and "PermissionError" in outcome.stderr_tail


@needs("network namespace")
def test_no_network():
    outcome, _ = run("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)")
    assert outcome.status == FAILED and "Network is unreachable" in outcome.stderr_tail


@needs("pid namespace")
def test_fork_bomb_is_contained_and_killed():
    outcome, left = run("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, Limits(timeout_s=2.0, max_processes=32))
    assert outcome.status in (TIMED_OUT, FAILED) and left == []


@needs("pid namespace")
def test_a_child_that_outlives_its_parent_is_killed():
    outcome, left = run("""
        import subprocess, sys
        subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)
    """)
    assert outcome.status == PASSED and left == []


def test_the_leftover_check_sees_a_running_program():
    """Control for the checks above: while a sandboxed program runs, its processes are found."""
    import threading

    marker = f"qg-{uuid.uuid4().hex}"
    thread = threading.Thread(target=run_untrusted, args=("import time\ntime.sleep(2)\n", FAST), kwargs={"marker": marker})
    thread.start()
    time.sleep(0.8)
    assert leftover_processes(marker)
    thread.join()
    time.sleep(0.2)
    assert leftover_processes(marker) == []


@pytest.mark.parametrize("close_streams", [False, True], ids=["streams open", "fds 0-2 closed"])
def test_a_program_that_leaves_its_session_ends_at_the_timeout(close_streams):
    """setsid() takes a process out of the launcher's process group: a group kill alone misses it."""
    started = time.perf_counter()
    outcome, left = run(f"""
        import os, time
        os.setsid()
        if {close_streams}:
            for fd in (0, 1, 2):
                os.close(fd)
        time.sleep(12)
    """, Limits(timeout_s=2.0))
    assert outcome.status == TIMED_OUT and time.perf_counter() - started < 6
    if "pids cgroup" in APPLIED or "pid namespace" in APPLIED:
        assert left == []


def test_the_process_limit_binds_even_for_root():
    """RLIMIT_NPROC does not bind root; the pids cgroup does (as root) and the rlimit does (otherwise)."""
    import os

    from quantgate.tasks.sandbox import _make_pids_cgroup

    probe = _make_pids_cgroup(1)
    if probe is not None:
        os.rmdir(probe)
    elif os.geteuid() == 0:
        pytest.skip("running as root without a writable pids cgroup: no process limit binds for root here")
    outcome, left = run("""
        import os, sys, time
        started = 0
        for _ in range(80):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(3)
                os._exit(0)
            started += 1
        sys.stderr.write(f"started {started}\\n")
    """, Limits(timeout_s=5.0, max_processes=32))
    started = int(outcome.stderr_tail.split("started ")[1].split()[0])
    assert started < 32 and left == []


def test_a_flood_on_stderr_and_stdout_costs_the_caller_a_bounded_amount():
    """100 MB on each stream: the caller keeps their tails only (its peak RSS stays far below 100 MB)."""
    import json
    import subprocess
    import sys

    probe = textwrap.dedent("""
        import json, resource, sys
        from quantgate.tasks.sandbox import Limits, run_untrusted
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = run_untrusted("import sys\\nblock = 'x' * (1 << 20)\\nfor _ in range(100):\\n"
                            "    sys.stderr.write(block)\\n    sys.stdout.write(block)\\nsys.stderr.write('END')\\n",
                            Limits(timeout_s=20.0, max_file_bytes=1 << 30))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"status": out.status, "grew_kb": after - before, "tail": out.stderr_tail[-3:]}))
    """)
    result = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                       check=True).stdout.splitlines()[-1])
    assert result["status"] == PASSED and result["tail"] == "END"
    assert result["grew_kb"] < 40_000
