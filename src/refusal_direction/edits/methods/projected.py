"""Projected direction ablation ("projected abliteration"): r' = r − (r·μ̂) μ̂ with μ̂ the unit harmless mean at the
direction's layer and position; the part of r that merely says "this is an activation like the harmless ones" is
kept out of the edit. Every form is directional ablation's, of r'."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.directions import CandidateDirections, Direction
from ..base import register
from .directional import DirectionalAblation


def projected_direction(direction: Direction, mean_harmless: CandidateDirections) -> Direction:
    """r with its component along the harmless mean (at r's layer and position) removed (float64)."""
    mu = mean_harmless.get(direction.position, direction.layer).vector.double()
    mu_hat = mu / mu.norm()
    r = direction.vector.double()
    return Direction(r - (r @ mu_hat) * mu_hat, direction.layer, direction.position, direction.model_id)


@register("projected")
@dataclass(frozen=True, eq=False)
class ProjectedAblation(DirectionalAblation):
    name: str = "projected"
    order = 2
    reasons = {"search": "the search interpolates the difference-in-means candidates themselves"}

    @classmethod
    def from_run(cls, inputs, name: str) -> ProjectedAblation:
        return cls(projected_direction(inputs.direction, inputs.mean_harmless()).vector, name=name)
