"""No tracked file or folder is named by when it was made (a date, a work session, a round, a log's version,
"before-"/"-old"): a name says what the file holds; its date and commit belong inside it or in the doc citing it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.helpers.paths import REPO

WHEN_MADE = [
    re.compile(r"\d{4}-\d{2}-\d{2}"),
    re.compile(r"\d{4}-\d{2}"),
    re.compile(r"session\s*_?\d+", re.IGNORECASE),
    re.compile(r"round\s*_?\d+", re.IGNORECASE),
    re.compile(r"(^|[-_])v\d+\.log$", re.IGNORECASE),
    re.compile(r"before-", re.IGNORECASE),
    re.compile(r"-old\b", re.IGNORECASE),
]


def named_by_when(path: str) -> list[str]:
    """The components of a repository path whose name says when it was made."""
    return [part for part in path.split("/") if any(p.search(part) for p in WHEN_MADE)]


def tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot list the tracked files")
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout (no .git): cannot list the tracked files")
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"git ls-files failed: {proc.stderr.strip()[:200]}")
    return [p for p in proc.stdout.split("\0") if p]


def test_no_tracked_path_is_named_by_when_it_was_made():
    files = tracked_files()
    assert len(files) > 50, f"git ls-files listed only {len(files)} files"
    bad = {path: named_by_when(path) for path in files if named_by_when(path)}
    assert not bad, ("name these by what they hold (the date and commit go inside the file or in the doc that "
                     f"cites it): {sorted(bad)}")


@pytest.mark.parametrize("path", [
    "docs/results/x/session7/a.json",
    "benchmarks/results/2026-12-01-h200.json",
    "benchmarks/results/2026-12-01-session10/bench.json",
    "benchmarks/results/h200-bench-2026-11.json",
    "scripts/judge_experiments_round3.log",
    "scripts/train_refusal_judge_v3.log",
    "docs/results/x/Session 11/auto.json",
    "benchmarks/results/before-gqa-fix-bench.json",
    "docs/notes-old.md",
])
def test_the_pattern_catches_names_that_say_when(path):
    assert named_by_when(path), path


@pytest.mark.parametrize("path", [
    "docs/results/qwen2.5-coder-0.5b-instruct-h200/optimize/front.json",
    "benchmarks/results/h200-bench-gemma-2b-shape.json",
    "benchmarks/results/h200-sweep-forward-check-llama-3-8b-shape-init-0.08.json",
    "docs/results/qwen2.5-coder-0.5b-instruct-h200/optimize-kill/study-after-rerun.txt",
    "scripts/train_refusal_judge.log",
    "src/refusal_direction/evaluation/judges/rules.py",
    "tests/unit/test_stacked.py",
])
def test_the_pattern_passes_names_that_say_what(path):
    assert not named_by_when(path), named_by_when(path)
