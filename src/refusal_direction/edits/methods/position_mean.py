"""Position-mean ablation: directional ablation of the difference-in-means direction averaged over the
post-instruction positions at the run's layer, r̄ = Σ_p r̂[p, layer] / ‖Σ_p r̂[p, layer]‖, instead of one position's.

Each position's unit candidate counts once (a position whose two means coincide — the same template token in both
sets — has no direction and is left out). The mix asks whether refusal is read from one token or from the whole
post-instruction span (issue: "directions mixed across post-instruction positions"). Every form is directional
ablation's, of r̄.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.directions import CandidateDirections
from ...errors import UserError
from ..base import register
from .directional import DirectionalAblation


def position_mean_direction(candidates: CandidateDirections, layer: int) -> tuple[torch.Tensor, int]:
    """(r̄ [d] float64, unit norm; the number of positions mixed) at ``layer`` (module docstring)."""
    vectors = candidates.vectors[:, layer].double()  # [n_positions, d]
    norms = vectors.norm(dim=-1)
    keep = norms > 1e-6 * norms.max()
    if not bool(keep.any()):
        raise UserError(f"no candidate direction at layer {layer}: every position's means coincide")
    mixed = (vectors[keep] / norms[keep, None]).sum(0)
    return mixed / mixed.norm(), int(keep.sum())


@register("position_mean")
@dataclass(frozen=True, eq=False)
class PositionMeanAblation(DirectionalAblation):
    name: str = "position_mean"
    n_positions: int = 0  # positions mixed (for the tables)
    order = 8
    compare = True
    reasons = {"search": "the search samples one position per trial; this mix is its own row in `compare`"}

    def describe(self) -> dict:
        return {**super().describe(), "mixed_positions": self.n_positions}

    @classmethod
    def from_run(cls, inputs, name: str) -> PositionMeanAblation:
        vector, n = position_mean_direction(inputs.candidates, inputs.direction.layer)
        return cls(vector, name=name, n_positions=n)


__all__ = ["PositionMeanAblation", "position_mean_direction"]
