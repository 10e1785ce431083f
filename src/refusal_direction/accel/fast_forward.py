"""The selection sweep's forward pass: last-position logits of many rows, each with its own intervention.

HF's forward with per-row hooks (selection's reference path) spends about a third of an H200's time in the
sweep on small element-wise kernels: every residual add, every ablation (two kernels), every RMSNorm, the
activation and its product, the rotary embedding, plus the padding mask. `SweepDecoder` runs the same
computation for the standard pre-norm decoder block — input RMSNorm, self-attention (q/k/v/o projections,
optionally per-head q/k RMSNorms, rotary position embedding), residual add, RMSNorm, gated MLP (down(act(gate) ·
up)), residual add; Llama, Mistral, Qwen2, Qwen3, Gemma, ... — found by inspecting the model, with the sweep's
interventions built in:

- row b has its own unit direction ablated at every block input and every attention and MLP output (a zero
  row: none) and its own vector added at one block's input (`RowInterventions`), as `selection`'s hooks do;
- prompts are right-padded: under causal attention, padding after a prompt never reaches it, so no padding
  mask exists; the chat template's opening, shared by every prompt, enters as a key/value prefix
  (`KVPrefix`) under lower-right causal alignment;
- the last block runs its output projection and MLP only at each row's last real position, the only
  position whose logits are read;
- queries, keys and values come from one matrix product;
- grouped-query attention reads each KV head for its query heads (SDPA's ``enable_gqa``) where flash attention
  takes it (CUDA, bf16/fp16), instead of copying keys and values per query head (8B sweep on an H200: memory-
  efficient attention with expanded K/V 0.50 s + 0.49 s of copies, flash with K/V unexpanded 0.39 s);
- on CUDA with Triton (`triton_kernels`), ablation + residual add + ablation + addition + the next RMSNorm
  are one kernel, act(gate) · up is one, the rotary embedding of queries and keys is one. Each is used only
  if it reproduces its PyTorch chain on probe inputs (`sweep_kernels.Kernels.build`).

The results equal the reference path's up to rounding (tests: float32 on the CPU, logits within 2e-5 of HF's forward
with hooks for Gemma, Llama, Qwen2 and Qwen3 blocks; bf16 on CUDA, within bf16 noise). `SweepDecoder.for_model` returns
None, with the reason logged, for a model whose blocks it does not recognise; `selection` also compares it once with
the HF forward with hooks and falls back to that if it differs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.model import LoadedModel
from ..core.padding import device_tensor, pad_id
from .sweep_kernels import BlockWeights, Kernels

log = logging.getLogger(__name__)

BLOCK_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
HEAD_NORMS = ("q_norm", "k_norm")  # Qwen3's per-head RMSNorms of queries and keys (optional, both or neither)
MLP_CHILDREN = ("gate_proj", "up_proj", "down_proj", "act_fn")


# --------------------------------------------------------------------------------------------------
# Value objects


@dataclass(frozen=True, eq=False)
class RowInterventions:
    """Interventions of the rows of one batch.

    ``dirs`` [rows, d_model]: unit direction ablated from row b at every block input and every attention and
    MLP output (a zero row: none). ``adds`` [rows, d_model] with ``add_layers`` [rows] (-1: none): vector added
    to row b at the input of block ``add_layers[b]`` (after that block input's ablation, as the hooks order it).
    """

    dirs: torch.Tensor | None = None
    adds: torch.Tensor | None = None
    add_layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.adds is not None:  # one host-to-device copy, not one per block
            object.__setattr__(self, "_layers", device_tensor(list(self.add_layers), self.adds.device))

    def added_at(self, layer: int) -> torch.Tensor | None:
        """[rows, d_model] vectors added at block ``layer``'s input (zeros for other rows), or None."""
        if self.adds is None or layer not in self.add_layers:
            return None
        return torch.where((self._layers == layer).unsqueeze(-1), self.adds, 0)


def cat_interventions(parts: Sequence[RowInterventions], sizes: Sequence[int], d: int, like: torch.Tensor):
    """Row-wise concatenation (a part without dirs or adds gets zero rows)."""
    def stack(name):
        if all(getattr(p, name) is None for p in parts):
            return None
        return torch.cat([getattr(p, name) if getattr(p, name) is not None else like.new_zeros(n, d)
                          for p, n in zip(parts, sizes)])
    layers = None
    if any(p.add_layers is not None for p in parts):
        layers = tuple(x for p, n in zip(parts, sizes) for x in (p.add_layers or (-1,) * n))
    return RowInterventions(stack("dirs"), stack("adds"), layers)


@dataclass(frozen=True, eq=False)
class KVPrefix:
    """Keys and values of tokens that precede every row (the chat template's opening), per block:
    [n, n_kv_heads, length, head_dim]; row b of a batch uses prefix row ``slots[b]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int


# --------------------------------------------------------------------------------------------------
# The decoder


class SweepDecoder:
    """Last-position logits of a standard pre-norm decoder with per-row interventions (see the module doc)."""

    def __init__(self, lm: LoadedModel, blocks: list[BlockWeights], embed: nn.Module, rotary: nn.Module,
                 head: nn.Module, n_heads: int, n_kv: int, head_dim: int, softcap: float | None, fuse: bool):
        self.lm, self.blocks, self.embed, self.rotary_emb, self.head = lm, blocks, embed, rotary, head
        self.n_heads, self.n_kv, self.head_dim, self.softcap = n_heads, n_kv, head_dim, softcap
        self.kernels = Kernels.build(blocks, lm.final_norm, (n_heads, n_kv, head_dim), fuse)
        # grouped-query attention without copying K/V per query head: where flash attention takes it (CUDA, bf16)
        self.native_gqa = n_kv != n_heads and fuse and _flash_takes_gqa(blocks[0].qkv_weight, n_heads, n_kv,
                                                                        head_dim)
        if n_kv != n_heads:  # which attention the sweep runs is a timing question: say it
            log.info("sweep forward attention: %s", "flash with grouped-query K/V unexpanded" if self.native_gqa
                     else f"K/V expanded to the {n_heads} query heads")

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, lm: LoadedModel, fuse: bool = True) -> SweepDecoder | None:
        """A SweepDecoder for ``lm``, or None (reason logged) if its blocks are not the standard pre-norm kind."""
        reason = _unsupported(lm)
        if reason:
            log.info("sweep forward unavailable for %s: %s; using HF's forward with hooks", lm.model_id, reason)
            return None
        cfg = lm.model.config.get_text_config()
        decoder = lm.model.get_decoder()
        blocks = []
        for site in lm.blocks:
            layer = site.block
            attn, mlp = layer.self_attn, layer.mlp
            bias = None
            if attn.q_proj.bias is not None:
                bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach()
            blocks.append(BlockWeights(
                layer.input_layernorm, layer.post_attention_layernorm,
                torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(), bias,
                attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, float(attn.scaling),
                getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)))
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        return cls(lm, blocks, decoder.embed_tokens, decoder.rotary_emb, lm.model.get_output_embeddings(),
                   int(cfg.num_attention_heads), int(cfg.num_key_value_heads), head_dim,
                   getattr(cfg, "final_logit_softcapping", None), fuse)

    # ----------------------------------------------------------------------------------------------
    def kv_prefix(self, ids: Sequence[int], rows: RowInterventions, n: int) -> KVPrefix:
        """Keys and values of ``ids`` for ``n`` rows, row i under intervention i of ``rows``."""
        x = self.embed(device_tensor([list(ids)], self.lm.device).expand(n, -1))
        keys, values = [], []
        self._run([(0, x, rows, None)], None, None, kv_out=(keys, values))
        return KVPrefix(keys, values, len(ids))

    def last_logits(self, seqs: Sequence[Sequence[int]], rows: RowInterventions,
                    prefix: KVPrefix | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Logits after the last token of each sequence [rows, vocab]; ``prefix`` row ``slots[b]`` precedes row b."""
        x, last = self._embed(seqs)
        return self._run([(0, x, rows, slots)], last, prefix)

    def capture(self, seqs: Sequence[Sequence[int]], prefix: KVPrefix | None = None,
                slots: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Unintervened pass: (last-position logits [rows, vocab], every block's input [rows, seq, d], last index)."""
        x, last = self._embed(seqs)
        resid: list[torch.Tensor] = []
        logits = self._run([(0, x, RowInterventions(), slots)], last, prefix, capture=resid)
        return logits, resid, last

    def replay(self, resid: list[torch.Tensor], last: torch.Tensor, prompts: Sequence[int], starts: Sequence[int],
               vectors: torch.Tensor, prefix: KVPrefix | None = None,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [n, vocab] of row i = prompt ``prompts[i]`` of a `capture` with ``vectors[i]`` added at block
        ``starts[i]``'s input; blocks before ``starts[i]`` are not recomputed (they equal the capture's)."""
        order = sorted(range(len(prompts)), key=lambda i: starts[i])
        dev = self.lm.device
        parts, lasts = [], []
        for layer in sorted(set(starts)):
            idx = [i for i in order if starts[i] == layer]
            t = device_tensor(idx, dev)
            p = device_tensor([prompts[i] for i in idx], dev)
            rows = RowInterventions(None, vectors.index_select(0, t), (layer,) * len(idx))
            parts.append((layer, resid[layer].index_select(0, p), rows, None if slots is None else slots[t]))
            lasts.append(last.index_select(0, p))
        logits = self._run(parts, torch.cat(lasts), prefix)
        out = torch.empty_like(logits)
        out[device_tensor([i for layer in sorted(set(starts)) for i in order if starts[i] == layer], dev)] = logits
        return out

    # ----------------------------------------------------------------------------------------------
    def _embed(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded embeddings [rows, seq, d] and each row's last real index [rows]."""
        width = max(len(s) for s in seqs)
        pad = pad_id(self.lm.tokenizer, self.lm.model.config)  # right padding: never read (see the module doc)
        ids = device_tensor([list(s) + [pad] * (width - len(s)) for s in seqs], self.lm.device)
        return self.embed(ids), device_tensor([len(s) - 1 for s in seqs], self.lm.device)

    def _run(self, parts, last: torch.Tensor | None, prefix: KVPrefix | None, capture: list | None = None,
             kv_out: tuple[list, list] | None = None) -> torch.Tensor | None:
        """Blocks from the first part's layer to the end. ``parts``: (layer, block input before that block's
        interventions [rows, seq, d], RowInterventions, prefix slots) joining at that layer, in layer order.
        ``last`` [all rows]: index of each row's last real token (None: keep every position, no logits).
        ``kv_out``: collect every block's rotated keys and values and stop there (for `kv_prefix`)."""
        k = self.kernels
        n_blocks, d = len(self.blocks), self.lm.d_model
        h = normed = slots = None
        rows = RowInterventions()
        sizes: list[int] = []
        seq = parts[0][1].shape[1]
        p_len = 0 if prefix is None else prefix.length
        positions = torch.arange(p_len, p_len + seq, device=self.lm.device).unsqueeze(0)
        cos, sin = (t[0] for t in self.rotary_emb(parts[0][1], position_ids=positions))  # [seq, hd]
        attn_mask = None
        if p_len:
            from torch.nn.attention.bias import causal_lower_right
            attn_mask = causal_lower_right(seq, p_len + seq)
        for layer in range(parts[0][0], n_blocks):
            block = self.blocks[layer]
            for _, x, part_rows, part_slots in (p for p in parts if p[0] == layer):
                u = part_rows.dirs
                hj, nj = k.residual(x, None, u, part_rows.added_at(layer), block.input_norm, ablate_sum=u is not None)
                if h is None:
                    h, normed, rows, slots, sizes = hj, nj, part_rows, part_slots, [x.shape[0]]
                else:
                    h, normed = torch.cat([h, hj]), torch.cat([normed, nj])
                    rows = cat_interventions([rows, part_rows], [sum(sizes), x.shape[0]], d, h)
                    slots = None if slots is None else torch.cat([slots, part_slots])
                    sizes.append(x.shape[0])
            if capture is not None:
                capture.append(h)
            n = h.shape[0]
            qkv = F.linear(normed, block.qkv_weight, block.qkv_bias)  # [n, seq, (heads + 2 kv) hd]
            qkv = k.head_norms(block, qkv, self.n_heads, self.n_kv, self.head_dim)
            q, key = k.rotary(qkv, cos, sin, self.n_heads, self.n_kv, self.head_dim)
            value = qkv[..., (self.n_heads + self.n_kv) * self.head_dim:].view(
                n, seq, self.n_kv, self.head_dim).transpose(1, 2)
            if kv_out is not None:
                kv_out[0].append(key.contiguous())
                kv_out[1].append(value.contiguous())
                if layer == n_blocks - 1:
                    return None
            if prefix is not None:
                key = torch.cat([prefix.keys[layer].index_select(0, slots), key], dim=2)
                value = torch.cat([prefix.values[layer].index_select(0, slots), value], dim=2)
            if self.native_gqa:  # flash attention reads each KV head for its query heads: no copy. Flash is
                # asked for explicitly: only it takes enable_gqa, and the sweep runs under selection's SDPA
                # restriction (memory-efficient, math), where enable_gqa would fall back to the math kernel
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    attn = F.scaled_dot_product_attention(q, key, value, attn_mask=attn_mask, scale=block.scaling,
                                                          is_causal=attn_mask is None, enable_gqa=True)
            else:
                attn = F.scaled_dot_product_attention(
                    q, _heads(key, self.n_heads), _heads(value, self.n_heads), attn_mask=attn_mask,
                    is_causal=attn_mask is None, scale=block.scaling)  # [n, heads, seq, hd]
            attn = attn.transpose(1, 2).reshape(n, seq, self.n_heads * self.head_dim)
            if layer == n_blocks - 1 and last is not None:  # only the last real position is read from here on
                at = torch.arange(n, device=h.device)
                attn, h = attn[at, last].unsqueeze(1), h[at, last].unsqueeze(1)
            h, normed = k.residual(h, block.o_proj(attn), rows.dirs, None, block.mid_norm, ablate_sum=False)
            mlp = block.down(k.act_mul(block, block.gate(normed), block.up(normed)))
            if layer + 1 < n_blocks:
                h, normed = k.residual(h, mlp, rows.dirs, rows.added_at(layer + 1), self.blocks[layer + 1].input_norm,
                                       ablate_sum=rows.dirs is not None)
            else:
                h, normed = k.residual(h, mlp, rows.dirs, None, self.lm.final_norm, ablate_sum=False)
        if last is None:
            return None
        logits = self.head(normed[:, -1].contiguous())
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


BUILT_DECODER = "sweep_decoder_built"  # key in LoadedModel.extra: (weights key, fuse, SweepDecoder)


def weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or edited in place (e.g. by weight orthogonalization)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def shared_decoder(lm: LoadedModel, fuse: bool = True) -> SweepDecoder | None:
    """``SweepDecoder.for_model(lm, fuse)``, built once per model and kept in ``lm.extra`` until a weight changes:
    the selection sweep and the own decode step share it, and with it the one concatenated q/k/v weight copy."""
    key = weights_key(lm.model)
    cached = lm.extra.get(BUILT_DECODER)
    if cached is not None and cached[:2] == (key, fuse) and cached[2].lm is lm:
        return cached[2]
    lm.extra.pop(BUILT_DECODER, None)  # the old copy goes before a new one is made
    decoder = SweepDecoder.for_model(lm, fuse)  # None is not kept: the reason may lie outside the weights
    if decoder is not None:
        lm.extra[BUILT_DECODER] = (key, fuse, decoder)
    return decoder


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Keys or values [rows, n_kv, len, hd] for every query head (a view when n_kv = 1; HF's repeat_kv otherwise)."""
    rows, n_kv, length, hd = x.shape
    if n_kv == n_heads:
        return x
    return x[:, :, None].expand(rows, n_kv, n_heads // n_kv, length, hd).reshape(rows, n_heads, length, hd)


def _flash_takes_gqa(like: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether flash attention takes grouped-query K/V unexpanded for both calls `SweepDecoder._run` makes: causal
    over equal query and key lengths (no prefix), and — with the prefix's lower-right `CausalBias` — the
    non-causal parameters SDPA's bias dispatch checks before it calls the flash kernel itself (flash refuses
    ``is_causal`` with unequal lengths). Elsewhere (CPU, float32, no flash) K/V are expanded per query head, since
    ``enable_gqa`` might then run on the math kernel."""
    if like.device.type != "cuda" or like.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        def probe(q_len: int, k_len: int, causal: bool) -> bool:
            q = torch.empty(2, n_heads, q_len, head_dim, device=like.device, dtype=like.dtype)
            k = torch.empty(2, n_kv, k_len, head_dim, device=like.device, dtype=like.dtype)
            return bool(can_use_flash_attention(SDPAParams(q, k, k, None, 0.0, causal, True)))

        # asked with flash enabled: the decoder may be built under selection's SDPA restriction (efficient,
        # math), where the probe would answer "no" for flash being switched off, not for the shapes; the sweep's
        # own call enables flash itself, so grouped-query attention in bf16/fp16 runs on flash whatever SDPA
        # backends the caller restricted to (the restriction is there to keep cuDNN's per-shape plans out; flash
        # builds none)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return probe(8, 8, True) and probe(8, 12, False)
    except (ImportError, TypeError, RuntimeError) as exc:  # torch without enable_gqa in SDPAParams
        log.info("grouped-query flash attention unavailable (%s): K/V expanded per query head", exc)
        return False


def _unsupported(lm: LoadedModel) -> str:
    """Why ``lm`` is not a standard pre-norm decoder on one device that this module can run ("" if it is)."""
    if lm.placement:
        return f"the model is {lm.placement} (the sweep forward needs every weight on one device)"
    decoder = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else None
    if not isinstance(decoder, nn.Module):
        return "no decoder module"
    for name in ("embed_tokens", "rotary_emb"):
        if not isinstance(getattr(decoder, name, None), nn.Module):
            return f"the decoder has no {name}"
    if lm.final_norm is None or not isinstance(lm.model.get_output_embeddings(), nn.Linear):
        return "no final norm or linear output embedding"
    if lm.model.get_output_embeddings().bias is not None:
        return "the output embedding has a bias"
    cfg = lm.model.config.get_text_config()
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    for site in lm.blocks:
        children = dict(site.block.named_children())
        if set(children) != BLOCK_CHILDREN:
            return f"block children {sorted(children)} (expected {sorted(BLOCK_CHILDREN)})"
        attn, mlp = children["self_attn"], children["mlp"]
        if set(dict(attn.named_children())) not in (set(ATTN_PROJECTIONS), set(ATTN_PROJECTIONS + HEAD_NORMS)):
            return (f"attention children {sorted(dict(attn.named_children()))} (expected {list(ATTN_PROJECTIONS)}, "
                    f"optionally with {list(HEAD_NORMS)})")
        head_dim = int(getattr(attn, "head_dim", 0) or 0)
        if any(tuple(getattr(getattr(attn, n, None), "weight", torch.empty(head_dim)).shape) != (head_dim,)
               for n in HEAD_NORMS if hasattr(attn, n)):
            return "query/key norms that are not per-head RMSNorms of the head dimension"
        if any(not isinstance(getattr(attn, p), nn.Linear) for p in ATTN_PROJECTIONS):
            return "attention projections are not nn.Linear"
        if attn.o_proj.bias is not None or not isinstance(getattr(attn, "scaling", None), (int, float)):
            return "attention output bias or no scaling attribute"
        if len({getattr(attn, p).bias is None for p in ATTN_PROJECTIONS[:3]}) != 1:
            return "q/k/v projections disagree on biases"
        if getattr(attn, "sliding_window", None):
            return "sliding-window attention"
        if set(dict(mlp.named_children())) - set(MLP_CHILDREN) or \
                any(not isinstance(getattr(mlp, p, None), nn.Linear) for p in MLP_CHILDREN[:3]):
            return f"MLP children {sorted(dict(mlp.named_children()))} (expected a gated MLP {list(MLP_CHILDREN)})"
        if any(getattr(mlp, p).bias is not None for p in MLP_CHILDREN[:3]):
            return "MLP biases"
        if not callable(getattr(mlp, "act_fn", None)):
            return "no MLP act_fn"
    return ""

