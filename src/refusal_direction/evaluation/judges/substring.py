"""Substring judge: the paper's 12-substring refusal match (`evaluation.refusal.is_refusal`) as a judge."""

from __future__ import annotations

from typing import Sequence

from ..refusal import is_refusal
from .base import check_pairs


class SubstringJudge:
    """Refusal = the completion contains one of the paper's 12 refusal substrings (case-insensitive)."""

    name = "substring"
    description = "the paper's 12 refusal substrings, case-insensitive (the headline score, for parity)"

    def judge(self, instructions: Sequence[str], completions: Sequence[str]) -> list[bool]:
        check_pairs(instructions, completions)
        return [bool(is_refusal(c)) for c in completions]
