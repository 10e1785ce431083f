"""Hooks on the residual stream: the sites, the projections, the per-row switches, and the one context manager
that applies an edit (`apply_intervention`).

Sites (TransformerLens's names): ``resid_pre`` (a block's input), ``attn_out`` and ``mlp_out`` (what the attention
and MLP sub-layers write into the residual). Hooks return new tensors (never edit activations in place) and every
hook takes an optional per-row switch ``rows`` ([batch] float/bool): the edit applies only where it is 1, so several
conditions can share one batch (one read of the weights per step). `per_row_interventions` goes further for the
selection sweep: each batch row has its own direction to ablate and its own vector and layer to add. On a model
dispatched over devices (accelerate's ``device_map``) every hook takes its tensors on the device its activations are
on (`follow`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol, Sequence

import torch

from .model import LoadedModel
from .padding import device_tensor
from .placement import DeviceCopies

SITES = ("resid_pre", "attn_out", "mlp_out")


class Intervention(Protocol):
    """What generation and the measures need of an edit (`edits.Edit` has every other form too)."""

    name: str

    def hooks(self, lm: LoadedModel, rows: torch.Tensor | None = None) -> list: ...


@contextlib.contextmanager
def apply_intervention(lm: LoadedModel, edit: Intervention, rows: torch.Tensor | None = None) -> Iterator[None]:
    """Hook ``edit`` into ``lm.model`` for the duration of the block; the hooks are removed on exit, also on error.

    ``rows``: optional [batch] mask (1 = intervene on this row); must match the batch of every call made inside.
    """
    handles: list = []
    try:
        handles += edit.hooks(lm, rows)
        yield
    finally:
        for h in handles:
            h.remove()


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


def hook_every_site(lm: LoadedModel, fn) -> list:
    """Apply ``fn`` at every block input and every attention/MLP output (the ablation sites); the handles."""
    return hook_sites(lm, fn, fn)


def hook_block_input(lm: LoadedModel, layer: int, fn):
    """Apply ``fn`` to block ``layer``'s input hidden states (the addition site); the handle."""
    return lm.blocks[layer].block.register_forward_pre_hook(input_hook(fn), with_kwargs=True)


def row_view(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[batch] switch as [batch, 1, ..., 1] against x [batch, ..., d], in x's dtype."""
    return rows.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def on_rows(rows: torch.Tensor | None, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x + delta where the row is switched on (everywhere when ``rows`` is None)."""
    return x + delta if rows is None else x + row_view(rows, x) * delta


def hook_output(module, fn):
    """Apply ``fn`` to ``module``'s output (its first element for a tuple); the handle."""
    return module.register_forward_hook(output_hook(fn))


def hook_sites(lm: LoadedModel, resid_pre, writers) -> list:
    """``resid_pre`` at every block input and ``writers`` at every attention/MLP output; the handles."""
    handles = []
    for i, site in enumerate(lm.blocks):
        handles += [hook_block_input(lm, i, resid_pre), hook_output(site.attn_out, writers),
                    hook_output(site.mlp_out, writers)]
    return handles


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

            handles += hook_every_site(lm, fn_ablate)
        if add_vectors is not None:
            layers = device_tensor(list(add_layers), add_vectors.device)  # [batch]
            for layer in sorted(set(add_layers) - {-1}):
                vec = torch.where((layers == layer).unsqueeze(-1), add_vectors, 0)  # [batch, d]

                def fn_add(x, at=follow(lm, vec.unsqueeze(1))):
                    return x + at(x)[0]

                handles.append(hook_block_input(lm, layer, fn_add))
        yield
    finally:
        for h in handles:
            h.remove()
