"""The code sandbox: statuses, the wall-clock kill of the whole process group, the memory, file and process limits,
the temporary working directory, the empty environment, and that none of it touches the test process."""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from refusal_direction.errors import UserError
from refusal_direction.evaluation import sandbox
from refusal_direction.evaluation.sandbox import Limits, group_members, identity, run_many, run_python, tasks_of

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux only")

MARGIN_S = 1.5  # start-up, the poll interval and a busy 2-core machine


def alive(pid: int, pgid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) member of process group ``pgid``."""
    return pid in group_members(pgid)


def test_a_program_that_exits_0_passes():
    result = run_python("print('hello')")
    assert result.status == "passed" and result.passed and result.returncode == 0
    assert result.stdout_tail == "hello\n" and result.signal is None and result.seconds > 0


@pytest.mark.parametrize("source,needle", [("assert 1 + 1 == 3", "AssertionError"),
                                           ("def f(:\n    pass", "SyntaxError"),
                                           ("import sys; sys.exit(3)", "")])
def test_a_wrong_program_fails(source, needle):
    result = run_python(source)
    assert result.status == "failed" and not result.passed and result.returncode != 0
    assert needle in result.stderr_tail


def test_an_infinite_loop_times_out_and_its_process_group_is_killed():
    source = ("import os, time\n"
              "pid = os.fork()\n"
              "if pid == 0:\n"
              "    time.sleep(600)\n"
              "    os._exit(0)\n"
              "print(os.getpgid(0), pid, flush=True)\n"
              "while True:\n"
              "    pass\n")
    start = time.monotonic()
    result = run_python(source, timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and result.signal == "SIGKILL", result
    assert 1.0 <= result.seconds <= elapsed < 1.0 + MARGIN_S
    pgid, grandchild = map(int, result.stdout_tail.split())
    assert not alive(grandchild, pgid) and group_members(pgid) == []


def test_what_a_program_forks_does_not_outlive_it():
    source = ("import os, time\n"
              "pid = os.fork()\n"
              "if pid == 0:\n"
              "    time.sleep(600)\n"
              "    os._exit(0)\n"
              "print(os.getpgid(0), pid)\n")
    result = run_python(source)
    assert result.status == "passed"
    pgid, grandchild = map(int, result.stdout_tail.split())
    assert not alive(grandchild, pgid)


@pytest.mark.parametrize("source", ["x = bytearray(8 << 30)",
                                    "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n"])
def test_a_memory_bomb_ends_as_memory_and_leaves_the_test_process_alone(source):
    before = resource.getrlimit(resource.RLIMIT_AS)
    result = run_python(source, memory_mb=256)
    assert result.status == "memory", result
    assert "MemoryError" in result.stderr_tail
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert len(bytearray(300 << 20)) == 300 << 20  # more than the child's whole limit, here


def test_files_are_written_inside_a_temporary_directory_that_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = ("import json, os\n"
              "with open('out.txt', 'w') as f:\n"
              "    f.write('x')\n"
              "print(json.dumps([os.getcwd(), os.path.abspath('out.txt'), os.path.exists('out.txt')]))\n")
    result = run_python(source)
    assert result.status == "passed", result
    cwd, written, existed = json.loads(result.stdout_tail)
    assert existed and Path(written).parent == Path(cwd)
    assert Path(cwd).parent == Path(tempfile.gettempdir()).resolve() and Path(cwd).name.startswith("rd-sandbox-")
    assert not Path(cwd).exists() and not Path(written).exists()
    assert list(tmp_path.iterdir()) == []


def test_a_file_past_the_size_limit_cannot_be_written():
    result = run_python("open('big', 'wb').write(b'x' * (3 << 20))", max_file_mb=1)
    assert result.status == "failed" and "File too large" in result.stderr_tail, result


def test_the_child_inherits_no_environment_and_runs_isolated(monkeypatch):
    monkeypatch.setenv("RD_SANDBOX_MARKER", "must-not-leak")
    monkeypatch.setenv("PYTHONPATH", "/must/not/leak")
    source = ("import json, os, sys\n"
              "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'isolated': sys.flags.isolated,\n"
              "                  'no_pyc': sys.dont_write_bytecode, 'stdin': sys.stdin.read(),\n"
              "                  'path': sys.path}))\n")
    result = run_python(source)
    assert result.status == "passed", result
    seen = json.loads(result.stdout_tail)
    assert set(seen["env"]) == {"PATH", "LANG", "HOME"}, seen["env"]
    assert seen["env"]["HOME"] == seen["cwd"] and seen["env"]["LANG"] == "C.UTF-8"
    assert seen["isolated"] == 1 and seen["no_pyc"] and seen["stdin"] == ""
    assert "/must/not/leak" not in seen["path"] and seen["cwd"] not in seen["path"]


def limited_python() -> str:
    """An interpreter whose children the kernel holds to RLIMIT_NPROC, or skip (root, and nobody cannot run any)."""
    for python in (sys.executable, shutil.which("python3", path="/usr/bin:/bin")):
        if python and identity(python).process_limit_enforced:
            return python
    pytest.skip(f"RLIMIT_NPROC cannot be enforced here: {identity().reason}, and nobody cannot run /usr/bin/python3 "
                f"either; a fork bomb would be bounded only by the timeout")


def test_forks_stop_at_the_process_limit():
    python = limited_python()
    source = ("import os, time\n"
              "n = 0\n"
              "for _ in range(200):\n"
              "    try:\n"
              "        pid = os.fork()\n"
              "    except OSError:\n"
              "        break\n"
              "    if pid == 0:\n"
              "        time.sleep(600)\n"
              "        os._exit(0)\n"
              "    n += 1\n"
              "print(os.getpgid(0), n)\n")
    result = run_python(source, max_processes=16, python=python)
    assert result.status == "passed", result
    pgid, forks = map(int, result.stdout_tail.split())
    assert 0 < forks < 16 and group_members(pgid) == []


def test_a_fork_bomb_is_contained_and_killed():
    python = limited_python()
    source = ("import os, time\n"
              "print(os.getpgid(0), flush=True)\n"
              "while True:\n"
              "    try:\n"
              "        os.fork()\n"
              "    except OSError:\n"
              "        time.sleep(0.01)\n")
    result = run_python(source, timeout_s=1.5, max_processes=8, python=python)
    assert result.status == "timeout", result
    pgid = int(result.stdout_tail.split()[0])
    assert group_members(pgid) == []
    assert run_python("print('after')").stdout_tail == "after\n"  # the machine can still start processes


def test_run_many_keeps_input_order():
    sources = [f"import time; time.sleep({0.05 * (5 - i)}); print({i})" for i in range(6)]
    results = run_many(sources, workers=3)
    assert [r.stdout_tail for r in results] == [f"{i}\n" for i in range(6)]
    assert run_many([], workers=2) == []


def test_limits_are_checked():
    with pytest.raises(UserError, match="timeout_s=0"):
        Limits(timeout_s=0)
    with pytest.raises(UserError, match="memory_mb=-1"):
        run_python("pass", memory_mb=-1)
    with pytest.raises(UserError, match="workers=0"):
        run_many(["pass"], workers=0)


def test_other_platforms_are_refused(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(UserError, match="needs Linux"):
        run_python("pass")
    with pytest.raises(UserError, match="needs Linux"):
        run_many(["pass"])


def test_the_process_count_sees_this_process():
    assert tasks_of(os.getuid()) >= 1
    assert os.getpid() in group_members(os.getpgid(0))


@pytest.mark.parametrize("returncode,stderr,status", [(0, "", "passed"), (1, "x\nMemoryError\n", "memory"),
                                                      (1, "ValueError\n", "failed"), (-9, "", "crashed"),
                                                      (-24, "", "timeout"), (-11, "", "crashed")])
def test_statuses(returncode, stderr, status):
    assert sandbox._status(False, returncode, stderr)[0] == status
    assert sandbox._status(True, -9, "")[0] == "timeout"
