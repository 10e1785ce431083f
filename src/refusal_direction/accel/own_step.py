"""The fast path's decode step without HF's module forwards: the sweep forward's fused pieces on a static cache.

HF's decoder runs about 42 kernels per block and decode step at gemma-2b shape with the fast path's hooks and
fusions (761 per step in a kernel profile): the norms, their casts, the rotary arithmetic, two kernels per
ablation site, the residual adds, the cache writes. For the standard pre-norm decoder block that
`fast_forward.SweepDecoder` recognises (Llama, Mistral, Qwen2, Gemma), `OwnStep` runs a decode step on that
decoder's pieces instead, reading and writing the `StaticCache` HF's prefill filled:

- the embedding, then per block: one q/k/v product, one rotary kernel for the new token's query and key (row b at
  its own position), two index copies into the cache, attention over the cache as far as it is written, the
  output projection, residual + ablation + RMSNorm in one kernel, gate and up products, act·up in one kernel, the
  down product, residual + ablations + the next block's addition + the next RMSNorm in one kernel;
- the rows' interventions are `fast_forward.RowInterventions`: each condition's direction ablated at every block
  input and every attention/MLP output, its vector added at one block's input — exactly what the hooks of
  `Baseline`, `DirectionalAblation` and `ActivationAddition` do. Any other intervention (the methods' forms) keeps
  HF's step;
- attention: the Triton `decode_attention` kernel where `folded_attention` verified it (CUDA, bf16/fp16), else
  SDPA with the query heads of each KV head folded into query rows, under a boolean mask of the written slots.

Every buffer address is fixed, so the step is captured as a CUDA graph like HF's (tests/gpu checks it on an H200).
On CPU in float32 the tokens equal HF's step (tests, also under Triton's interpreter with every kernel a GPU would
use, and on the real Qwen2.5-Coder-0.5B); the element-wise kernels are the sweep's, each verified on probes before
use, and each batch's first decode step runs on both steps (`static_decode._Decoder.checked_own_step`): the own
step goes on only if its logits are HF's within `OWN_STEP_TOLERANCE`. Chosen with ``step="own"``
(`fast_generation.generate_fast`; the Python API's default stays HF's step, the reference) and by the pipeline's
``decode_step = "own"`` (the config's default). Measured on one H200 (BENCHMARKS.md "Generation" and "The real
model"): the real Qwen2.5-Coder-0.5B's replicate generation 7.8 s vs 9.4 s on HF's step, refusal counts equal within
one per set; random-weight gemma-2b / Llama-3-8B shapes 1.79 / 5.16 s vs 2.41 / 6.45 s on repeat calls (a
process's first call also compiles the Triton kernels, ~1.5 s on an empty Triton cache).

Not for models that carry hooks of their own on their decoder layers (the own step would skip them): those keep
HF's step (`foreign_hooks`). The step writes the cache's tensors but not `StaticLayer`'s length counter, so the cache
is not handed back to HF's forward afterwards.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.model import LoadedModel
from ..edits import Edit
from .fast_forward import RowInterventions, SweepDecoder, shared_decoder
from .folded_attention import decode_kernel_for

log = logging.getLogger(__name__)

STEPS = ("hf", "own")  # the decode step: HF's model forward with hooks, or `OwnStep`
OWN_STEP_TOLERANCE = 5e-2  # largest relative logit difference from HF's step on a batch's first step (as selection's)


def row_interventions(lm: LoadedModel, interventions: Sequence, condition: torch.Tensor) -> RowInterventions | str:
    """The interventions of a batch whose row b runs ``interventions[condition[b]]`` (each edit's ``row_form``), or
    why they have no form here. Directions and vectors in the model's dtype, made as the hooks make them."""
    n, d = len(interventions), lm.d_model
    dirs = torch.zeros(n, d, dtype=lm.dtype, device=lm.device)
    adds = torch.zeros_like(dirs)
    layers = [-1] * n
    has_dirs = False
    for c, iv in enumerate(interventions):
        form = iv.row_form(lm) if isinstance(iv, Edit) else None
        if form is None:
            why = iv.reasons.get("own_step", "") if isinstance(iv, Edit) else "not an edits.Edit"
            return f"intervention {iv.name!r} ({type(iv).__name__}) has no own-step form: {why}"
        if form.ablate is not None:
            dirs[c], has_dirs = form.ablate, True
        if form.add is not None:
            adds[c], layers[c] = form.add, form.layer
    condition = condition.to(lm.device)
    has_adds = any(layer >= 0 for layer in layers)
    return RowInterventions(dirs[condition] if has_dirs else None, adds[condition] if has_adds else None,
                            tuple(layers[c] for c in condition.tolist()) if has_adds else None)


def decoder_for(lm: LoadedModel, fuse: bool) -> SweepDecoder | None:
    """The model's `SweepDecoder`, shared with the selection sweep (`fast_forward.shared_decoder`), or None."""
    return shared_decoder(lm, fuse)


class OwnStep:
    """``logits = step()`` for the token in ``ids`` [rows, 1] at ``position`` [rows, 1]: writes its key and value
    into the cache at ``slot`` (one slot per step, the same for every row, as HF's `StaticCache` does), advances
    the slot, returns the last-position logits [rows, vocab]."""

    def __init__(self, decoder: SweepDecoder, cache, prompt_mask: torch.Tensor, rows: RowInterventions,
                 ids: torch.Tensor, position: torch.Tensor, attention=None):
        self.decoder, self.rows, self.ids, self.position, self.attention = decoder, rows, ids, position, attention
        self.keys = [layer.keys for layer in cache.layers]  # [rows, n_kv, cache_len, hd] each
        self.values = [layer.values for layer in cache.layers]
        n, length = prompt_mask.shape
        cache_len = self.keys[0].shape[2]
        if len(self.keys) != len(decoder.blocks) or any(k.shape[2] != cache_len for k in self.keys):
            raise ValueError("the static cache does not match the decoder's blocks")
        self.slot = torch.full((1,), length, dtype=torch.long, device=ids.device)  # the cache slot written next
        self.mask = torch.zeros(n, 1, 1, cache_len, dtype=torch.bool, device=ids.device)  # [rows, 1, 1, cache_len]
        self.mask[:, 0, 0, :length] = prompt_mask.bool()
        self.added = [rows.added_at(layer) for layer in range(len(decoder.blocks))]  # [rows, d] or None each
        self.attention_name = "SDPA" if attention is None else "the decode attention kernel"

    def __call__(self) -> torch.Tensor:
        dec, k, u = self.decoder, self.decoder.kernels, self.rows.dirs
        n_heads, n_kv, hd = dec.n_heads, dec.n_kv, dec.head_dim
        blocks = dec.blocks
        x = dec.embed(self.ids)  # [rows, 1, d]
        rows = x.shape[0]
        cos, sin = (t[:, 0] for t in dec.rotary_emb(x, position_ids=self.position))  # [rows, hd]: row b at its own
        h, normed = k.residual(x, None, u, self.added[0], blocks[0].input_norm, ablate_sum=u is not None)
        self.mask.index_fill_(3, self.slot, True)
        for layer, block in enumerate(blocks):
            qkv = k.head_norms(block, F.linear(normed, block.qkv_weight, block.qkv_bias), n_heads, n_kv, hd)
            # the rows as the "sequence" of one row, so cos/sin [rows, hd] index them: [1, heads/kv, rows, hd]
            q, key = k.rotary(qkv.view(1, rows, -1), cos, sin, n_heads, n_kv, hd)
            value = qkv[:, 0, (n_heads + n_kv) * hd:].view(rows, n_kv, 1, hd)
            self.keys[layer].index_copy_(2, self.slot, key[0].transpose(0, 1).unsqueeze(2))
            self.values[layer].index_copy_(2, self.slot, value)
            q = q[0].transpose(0, 1).view(rows, n_kv, n_heads // n_kv, hd)  # query heads of KV head g as rows of g
            if self.attention is not None:
                out = self.attention(q, self.keys[layer], self.values[layer], self.mask, block.scaling)
            else:
                out = F.scaled_dot_product_attention(q, self.keys[layer], self.values[layer], attn_mask=self.mask,
                                                     scale=block.scaling)  # [rows, n_kv, G, hd]
            h, normed = k.residual(h, block.o_proj(out.reshape(rows, 1, n_heads * hd)), u, None, block.mid_norm,
                                   ablate_sum=False)
            mlp = block.down(k.act_mul(block, block.gate(normed), block.up(normed)))
            if layer + 1 < len(blocks):
                h, normed = k.residual(h, mlp, u, self.added[layer + 1], blocks[layer + 1].input_norm,
                                       ablate_sum=u is not None)
            else:
                h, normed = k.residual(h, mlp, u, None, dec.lm.final_norm, ablate_sum=False)
        self.slot.add_(1)
        logits = dec.head(normed[:, -1].contiguous())  # [rows, vocab]
        if dec.softcap:
            logits = torch.tanh(logits / dec.softcap) * dec.softcap
        return logits


def foreign_hooks(lm: LoadedModel) -> str:
    """Modules of the decoder layers that carry forward hooks ("" if none), for a look before the fast path adds
    its own: the own step does not run those modules' forwards, so it would skip such hooks."""
    hooked = [name for site in lm.blocks for name, m in site.block.named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    return ", ".join(hooked[:3]) + (f" and {len(hooked) - 3} more" if len(hooked) > 3 else "")


def own_step_for(lm: LoadedModel, cache, prompt_mask: torch.Tensor, condition: torch.Tensor,
                 interventions: Sequence, ids: torch.Tensor, position: torch.Tensor, fuse: bool,
                 notes: list[str], hooks: str = "") -> OwnStep | None:
    """An `OwnStep` for this batch, or None with the reason in ``notes`` (HF's step then decodes). ``hooks``:
    `foreign_hooks` of the model before the fast path's contexts were entered."""
    if hooks:
        notes.append(f"own decode step unavailable (the model's own hooks on {hooks}): HF's step")
        return None
    rows = row_interventions(lm, interventions, condition)
    if isinstance(rows, str):
        notes.append(f"own decode step unavailable ({rows}): HF's step")
        return None
    if any(type(layer).__name__ != "StaticLayer" for layer in cache.layers):
        notes.append("own decode step unavailable (sliding-window cache layers): HF's step")
        return None
    decoder = decoder_for(lm, fuse)
    if decoder is None:
        notes.append("own decode step unavailable (not a standard pre-norm decoder, see the log): HF's step")
        return None
    if decoder.n_heads % decoder.n_kv:
        notes.append("own decode step unavailable (query heads not a multiple of KV heads): HF's step")
        return None
    attention = decode_kernel_for(lm.model, lm.model.config.get_text_config(), notes) if fuse else None
    return OwnStep(decoder, cache, prompt_mask, rows, ids, position, attention)


__all__ = ["OWN_STEP_TOLERANCE", "STEPS", "OwnStep", "decoder_for", "foreign_hooks", "own_step_for",
           "row_interventions"]
