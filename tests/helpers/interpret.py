"""Run a check module of tests/helpers under Triton's CPU interpreter, in a fresh interpreter; its JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

# Triton 3.6's interpreter (the one in the H200 image) fails on the decode kernel's loop over a runtime bound
# ("only 0-dimensional arrays can be converted to Python scalars" in `range(0, length, BLOCK_N)`); 3.9's runs it.
# The compiled kernels are checked on the GPU by tests/gpu/*_cuda.py either way.
MIN_INTERPRETER = (3, 9)


def interpreter_version() -> tuple[int, ...]:
    import triton

    return tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2] if p.isdigit())


def run_interpreted(module: str, timeout: float = 900, decode_kernel: bool = False) -> dict:
    """``python -m module`` with TRITON_INTERPRET=1 from the repository root (src/ on the path too, for a checkout
    that is not installed); the JSON it prints. Asserts it exits 0 (the end of its stderr shows otherwise).
    ``decode_kernel``: the module runs the decode-attention kernel, skipped under a Triton older than
    `MIN_INTERPRETER`, whose interpreter cannot run it."""
    if decode_kernel and interpreter_version() < MIN_INTERPRETER:
        pytest.skip(f"Triton {'.'.join(map(str, interpreter_version()))}'s interpreter cannot run the decode kernel "
                    f"(needs {'.'.join(map(str, MIN_INTERPRETER))}+); the CUDA tests check the compiled kernels")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", module], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)
