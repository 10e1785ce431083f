"""Grouped-query attention under a padding mask without HF's per-step ``repeat_kv`` copy; decode steps on a kernel
that reads the KV cache only as far as it is filled.

The query heads that share a KV head become query rows of that head, so SDPA reads each KV head once.
`folded_gqa_attention` switches an SDPA model to it for a block (registered with transformers'
``AttentionInterface``) and back afterwards; cases the fold does not cover go to HF's own sdpa function.
With ``decode_kernel=True`` (CUDA, bfloat16/float16, Triton), single-query steps under a padding mask run on
`decode_attention` instead of SDPA — for multi-head models too — once it has matched SDPA on probes of the
model's head shapes (`verify_decode_kernel`); float32 keeps SDPA, so float32 tokens stay those of HF generate.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

log = logging.getLogger(__name__)

FOLDED_SDPA = "refusal_direction_folded_sdpa"  # name registered with transformers' AttentionInterface
_DECODE: dict = {"kernel": None}  # the decode_attention function while a `folded_gqa_attention` block uses it


def folded_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """HF attention function: SDPA with the query heads of each KV head folded into query rows.

    query [batch, h_q, q, d], key/value [batch, h_kv, s, d]; returns [batch, q, h_q, d_v] like HF's sdpa.
    Same result as ``repeat_kv`` + SDPA without copying K/V h_q/h_kv times; cases it does not cover
    (no mask, no GQA, a per-head mask, position bias, dropout) go to HF's own sdpa function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h_q, q, d = query.shape
    h_kv = key.shape[1]
    run = _DECODE["kernel"]
    if (run is not None and q == 1 and attention_mask is not None and attention_mask.dim() == 4
            and attention_mask.shape[1:3] == (1, 1) and not dropout and h_q % h_kv == 0
            and kwargs.get("position_bias") is None):
        out = run(query.reshape(b, h_kv, h_q // h_kv, d), key, value, attention_mask, _scale(scaling, d))
        return out.reshape(b, 1, h_q, d), None  # [batch, q = 1, h_q, d]
    if (attention_mask is None or h_q == h_kv or h_q % h_kv or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or dropout or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rep = h_q // h_kv
    folded = query.reshape(b, h_kv, rep * q, d)  # row r*q + i = query head (g*rep + r) at position i
    mask = attention_mask if attention_mask.shape[2] == 1 else attention_mask.repeat(1, 1, rep, 1)  # [b,1,rep*q,s]
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    out = out.reshape(b, h_q, q, value.shape[-1])  # [batch, h_q, q, d_v]
    return out.transpose(1, 2).contiguous(), None


def _scale(scaling, head_dim: int) -> float:
    return float(scaling) if scaling is not None else head_dim ** -0.5


@contextlib.contextmanager
def folded_gqa_attention(model: torch.nn.Module, decode_kernel: bool = False,
                         notes: list[str] | None = None) -> Iterator[bool]:
    """Switch an SDPA grouped-query model to `folded_sdpa_attention` for the block; yields whether it folds.

    ``decode_kernel``: also run single-query steps on `decode_attention` where `verify_decode_kernel` passes
    (the reason it is not used, or that it is, goes to ``notes``)."""
    cfg = model.config.get_text_config()
    heads, kv_heads = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    run = decode_kernel_for(model, cfg, notes) if decode_kernel else None
    if (getattr(model.config, "_attn_implementation", None) != "sdpa" or not heads or not kv_heads
            or (heads == kv_heads and run is None) or not hasattr(model, "set_attn_implementation")):
        yield False
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FOLDED_SDPA, folded_sdpa_attention)
    AttentionMaskInterface.register(FOLDED_SDPA, sdpa_mask)
    try:
        model.set_attn_implementation(FOLDED_SDPA)
    except Exception as exc:  # any refusal leaves the model as it was
        log.info("keeping HF sdpa attention (%s)", exc)
        yield False
        return
    _DECODE["kernel"] = run
    try:
        yield model.config._attn_implementation == FOLDED_SDPA and heads != kv_heads
    finally:
        _DECODE["kernel"] = None
        model.set_attn_implementation("sdpa")


_VERIFIED: dict[tuple, tuple[bool, str]] = {}  # (heads, kv heads, head dim, dtype, device) -> probe check result


def decode_kernel_for(model: torch.nn.Module, cfg, notes: list[str] | None):
    """`decode_attention.decode_attention` if it can run here and matches SDPA on probes, else None."""
    param = next(model.parameters())
    say = notes.append if notes is not None else (lambda _: None)
    if param.device.type != "cuda" or param.dtype not in (torch.bfloat16, torch.float16):
        return None  # float32 and the CPU keep SDPA (HF generate's exact tokens)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    key = (heads, kv_heads, head_dim, param.dtype, str(param.device))
    try:
        from .decode_attention import decode_attention
        if key not in _VERIFIED:  # the probe check runs once per process and head shape (~0.1 s)
            _VERIFIED[key] = verify_decode_kernel(decode_attention, heads, kv_heads, head_dim, param.dtype,
                                                  param.device)
        ok, detail = _VERIFIED[key]
    except Exception as exc:  # noqa: BLE001 - no Triton, no compiler, an unsupported GPU: keep SDPA
        say(f"decode attention kernel unavailable ({type(exc).__name__}: {str(exc)[:120]}): SDPA")
        return None
    say(("decode attention kernel: " if ok else "decode attention kernel differs from SDPA on probes, "
         "not used: ") + detail)
    return decode_attention if ok else None


def verify_decode_kernel(run, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device
                         ) -> tuple[bool, str]:
    """Whether ``run`` (`decode_attention`) matches SDPA on probes of these head shapes: its error against a
    float64 reference at most twice SDPA's own plus 1e-3, for boolean and additive masks with left padding and
    unwritten slots (what a static cache holds). Returns (ok, "max error kernel vs SDPA")."""
    g = torch.Generator().manual_seed(0)
    rows, length = 5, 3 * 64 + 17
    q = torch.randn(rows, heads, 1, head_dim, generator=g)
    k, v = (torch.randn(rows, kv_heads, length, head_dim, generator=g) for _ in range(2))
    start = torch.tensor([0, 3, 70, 0, 150])
    end = torch.tensor([1, 90, 201, length, 151])
    pos = torch.arange(length)
    valid = (pos >= start[:, None]) & (pos < end[:, None])  # [rows, length]
    scale = head_dim ** -0.5
    rep = heads // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1),
        attn_mask=valid[:, None, None], scale=scale)  # [rows, heads, 1, hd]
    qd, kd, vd = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    worst_kernel = worst_sdpa = 0.0
    for mask in (valid, torch.where(valid, 0.0, torch.finfo(dtype).min)):
        m = mask[:, None, None].to(device=device, dtype=mask.dtype if mask.dtype == torch.bool else dtype)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            qd, kd.repeat_interleave(rep, 1), vd.repeat_interleave(rep, 1), attn_mask=m, scale=scale)
        out = run(qd.reshape(rows, kv_heads, rep, head_dim), kd, vd, m, scale)
        out = out.reshape(rows, heads, 1, head_dim)
        worst_kernel = max(worst_kernel, float((out.double().cpu() - ref).abs().max()))
        worst_sdpa = max(worst_sdpa, float((sdpa.double().cpu() - ref).abs().max()))
    ok = worst_kernel <= 2 * worst_sdpa + 1e-3
    return ok, f"max error {worst_kernel:.2e} vs SDPA's {worst_sdpa:.2e} on probes"
