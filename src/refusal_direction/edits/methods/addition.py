"""Activation addition: x' = x + coeff · r at the input of one block, at every position (+r induces refusal on
harmless prompts, −r is the paper's second bypass condition)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.hooks import add, follow, hook_block_input
from ..base import Edit, RowForm, register

ONE_SITE = "it changes the residual at one block's input only, which no edit of the writers reproduces"


def check_layer(layer: int, lm) -> None:
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"layer={layer} out of range (0..{lm.n_layers - 1})")


@register("actadd")
@dataclass(frozen=True, eq=False)
class ActivationAddition(Edit):
    direction: torch.Tensor  # [d_model], raw (unnormalised) difference-in-means vector
    layer: int
    coeff: float = 1.0
    name: str = "actadd"
    order = 20
    reasons = {"weights": ONE_SITE, "lora": ONE_SITE,
               "stacked": "an addition at one site, not a projection: hooked with its own row switch",
               "search": "the search looks for ablations that remove refusal at low damage"}

    def describe(self) -> dict:
        return {"type": "activation_addition", "site": f"resid_pre of block {self.layer}",
                "coeff": self.coeff, "direction_norm": float(self.direction.double().norm())}

    def _vector(self, lm) -> torch.Tensor:
        check_layer(self.layer, lm)
        return (self.coeff * self.direction.double()).to(device=lm.device, dtype=lm.dtype)

    def hooks(self, lm, rows=None) -> list:
        at = follow(lm, self._vector(lm), rows)

        def fn(x):
            return add(x, *at(x))

        return [hook_block_input(lm, self.layer, fn)]

    def row_form(self, lm) -> RowForm:
        return RowForm(add=self._vector(lm), layer=self.layer)

    @classmethod
    def from_run(cls, inputs, name: str) -> ActivationAddition:
        """−coeff · r at the direction's layer: the paper's bypass by addition (the run's ``actadd_coeff``)."""
        d = inputs.direction
        return cls(d.vector, d.layer, -inputs.actadd_coeff, name=name)
