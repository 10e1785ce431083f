"""Per-layer kernel ablation: a scaled projection y ← y − w(l) r̂ r̂ᵀ y at attn_out / mlp_out of block l, with
per-layer weights for the attention and the MLP writers separately, and x ← x − w_emb r̂ r̂ᵀ x at block 0's input
(the embeddings). No resid_pre hooks elsewhere: with w < 1 the residual keeps part of r̂ on purpose.

The kernel: w(l) = w_min + (w_max − w_min) · max(0, 1 − |l − peak| / width), triangular (`layer_kernel`).
Weight form: v ← v − w P v with the writer's layer weight (exact: each hook scales a linear map's output, and so
does the edit). Search parameters: one kernel per writer, ``{attn,mlp}_peak`` in [0, n_layers − 1], ``_width`` in
[1, n_layers], ``_max`` in [0.5, 1.5] and ``_min`` = ``_min_fraction`` × ``_max`` (fraction in [0, 1]); the
embeddings are not edited by the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...core.directions import Direction
from ...core.hooks import hook_block_input, hook_output, on_rows, unit
from ...errors import UserError
from ..base import Edit, register

WRITERS = ("attn", "mlp")


def layer_kernel(n_layers: int, peak: float, width: float, w_min: float = 0.0, w_max: float = 1.0
                 ) -> tuple[float, ...]:
    """Per-layer weights of the triangular kernel (module docstring); ``width`` > 0."""
    if width <= 0 or not math.isfinite(width):
        raise UserError(f"layer kernel width must be positive, got {width}")
    return tuple(w_min + (w_max - w_min) * max(0.0, 1 - abs(layer - peak) / width) for layer in range(n_layers))


def kernel_weights(params: dict, writer: str, n_layers: int) -> tuple[float, ...]:
    """The search's kernel of ``writer`` (attn | mlp) from a trial's parameters."""
    w_max = params[f"{writer}_max"]
    return layer_kernel(n_layers, params[f"{writer}_peak"], params[f"{writer}_width"],
                        w_min=params[f"{writer}_min_fraction"] * w_max, w_max=w_max)


@register("layer_kernel")
@dataclass(frozen=True, eq=False)
class LayerKernelAblation(Edit):
    """Scaled projection y ← y − w r̂ r̂ᵀ y, w per layer and writer."""

    direction: torch.Tensor  # [d_model]
    attn_weights: tuple[float, ...]  # [n_layers]
    mlp_weights: tuple[float, ...]  # [n_layers]
    embed_weight: float = 0.0
    name: str = "layer_kernel"
    kernel: dict | None = None  # the kernel's parameters (for the tables), when built by `from_run`
    order = 4
    compare = True
    searchable = True
    reasons = {"own_step": "per-layer, per-writer weights: the own decode step ablates one direction at full weight"}

    def describe(self) -> dict:
        return {"type": "layer_kernel_ablation", "attn_weights": list(self.attn_weights),
                "mlp_weights": list(self.mlp_weights), "embed_weight": self.embed_weight} | (self.kernel or {})

    def _check(self, lm) -> None:
        if len(self.attn_weights) != lm.n_layers or len(self.mlp_weights) != lm.n_layers:
            raise ValueError(f"layer kernel has {len(self.attn_weights)}/{len(self.mlp_weights)} weights for a "
                             f"model with {lm.n_layers} layers; build it with layer_kernel(n_layers={lm.n_layers})")

    def hooks(self, lm, rows=None) -> list:
        self._check(lm)
        r = unit(self.direction).to(device=lm.device, dtype=lm.dtype)

        def scaled(w):
            def fn(x):
                return on_rows(rows, x, -w * (x @ r).unsqueeze(-1) * r)
            return fn

        handles = [hook_block_input(lm, 0, scaled(self.embed_weight))] if self.embed_weight else []
        for site, wa, wm in zip(lm.blocks, self.attn_weights, self.mlp_weights):
            if wa:
                handles.append(hook_output(site.attn_out, scaled(wa)))
            if wm:
                handles.append(hook_output(site.mlp_out, scaled(wm)))
        return handles

    def projection(self, lm) -> tuple[torch.Tensor, dict]:
        """(r̂, the per-layer writer weights and the embedding weight)."""
        self._check(lm)
        weights = {("resid_pre", 0): self.embed_weight} if self.embed_weight else {}
        for i, (wa, wm) in enumerate(zip(self.attn_weights, self.mlp_weights, strict=True)):
            weights.update({("attn_out", i): wa, ("mlp_out", i): wm})
        return unit(self.direction).float().cpu()[None], weights

    def weights_(self, model):
        from ..weights import edit_written_vectors_, unit64

        r = unit64(self.direction)

        def edit(kind, layer, v):
            if "embedding" in kind:
                w = self.embed_weight
            else:
                w = (self.attn_weights if kind.startswith("attention") else self.mlp_weights)[layer]
            return v - w * torch.outer(v @ r, r)

        return edit_written_vectors_(model, edit)

    @classmethod
    def from_run(cls, inputs, name: str) -> LayerKernelAblation:
        """The run's direction, one kernel for both writers: peak at its layer, width n_layers / 2, 0 to 1."""
        n, d = inputs.lm.n_layers, inputs.direction
        kernel = layer_kernel(n, peak=d.layer, width=n / 2)
        return cls(d.vector, kernel, kernel, 0.0, name=name,
                   kernel={"peak": d.layer, "width": n / 2, "w_min": 0.0, "w_max": 1.0})

    @classmethod
    def suggest(cls, trial, n_layers: int) -> None:
        for writer in WRITERS:
            trial.suggest_float(f"{writer}_peak", 0.0, float(n_layers - 1))
            trial.suggest_float(f"{writer}_width", 1.0, float(max(n_layers, 2)))
            trial.suggest_float(f"{writer}_max", 0.5, 1.5)
            trial.suggest_float(f"{writer}_min_fraction", 0.0, 1.0)

    @classmethod
    def from_params(cls, inputs, direction: Direction, params: dict, name: str) -> LayerKernelAblation:
        n = inputs.lm.n_layers
        return cls(direction.vector, kernel_weights(params, "attn", n), kernel_weights(params, "mlp", n), 0.0,
                   name=name)
