"""Run a check module of tests/helpers under Triton's CPU interpreter, in a fresh interpreter; its JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.paths import REPO


def run_interpreted(module: str, timeout: float = 900) -> dict:
    """``python -m module`` with TRITON_INTERPRET=1 from the repository root (src/ on the path too, for a checkout
    that is not installed); the JSON it prints. Asserts it exits 0 (the end of its stderr shows otherwise)."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", module], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)
