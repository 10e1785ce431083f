"""Bake directional ablation into the weights: project r̂ out of every matrix that writes to the residual stream.

Ablating r̂ at every block input and every attention/MLP output (`DirectionalAblation`) is the same
function as a model whose residual stream never receives a component along r̂. That holds when every
matrix that *writes* to the residual stream has r̂ projected out of its output space:

- token embedding rows (and learned absolute position embeddings):  W_E ← W_E − (W_E r̂) r̂ᵀ
- each block's attention output projection and MLP down projection: W_out ← W_out − r̂ (r̂ᵀ W_out)
- their biases, where present:                                      b ← b − (b·r̂) r̂

Two things break the equivalence, and both are handled here:

- a tied unembedding (gemma-2b-it, Qwen2.5-0.5B): editing the embedding would also edit ``lm_head``
  (max |Δlogit| 0.07 instead of 4e-7 on gemma-2b-it). The unembedding is untied first: ``lm_head``
  gets its own copy and ``config.tie_word_embeddings`` becomes False, so the saved model reloads
  untied with plain transformers.
- a norm between a sub-layer and the residual (Gemma-2/3 "sandwich" norms): the written vector is
  the norm's output, which no weight edit can keep orthogonal to r̂. Such models are refused.

The writer of each sub-layer is found by a probe forward pass: the last linear layer with d_model
outputs that runs inside the module, and its output must be exactly the module's output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..core.directions import Direction
from ..core.model import LoadedModel, find_blocks
from ..errors import UserError

log = logging.getLogger(__name__)

_CHUNK_ROWS = 16384  # rows of an embedding matrix edited at a time (bounds the float64 scratch memory)


@dataclass(frozen=True)
class EditedWeights:
    """What `orthogonalize_weights_` changed."""

    names: tuple[str, ...]  # parameter names that had r̂ projected out
    untied: bool  # lm_head was given its own copy of the (shared) embedding matrix


# --------------------------------------------------------------------------------------------------
# Orthogonalization


def orthogonalize_weights_(
    lm_or_model: LoadedModel | nn.Module,
    direction: Direction | torch.Tensor,
    untie: bool = True,
) -> EditedWeights:
    """Project r̂ out of every matrix that writes to the residual stream, in place.

    ``untie=False`` keeps a tied ``lm_head`` tied to the edited embedding; that is *not* equivalent to
    the hooks and exists only to demonstrate the trap in tests.
    """
    model, blocks = _model_and_blocks(lm_or_model)
    check_dense(model)
    d_model = int(model.config.get_text_config().hidden_size)
    vector = direction.vector if isinstance(direction, Direction) else direction
    if vector.shape != (d_model,):
        raise UserError(f"direction has shape {tuple(vector.shape)} but the model has d_model {d_model}; "
                        "use a direction extracted from this model")
    r_hat = vector.double().cpu()
    r_hat = r_hat / r_hat.norm()

    writers = find_residual_writers(model, blocks)  # fails before anything is edited
    untied = untie_embeddings_(model) if untie else False
    if not untie and _embeddings_shared(model):
        log.warning("untie=False on a model with a tied unembedding: lm_head is edited too, so the result "
                    "is NOT equivalent to directional ablation")

    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    edited: list[str] = []
    with torch.no_grad():
        for emb in _embeddings(model, blocks, d_model):
            _project_rows_(emb.weight, r_hat)
            edited.append(names[id(emb.weight)])
        for module in writers:
            if _is_conv1d(module):  # GPT-2 Conv1D: y = x W + b, W [in, d_model]
                _project_rows_(module.weight, r_hat)
            else:  # nn.Linear: y = x Wᵀ + b, W [d_model, in]
                _project_columns_(module.weight, r_hat)
            edited.append(names[id(module.weight)])
            if getattr(module, "bias", None) is not None:
                _project_rows_(module.bias.view(1, -1), r_hat)
                edited.append(names[id(module.bias)])
    log.info("orthogonalized %d tensors against r̂%s", len(edited), " (lm_head untied first)" if untied else "")
    return EditedWeights(tuple(edited), untied)


def check_dense(model: nn.Module) -> None:
    """Refuse models whose weights are not plain floating-point tensors (still quantized)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    packed = bool(getattr(quantizer, "packed_modules", None))
    still_quantized = quantizer is not None and (packed or not _is_gguf(method))
    if still_quantized or any(not p.is_floating_point() for p in model.parameters()):
        raise UserError(f"the model's weights are quantized ({method}); orthogonalization needs dense weights. "
                        "Load it unquantized (a GGUF file: dequantized, e.g. --dtype float32 on CPU) and retry")


def _is_gguf(method) -> bool:
    return str(getattr(method, "value", method)).lower() == "gguf"




def _model_and_blocks(lm_or_model: LoadedModel | nn.Module):
    if isinstance(lm_or_model, LoadedModel):
        return lm_or_model.model, lm_or_model.blocks
    blocks, _ = find_blocks(lm_or_model)
    return lm_or_model, blocks


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def _project_rows_(weight: torch.Tensor, r_hat: torch.Tensor) -> None:
    """W ← W − (W r̂) r̂ᵀ for W [rows, d_model], in chunks of rows, computed in float64."""
    r = r_hat.to(device=weight.device, dtype=_compute_dtype(weight))
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        rows = weight[start:start + _CHUNK_ROWS]
        w = rows.to(r.dtype)
        rows.copy_((w - torch.outer(w @ r, r)).to(weight.dtype))


def _project_columns_(weight: torch.Tensor, r_hat: torch.Tensor) -> None:
    """W ← W − r̂ (r̂ᵀ W) for W [d_model, in], computed in float64."""
    r = r_hat.to(device=weight.device, dtype=_compute_dtype(weight))
    w = weight.to(r.dtype)
    weight.copy_((w - torch.outer(r, r @ w)).to(weight.dtype))


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if _is_conv1d(module):
        return int(module.nf)
    return None


def _embeddings(model: nn.Module, blocks, d_model: int) -> list[nn.Embedding]:
    """Token embedding plus any other d_model-wide embedding outside the blocks (learned positions)."""
    token = model.get_input_embeddings()
    if token is None or token.weight.shape[-1] != d_model:
        raise UserError(f"{type(model).__name__} has no token embedding of width d_model={d_model}; "
                        "this architecture is not supported for export")
    inside = {id(m) for site in blocks for m in site.block.modules()}
    out = [token]
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m is not token and id(m) not in inside and m.weight.shape[-1] == d_model:
            log.info("also orthogonalizing embedding %s (%s)", name, tuple(m.weight.shape))
            out.append(m)
    return out


def _embeddings_shared(model: nn.Module) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or emb is None or getattr(out, "weight", None) is None:
        return False
    return out.weight is emb.weight or (out.weight.data_ptr() == emb.weight.data_ptr() != 0  # 0: meta, no data
                                        and out.weight.device == emb.weight.device)


def untie_embeddings_(model: nn.Module) -> bool:
    """Give ``lm_head`` its own copy of a shared embedding and record it in the config; True if untied.

    transformers decides tying on load from ``config.tie_word_embeddings`` (and, in v5, keeps the
    ``all_tied_weights_keys`` map it derived from it); both are updated so neither ``tie_weights()``
    nor a save/reload ties the matrices again.
    """
    shared = _embeddings_shared(model)
    if shared:
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    flagged = any(getattr(c, "tie_word_embeddings", False) for c in configs)
    for c in configs:
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False
    for m in model.modules():  # transformers v5 caches the tie map computed at init
        if hasattr(m, "all_tied_weights_keys") and hasattr(m, "get_expanded_tied_weights_keys"):
            m.all_tied_weights_keys = m.get_expanded_tied_weights_keys(all_submodels=False)
    if shared or flagged:
        log.info("untied lm_head from the token embedding (config.tie_word_embeddings=False)")
    return shared


def _same_output(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The linear layer's output is the site's output: equal values, or on the meta device (no values), the
    same tensor object (what a module returns when it passes the projection's output straight through)."""
    if a.device.type == "meta" or b.device.type == "meta":
        return a is b
    return torch.equal(a, b)


def _probe_mask(ids: torch.Tensor) -> torch.Tensor | None:
    """None (causal) for a real probe. On the meta device a ready 4-D causal mask [1, 1, seq, seq]: transformers
    then builds no mask of its own, whose data-dependent checks cannot run without values."""
    if ids.device.type != "meta":
        return None
    return torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()


def find_residual_writers(model: nn.Module, blocks) -> list[nn.Module]:
    """For every block's attention and MLP site, the linear layer whose output is the site's output.

    Found by one probe forward pass (4 tokens): the last nn.Linear / Conv1D with d_model outputs that
    runs inside the site module, checked to produce exactly the module's output. The probe also runs on a
    model on the meta device (no weights: `stream.residual_roles`), where "exactly" means the same tensor.
    """
    d_model = int(model.config.get_text_config().hidden_size)
    sites = [(i, kind, m) for i, s in enumerate(blocks) for kind, m in (("attention", s.attn_out), ("MLP", s.mlp_out))]
    for i, kind, module in sites:
        if "norm" in type(module).__name__.lower() or not any(_out_features(m) for m in module.modules()):
            raise UserError(
                f"block {i}'s {kind} output is written to the residual stream through {type(module).__name__}, "
                "not a linear layer (a post-sub-layer 'sandwich' norm as in Gemma-2/3); no weight edit "
                "reproduces directional ablation there. Use the hook-based ablation (the `ablation` "
                "intervention) with this model instead of exporting")

    calls: dict[int, list[tuple[nn.Module, torch.Tensor]]] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []

    def record_linear(key):
        def hook(module, args, output):
            if _out_features(module) == d_model:
                calls.setdefault(key, []).append((module, output))
        return hook

    def record_site(key):
        def hook(module, args, output):
            outputs[key] = output[0] if isinstance(output, tuple) else output
        return hook

    try:
        for _, _, module in sites:
            key = id(module)
            handles.append(module.register_forward_hook(record_site(key)))
            for sub in module.modules():
                if _out_features(sub) is not None:
                    handles.append(sub.register_forward_hook(record_linear(key)))
        device = next(model.parameters()).device
        vocab = int(model.config.get_text_config().vocab_size)
        ids = torch.tensor([[min(t, vocab - 1) for t in (2, 10, 20, 30)]], device=device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=_probe_mask(ids), use_cache=False)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()

    writers = []
    for i, kind, module in sites:
        seen = calls.get(id(module), [])
        out = outputs.get(id(module))
        if not seen or out is None or not _same_output(seen[-1][1], out):
            raise UserError(
                f"block {i}'s {kind} module ({type(module).__name__}) does not return the output of one "
                f"linear layer with d_model={d_model} outputs (found {len(seen)} candidate calls); weight "
                "orthogonalization would not match directional ablation for this architecture (e.g. "
                "mixture-of-experts or a post-sub-layer norm). Use the hook-based ablation instead")
        writers.append(seen[-1][0])
    return writers


# --------------------------------------------------------------------------------------------------
# Any edit of the written vectors


def unit64(v: torch.Tensor) -> torch.Tensor:
    """r̂ in float64 on the CPU (the weight forms compute in float64)."""
    v = v.double().cpu()
    return v / v.norm()


WrittenEdit = Callable[[str, int, torch.Tensor], torch.Tensor]  # (kind, layer, vectors [n, d] float64) -> [n, d]


def edit_written_vectors_(lm_or_model: LoadedModel | nn.Module, edit: WrittenEdit) -> EditedWeights:
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
