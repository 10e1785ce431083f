"""The methods' interventions: hooks on the residual stream, each with an optional per-row switch.

Every class here is a small frozen dataclass with a ``name`` and ``describe()``, like `core.interventions`,
plus ``register_hooks(lm, rows) -> handles``: `core.interventions.apply_intervention` calls it, so the
methods run on both generation paths (HF ``generate`` and the fast batch of `accel`, where ``rows`` is the
[batch] switch that lets every method share one batch) and in the capability measures, unchanged.

Sites are the ones of `DirectionalAblation`: resid_pre of every block (the block's input), attn_out and
mlp_out (the attention and MLP outputs written to the residual). With P = Q Qᵀ for an orthonormal basis Q:

- `SubspaceAblation`: x ← x − P x at every site (k = 1 is directional ablation; k > 1 the refusal
  subspace / "cone" of Wollschläger et al., ICML 2025).
- `LayerKernelAblation`: y ← y − w(l) r̂ r̂ᵀ y at attn_out / mlp_out of block l with per-layer weights
  (separately for attention and MLP), and x ← x − w_emb r̂ r̂ᵀ x at block 0's input (the embeddings).
  No resid_pre hooks elsewhere: with w < 1 the residual keeps part of r̂ on purpose.
- `AffineAblation` (ACE, Marshall et al., arXiv 2411.09003): x ← x − (r̂·x − c) r̂ at every block input
  and y ← y − (r̂·y) r̂ at attn_out / mlp_out, where c = r̂·μ_harmless at the direction's site: every
  residual's projection on r̂ is set to the harmless mean's instead of to 0.
- `AffineAddition` (ACE's addition form): x ← x − (r̂·x − c) r̂ at one block's input, with c = r̂·μ_harmful
  (set the projection to the harmful mean's, to induce refusal).
- `NormPreservingAblation`: the hook form of the norm-preserving weight edit (`export.method_edits`);
  built there, because it needs the residual-writing linear layers that export finds.

Hooks return new tensors and are removed by `apply_intervention` on exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.interventions import input_hook, output_hook, unit
from ..core.model import LoadedModel
from ..core.stacked import SITES


def _row_view(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[batch] switch as [batch, 1, ..., 1] against x [batch, ..., d], in x's dtype."""
    return rows.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _on(rows: torch.Tensor | None, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x + delta where the row is switched on (everywhere when ``rows`` is None)."""
    return x + delta if rows is None else x + _row_view(rows, x) * delta


def _hook_input(lm: LoadedModel, layer: int, fn):
    return lm.blocks[layer].block.register_forward_pre_hook(input_hook(fn), with_kwargs=True)


def _hook_out(module, fn):
    return module.register_forward_hook(output_hook(fn))


@dataclass(frozen=True, eq=False)
class SubspaceAblation:
    """x ← x − Q Qᵀ x at every block input and attention/MLP output; ``basis`` [k, d_model], orthonormal rows."""

    basis: torch.Tensor
    name: str = "subspace"

    def describe(self) -> dict:
        return {"type": "subspace_ablation", "k": int(self.basis.shape[0]),
                "sites": "resid_pre, attn_out, mlp_out of every block"}

    def register_hooks(self, lm: LoadedModel, rows: torch.Tensor | None = None) -> list:
        q = self.basis.to(device=lm.device, dtype=lm.dtype)  # [k, d]
        qt = q.T.contiguous()  # [d, k]

        def fn(x):
            return _on(rows, x, -((x @ qt) @ q))

        handles = []
        for i, site in enumerate(lm.blocks):
            handles += [_hook_input(lm, i, fn), _hook_out(site.attn_out, fn), _hook_out(site.mlp_out, fn)]
        return handles

    def projection_form(self, lm: LoadedModel) -> tuple[torch.Tensor, dict]:
        """(basis, weight 1 at every site): for `core.stacked` (many trials in one batch)."""
        return self.basis.float().cpu(), {(s, i): 1.0 for i in range(lm.n_layers) for s in SITES}


@dataclass(frozen=True, eq=False)
class LayerKernelAblation:
    """Scaled projection y ← y − w r̂ r̂ᵀ y, w per layer and writer (see `layer_kernel`)."""

    direction: torch.Tensor  # [d_model]
    attn_weights: tuple[float, ...]  # [n_layers]
    mlp_weights: tuple[float, ...]  # [n_layers]
    embed_weight: float = 0.0
    name: str = "layer_kernel"

    def describe(self) -> dict:
        return {"type": "layer_kernel_ablation", "attn_weights": list(self.attn_weights),
                "mlp_weights": list(self.mlp_weights), "embed_weight": self.embed_weight}

    def _check(self, lm: LoadedModel) -> None:
        if len(self.attn_weights) != lm.n_layers or len(self.mlp_weights) != lm.n_layers:
            raise ValueError(f"layer kernel has {len(self.attn_weights)}/{len(self.mlp_weights)} weights for a "
                             f"model with {lm.n_layers} layers; build it with layer_kernel(n_layers={lm.n_layers})")

    def register_hooks(self, lm: LoadedModel, rows: torch.Tensor | None = None) -> list:
        self._check(lm)
        r = unit(self.direction).to(device=lm.device, dtype=lm.dtype)

        def scaled(w):
            def fn(x):
                return _on(rows, x, -w * (x @ r).unsqueeze(-1) * r)
            return fn

        handles = [_hook_input(lm, 0, scaled(self.embed_weight))] if self.embed_weight else []
        for site, wa, wm in zip(lm.blocks, self.attn_weights, self.mlp_weights):
            if wa:
                handles.append(_hook_out(site.attn_out, scaled(wa)))
            if wm:
                handles.append(_hook_out(site.mlp_out, scaled(wm)))
        return handles

    def projection_form(self, lm: LoadedModel) -> tuple[torch.Tensor, dict]:
        """(r̂, the per-layer writer weights and the embedding weight): for `core.stacked`."""
        self._check(lm)
        weights = {("resid_pre", 0): self.embed_weight} if self.embed_weight else {}
        for i, (wa, wm) in enumerate(zip(self.attn_weights, self.mlp_weights, strict=True)):
            weights.update({("attn_out", i): wa, ("mlp_out", i): wm})
        return unit(self.direction).float().cpu()[None], weights


@dataclass(frozen=True, eq=False)
class AffineAblation:
    """ACE: the projection on r̂ set to ``offset`` (= r̂·μ_harmless) at every block input; writers r̂-free."""

    direction: torch.Tensor  # [d_model]
    offset: float  # c = r̂·μ_harmless at the direction's layer and position
    name: str = "ace"

    def describe(self) -> dict:
        return {"type": "affine_concept_ablation", "offset": self.offset,
                "sites": "resid_pre (affine), attn_out, mlp_out (linear) of every block"}

    def register_hooks(self, lm: LoadedModel, rows: torch.Tensor | None = None) -> list:
        r = unit(self.direction).to(device=lm.device, dtype=lm.dtype)
        c = float(self.offset)

        def affine(x):
            return _on(rows, x, -((x @ r).unsqueeze(-1) - c) * r)

        def linear(y):
            return _on(rows, y, -(y @ r).unsqueeze(-1) * r)

        handles = []
        for i, site in enumerate(lm.blocks):
            handles += [_hook_input(lm, i, affine), _hook_out(site.attn_out, linear), _hook_out(site.mlp_out, linear)]
        return handles


@dataclass(frozen=True, eq=False)
class AffineAddition:
    """ACE's addition form: at block ``layer``'s input the projection on r̂ is set to ``target`` (r̂·μ_harmful)."""

    direction: torch.Tensor  # [d_model]
    layer: int
    target: float
    name: str = "ace_add"

    def describe(self) -> dict:
        return {"type": "affine_concept_addition", "layer": self.layer, "target": self.target}

    def register_hooks(self, lm: LoadedModel, rows: torch.Tensor | None = None) -> list:
        if not 0 <= self.layer < lm.n_layers:
            raise ValueError(f"layer={self.layer} out of range (0..{lm.n_layers - 1})")
        r = unit(self.direction).to(device=lm.device, dtype=lm.dtype)
        c = float(self.target)

        def fn(x):
            return _on(rows, x, -((x @ r).unsqueeze(-1) - c) * r)

        return [_hook_input(lm, self.layer, fn)]


@dataclass(frozen=True)
class WriterEdit:
    """One residual writer of the norm-preserving hook form: its input scaled by ``scale``, its bias moved."""

    module: torch.nn.Module  # nn.Linear or Conv1D writing d_model outputs
    scale: torch.Tensor  # [in_features]: ‖w_j‖ / ‖(I − r̂r̂ᵀ) w_j‖ per written vector w_j
    bias_delta: torch.Tensor | None  # [d_model]: b' − (I − r̂r̂ᵀ) b, or None without a bias


@dataclass(frozen=True, eq=False)
class NormPreservingAblation:
    """Hook form of the norm-preserving edit: r̂ removed from every written vector, each keeping its norm.

    Embedding outputs e ← (I − P) e · ‖e‖ / ‖(I − P) e‖ (a function of the row alone); each writer's input
    a ← a ⊙ scale, its output y ← (I − P) y + bias_delta. Equal to `export.method_edits.norm_preserving_weights_`.
    """

    direction: torch.Tensor  # [d_model]
    embeddings: Sequence[torch.nn.Module]
    writers: Sequence[WriterEdit]
    name: str = "norm_preserving"

    def describe(self) -> dict:
        return {"type": "norm_preserving_ablation", "n_writers": len(self.writers),
                "norm": "euclidean norm of each vector written into the residual (embedding rows, writer columns)"}

    def register_hooks(self, lm: LoadedModel, rows: torch.Tensor | None = None) -> list:
        r = unit(self.direction).to(device=lm.device, dtype=lm.dtype)

        def embed(e):
            removed = e - (e @ r).unsqueeze(-1) * r
            ratio = e.norm(dim=-1, keepdim=True) / removed.norm(dim=-1, keepdim=True).clamp(min=1e-30)
            return _on(rows, e, removed * ratio - e)

        handles = [_hook_out(m, embed) for m in self.embeddings]
        for w in self.writers:
            s = w.scale.to(device=lm.device, dtype=lm.dtype)
            delta = None if w.bias_delta is None else w.bias_delta.to(device=lm.device, dtype=lm.dtype)

            def pre(module, args, kwargs, s=s):
                a = args[0]
                return (_on(rows, a, a * (s - 1)),) + tuple(args[1:]), kwargs

            def post(y, delta=delta):
                change = -(y @ r).unsqueeze(-1) * r
                return _on(rows, y, change if delta is None else change + delta)

            handles.append(w.module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(_hook_out(w.module, post))
        return handles

    @staticmethod
    def stack_hooks(lm: LoadedModel, group: Sequence[NormPreservingAblation], switches: Sequence[torch.Tensor]
                    ) -> list | None:
        """One hook per module for several norm-preserving ablations, each on its own rows (`core.stacked`):
        per-row directions, writer input scales and bias shifts (ones / zeros on rows of none of them, which
        come back exactly as they were). None when the group does not share its modules (hook them singly)."""
        first = group[0]
        if any([m for m in g.embeddings] != [m for m in first.embeddings] or
               [w.module for w in g.writers] != [w.module for w in first.writers] for g in group[1:]):
            return None
        dt, rows = lm.dtype, switches[0].shape[0]
        # which[b]: 1 + the member acting on row b (0: none); every per-row table is gathered by it on the device,
        # with no host synchronisation (boolean-mask writes would wait for the device once per writer and member)
        on_all = (torch.stack([sw.detach() for sw in switches]).cpu() != 0).long()  # [members, rows], one transfer
        which = (on_all * torch.arange(1, len(group) + 1)[:, None]).sum(0)
        units = torch.cat([torch.zeros(1, lm.d_model), torch.stack([unit(g.direction).float().cpu() for g in group])])
        per_device: dict[str, tuple] = {}

        def on(device):  # (which, r_rows [rows, d], any_on) on ``device``, copied there once
            key = str(device)
            if key not in per_device:
                w = which.to(device)
                per_device[key] = (w, units.to(device=device, dtype=dt)[w], (w > 0).view(-1, 1, 1))
            return per_device[key]

        def project(x):  # x − (x·r_b) r_b per row (r_b = 0 on rows off)
            _, r_rows, _ = on(x.device)
            flat = x.reshape(rows, -1, x.shape[-1])
            return (flat - torch.bmm(flat, r_rows.unsqueeze(-1)) * r_rows.unsqueeze(1)).view_as(x)

        def embed(e):
            removed = project(e)
            ratio = e.norm(dim=-1, keepdim=True) / removed.norm(dim=-1, keepdim=True).clamp(min=1e-30)
            any_on = on(e.device)[2]
            return torch.where(any_on.view(-1, *([1] * (e.dim() - 1))), removed * ratio, e)

        handles = [_hook_out(m, embed) for m in first.embeddings]
        for j, module in enumerate(w.module for w in first.writers):
            device = module.weight.device
            w_dev = on(device)[0]
            ones = torch.ones(1, first.writers[j].scale.shape[0], device=device, dtype=dt)
            scales = torch.stack([g.writers[j].scale.to(device=device, dtype=dt) for g in group])
            scale = torch.cat([ones, scales])[w_dev]
            shift = None
            if any(g.writers[j].bias_delta is not None for g in group):
                zero = torch.zeros(lm.d_model, device=device, dtype=dt)
                deltas = [zero if g.writers[j].bias_delta is None else g.writers[j].bias_delta.to(device=device,
                                                                                                 dtype=dt)
                          for g in group]
                shift = torch.cat([zero[None], torch.stack(deltas)])[w_dev]  # on the device: no host sync

            def pre(module, args, kwargs, scale=scale):
                a = args[0]
                return (a * scale.view(rows, *([1] * (a.dim() - 2)), -1),) + tuple(args[1:]), kwargs

            def post(y, shift=shift):
                out = project(y)
                return out if shift is None else out + shift.view(rows, *([1] * (y.dim() - 2)), -1)

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(_hook_out(module, post))
        return handles


__all__ = ["SubspaceAblation", "LayerKernelAblation", "AffineAblation", "AffineAddition", "WriterEdit",
           "NormPreservingAblation"]
