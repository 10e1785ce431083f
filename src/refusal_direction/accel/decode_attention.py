"""A Triton kernel for one decode step's attention over a static KV cache: only the key blocks the mask lets through.

At a decode step every row has one new query per head, and the static cache holds ``max_cache_len`` key/value
slots per row, most of them not yet written (future tokens) or left padding. SDPA reads all of them: on an
H200 at Llama-3-8B shape (200 rows, a 567-token cache) its memory-efficient kernel spends 0.27 ms per layer,
8.5 ms per step — more than reading every weight of the model. This kernel reads, per (row, KV head), the
mask for the span between the first and the last position it lets through and loads keys and values only
there, so a step reads the cache only as far as it is filled (positions inside the span the mask shuts, such as
left padding within it, are masked in the scores).

- the query heads that share a KV head are rows of one tile (``BLOCK_G`` ≥ 16, the tensor-core minimum):
  keys and values are read once per KV head (grouped- and multi-query attention alike);
- online softmax in float32 (running max, running sum, rescaled accumulator), products on tensor cores in the
  cache's dtype, as flash attention does;
- the span is split into ``splits`` equal ranges when rows x KV heads alone would leave the GPU's SMs idle
  (flash-decoding); the ranges' partial results are combined in float32 by a second kernel; with one range the
  result is normalised and stored in the kernel itself (two launches at most per call, nothing else);
- the mask is HF's: boolean (True: attend) or additive float (a very negative value: masked); the additive
  values are added to the scores. Its head axis must be 1 (one mask for every head).

The grid and every address are fixed for a given cache, so the step stays capturable as a CUDA graph. Results
equal SDPA's up to the summation order of the softmax (``folded_attention`` checks the kernel against SDPA on
probes of the model's shapes before using it). This module imports triton at import time; callers import it
only on CUDA.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # key positions per block (H200: 32 beats 64 and 128 at Llama-3-8B and Gemma-2b shapes)
MIN_BLOCK_G = 16  # query rows per tile: tensor-core products need at least 16


def decode_kernel_source(Q, K, V, M, Acc, Mx, Lx, Out,
                         sq_b, sq_h, sq_g, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l,
                         n_kv, n_g, length, scale,
                         IS_BOOL: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                         SPLIT: tl.constexpr):
    """One (row, KV head, split): online-softmax attention of its query rows over its share of the keys.

    First the row's mask is scanned for its first and last position it lets through; that span is divided
    evenly among the splits, and only it is read. With one split (``SPLIT`` false) the normalised result goes
    straight to ``Out`` [rows x n_kv, n_g, D] in its dtype; otherwise the unnormalised float32 accumulator
    [BLOCK_G, D], the running max and the running sum go to ``Acc``, ``Mx``, ``Lx`` ([rows x n_kv, splits,
    BLOCK_G(, D)], contiguous) for `combine_kernel_source`.
    """
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = bh // n_kv
    h = bh % n_kv
    lo = length
    hi = 0
    for n0 in range(0, length, BLOCK_N):  # the span the mask lets through (one byte or two per position)
        n = n0 + tl.arange(0, BLOCK_N)
        raw = tl.load(M + b * sm_b + n * sm_l, mask=n < length, other=0)
        ok = (raw != 0) & (n < length) if IS_BOOL else (raw.to(tl.float32) > -1e30) & (n < length)
        lo = tl.minimum(lo, tl.min(tl.where(ok, n, length), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(ok, n + 1, 0), axis=0))
    per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), n_splits) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, hi)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :], mask=g[:, None] < n_g, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        inside = n < end
        raw = tl.load(M + b * sm_b + n * sm_l, mask=inside, other=0)
        if IS_BOOL:
            bias = tl.where((raw != 0) & inside, 0.0, float("-inf"))
        else:  # HF masks with the dtype's most negative value, not -inf
            bias = tl.where((raw.to(tl.float32) > -1e30) & inside, raw.to(tl.float32), float("-inf"))
        k = tl.load(K + b * sk_b + h * sk_h + n[:, None] * sk_l + d[None, :], mask=inside[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale + bias[None, :]  # [BLOCK_G, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block the mask shuts entirely
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + b * sv_b + h * sv_h + n[:, None] * sv_l + d[None, :], mask=inside[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    if SPLIT:
        out = (bh * n_splits + split) * BLOCK_G
        tl.store(Acc + (out + g[:, None]) * D + d[None, :], acc)
        tl.store(Mx + out + g, m_i)
        tl.store(Lx + out + g, l_i)
    else:
        res = acc / l_i[:, None]
        tl.store(Out + (bh * n_g + g[:, None]) * D + d[None, :], res.to(Out.dtype.element_ty), mask=g[:, None] < n_g)


def combine_kernel_source(Acc, Mx, Lx, Out, n_g, n_splits, BLOCK_G: tl.constexpr, D: tl.constexpr):
    """The splits' partial results of one (row, KV head) rescaled to their common max and summed, normalised,
    stored in ``Out``'s dtype (a split that saw no key has max -inf and weighs nothing)."""
    bh = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    top = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for sp in range(0, n_splits):
        top = tl.maximum(top, tl.load(Mx + (bh * n_splits + sp) * BLOCK_G + g))
    top = tl.where(top == float("-inf"), 0.0, top)
    num = tl.zeros([BLOCK_G, D], tl.float32)
    den = tl.zeros([BLOCK_G], tl.float32)
    for sp in range(0, n_splits):
        base = (bh * n_splits + sp) * BLOCK_G
        w = tl.exp(tl.load(Mx + base + g) - top)
        den += w * tl.load(Lx + base + g)
        num += w[:, None] * tl.load(Acc + (base + g[:, None]) * D + d[None, :])
    res = num / den[:, None]
    tl.store(Out + (bh * n_g + g[:, None]) * D + d[None, :], res.to(Out.dtype.element_ty), mask=g[:, None] < n_g)


# under TRITON_INTERPRET=1 (tests), Triton's CPU interpreter
_decode_kernel = triton.jit(decode_kernel_source)
_combine_kernel = triton.jit(combine_kernel_source)


def n_splits(programs: int, length: int, target: int) -> int:
    """Splits of the key axis so that ``programs`` x splits reaches ``target`` (at most one block per split)."""
    return max(1, min(math.ceil(target / max(programs, 1)), math.ceil(length / BLOCK_N)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     splits: int | None = None, block_n: int = BLOCK_N, num_warps: int = 4,
                     num_stages: int = 3) -> torch.Tensor:
    """Attention of one query position: q [rows, n_kv, G, D] (the G query heads of each KV head), k/v
    [rows, n_kv, L, D], mask [rows, 1, 1, L] (bool: attend; float: added) -> [rows, n_kv, G, D] in q's dtype.

    ``splits``: key ranges per (row, KV head) (default: enough programs for about four per SM); ``block_n``,
    ``num_warps``, ``num_stages``: the kernel's tile and launch settings (benchmarks/decode_ab.py compares them)."""
    rows, n_kv, n_g, dim = q.shape
    length = k.shape[2]
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[-1] != length:
        raise ValueError(f"decode attention needs a [rows, 1, 1, {length}] mask, got {tuple(mask.shape)}")
    if dim & (dim - 1) or dim < 16 or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"decode attention needs a power-of-two head dim >= 16 with unit stride, got {dim}")
    block_g = max(MIN_BLOCK_G, triton.next_power_of_2(n_g))
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        splits = n_splits(rows * n_kv, length, 4 * sms)
    out = torch.empty(rows, n_kv, n_g, dim, device=q.device, dtype=q.dtype)
    if splits > 1:
        acc = torch.empty(rows * n_kv, splits, block_g, dim, device=q.device, dtype=torch.float32)
        mx = torch.empty(rows * n_kv, splits, block_g, device=q.device, dtype=torch.float32)
        lx = torch.empty_like(mx)
    else:
        acc = mx = lx = out  # not written
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    _decode_kernel[(rows * n_kv, splits)](
        q, k, v, m, acc, mx, lx, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), m.stride(0), m.stride(-1), n_kv, n_g, length, float(scale),
        IS_BOOL=mask.dtype == torch.bool, BLOCK_G=block_g, BLOCK_N=block_n, D=dim, SPLIT=splits > 1,
        num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _combine_kernel[(rows * n_kv,)](acc, mx, lx, out, n_g, splits, BLOCK_G=block_g, D=dim, num_warps=num_warps)
    return out


__all__ = ["BLOCK_N", "combine_kernel_source", "decode_attention", "decode_kernel_source", "n_splits"]
