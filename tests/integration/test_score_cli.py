"""`python -m refusal_direction score` on the paper's released completions, in a fresh process."""

import json
import subprocess
import sys

import pytest


def test_score_cli_on_released_completions(reference_run):
    path = reference_run / "completions" / "jailbreakbench_baseline_completions.json"
    out = subprocess.run([sys.executable, "-m", "refusal_direction", "score", str(path), "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["refusal"]["rate"] == pytest.approx(0.91)
    out = subprocess.run([sys.executable, "-m", "refusal_direction", "score", str(path)],
                         capture_output=True, text=True, check=True)
    assert "refusal score 0.91" in out.stdout
