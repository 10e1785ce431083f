"""Shared argument check for judges: one instruction per completion."""

from __future__ import annotations

from typing import Sequence


def check_pairs(instructions: Sequence[str], completions: Sequence[str]) -> None:
    """Raise ValueError unless there is one instruction per completion."""
    if len(instructions) != len(completions):
        raise ValueError(f"got {len(instructions)} instructions but {len(completions)} completions; "
                         "pass one instruction per completion")
