"""User-facing errors.

`UserError` is raised for anything the user can fix (bad path, bad value, missing access). Its message
says what was wrong, the value seen, and what to do. The CLI prints it without a traceback and exits
with status 2. Internal invariants use `assert`.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in user input or environment, with a message that says how to fix it."""


class UserErrors(UserError):
    """Several user errors found at once (validation reports all problems, not the first)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(f"- {p}" for p in self.problems))
