"""The sweep forward's element-wise steps: PyTorch chains, each replaced by a Triton kernel where it is verified.

`Kernels` holds, for one model, which steps run as `triton_kernels` kernels: residual add + ablations +
addition + the next RMSNorm, act(gate) · up, and the rotary embedding of queries and keys. Each kernel is
used only if it reproduces its PyTorch chain on probe inputs in the model's dtype (`Kernels.build`); off
CUDA, or without Triton, every step is its PyTorch chain. `BlockWeights` is what `fast_forward` reads of
one decoder block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .fusion import fused_form, norm_eps

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class BlockWeights:
    """One decoder block as the sweep forward runs it: its norms, fused q/k/v weight, projections and MLP."""

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
    q_norm: nn.Module | None = None  # per-head RMSNorms of queries and keys before the rotary embedding (Qwen3)
    k_norm: nn.Module | None = None


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

    def act_mul(self, block: BlockWeights, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.triton_act is not None:
            return self.tk.act_mul(gate, up, self.triton_act)
        return block.act(gate) * up

    @staticmethod
    def head_norms(block: BlockWeights, qkv: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
        """qkv [rows, seq, width] with the block's per-head query and key norms applied (as HF applies them to each
        head's slice of q_proj / k_proj's output); unchanged for blocks without them."""
        if block.q_norm is None:
            return qkv
        rows, seq, _ = qkv.shape
        q_end, k_end = n_heads * head_dim, (n_heads + n_kv) * head_dim
        q = block.q_norm(qkv[..., :q_end].reshape(rows, seq, n_heads, head_dim)).reshape(rows, seq, q_end)
        k = block.k_norm(qkv[..., q_end:k_end].reshape(rows, seq, n_kv, head_dim)).reshape(rows, seq, k_end - q_end)
        return torch.cat([q, k, qkv[..., k_end:]], dim=-1)

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
    def build(cls, blocks: Sequence[BlockWeights], final_norm: nn.Module, shape: tuple[int, int, int],
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


def _verified_norms(tk, blocks: Sequence[BlockWeights], final_norm: nn.Module) -> dict:
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


def _verified_act(tk, block: BlockWeights) -> int | None:
    w = block.qkv_weight
    g, u = _probe((64, 512), w.dtype, w.device, 5, 3.0), _probe((64, 512), w.dtype, w.device, 6)
    ref = block.act(g) * u
    for act in (tk.GELU_TANH, tk.SILU):
        if _close_in_dtype(ref, tk.act_mul(g, u, act)):
            return act
    return None


def _verified_rotary(tk, block: BlockWeights, shape: tuple[int, int, int]) -> bool:
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

