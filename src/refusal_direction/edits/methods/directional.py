"""Directional ablation (the paper): x' = x − r̂ r̂ᵀ x at the input of every decoder block and at the outputs of
every attention and MLP sub-layer, at every position (prompt and generated tokens). Then every block input, every
mid-block residual and the final residual have zero component along r̂.

Weight form: r̂ projected out of every matrix that writes to the residual (`edits.weights.orthogonalize_weights_`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.hooks import SITES, ablate, follow, hook_every_site, unit
from ..base import Edit, RowForm, register


@register("dim")
@dataclass(frozen=True, eq=False)
class DirectionalAblation(Edit):
    direction: torch.Tensor  # [d_model], any norm; normalised when applied
    name: str = "ablation"
    order = 1
    compare = True
    reasons = {"search": "the search's subspace form with k = 1 is this ablation of the interpolated direction"}

    def describe(self) -> dict:
        return {"type": "directional_ablation", "sites": "resid_pre, attn_out, mlp_out of every block",
                "direction_norm": float(self.direction.double().norm())}

    def hooks(self, lm, rows=None) -> list:
        r_hat = unit(self.direction).to(device=lm.device, dtype=lm.dtype)
        # With a row switch, the per-row directions ([batch, d], zero where off) are made once here, not at every
        # hook call: each site then costs two kernels.
        r_rows = None if rows is None else (rows.to(device=lm.device, dtype=lm.dtype).unsqueeze(-1)
                                            * r_hat).contiguous()
        at = follow(lm, r_hat, r_rows)

        def fn(x):
            return ablate(x, *at(x))

        return hook_every_site(lm, fn)

    def projection(self, lm) -> tuple[torch.Tensor, dict]:
        r = unit(self.direction).float().cpu()[None]
        return r, {(s, layer): 1.0 for layer in range(lm.n_layers) for s in SITES}

    def row_form(self, lm) -> RowForm:
        return RowForm(ablate=unit(self.direction).to(device=lm.device, dtype=lm.dtype))

    def weights_(self, model):
        from ..weights import orthogonalize_weights_

        return orthogonalize_weights_(model, self.direction)

    @classmethod
    def from_run(cls, inputs, name: str) -> DirectionalAblation:
        """The run's selected direction."""
        return cls(inputs.direction.vector, name=name)
