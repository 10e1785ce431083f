"""The selection sweep's forward pass: last-position logits of many rows, each with its own intervention.

HF's forward with per-row hooks (selection's reference path) spends about a third of an H200's time in the
sweep on small element-wise kernels: every residual add, every ablation (two kernels), every RMSNorm, the
activation and its product, the rotary embedding, plus the padding mask. `SweepDecoder` runs the same
computation for the standard pre-norm decoder block — input RMSNorm, self-attention (q/k/v/o projections,
rotary position embedding), residual add, RMSNorm, gated MLP (down(act(gate) · up)), residual add; Llama,
Mistral, Qwen2, Gemma, ... — found by inspecting the model, with the sweep's interventions built in:

- row b has its own unit direction ablated at every block input and every attention and MLP output (a zero
  row: none) and its own vector added at one block's input (`RowInterventions`), as `selection`'s hooks do;
- prompts are right-padded: under causal attention, padding after a prompt never reaches it, so no padding
  mask exists; the chat template's opening, shared by every prompt, enters as a key/value prefix
  (`KVPrefix`) under lower-right causal alignment;
- the last block runs its output projection and MLP only at each row's last real position, the only
  position whose logits are read;
- queries, keys and values come from one matrix product;
- on CUDA with Triton (`triton_kernels`), ablation + residual add + ablation + addition + the next RMSNorm
  are one kernel, act(gate) · up is one, the rotary embedding of queries and keys is one. Each is used only
  if it reproduces its PyTorch chain on probe inputs (`Kernels.build`).

The results equal the reference path's up to rounding (tests: float32 on the CPU, logits within 2e-5 of HF's forward
with hooks for Gemma, Llama and Qwen2 blocks; bf16 on CUDA, within bf16 noise). `SweepDecoder.for_model` returns
None, with the reason logged, for a model whose blocks it does not recognise; `selection` also compares it once with
the HF forward with hooks and falls back to that if it differs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.model import LoadedModel
from ..core.padding import device_tensor
from .fusion import fused_form, norm_eps

log = logging.getLogger(__name__)

BLOCK_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
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


@dataclass(frozen=True, eq=False)
class _Block:
    input_norm: nn.Module
    mid_norm: nn.Module
    qkv_weight: torch.Tensor  # [(n_heads + 2 n_kv) head_dim, d_model]
    qkv_bias: torch.Tensor | None
    o_proj: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    act: nn.Module
    scaling: float


# --------------------------------------------------------------------------------------------------
# Kernels: PyTorch chains, replaced by verified Triton kernels on CUDA


def _ablate(x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """x - (x·u_b) u_b per row b: x [rows, seq, d], u [rows, d] (what selection's hooks compute)."""
    if u is None:
        return x
    proj = torch.bmm(x, u.unsqueeze(-1))  # [rows, seq, 1]
    return torch.addcmul(x, proj, u.unsqueeze(1), value=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Kernels:
    """The element-wise steps of a block; each is a PyTorch chain unless a verified Triton kernel replaced it."""

    triton_residual: dict | None = None  # norm module id -> (form, weight, eps), for norms the kernel reproduces
    triton_act: int | None = None  # triton_kernels.GELU_TANH / SILU
    triton_rotary: bool = False
    shape: tuple[int, int, int] = (0, 0, 0)  # query heads, key/value heads, head dim
    tk: object = None  # the triton_kernels module, once imported

    def residual(self, x, a, u, v, norm: nn.Module, ablate_sum: bool):
        """(new residual, its norm): x + ablate(a) [, ablated] [+ v], then ``norm`` of that."""
        spec = None if self.triton_residual is None else self.triton_residual.get(id(norm))
        if spec is not None:
            return self.tk.residual_update(x, a, u, v, spec[1], spec[2], spec[0], ablate_sum)
        if a is not None:
            x = x + _ablate(a, u)
        if ablate_sum:
            x = _ablate(x, u)
        if v is not None:
            x = x + v.unsqueeze(1)
        return x, norm(x)

    def act_mul(self, block: _Block, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.triton_act is not None:
            return self.tk.act_mul(gate, up, self.triton_act)
        return block.act(gate) * up

    def rotary(self, qkv, cos, sin, n_heads: int, n_kv: int, head_dim: int):
        """Rotated queries [rows, n_heads, seq, hd] and keys [rows, n_kv, seq, hd] from qkv [rows, seq, width]."""
        rows, seq, _ = qkv.shape
        if self.triton_rotary:
            qk = self.tk.rotary(qkv, cos, sin, n_heads, n_kv, head_dim)
            return qk[:, :n_heads], qk[:, n_heads:]
        qk = qkv[..., :(n_heads + n_kv) * head_dim].view(rows, seq, n_heads + n_kv, head_dim).transpose(1, 2)
        qk = qk * cos + _rotate_half(qk) * sin  # cos, sin [seq, hd] broadcast
        return qk[:, :n_heads], qk[:, n_heads:]

    @classmethod
    def build(cls, blocks: Sequence[_Block], final_norm: nn.Module, shape: tuple[int, int, int],
              enabled: bool) -> Kernels:
        """Triton kernels that reproduce their PyTorch chains on probes (CUDA only; else PyTorch everywhere)."""
        device = blocks[0].qkv_weight.device
        if not enabled or device.type != "cuda":
            return cls(shape=shape)
        try:
            from . import triton_kernels as tk
        except ImportError as exc:
            log.info("triton unavailable (%s): the sweep's forward uses PyTorch kernels", exc)
            return cls(shape=shape)
        kernels, notes = cls(shape=shape, tk=tk), []
        kernels.triton_residual = _checked("residual+norm", lambda: _verified_norms(tk, blocks, final_norm), {})
        notes.append(f"residual+norm kernel for {len(kernels.triton_residual)} norms")
        act = _checked("act·up", lambda: _verified_act(tk, blocks[0]), None)
        if act is not None and all(type(b.act) is type(blocks[0].act) for b in blocks):
            kernels.triton_act = act
            notes.append("act·up kernel")
        kernels.triton_rotary = _checked("rotary", lambda: _verified_rotary(tk, blocks[0], shape), False)
        if kernels.triton_rotary:
            notes.append("rotary kernel")
        log.info("sweep forward on CUDA: %s", ", ".join(notes))
        return kernels


def _checked(name: str, verify, failed):
    """``verify()``, or ``failed`` (with a log line) if the kernel cannot even run here (compiler, GPU support)."""
    try:
        return verify()
    except Exception as exc:  # noqa: BLE001 - any Triton failure means: use the PyTorch chain
        log.info("Triton %s kernel unavailable (%s: %s); using PyTorch kernels for it", name, type(exc).__name__,
                 str(exc)[:200])
        return failed


def _close_in_dtype(ref: torch.Tensor, out: torch.Tensor, ulps: float = 1.0, share: float = 0.99) -> bool:
    """Within ``ulps`` units in the last place everywhere, and bit-identical in at least ``share`` of elements."""
    ref32, out32 = ref.float(), out.float()
    tol = ulps * torch.finfo(ref.dtype).eps * ref32.abs() + torch.finfo(ref.dtype).tiny
    return bool(((out32 - ref32).abs() <= tol).all()) and float((ref == out).float().mean()) >= share


def _probe(shape, dtype, device, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _verified_norms(tk, blocks: Sequence[_Block], final_norm: nn.Module) -> dict:
    """For each norm the residual kernel reproduces (with the PyTorch chain on probes): id -> (form, weight, eps)."""
    w = blocks[0].qkv_weight
    d, dtype, device = w.shape[1], w.dtype, w.device
    x, a = _probe((4, 8, d), dtype, device, 1, 4.0), _probe((4, 8, d), dtype, device, 2)
    u = _probe((4, d), torch.float32, device, 3)
    u = (u / u.norm(dim=-1, keepdim=True)).to(dtype)
    u[1] = 0  # a row without ablation
    v = _probe((4, d), dtype, device, 4)
    forms = {"scale_fp32": tk.NORM_SCALE_FP32, "weight_after_cast": tk.NORM_WEIGHT_AFTER_CAST}
    out = {}
    for norm in [m for b in blocks for m in (b.input_norm, b.mid_norm)] + [final_norm]:
        found = fused_form(norm)
        eps = norm_eps(norm)
        if found is None or found[0] not in forms or eps is None:
            continue
        spec = (forms[found[0]], norm.weight.detach().contiguous(), eps)
        ok = True
        for args in ((x, a, u, v, True), (x, a, u, None, False), (x, None, u, None, True), (x, a, None, None, False)):
            h_ref, n_ref = Kernels().residual(*args[:4], norm, args[4])
            h, n = tk.residual_update(*args[:4], spec[1], spec[2], spec[0], args[4])
            ok = ok and _close_in_dtype(h_ref, h, 2.0, 0.95) and _close_in_dtype(n_ref, n, 2.0, 0.95)
        if ok:
            out[id(norm)] = spec
    return out


def _verified_act(tk, block: _Block) -> int | None:
    w = block.qkv_weight
    g, u = _probe((64, 512), w.dtype, w.device, 5, 3.0), _probe((64, 512), w.dtype, w.device, 6)
    ref = block.act(g) * u
    for act in (tk.GELU_TANH, tk.SILU):
        if _close_in_dtype(ref, tk.act_mul(g, u, act)):
            return act
    return None


def _verified_rotary(tk, block: _Block, shape: tuple[int, int, int]) -> bool:
    """Whether the kernel reproduces the PyTorch rotary chain on probes (needs a power-of-two half head dim)."""
    n_heads, n_kv, hd = shape
    if hd % 2 or (hd // 2) & (hd // 2 - 1):
        return False
    w = block.qkv_weight
    qkv = _probe((3, 5, w.shape[0]), w.dtype, w.device, 7, 2.0)
    angle = torch.arange(5, device=w.device).float().unsqueeze(-1) * torch.linspace(0.01, 1, hd, device=w.device)
    cos, sin = angle.cos().to(w.dtype), angle.sin().to(w.dtype)
    q_ref, k_ref = Kernels().rotary(qkv, cos, sin, n_heads, n_kv, hd)
    qk = tk.rotary(qkv, cos, sin, n_heads, n_kv, hd)
    return _close_in_dtype(q_ref, qk[:, :n_heads]) and _close_in_dtype(k_ref, qk[:, n_heads:])


# --------------------------------------------------------------------------------------------------
# The decoder


class SweepDecoder:
    """Last-position logits of a standard pre-norm decoder with per-row interventions (see the module doc)."""

    def __init__(self, lm: LoadedModel, blocks: list[_Block], embed: nn.Module, rotary: nn.Module,
                 head: nn.Module, n_heads: int, n_kv: int, head_dim: int, softcap: float | None, fuse: bool):
        self.lm, self.blocks, self.embed, self.rotary_emb, self.head = lm, blocks, embed, rotary, head
        self.n_heads, self.n_kv, self.head_dim, self.softcap = n_heads, n_kv, head_dim, softcap
        self.kernels = Kernels.build(blocks, lm.final_norm, (n_heads, n_kv, head_dim), fuse)

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
            blocks.append(_Block(
                layer.input_layernorm, layer.post_attention_layernorm,
                torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(), bias,
                attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, float(attn.scaling)))
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
        pad = self.lm.tokenizer.pad_token_id or 0
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


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Keys or values [rows, n_kv, len, hd] for every query head (a view when n_kv = 1; HF's repeat_kv otherwise)."""
    rows, n_kv, length, hd = x.shape
    if n_kv == n_heads:
        return x
    return x[:, :, None].expand(rows, n_kv, n_heads // n_kv, length, hd).reshape(rows, n_heads, length, hd)


def _unsupported(lm: LoadedModel) -> str:
    """Why ``lm`` is not a standard pre-norm decoder this module can run ("" if it is)."""
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
        if set(dict(attn.named_children())) != set(ATTN_PROJECTIONS):
            return f"attention children {sorted(dict(attn.named_children()))} (expected {list(ATTN_PROJECTIONS)})"
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

