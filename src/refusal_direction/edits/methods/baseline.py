"""No intervention: the model as it is (so loops over conditions need no special case)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import Edit, RowForm, register


@register("baseline")
@dataclass(frozen=True, eq=False)
class Baseline(Edit):
    name: str = "baseline"
    order = 0
    compare = True
    identity = True
    reasons = {"weights": "the baseline changes nothing", "lora": "the baseline changes nothing",
               "stacked": "the baseline has no hook", "search": "the baseline is not an edit to search"}

    def describe(self) -> dict:
        return {"type": "baseline"}

    def hooks(self, lm, rows=None) -> list:
        return []

    def row_form(self, lm) -> RowForm:
        return RowForm()

    @classmethod
    def from_run(cls, inputs, name: str) -> Baseline:
        return cls(name=name)
