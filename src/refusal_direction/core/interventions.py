"""Interventions on the residual stream, applied through one context manager.

- `Baseline`: no-op (so loops over conditions need no special case).
- `DirectionalAblation`: x' = x - r̂ r̂ᵀ x at the input of every decoder block and at the outputs of
  every attention and MLP sub-layer, at every position (prompt and generated tokens). Then every
  block input, every mid-block residual and the final residual have zero component along r̂.
- `ActivationAddition`: x' = x + coeff · r at the input of one block, at every position.

Hooks return new tensors (never edit activations in place) and are removed on exit, also on error.
Every hook takes an optional per-row switch ``rows`` ([batch] float/bool): the intervention applies
only where it is 1, so several conditions can share one batch (one read of the weights per step).
`per_row_interventions` goes further for the selection sweep: each batch row has its own direction to
ablate and its own vector and layer to add. Both register their hooks through the same two helpers.
On a model dispatched over devices (accelerate's ``device_map``) every hook takes the direction on the
device its activations are on (`follow`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import torch

from .model import LoadedModel
from .padding import device_tensor
from .placement import DeviceCopies


@dataclass(frozen=True, eq=False)
class Baseline:
    name: str = "baseline"

    def describe(self) -> dict:
        return {"type": "baseline"}


@dataclass(frozen=True, eq=False)
class DirectionalAblation:
    direction: torch.Tensor  # [d_model], any norm; normalised when applied
    name: str = "ablation"

    def describe(self) -> dict:
        return {"type": "directional_ablation", "sites": "resid_pre, attn_out, mlp_out of every block",
                "direction_norm": float(self.direction.double().norm())}


@dataclass(frozen=True, eq=False)
class ActivationAddition:
    direction: torch.Tensor  # [d_model], raw (unnormalised) difference-in-means vector
    layer: int
    coeff: float = 1.0
    name: str = "actadd"

    def describe(self) -> dict:
        return {"type": "activation_addition", "site": f"resid_pre of block {self.layer}",
                "coeff": self.coeff, "direction_norm": float(self.direction.double().norm())}


Intervention = Union[Baseline, DirectionalAblation, ActivationAddition]


def unit(direction: torch.Tensor) -> torch.Tensor:
    """r̂ = r / ‖r‖, computed in float32 (float64 input is kept)."""
    d = direction.float() if direction.dtype not in (torch.float32, torch.float64) else direction
    return d / d.norm()


def ablate(x: torch.Tensor, r_hat: torch.Tensor, r_rows: torch.Tensor | None = None) -> torch.Tensor:
    """x - r̂ r̂ᵀ x over the last dim; ``r_hat`` [d] unit norm, in x's dtype and device.

    ``r_rows`` [batch, d]: optional per-row switch folded into the direction (r̂ where row b is ablated,
    zeros where it is not; see `apply_intervention`), so a row that is off comes back exactly as it was.
    Two kernels: a matrix-vector product for the projections and one fused multiply-subtract pass over x.
    (Measured on an H200 at 200 rows, gemma-2b shape: this decodes 0.2-0.3 s faster over 512 steps than a
    batched rank-one update, which cuBLAS runs as a slow k=1 batched GEMM, and than bmm + baddbmm.)
    """
    proj = (x @ r_hat).unsqueeze(-1)  # [..., 1]
    return torch.addcmul(x, proj, r_hat if r_rows is None else _per_row(r_rows, x), value=-1)


def ablate_rows(x: torch.Tensor, r_rows: torch.Tensor) -> torch.Tensor:
    """x - (x·r̂_b) r̂_b with a different unit direction per batch row: x [batch, ..., d], r_rows [batch, d]
    (a zero row leaves row b exactly as it is). A batched matrix-vector product, then one fused pass over x."""
    b, d = x.shape[0], x.shape[-1]
    proj = torch.bmm(x.reshape(b, -1, d), r_rows.unsqueeze(-1)).view(*x.shape[:-1], 1)  # [batch, ..., 1]
    return torch.addcmul(x, proj, _per_row(r_rows, x), value=-1)


def _per_row(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[batch, d] viewed as [batch, 1, ..., 1, d] to broadcast against x [batch, ..., d]."""
    return v.view(v.shape[0], *([1] * (x.dim() - 2)), v.shape[-1])


def add(x: torch.Tensor, vector: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    if rows is not None:
        return x + rows.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) * vector
    return x + vector


def replace_first(value, fn):
    """Apply fn to a tensor or to the first element of a tuple output; return a new object."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return (fn(value[0]),) + tuple(value[1:])
    raise TypeError(f"cannot intervene on a module output of type {type(value).__name__}")


def input_hook(fn):
    """A forward pre-hook (register with with_kwargs=True) rewriting the block's hidden_states input."""

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    return hook


def output_hook(fn):
    def hook(module, args, output):
        return replace_first(output, fn)

    return hook


def follow(lm: LoadedModel, *tensors: torch.Tensor | None):
    """``at(x)``: ``tensors`` on x's device. On one device that is ``tensors`` themselves; on a dispatched model
    each block's activations arrive on its own device, and each tensor is copied there once."""
    if not lm.placement:
        return lambda x: tensors
    copies = [None if t is None else DeviceCopies(t) for t in tensors]
    return lambda x: tuple(None if c is None else c.on(x.device) for c in copies)


def _hook_every_site(lm: LoadedModel, fn) -> list:
    """Apply ``fn`` at every block input and every attention/MLP output (the ablation sites); the handles."""
    handles = []
    for site in lm.blocks:
        handles.append(site.block.register_forward_pre_hook(input_hook(fn), with_kwargs=True))
        handles.append(site.attn_out.register_forward_hook(output_hook(fn)))
        handles.append(site.mlp_out.register_forward_hook(output_hook(fn)))
    return handles


def _hook_block_input(lm: LoadedModel, layer: int, fn):
    """Apply ``fn`` to block ``layer``'s input hidden states (the addition site); the handle."""
    return lm.blocks[layer].block.register_forward_pre_hook(input_hook(fn), with_kwargs=True)


@contextlib.contextmanager
def apply_intervention(
    lm: LoadedModel, intervention: Intervention, rows: torch.Tensor | None = None
) -> Iterator[None]:
    """Hook ``intervention`` into ``lm.model`` for the duration of the block.

    ``rows``: optional [batch] mask (1 = intervene on this row); must match the batch of every call
    made inside the block.
    """
    handles = []
    try:
        if isinstance(intervention, DirectionalAblation):
            r_hat = unit(intervention.direction).to(device=lm.device, dtype=lm.dtype)
            # With a row switch, the per-row directions ([batch, d], zero where off) are made once here,
            # not at every hook call: each site then costs two kernels.
            r_rows = None if rows is None else (rows.to(device=lm.device, dtype=lm.dtype).unsqueeze(-1)
                                                * r_hat).contiguous()
            at = follow(lm, r_hat, r_rows)

            def fn(x):
                return ablate(x, *at(x))

            handles += _hook_every_site(lm, fn)
        elif isinstance(intervention, ActivationAddition):
            if not 0 <= intervention.layer < lm.n_layers:
                raise ValueError(f"layer={intervention.layer} out of range (0..{lm.n_layers - 1})")
            vec = (intervention.coeff * intervention.direction.double()).to(device=lm.device, dtype=lm.dtype)
            at = follow(lm, vec, rows)

            def fn(x):
                return add(x, *at(x))

            handles.append(_hook_block_input(lm, intervention.layer, fn))
        elif hasattr(intervention, "register_hooks"):  # the methods' interventions (refusal_direction.methods)
            handles += intervention.register_hooks(lm, rows)
        elif not isinstance(intervention, Baseline):
            raise TypeError(f"unknown intervention {intervention!r}")
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def per_row_interventions(
    lm: LoadedModel,
    ablate_dirs: torch.Tensor | None = None,
    add_vectors: torch.Tensor | None = None,
    add_layers: Sequence[int] | None = None,
) -> Iterator[None]:
    """Hook per-row interventions into ``lm.model`` for one batch.

    ``ablate_dirs`` [batch, d_model]: unit direction ablated from row b at every block input and every
    attention/MLP output (a zero row leaves that row untouched). ``add_vectors`` [batch, d_model] with
    ``add_layers`` [batch] (-1 = none): vector added to row b at the input of block ``add_layers[b]``.
    """
    handles = []
    try:
        if ablate_dirs is not None:
            at_dirs = follow(lm, ablate_dirs)

            def fn_ablate(x):
                return ablate_rows(x, *at_dirs(x))

            handles += _hook_every_site(lm, fn_ablate)
        if add_vectors is not None:
            layers = device_tensor(list(add_layers), add_vectors.device)  # [batch]
            for layer in sorted(set(add_layers) - {-1}):
                vec = torch.where((layers == layer).unsqueeze(-1), add_vectors, 0)  # [batch, d]

                def fn_add(x, at=follow(lm, vec.unsqueeze(1))):
                    return x + at(x)[0]

                handles.append(_hook_block_input(lm, layer, fn_add))
        yield
    finally:
        for h in handles:
            h.remove()
