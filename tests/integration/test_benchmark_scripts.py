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
    (["decode_ab.py", "--model", "tiny"], "needs a CUDA device"),  # CI and this machine have no GPU
    (["lora_export_check.py", "RUN_WITH_CANDIDATES", "/tmp/x", "--params", "{form"], "--params is not JSON"),
    (["optimize_profile.py", "/no/such/run"], "optimize/study.journal"),
    (["optimize_profile.py", "RUN_WITH_STUDY", "--batch", "0"], "--batch 0"),
    (["lora_export_check.py", "/no/such/run", "/tmp/x"], "candidates.safetensors"),
]


@pytest.mark.parametrize("args,says", CASES, ids=[c[0][0] + "-" + c[0][-1] for c in CASES])
def test_bad_input_exits_2_with_one_line(args, says, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    for marker, needed in (("RUN_WITH_STUDY", "optimize/study.journal"),
                           ("RUN_WITH_CANDIDATES", "directions/candidates.safetensors")):
        if marker in args:  # past the run-directory check, to reach the option's own
            (tmp_path / "run" / needed).parent.mkdir(parents=True)
            (tmp_path / "run" / needed).write_text("")
            args = [str(tmp_path / "run") if a == marker else a for a in args]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / args[0]), *args[1:]], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], proc.stderr
