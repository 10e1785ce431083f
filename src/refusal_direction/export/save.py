"""Save an edited copy of a model as a plain HF directory, with a README and provenance JSON; reload it."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..core.directions import Direction
from ..core.gguf_cache import drop_gguf_quantizer_
from ..core.model import LoadedModel
from ..edits import DirectionalAblation, Edit
from ..edits.weights import _is_gguf, check_dense
from ..errors import UserError
from .card import EXPORT_INFO, check_out_dir, provenance, staged_export, write_model_card

log = logging.getLogger(__name__)


def export_edit(lm: LoadedModel, edit: Edit, out_dir: str | os.PathLike, run_info: dict | None = None,
                force: bool = False, direction: Direction | None = None) -> Path:
    """Save a copy of ``lm.model`` with ``edit``'s weight form applied (+ tokenizer, README, provenance JSON) to
    ``out_dir``: the one export of every method (research only).

    The caller's model is not changed: a deep copy is edited, so this needs memory for a second copy of the
    weights on the model's device. The directory is written as ``out_dir.tmp-*`` and renamed into place at the end
    (`card.staged_export`). An existing non-empty ``out_dir`` is refused unless ``force=True`` and it holds a
    previous export (it has ``refusal_direction_export.json``); other directories are never replaced.
    ``direction``: the Direction the edit was made from, recorded in the provenance (the DiM export's check).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    check_dense(lm.model)
    if any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules()):
        raise UserError("the model has forward hooks attached (export called inside apply_intervention?); "
                        "export from the plain model outside any intervention context")
    log.info("copying %s for export (a second copy of the weights on %s)", lm.model_id, lm.device)
    model = copy.deepcopy(lm.model)
    edited = edit.weights_(model)
    drop_gguf_quantizer_(model)  # a dequantized GGUF model is dense; its GGUF quantizer cannot be saved
    quantizer = getattr(lm.model, "hf_quantizer", None)
    gguf = str(lm.model_id).endswith(".gguf") or _is_gguf(
        getattr(getattr(quantizer, "quantization_config", None), "quant_method", None))
    info = provenance(lm.model_id, lm.revision, "gguf (dequantized)" if gguf else "transformers",
                      str(lm.dtype).removeprefix("torch."), edit, edited, dict(run_info or {}), direction)
    with staged_export(out_dir) as tmp:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_model_card(tmp, info)
    log.info("exported %s (%s) to %s", edit.name, edit.method, out_dir)
    return out_dir


def export_model(
    lm: LoadedModel,
    direction: Direction,
    out_dir: str | os.PathLike,
    run_info: dict | None = None,
    force: bool = False,
) -> Path:
    """The DiM export: ``direction`` ablated in the weights (`export_edit`); a model dispatched over devices is
    edited shard by shard from its checkpoint instead (`stream.export_streaming`)."""
    if lm.placement:  # dispatched (offloaded) weights cannot be copied and edited in memory: stream the files
        from .stream import export_streaming

        check_out_dir(Path(out_dir), force)
        log.info("the model is %s: exporting shard by shard from its checkpoint", lm.placement)
        return export_streaming(lm.model_id, direction, Path(out_dir), dict(run_info or {}), force=force,
                                revision=lm.revision)
    return export_edit(lm, DirectionalAblation(direction.vector, name="dim"), out_dir, run_info, force, direction)


def read_export_info(model_dir: str | os.PathLike) -> dict:
    """The provenance JSON of an export directory."""
    path = Path(model_dir) / EXPORT_INFO
    if not path.is_file():
        raise UserError(f"{model_dir} has no {EXPORT_INFO}; it is not a refusal-direction export "
                        "(pass the directory written by `refusal-direction export`)")
    return json.loads(path.read_text())


def load_exported(model_dir: str | os.PathLike, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None) -> nn.Module:
    """Load an export with plain ``AutoModelForCausalLM.from_pretrained`` (no code of ours in the path)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model.to(device).eval().requires_grad_(False)

