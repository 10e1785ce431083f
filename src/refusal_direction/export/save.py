"""Save an orthogonalized copy of a model as a plain HF directory, with a README and provenance JSON; reload it."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from ..core.directions import Direction
from ..core.model import LoadedModel
from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_text
from .orthogonalize import EditedWeights, _is_gguf, check_dense, orthogonalize_weights_

log = logging.getLogger(__name__)

EXPORT_INFO = "refusal_direction_export.json"


def export_model(
    lm: LoadedModel,
    direction: Direction,
    out_dir: str | os.PathLike,
    run_info: dict | None = None,
    force: bool = False,
) -> Path:
    """Save an orthogonalized copy of ``lm.model`` (+ tokenizer, README, provenance JSON) to ``out_dir``.

    The caller's model is not changed: a deep copy is edited, so this needs memory for a second copy of
    the weights on the model's device. The directory is written as ``out_dir.tmp-*`` and renamed into
    place at the end. An existing non-empty ``out_dir`` is refused unless ``force=True`` and it holds
    a previous export (it has ``refusal_direction_export.json``); other directories are never replaced.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    check_dense(lm.model)
    run_info = dict(run_info or {})
    if any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules()):
        raise UserError("the model has forward hooks attached (export_model called inside apply_intervention?); "
                        "export from the plain model outside any intervention context")

    log.info("copying %s for export (a second copy of the weights on %s)", lm.model_id, lm.device)
    model = copy.deepcopy(lm.model)
    edited = orthogonalize_weights_(model, direction)
    _drop_gguf_quantizer_(model)
    info = _provenance(lm, direction, edited, run_info)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "README.md", _readme(info))
        atomic_write_json(tmp / EXPORT_INFO, info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported orthogonalized model to %s", out_dir)
    return out_dir



def _drop_gguf_quantizer_(model: nn.Module) -> None:
    """A dequantized GGUF model is dense but still carries its (unserializable) GGUF quantizer; drop it."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log.info("saving the dequantized GGUF weights as a plain safetensors checkpoint")

def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory; choose a new directory name")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / EXPORT_INFO).is_file():
            raise UserError(f"--out {out_dir} is not empty and is not a previous export; choose a new or empty "
                            "directory (it is never overwritten, even with --force)")
        if not force:
            raise UserError(f"--out {out_dir} already holds an export; pass --force to replace it or choose a "
                            "new directory")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _provenance(lm: LoadedModel, direction: Direction, edited: EditedWeights, run_info: dict) -> dict:
    from .. import __version__

    vec = direction.vector.double().cpu().contiguous()
    quantizer = getattr(lm.model, "hf_quantizer", None)
    gguf = str(lm.model_id).endswith(".gguf") or _is_gguf(
        getattr(getattr(quantizer, "quantization_config", None), "quant_method", None))
    return {
        "tool": "refusal-direction",
        "tool_version": __version__,
        "purpose": "safety research and evaluation only; not for deployment or upload",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_model": lm.model_id,
        "source_revision": lm.revision,
        "source_format": "gguf (dequantized)" if gguf else "transformers",
        "saved_dtype": str(lm.dtype).removeprefix("torch."),
        "edit": "directional ablation baked into weights (orthogonalization against r̂)",
        "direction": {
            "layer": direction.layer,
            "position": direction.position,
            "norm": float(vec.norm()),
            "d_model": int(vec.shape[-1]),
            "model_id": direction.model_id,
            "sha256_float64": direction_digest(direction),
        },
        "untied_lm_head": edited.untied,
        "edited_parameters": list(edited.names),
        "run": run_info,
    }


def direction_digest(direction: Direction | torch.Tensor) -> str:
    """sha256 of the direction's float64 bytes (recorded in the export, to match it to a run later)."""
    vector = direction.vector if isinstance(direction, Direction) else direction
    return hashlib.sha256(vector.double().cpu().contiguous().numpy().tobytes()).hexdigest()


def _readme(info: dict) -> str:
    d = info["direction"]
    run_dir = info["run"].get("run_dir", "(not recorded)")
    gguf_note = ("\nThe source was a GGUF file; this export is a standard transformers safetensors directory with "
                 f"dequantized `{info['saved_dtype']}` weights, not a GGUF file.\n"
                 if info["source_format"].startswith("gguf") else "")
    untie_note = ("The source model ties `lm_head` to the token embedding; here `lm_head` is a separate, unedited "
                  "copy and `tie_word_embeddings` is false, so that the edit matches the hook-based ablation.\n"
                  if info["untied_lm_head"] else "")
    return f"""# {info['source_model']} with the refusal direction ablated (research artifact)

**For safety research and evaluation only. Not for deployment, not for upload to any model hub.**
This model was made by `refusal-direction` {info['tool_version']}, a tool replicating Arditi et al. (2024),
"Refusal in Language Models Is Mediated by a Single Direction". Its refusal behaviour has been removed
on purpose so that this effect can be studied; it will comply with harmful requests. Keep it private.

## What was changed

Every matrix that writes to the residual stream (token embedding, each attention output projection, each
MLP down projection, and their biases) had the refusal direction r̂ projected out
(W ← W − r̂ r̂ᵀ W). The model is therefore equivalent to running the source model with directional
ablation of r̂ at every layer and position. Nothing else was changed.

{untie_note}{gguf_note}
| | |
|---|---|
| source model | `{info['source_model']}` (revision: {info['source_revision'] or 'not recorded'}) |
| direction layer (block input) | {d['layer']} |
| direction position | {d['position']} (counted from the end of the prompt) |
| direction norm ‖r‖ | {d['norm']:.6g} |
| direction sha256 (float64 bytes) | `{d['sha256_float64']}` |
| source run directory | `{run_dir}` |
| weights dtype | {info['saved_dtype']} |
| created (UTC) | {info['created_utc']} |

Machine-readable provenance: `{EXPORT_INFO}`.

## Loading

Plain transformers, no code from refusal-direction needed:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")
```

Check the export against the hooks with `refusal-direction verify-export --run RUN --model-dir DIR`.
"""


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

