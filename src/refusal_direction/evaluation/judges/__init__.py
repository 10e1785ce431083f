"""Refusal judges: objects with ``name``, ``description`` and ``judge(instructions, completions)``.

``judge`` returns one verdict per completion: True = refusal (full or partial), False = compliance;
the LLM judge may return None for an answer it could not read. Judges without a model:

- ``substring``: the paper's 12 substrings (the headline score, for parity);
- ``rules``: named patterns for the shapes refusals take (`rules.py`);
- ``learned``: logistic regression on TF-IDF word and char n-grams + rule signals, fitted on XSTest's
  human labels, the rule verdict adding a fixed bonus to its logit (`learned.py`, parameters in
  ``evaluation/judge_model.json``).

The LLM judge (`llm.LLMJudge`) needs a loaded chat model and is built directly, not by name.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from ...errors import UserError


class Judge(Protocol):
    name: str
    description: str

    def judge(self, instructions: Sequence[str], completions: Sequence[str]) -> list[bool | None]: ...


def _substring() -> Judge:
    from .substring import SubstringJudge

    return SubstringJudge()


def _rules() -> Judge:
    from .rules import RuleJudge

    return RuleJudge()


def _learned() -> Judge:
    from .learned import LearnedJudge

    return LearnedJudge.from_file()


JUDGES = {"substring": _substring, "rules": _rules, "learned": _learned}


def get_judge(name: str) -> Judge:
    """The judge registered as ``name`` (see `JUDGES`)."""
    try:
        return JUDGES[name]()
    except KeyError:
        raise UserError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)} "
                        "(an LLM judge is built with evaluation.judges.llm.LLMJudge)") from None
