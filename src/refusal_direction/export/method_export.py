"""Export and verify the weight form of any method (`method_edits.method_weights_`), like `export_model`.

`export_method_model` saves an edited copy as a plain HF directory (tokenizer, README, provenance JSON with
the method's parameters); `verify_method_export` compares the source model under the method's hooks with the
reloaded export: max |Δlogit| over every real prompt position, greedy agreement over new tokens.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..core.gguf_cache import drop_gguf_quantizer_
from ..core.interventions import apply_intervention
from ..core.model import LoadedModel, find_blocks
from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_text
from .card import EXPORT_INFO, _move_into_place
from .card import check_out_dir as _check_out_dir
from .method_edits import method_weights_
from .verify import _greedy


def export_method_model(lm: LoadedModel, intervention, out_dir: str | os.PathLike, run_info: dict | None = None,
                        force: bool = False) -> Path:
    """Save a copy of ``lm.model`` with ``intervention``'s weight form applied (research only); the caller's
    model is unchanged. Same directory rules as `export_model`."""
    from .. import __version__

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    if any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules()):
        raise UserError("the model has forward hooks attached; export from the plain model outside any intervention")
    model = copy.deepcopy(lm.model)
    edited = method_weights_(model, intervention)
    drop_gguf_quantizer_(model)  # a dequantized GGUF model is dense; its GGUF quantizer cannot be saved
    info = {"tool": "refusal-direction", "tool_version": __version__,
            "purpose": "safety research and evaluation only; not for deployment or upload",
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_model": lm.model_id, "source_revision": lm.revision,
            "saved_dtype": str(lm.dtype).removeprefix("torch."), "method": intervention.name,
            "edit": intervention.describe(), "untied_lm_head": edited.untied,
            "edited_parameters": list(edited.names), "run": dict(run_info or {})}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "README.md", f"# {lm.model_id}, method `{intervention.name}` baked into the weights "
                          "(research artifact)\n\n**For safety research and evaluation only. Not for deployment, "
                          "not for upload.** Its refusal behaviour was removed on purpose.\n\nProvenance: "
                          f"`{EXPORT_INFO}`.\n")
        atomic_write_json(tmp / EXPORT_INFO, info)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@torch.no_grad()
def verify_method_export(lm_hooked: LoadedModel, exported_model: nn.Module, intervention,
                         instructions: Sequence[str], max_new_tokens: int = 16, tol: float = 1e-4) -> dict:
    """Hooked source vs exported model: ``max_abs_logit_diff``, greedy ``agreement``, ``ok``."""
    from dataclasses import replace

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


__all__ = ["export_method_model", "verify_method_export"]
