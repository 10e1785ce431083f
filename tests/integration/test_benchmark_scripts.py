"""The benchmark scripts answer a bad input with exit 2 and one line that names it and the fix (CPU, no model)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

CASES = [
    (["profile_kernels.py", "--model", "/no/such/model"], "--model /no/such/model"),
    (["decode_ab.py", "--model", "nope"], "--model nope"),
    (["optimize_profile.py", "/no/such/run"], "optimize/study.journal"),
    (["optimize_profile.py", "/no/such/run", "--batch", "0"], "optimize/study.journal"),
    (["lora_export_check.py", "/no/such/run", "/tmp/x"], "candidates.safetensors"),
]


@pytest.mark.parametrize("args,says", CASES, ids=[c[0][0] + "-" + c[0][-1] for c in CASES])
def test_bad_input_exits_2_with_one_line(args, says, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / args[0]), *args[1:]], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], proc.stderr
