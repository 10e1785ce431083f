"""Streaming export: orthogonalize a safetensors checkpoint one shard at a time, for models bigger than memory.

The same edit as `orthogonalize.orthogonalize_weights_`, applied to the files instead of a loaded model:

1. `residual_roles` finds which tensors write to the residual stream without any weights: the model is
   built on the meta device from its config (no memory), and the in-memory edit's own logic
   (`find_blocks`, `find_residual_writers`'s probe pass, `_embeddings`, the tie check) runs on it. So every
   architecture the in-memory edit supports is supported here, and the same ones are refused.
2. `export_streaming` reads each shard tensor by tensor (``safe_open``), projects r̂ out of the edited
   ones (same float64 arithmetic, same row chunks), writes the new shard, and copies the index (plus the
   untied ``lm_head`` where the source ties it), config (``tie_word_embeddings: false``), tokenizer and
   other files. Peak memory: about one shard, plus a float64 copy of the largest edited matrix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.directions import Direction
from ..core.model import find_blocks
from ..edits import DirectionalAblation
from ..edits.weights import (
    EditedWeights,
    _embeddings,
    _embeddings_shared,
    _is_conv1d,
    _project_columns_,
    _project_rows_,
    check_dense,
    find_residual_writers,
)
from ..errors import UserError
from ..fileio import atomic_write_json
from .card import check_out_dir, provenance, staged_export, write_model_card

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
_WEIGHT_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.py")


@dataclass(frozen=True)
class ResidualRoles:
    """How each edited tensor is projected, by parameter name, and the tie of the unembedding."""

    rows: tuple[str, ...]  # W ← W − (W r̂) r̂ᵀ: embeddings [vocab, d], Conv1D weights [in, d], biases [d]
    columns: tuple[str, ...]  # W ← W − r̂ (r̂ᵀ W): nn.Linear weights [d, in]
    embedding: str  # the token embedding
    tied_head: str | None  # lm_head's name when it shares the token embedding (then written as its own copy)
    d_model: int
    prefix: str  # the base model's attribute name ("model"), which some checkpoints leave out of their keys


def residual_roles(config) -> ResidualRoles:
    """The residual-writing tensors of the model ``config`` describes, from a weightless (meta) model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    check_dense(model)
    blocks, _ = find_blocks(model)
    d_model = int(model.config.get_text_config().hidden_size)
    writers = find_residual_writers(model, blocks)
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    embeddings = _embeddings(model, blocks, d_model)
    rows = [names[id(e.weight)] for e in embeddings]
    columns = []
    for module in writers:
        (rows if _is_conv1d(module) else columns).append(names[id(module.weight)])
        if getattr(module, "bias", None) is not None:
            rows.append(names[id(module.bias)])
    head = model.get_output_embeddings()
    tied_head = None
    if _embeddings_shared(model):
        tied_head = next(n for n, m in model.named_modules() if m is head) + ".weight"
    return ResidualRoles(tuple(rows), tuple(columns), rows[0], tied_head, d_model, model.base_model_prefix)


def checkpoint_dir(model: str, revision: str | None = None) -> Path:
    """A local directory with the model's safetensors checkpoint: ``model`` itself, or its Hub snapshot."""
    if model.endswith(".gguf"):
        raise UserError(f"{model} is a GGUF file; streaming export needs a safetensors checkpoint. Export it "
                        "without --device-map/--streaming (the GGUF is dequantized in memory), or pass a "
                        "transformers model directory")
    path = Path(model).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model, revision=revision, allow_patterns=list(_WEIGHT_PATTERNS),
                                      token=os.environ.get("HF_TOKEN")))
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{path} has no .safetensors weights (only safetensors checkpoints can be streamed); "
                        "convert it with `save_pretrained` or export without --streaming")
    return path


def _shards(src: Path) -> tuple[dict[str, str], dict | None]:
    """{tensor name: shard file name} and the index (None for a single ``model.safetensors``)."""
    from safetensors import safe_open

    if (src / INDEX).is_file():
        index = json.loads((src / INDEX).read_text())
        return dict(index["weight_map"]), index
    files = sorted(p.name for p in src.glob("*.safetensors"))
    weight_map = {}
    for name in files:
        with safe_open(str(src / name), framework="pt") as f:
            weight_map.update({k: name for k in f.keys()})
    return weight_map, None


def _checkpoint_name(name: str, weight_map: dict[str, str], prefix: str) -> str:
    """A parameter's key in the checkpoint (with or without the base-model prefix); refuses a missing one."""
    for key in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
        if key in weight_map:
            return key
    raise UserError(f"the checkpoint has no tensor {name!r} (a residual-writing weight); its key names do not "
                    "match the model class's parameters. Export with the in-memory path (no --streaming)")


def _edit(tensor: torch.Tensor, how: str, r_hat: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    if how == "columns":
        _project_columns_(out, r_hat)
    else:
        _project_rows_(out.view(-1, out.shape[-1]), r_hat)
    return out


def _untied_config(src: Path) -> dict:
    config = json.loads((src / "config.json").read_text())
    for c in (config, config.get("text_config")):
        if isinstance(c, dict) and "tie_word_embeddings" in c:
            c["tie_word_embeddings"] = False
    config["tie_word_embeddings"] = False
    return config


def export_streaming(
    model: str,
    direction: Direction,
    out_dir: str | os.PathLike,
    run_info: dict | None = None,
    force: bool = False,
    revision: str | None = None,
) -> Path:
    """Write an orthogonalized copy of the safetensors checkpoint ``model`` (a directory or Hub id) to
    ``out_dir``, shard by shard; the result equals `export_model`'s (same tensors, same config)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    src = checkpoint_dir(model, revision)
    roles = residual_roles(AutoConfig.from_pretrained(str(src), token=os.environ.get("HF_TOKEN")))
    vector = direction.vector if isinstance(direction, Direction) else direction
    if vector.shape != (roles.d_model,):
        raise UserError(f"direction has shape {tuple(vector.shape)} but the model has d_model {roles.d_model}; "
                        "use a direction extracted from this model")
    r_hat = vector.double().cpu() / vector.double().norm()
    weight_map, index = _shards(src)
    how = {_checkpoint_name(n, weight_map, roles.prefix): "rows" for n in roles.rows}
    how.update({_checkpoint_name(n, weight_map, roles.prefix): "columns" for n in roles.columns})
    embedding = _checkpoint_name(roles.embedding, weight_map, roles.prefix)
    head, head_bytes, saved_dtype = roles.tied_head, 0, None
    with staged_export(out_dir) as tmp:
        for shard in sorted(set(weight_map.values())):
            tensors = {}
            with safe_open(str(src / shard), framework="pt") as f:
                metadata = f.metadata() or {"format": "pt"}
                for key in f.keys():
                    t = f.get_tensor(key)
                    if key == embedding:
                        saved_dtype = str(t.dtype).removeprefix("torch.")
                        if head is not None:  # lm_head keeps the unedited embedding, as in untie_embeddings_
                            tensors[head] = t.clone()
                            head_bytes = t.numel() * t.element_size()
                    if key == head:  # a tied checkpoint that also stores lm_head: replaced by the copy above
                        continue
                    tensors[key] = _edit(t, how[key], r_hat) if key in how else t
            save_file(tensors, str(tmp / shard), metadata=metadata)
            log.info("orthogonalized shard %s (%d tensors)", shard, len(tensors))
        _copy_side_files(src, tmp, index, weight_map, embedding, head, head_bytes)
        edited = EditedWeights(tuple(sorted(how, key=list(weight_map).index)), head is not None)
        info = provenance(model, revision, "transformers (streamed safetensors)", saved_dtype or "unknown",
                          DirectionalAblation(direction.vector, name="dim"), edited, dict(run_info or {}), direction)
        write_model_card(tmp, info)
    log.info("exported orthogonalized model to %s (%d tensors edited, streamed)", out_dir, len(how))
    return out_dir


def _copy_side_files(src: Path, tmp: Path, index: dict | None, weight_map: dict, embedding: str,
                     head: str | None, head_bytes: int) -> None:
    """Config (``tie_word_embeddings: false``, as `untie_embeddings_` leaves it), the index with an added
    lm_head in the embedding's shard, and every other non-weight file (tokenizer, generation config, ...)."""
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in (INDEX, "config.json", "README.md") \
                and not p.name.startswith("refusal_direction_export"):
            shutil.copy2(p, tmp / p.name)
    atomic_write_json(tmp / "config.json", _untied_config(src))
    if index is not None:
        index = json.loads(json.dumps(index))
        if head is not None:
            if head not in weight_map and "total_size" in index.get("metadata", {}):
                index["metadata"]["total_size"] = int(index["metadata"]["total_size"]) + head_bytes
            index["weight_map"][head] = weight_map[embedding]
        atomic_write_json(tmp / INDEX, index)
