"""Grouped-query attention under a padding mask without HF's per-step ``repeat_kv`` copy.

The query heads that share a KV head become query rows of that head, so SDPA reads each KV head once.
`folded_gqa_attention` switches an SDPA model to it for a block (registered with transformers'
``AttentionInterface``) and back afterwards; cases the fold does not cover go to HF's own sdpa function.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

log = logging.getLogger(__name__)

FOLDED_SDPA = "refusal_direction_folded_sdpa"  # name registered with transformers' AttentionInterface


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


@contextlib.contextmanager
def folded_gqa_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Switch an SDPA grouped-query model to `folded_sdpa_attention` for the block; yields whether it did."""
    cfg = model.config.get_text_config()
    heads, kv_heads = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if (getattr(model.config, "_attn_implementation", None) != "sdpa" or not heads or not kv_heads
            or heads == kv_heads or not hasattr(model, "set_attn_implementation")):
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
    try:
        yield model.config._attn_implementation == FOLDED_SDPA
    finally:
        model.set_attn_implementation("sdpa")
