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


# A tiny run's settings (TOML) for CLI tests on a tiny model: seconds per command on CPU.
TINY_RUN_TOML = """n_train = 6
n_val = 3
n_eval = {n_eval}
n_harmless_eval = 3
max_new_tokens = 4
batch_size = 8
layer = 1
position = -2
device = "cpu"
{judge}data_dir = "{data}"
"""


def tiny_run_toml(data_dir, n_eval: int = 3, judge: str | None = "substring") -> str:
    """`TINY_RUN_TOML` for ``data_dir`` (``judge``: the run's second judge; None: the default)."""
    return TINY_RUN_TOML.format(data=data_dir, n_eval=n_eval, judge=f'judge = "{judge}"\n' if judge else "")
