"""Norm-preserving ablation: r̂ removed from every vector written into the residual stream, each keeping its norm.

A written vector is a token/position embedding row, a column of a writer ``nn.Linear`` (row of a GPT-2 ``Conv1D``)
— what one input unit of the attention output / MLP down projection adds — or a writer bias. Weight form:
v ← (I − P) v · ‖v‖ / ‖(I − P) v‖ with P = r̂ r̂ᵀ (a vector parallel to r̂ stays as (I − P)v = 0). Its hook form is
exact too: rescaling columns of W is rescaling the writer's input units, so the hooks scale each writer's input
(``scale`` per unit), project its output and shift its bias; embedding outputs are projected and rescaled.
`norm_preserving_ablation` builds the hook form from the model's writers. Several of them in one batch share one
hook per module (`NormPreservingAblation.stack`). Built from a run on the projected direction ("biprojected");
in the search, on the interpolated direction (no parameters of its own).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ...core.directions import Direction
from ...core.hooks import hook_output, on_rows, unit
from ...core.model import LoadedModel
from ..base import Edit, register
from .projected import projected_direction


def _norm_preserved(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    removed = v - torch.outer(v @ r, r)
    kept = removed.norm(dim=-1, keepdim=True)
    return torch.where(kept > 0, removed * (v.norm(dim=-1, keepdim=True) / kept.clamp(min=1e-300)), removed)



_WRITERS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def _writers_of(lm: LoadedModel) -> list:
    """`find_residual_writers` of ``lm.model``, found once per model (it runs a probe forward pass; a search
    builds this ablation for every trial)."""
    found = _WRITERS.get(lm.model)
    if found is None:
        from ..weights import find_residual_writers

        found = _WRITERS[lm.model] = find_residual_writers(lm.model, lm.blocks)
    return found


_NORMS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
_EMBEDDINGS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _written(module) -> torch.Tensor:
    """The writer's written vectors [in, d] (a view of its weight, in its own dtype)."""
    from ..weights import _is_conv1d

    return module.weight.detach() if _is_conv1d(module) else module.weight.detach().T


def _squared_norms(module) -> torch.Tensor:
    """‖v‖² of each written vector of ``module`` [in], float64, computed once per module and weight (its storage,
    device, dtype and version: a move, a cast, an in-place edit or a new tensor computes them again)."""
    w = module.weight
    key = (w.data_ptr(), w.device, w.dtype, tuple(w.shape), w._version)
    hit = _NORMS.get(module)
    if hit is None or hit[0] != key:
        v = _written(module).to(torch.float64)
        hit = _NORMS[module] = (key, (v * v).sum(-1))
    return hit[1]


def norm_preserving_ablation(lm: LoadedModel, direction: torch.Tensor, name: str = "norm_preserving"
                             ) -> NormPreservingAblation:
    """The hook form of `norm_preserving_weights_` on ``lm`` (its writers' input scales and bias shifts).

    scale = ‖v‖ / ‖(I − P) v‖ = ‖v‖ / √(‖v‖² − (v·r̂)²) per written vector, with ‖v‖² cached per writer and v·r̂
    from one product per writer, both in float64 (a search builds this for many trials; the weight form computes
    (I − P) v itself, and the two agree to float64 rounding unless a vector is almost parallel to r̂)."""
    from ..weights import _embeddings, unit64

    r_cpu = unit64(direction)
    writers = _writers_of(lm)
    r_on: dict[str, torch.Tensor] = {}  # r̂ in float64 on each weight's device, copied there once
    dots = []
    for module in writers:
        key = str(module.weight.device)
        if key not in r_on:
            r_on[key] = r_cpu.to(device=module.weight.device, dtype=torch.float64)
        dots.append(_written(module).to(torch.float64) @ r_on[key])
    scales: list[torch.Tensor | None] = [None] * len(writers)
    for key in r_on:  # the scale arithmetic once per device, over every writer's vectors together
        idx = [i for i, m in enumerate(writers) if str(m.weight.device) == key]
        dot = torch.cat([dots[i] for i in idx])
        nsq = torch.cat([_squared_norms(writers[i]) for i in idx])
        removed = nsq - dot * dot  # ‖(I − P) v‖², exactly 0 for a vector parallel to r̂ (up to rounding)
        scale = torch.where(removed > 1e-12 * nsq, (nsq / removed.clamp(min=1e-300)).sqrt(), 1.0).float()
        for i, part in zip(idx, scale.split([len(dots[i]) for i in idx]), strict=True):
            scales[i] = part
    edits = []
    for module, scale in zip(writers, scales, strict=True):
        delta = None
        if getattr(module, "bias", None) is not None:
            b = module.bias.detach().to(torch.float64)[None]
            rb = r_cpu.to(b.device)
            delta = (_norm_preserved(b, rb) - (b - torch.outer(b @ rb, rb)))[0]
        edits.append(WriterEdit(module, scale, None if delta is None else delta.float()))
    embeddings = _EMBEDDINGS.get(lm.model)
    if embeddings is None:
        embeddings = _EMBEDDINGS[lm.model] = tuple(_embeddings(lm.model, lm.blocks, lm.d_model))
    return NormPreservingAblation(direction, embeddings, tuple(edits), name=name)


@dataclass(frozen=True)
class WriterEdit:
    """One residual writer of the norm-preserving hook form: its input scaled by ``scale``, its bias moved."""

    module: torch.nn.Module  # nn.Linear or Conv1D writing d_model outputs
    scale: torch.Tensor  # [in_features]: ‖w_j‖ / ‖(I − r̂r̂ᵀ) w_j‖ per written vector w_j
    bias_delta: torch.Tensor | None  # [d_model]: b' − (I − r̂r̂ᵀ) b, or None without a bias


@register("norm_preserving")
@dataclass(frozen=True, eq=False)
class NormPreservingAblation(Edit):
    """Hook form of the norm-preserving edit: r̂ removed from every written vector, each keeping its norm.

    Embedding outputs e ← (I − P) e · ‖e‖ / ‖(I − P) e‖ (a function of the row alone); each writer's input
    a ← a ⊙ scale, its output y ← (I − P) y + bias_delta. Equal to its weight form.
    """

    direction: torch.Tensor  # [d_model]
    embeddings: Sequence[torch.nn.Module]
    writers: Sequence[WriterEdit]
    name: str = "norm_preserving"
    order = 3
    compare = True
    searchable = True
    reasons = {"lora": "it rescales every written vector: its weight change is full-rank, which no low-rank adapter "
                       "holds; use the merged export",
               "own_step": "writer input scales and bias shifts: the own decode step ablates one direction"}

    def describe(self) -> dict:
        return {"type": "norm_preserving_ablation", "n_writers": len(self.writers),
                "norm": "euclidean norm of each vector written into the residual (embedding rows, writer columns)"}

    def hooks(self, lm: LoadedModel, rows: torch.Tensor | None = None) -> list:
        r = unit(self.direction).to(device=lm.device, dtype=lm.dtype)

        def embed(e):
            removed = e - (e @ r).unsqueeze(-1) * r
            ratio = e.norm(dim=-1, keepdim=True) / removed.norm(dim=-1, keepdim=True).clamp(min=1e-30)
            return on_rows(rows, e, removed * ratio - e)

        handles = [hook_output(m, embed) for m in self.embeddings]
        for w in self.writers:
            s = w.scale.to(device=lm.device, dtype=lm.dtype)
            delta = None if w.bias_delta is None else w.bias_delta.to(device=lm.device, dtype=lm.dtype)

            def pre(module, args, kwargs, s=s):
                a = args[0]
                return (on_rows(rows, a, a * (s - 1)),) + tuple(args[1:]), kwargs

            def post(y, delta=delta):
                change = -(y @ r).unsqueeze(-1) * r
                return on_rows(rows, y, change if delta is None else change + delta)

            handles.append(w.module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(hook_output(w.module, post))
        return handles

    def weights_(self, model):
        """v ← (I − P) v · ‖v‖ / ‖(I − P) v‖ for every written vector."""
        from ..weights import edit_written_vectors_, unit64

        r = unit64(self.direction)
        return edit_written_vectors_(model, lambda kind, layer, v: _norm_preserved(v, r))

    @classmethod
    def from_run(cls, inputs, name: str) -> NormPreservingAblation:
        """Biprojected: the run's projected direction (`projected.projected_direction`), norms kept."""
        return norm_preserving_ablation(inputs.lm, projected_direction(inputs.direction,
                                                                       inputs.mean_harmless()).vector, name=name)

    @classmethod
    def from_params(cls, inputs, direction: Direction, params: dict, name: str) -> NormPreservingAblation:
        return norm_preserving_ablation(inputs.lm, direction.vector, name=name)

    @classmethod
    def stack(cls, lm: LoadedModel, group: Sequence[NormPreservingAblation], switches: Sequence[torch.Tensor]
              ) -> list | None:
        """One hook per module for several norm-preserving ablations, each on its own rows (`edits.stacked`):
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

        handles = [hook_output(m, embed) for m in first.embeddings]
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
            handles.append(hook_output(module, post))
        return handles
