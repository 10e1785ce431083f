"""Weight forms of the methods: each edits every vector written into the residual stream.

A written vector is a token/position embedding row, a column of a writer ``nn.Linear`` (row of a GPT-2
``Conv1D``) — what one input unit of the attention output / MLP down projection adds — or a writer bias.
With P = r̂ r̂ᵀ (or Q Qᵀ for a subspace), the forms, each equal to its hooks in `methods.interventions`:

- subspace ablation: v ← v − Q Qᵀ v everywhere (k = 1: `orthogonalize_weights_`).
- layer kernel: v ← v − w P v with the writer's layer weight (attention or MLP), w_emb for embeddings.
  Exact: each hook scales a linear map's output, and so does the edit.
- ACE: v ← v − P v everywhere, and every token-embedding row gets + (c / γ) r̂, where γ is the gain from
  the embedding output to block 0's input (√d_model in Gemma, measured by a probe). Every residual then has
  projection exactly c, as with the hooks. The per-layer variant (a different c at each layer) would need a
  bias on writers that have none (Qwen/Llama/Gemma), which transformers drops on reload; it is not offered.
- norm-preserving ablation: v ← (I − P) v · ‖v‖ / ‖(I − P) v‖ (the Euclidean norm of each written vector is
  kept; a vector parallel to r̂ stays as (I − P)v = 0). Its hook equivalent is exact too: rescaling columns
  of W is rescaling the writer's input units (`norm_preserving_ablation` builds it).

None exists for ACE's addition form or activation addition as hooked here: both change the residual at one
block's input only, and any edit of the writers before it also changes what the earlier blocks read.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable

import torch
from torch import nn

from ..core.interventions import DirectionalAblation
from ..core.model import LoadedModel
from ..errors import UserError
from ..methods.interventions import (
    AffineAblation,
    LayerKernelAblation,
    NormPreservingAblation,
    SubspaceAblation,
    WriterEdit,
)
from .orthogonalize import (
    _CHUNK_ROWS,
    EditedWeights,
    _embeddings,
    _is_conv1d,
    _model_and_blocks,
    check_dense,
    find_residual_writers,
    orthogonalize_weights_,
    untie_embeddings_,
)

log = logging.getLogger(__name__)

Edit = Callable[[str, int, torch.Tensor], torch.Tensor]  # (kind, layer, vectors [n, d] float64) -> [n, d]


def _unit(v: torch.Tensor) -> torch.Tensor:
    v = v.double().cpu()
    return v / v.norm()


def edit_written_vectors_(lm_or_model: LoadedModel | nn.Module, edit: Edit) -> EditedWeights:
    """Apply ``edit`` to every written vector, in float64, in place; kinds: ``token_embedding``,
    ``embedding`` (other d_model embeddings, e.g. learned positions), ``attention``, ``mlp``,
    ``attention_bias``, ``mlp_bias`` (layer = block index, -1 for embeddings)."""
    model, blocks = _model_and_blocks(lm_or_model)
    check_dense(model)
    d_model = int(model.config.get_text_config().hidden_size)
    writers = find_residual_writers(model, blocks)  # fails before anything is edited
    untied = untie_embeddings_(model)
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    edited = []
    with torch.no_grad():
        for i, emb in enumerate(_embeddings(model, blocks, d_model)):
            w = emb.weight
            for start in range(0, w.shape[0], _CHUNK_ROWS):
                rows = w[start:start + _CHUNK_ROWS]
                rows.copy_(edit("token_embedding" if i == 0 else "embedding", -1, rows.double().cpu()).to(rows))
            edited.append(names[id(w)])
        for j, module in enumerate(writers):
            layer, kind = j // 2, ("attention", "mlp")[j % 2]
            w = module.weight
            vectors = w.double().cpu() if _is_conv1d(module) else w.double().cpu().T  # [in, d_model]
            new = edit(kind, layer, vectors)
            w.copy_((new if _is_conv1d(module) else new.T).to(w))
            edited.append(names[id(w)])
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(edit(f"{kind}_bias", layer, module.bias.double().cpu()[None])[0].to(module.bias))
                edited.append(names[id(module.bias)])
    return EditedWeights(tuple(edited), untied)


def subspace_weights_(model, basis: torch.Tensor) -> EditedWeights:
    """v ← v − Q Qᵀ v for ``basis`` Q [k, d_model] with orthonormal rows."""
    q = basis.double().cpu()
    return edit_written_vectors_(model, lambda kind, layer, v: v - (v @ q.T) @ q)


def kernel_weights_(model, direction: torch.Tensor, attn_weights, mlp_weights, embed_weight: float = 0.0
                    ) -> EditedWeights:
    """Scaled projection v ← v − w r̂ r̂ᵀ v, w by writer kind and layer (see `LayerKernelAblation`)."""
    r = _unit(direction)

    def edit(kind, layer, v):
        if "embedding" in kind:
            w = embed_weight
        else:
            w = (attn_weights if kind.startswith("attention") else mlp_weights)[layer]
        return v - w * torch.outer(v @ r, r)

    return edit_written_vectors_(model, edit)


def embedding_gain(lm_or_model, direction: torch.Tensor) -> float:
    """γ: the change of block 0's input along r̂ when a token's embedding row gains r̂ (probe of 4 tokens; the
    rows are restored bit for bit). Measured on the weight, so a scale inside the embedding module counts."""
    model, blocks = _model_and_blocks(lm_or_model)
    weight = model.get_input_embeddings().weight
    r = _unit(direction).to(device=weight.device, dtype=torch.float32)
    vocab = int(model.config.get_text_config().vocab_size)
    tokens = [min(t, vocab - 1) for t in (2, 10, 20, 30)]
    ids = torch.tensor([tokens], device=weight.device)
    seen = []

    def capture(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).float())

    saved = weight[tokens].clone()
    handle = blocks[0].block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
            weight[tokens] += r.to(weight.dtype)
            model(input_ids=ids, use_cache=False)
    finally:
        with torch.no_grad():
            weight[tokens] = saved
        handle.remove()
    change = (seen[1] - seen[0])[0]  # [4, d]
    gain = change @ r  # [4]
    if (change - gain[:, None] * r).abs().max() > 1e-3 * gain.abs().max() or gain.std() > 1e-3 * gain.abs().mean():
        raise UserError("block 0's input is not a uniformly scaled copy of the token embedding in this model; "
                        "ACE's weight form cannot be exact here (use the hook form)")
    return float(gain.mean())


def ace_weights_(model, direction: torch.Tensor, offset: float) -> EditedWeights:
    """ACE in the weights: r̂ projected out of every written vector, + (c/γ) r̂ on each token-embedding row."""
    r = _unit(direction)
    gain = embedding_gain(model, direction)

    def edit(kind, layer, v):
        out = v - torch.outer(v @ r, r)
        return out + (offset / gain) * r if kind == "token_embedding" else out

    return edit_written_vectors_(model, edit)


def _norm_preserved(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    removed = v - torch.outer(v @ r, r)
    kept = removed.norm(dim=-1, keepdim=True)
    return torch.where(kept > 0, removed * (v.norm(dim=-1, keepdim=True) / kept.clamp(min=1e-300)), removed)


def norm_preserving_weights_(model, direction: torch.Tensor) -> EditedWeights:
    """v ← (I − P) v · ‖v‖ / ‖(I − P) v‖ for every written vector (module docstring)."""
    r = _unit(direction)
    return edit_written_vectors_(model, lambda kind, layer, v: _norm_preserved(v, r))


_WRITERS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def _writers_of(lm: LoadedModel) -> list:
    """`find_residual_writers` of ``lm.model``, found once per model (it runs a probe forward pass; a search
    builds this ablation for every trial)."""
    found = _WRITERS.get(lm.model)
    if found is None:
        found = _WRITERS[lm.model] = find_residual_writers(lm.model, lm.blocks)
    return found


_NORMS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
_EMBEDDINGS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _written(module) -> torch.Tensor:
    """The writer's written vectors [in, d] (a view of its weight, in its own dtype)."""
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
    r_cpu = _unit(direction)
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


def method_weights_(model, intervention) -> EditedWeights:
    """The weight form of ``intervention``, applied to ``model`` in place; UserError where none exists."""
    if isinstance(intervention, DirectionalAblation):
        return orthogonalize_weights_(model, intervention.direction)
    if isinstance(intervention, SubspaceAblation):
        return subspace_weights_(model, intervention.basis)
    if isinstance(intervention, LayerKernelAblation):
        return kernel_weights_(model, intervention.direction, intervention.attn_weights, intervention.mlp_weights,
                               intervention.embed_weight)
    if isinstance(intervention, AffineAblation):
        return ace_weights_(model, intervention.direction, intervention.offset)
    if isinstance(intervention, NormPreservingAblation):
        return norm_preserving_weights_(model, intervention.direction)
    raise UserError(f"{intervention.name!r} ({type(intervention).__name__}) has no weight form: it changes the "
                    "residual at one block's input only, which no edit of the writers reproduces; use its hooks")


__all__ = ["ace_weights_", "edit_written_vectors_", "embedding_gain", "kernel_weights_", "method_weights_",
           "norm_preserving_ablation", "norm_preserving_weights_", "subspace_weights_"]
