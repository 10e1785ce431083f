"""Verify an export: hooked source model and exported model agree on logits, greedy tokens, r̂-free residuals
(`verify_export`, the DiM export) or on logits and greedy tokens under any edit (`verify_method_export`)."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from typing import Iterator, Sequence

import torch
from torch import nn

from ..core.directions import Direction
from ..core.model import LoadedModel, find_blocks
from ..core.padding import position_ids
from ..edits import DirectionalAblation, apply_intervention
from ..errors import UserError
from .card import direction_digest
from .save import read_export_info

log = logging.getLogger(__name__)


def default_tol(dtype: torch.dtype) -> float:
    """Max |Δlogit| allowed by default: 1e-4 in float32, 0.5 in lower precision (see `verify_export`)."""
    return 1e-4 if dtype == torch.float32 else 0.5


def check_same_direction(model_dir: str | os.PathLike, direction: Direction, source: str | os.PathLike) -> None:
    """Refuse to verify an export against a run whose direction is not the one it was exported with."""
    info = read_export_info(model_dir)
    if info.get("direction", {}).get("sha256_float64") not in (None, direction_digest(direction)):
        raise UserError(f"{model_dir} was exported with a different direction than {source}'s; verify it "
                        "against the run it was exported from")


@torch.no_grad()
def verify_export(
    lm_hooked: LoadedModel,
    exported_model: nn.Module,
    direction: Direction | torch.Tensor,
    instructions: Sequence[str],
    max_new_tokens: int = 32,
    tol: float = 1e-4,
    batch_size: int = 8,
) -> dict:
    """Compare the source model under `DirectionalAblation` hooks with the exported model (no hooks).

    Reports, over ``instructions``:

    - ``max_abs_logit_diff``: max |Δlogit| over every real prompt position and vocabulary entry;
    - greedy agreement over ``max_new_tokens`` new tokens per prompt (not cut at end-of-turn, so every
      prompt contributes the same number of positions): ``agreement`` = fraction of positions where both
      chose the same token, ``n_identical`` = prompts whose sequences are identical;
    - ``max_abs_projection`` / ``max_rel_projection``: max |x·r̂| (and |x·r̂|/‖x‖) of the exported model's
      residual stream at every block input and at the final residual (before the final norm), over
      every prompt position (padding included) and every generated token.

    ``ok`` = ``max_abs_logit_diff <= tol and agreement == 1.0``. ``tol=1e-4`` suits float32 (measured:
    5e-5 on Qwen2.5-0.5B at logit scale 32; 1e-5..1.3e-4 on tiny random Gemmas). In bfloat16 the two
    paths round differently (rounded projected weights vs rounded hooked activations): tiny random
    Gemmas differ by 0.4..1.2 at logit scale 8..14, so verify in float32, or pass a loose ``tol`` and
    read ``agreement``.
    """
    vector = direction.vector if isinstance(direction, Direction) else direction
    r_hat = (vector.double() / vector.double().norm())
    blocks, final_norm = find_blocks(exported_model)
    exported = replace(lm_hooked, model=exported_model, blocks=blocks, final_norm=final_norm)
    ablation = DirectionalAblation(vector)

    stats = {"max_abs_logit_diff": 0.0, "logit_scale": 0.0, "max_abs_projection": 0.0,
             "max_rel_projection": 0.0, "n_agree": 0, "n_positions": 0, "n_identical": 0}
    per_prompt = []
    instructions = list(instructions)
    for start in range(0, len(instructions), batch_size):
        batch = instructions[start:start + batch_size]
        with apply_intervention(lm_hooked, ablation):
            logits_a, tokens_a, mask = _greedy(lm_hooked, batch, max_new_tokens)
        with _track_projection(exported, r_hat, stats):
            logits_b, tokens_b, _ = _greedy(exported, batch, max_new_tokens)
        real = mask.bool().to(logits_a.device)
        diff = (logits_a.float() - logits_b.float().to(logits_a.device)).abs()[real]  # [n_real, vocab]
        stats["max_abs_logit_diff"] = max(stats["max_abs_logit_diff"], float(diff.max()))
        stats["logit_scale"] = max(stats["logit_scale"], float(logits_a.float().abs()[real].max()))
        same = tokens_a.cpu() == tokens_b.cpu()  # [batch, max_new_tokens]
        stats["n_agree"] += int(same.sum())
        stats["n_positions"] += same.numel()
        stats["n_identical"] += int(same.all(dim=1).sum())
        per_prompt += [float(row.float().mean()) for row in same]

    agreement = stats["n_agree"] / max(stats["n_positions"], 1)
    result = {
        "n_prompts": len(instructions),
        "max_new_tokens": max_new_tokens,
        "max_abs_logit_diff": stats["max_abs_logit_diff"],
        "logit_scale": stats["logit_scale"],
        "agreement": agreement,
        "n_identical": stats["n_identical"],
        "per_prompt_agreement": per_prompt,
        "max_abs_projection": stats["max_abs_projection"],
        "max_rel_projection": stats["max_rel_projection"],
        "tol": tol,
        "ok": stats["max_abs_logit_diff"] <= tol and agreement == 1.0,
    }
    log.info("verify export: max |Δlogit| %.3g (scale %.3g), greedy agreement %.4f (%d/%d identical), "
             "max |x·r̂| %.3g", result["max_abs_logit_diff"], result["logit_scale"], agreement,
             result["n_identical"], len(instructions), result["max_abs_projection"])
    return result


def _greedy(lm: LoadedModel, batch: Sequence[str], max_new_tokens: int):
    """Prompt logits [batch, seq, vocab], ``max_new_tokens`` greedy tokens [batch, n], prompt mask."""
    enc = lm.tokenize(list(batch))
    mask = enc["attention_mask"]
    out = lm.model(**enc, position_ids=position_ids(mask), use_cache=True)
    prompt_logits = out.logits
    cache, attn, pos = out.past_key_values, mask, position_ids(mask)[:, -1:]
    tokens = []
    nxt = out.logits[:, -1].argmax(-1)  # [batch]
    for step in range(max_new_tokens):
        tokens.append(nxt)
        if step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        pos = pos + 1
        out = lm.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos,
                       past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
    new = torch.stack(tokens, dim=1) if tokens else mask.new_zeros(mask.shape[0], 0)  # [batch, max_new_tokens]
    return prompt_logits, new, mask


@contextlib.contextmanager
def _track_projection(lm: LoadedModel, r_hat: torch.Tensor, stats: dict) -> Iterator[None]:
    """Track max |x·r̂| and |x·r̂|/‖x‖ at every block input and at the final norm's input (all positions)."""
    r = r_hat.to(device=lm.device, dtype=torch.float32)

    def hook(module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).float()
        proj = (x @ r).abs()  # [batch, seq]
        rel = proj / x.norm(dim=-1).clamp(min=1e-12)
        stats["max_abs_projection"] = max(stats["max_abs_projection"], float(proj.max()))
        stats["max_rel_projection"] = max(stats["max_rel_projection"], float(rel.max()))

    sites = [s.block for s in lm.blocks] + ([lm.final_norm] if lm.final_norm is not None else [])
    handles = []
    try:
        for m in sites:
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def verify_method_export(lm_hooked: LoadedModel, exported_model: nn.Module, intervention,
                         instructions: Sequence[str], max_new_tokens: int = 16, tol: float = 1e-4) -> dict:
    """Hooked source vs exported model: ``max_abs_logit_diff``, greedy ``agreement``, ``ok``."""
    blocks, final_norm = find_blocks(exported_model)
    exported = replace(lm_hooked, model=exported_model, blocks=blocks, final_norm=final_norm)
    with apply_intervention(lm_hooked, intervention):
        logits_a, tokens_a, mask = _greedy(lm_hooked, list(instructions), max_new_tokens)
    logits_b, tokens_b, _ = _greedy(exported, list(instructions), max_new_tokens)
    real = mask.bool().to(logits_a.device)
    diff = float((logits_a.float() - logits_b.float().to(logits_a.device)).abs()[real].max())
    agreement = float((tokens_a.cpu() == tokens_b.cpu()).float().mean())
    return {"method": intervention.name, "n_prompts": len(instructions), "max_abs_logit_diff": diff,
            "agreement": agreement, "tol": tol, "ok": diff <= tol and agreement == 1.0}
