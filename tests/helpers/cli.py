"""Run the installed CLI in a subprocess (`python -m refusal_direction ...`), with this process's import path."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI's result; with ``check`` its exit code must be 0 (the assertion shows the end of stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "refusal_direction", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
