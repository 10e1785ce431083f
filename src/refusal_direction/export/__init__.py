"""Export stage: bake directional ablation into the weights, save the model, and verify the result.

Ablating r̂ at every block input and every attention/MLP output (`DirectionalAblation`) is the same
function as a model whose residual stream never receives a component along r̂. That holds when every
matrix that *writes* to the residual stream has r̂ projected out of its output space:

- token embedding rows (and learned absolute position embeddings):  W_E ← W_E − (W_E r̂) r̂ᵀ
- each block's attention output projection and MLP down projection: W_out ← W_out − r̂ (r̂ᵀ W_out)
- their biases, where present:                                      b ← b − (b·r̂) r̂

Two things break the equivalence, and both are handled here:

- a tied unembedding (gemma-2b-it, Qwen2.5-0.5B): editing the embedding would also edit ``lm_head``
  (max |Δlogit| 0.07 instead of 4e-7 on gemma-2b-it). The unembedding is untied first: ``lm_head``
  gets its own copy and ``config.tie_word_embeddings`` becomes False, so the saved model reloads
  untied with plain transformers.
- a norm between a sub-layer and the residual (Gemma-2/3 "sandwich" norms): the written vector is
  the norm's output, which no weight edit can keep orthogonal to r̂. Such models are refused.

The writer of each sub-layer is found by a probe forward pass: the last linear layer with d_model
outputs that runs inside the module, and its output must be exactly the module's output.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..core.directions import Direction
from ..core.interventions import DirectionalAblation, apply_intervention
from ..core.model import LoadedModel, find_blocks
from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

EXPORT_INFO = "refusal_direction_export.json"
_CHUNK_ROWS = 16384  # rows of an embedding matrix edited at a time (bounds the float64 scratch memory)


@dataclass(frozen=True)
class EditedWeights:
    """What `orthogonalize_weights_` changed."""

    names: tuple[str, ...]  # parameter names that had r̂ projected out
    untied: bool  # lm_head was given its own copy of the (shared) embedding matrix


# --------------------------------------------------------------------------------------------------
# Orthogonalization


def orthogonalize_weights_(
    lm_or_model: LoadedModel | nn.Module,
    direction: Direction | torch.Tensor,
    untie: bool = True,
) -> EditedWeights:
    """Project r̂ out of every matrix that writes to the residual stream, in place.

    ``untie=False`` keeps a tied ``lm_head`` tied to the edited embedding; that is *not* equivalent to
    the hooks and exists only to demonstrate the trap in tests.
    """
    model, blocks = _model_and_blocks(lm_or_model)
    check_dense(model)
    d_model = int(model.config.get_text_config().hidden_size)
    vector = direction.vector if isinstance(direction, Direction) else direction
    if vector.shape != (d_model,):
        raise UserError(f"direction has shape {tuple(vector.shape)} but the model has d_model {d_model}; "
                        "use a direction extracted from this model")
    r_hat = vector.double().cpu()
    r_hat = r_hat / r_hat.norm()

    writers = find_residual_writers(model, blocks)  # fails before anything is edited
    untied = untie_embeddings_(model) if untie else False
    if not untie and _embeddings_shared(model):
        log.warning("untie=False on a model with a tied unembedding: lm_head is edited too, so the result "
                    "is NOT equivalent to directional ablation")

    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    edited: list[str] = []
    with torch.no_grad():
        for emb in _embeddings(model, blocks, d_model):
            _project_rows_(emb.weight, r_hat)
            edited.append(names[id(emb.weight)])
        for module in writers:
            if _is_conv1d(module):  # GPT-2 Conv1D: y = x W + b, W [in, d_model]
                _project_rows_(module.weight, r_hat)
            else:  # nn.Linear: y = x Wᵀ + b, W [d_model, in]
                _project_columns_(module.weight, r_hat)
            edited.append(names[id(module.weight)])
            if getattr(module, "bias", None) is not None:
                _project_rows_(module.bias.view(1, -1), r_hat)
                edited.append(names[id(module.bias)])
    log.info("orthogonalized %d tensors against r̂%s", len(edited), " (lm_head untied first)" if untied else "")
    return EditedWeights(tuple(edited), untied)


def check_dense(model: nn.Module) -> None:
    """Refuse models whose weights are not plain floating-point tensors (still quantized)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    packed = bool(getattr(quantizer, "packed_modules", None))
    still_quantized = quantizer is not None and (packed or not _is_gguf(method))
    if still_quantized or any(not p.is_floating_point() for p in model.parameters()):
        raise UserError(f"the model's weights are quantized ({method}); orthogonalization needs dense weights. "
                        "Load it unquantized (a GGUF file: dequantized, e.g. --dtype float32 on CPU) and retry")


def _is_gguf(method) -> bool:
    return str(getattr(method, "value", method)).lower() == "gguf"


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


def _model_and_blocks(lm_or_model: LoadedModel | nn.Module):
    if isinstance(lm_or_model, LoadedModel):
        return lm_or_model.model, lm_or_model.blocks
    blocks, _ = find_blocks(lm_or_model)
    return lm_or_model, blocks


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def _project_rows_(weight: torch.Tensor, r_hat: torch.Tensor) -> None:
    """W ← W − (W r̂) r̂ᵀ for W [rows, d_model], in chunks of rows, computed in float64."""
    r = r_hat.to(device=weight.device, dtype=_compute_dtype(weight))
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        rows = weight[start:start + _CHUNK_ROWS]
        w = rows.to(r.dtype)
        rows.copy_((w - torch.outer(w @ r, r)).to(weight.dtype))


def _project_columns_(weight: torch.Tensor, r_hat: torch.Tensor) -> None:
    """W ← W − r̂ (r̂ᵀ W) for W [d_model, in], computed in float64."""
    r = r_hat.to(device=weight.device, dtype=_compute_dtype(weight))
    w = weight.to(r.dtype)
    weight.copy_((w - torch.outer(r, r @ w)).to(weight.dtype))


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if _is_conv1d(module):
        return int(module.nf)
    return None


def _embeddings(model: nn.Module, blocks, d_model: int) -> list[nn.Embedding]:
    """Token embedding plus any other d_model-wide embedding outside the blocks (learned positions)."""
    token = model.get_input_embeddings()
    if token is None or token.weight.shape[-1] != d_model:
        raise UserError(f"{type(model).__name__} has no token embedding of width d_model={d_model}; "
                        "this architecture is not supported for export")
    inside = {id(m) for site in blocks for m in site.block.modules()}
    out = [token]
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m is not token and id(m) not in inside and m.weight.shape[-1] == d_model:
            log.info("also orthogonalizing embedding %s (%s)", name, tuple(m.weight.shape))
            out.append(m)
    return out


def _embeddings_shared(model: nn.Module) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or emb is None or getattr(out, "weight", None) is None:
        return False
    return out.weight is emb.weight or (out.weight.data_ptr() == emb.weight.data_ptr()
                                        and out.weight.device == emb.weight.device)


def untie_embeddings_(model: nn.Module) -> bool:
    """Give ``lm_head`` its own copy of a shared embedding and record it in the config; True if untied.

    transformers decides tying on load from ``config.tie_word_embeddings`` (and, in v5, keeps the
    ``all_tied_weights_keys`` map it derived from it); both are updated so neither ``tie_weights()``
    nor a save/reload ties the matrices again.
    """
    shared = _embeddings_shared(model)
    if shared:
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    flagged = any(getattr(c, "tie_word_embeddings", False) for c in configs)
    for c in configs:
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False
    for m in model.modules():  # transformers v5 caches the tie map computed at init
        if hasattr(m, "all_tied_weights_keys") and hasattr(m, "get_expanded_tied_weights_keys"):
            m.all_tied_weights_keys = m.get_expanded_tied_weights_keys(all_submodels=False)
    if shared or flagged:
        log.info("untied lm_head from the token embedding (config.tie_word_embeddings=False)")
    return shared


def find_residual_writers(model: nn.Module, blocks) -> list[nn.Module]:
    """For every block's attention and MLP site, the linear layer whose output is the site's output.

    Found by one probe forward pass (4 tokens): the last nn.Linear / Conv1D with d_model outputs that
    runs inside the site module, checked to produce exactly the module's output.
    """
    d_model = int(model.config.get_text_config().hidden_size)
    sites = [(i, kind, m) for i, s in enumerate(blocks) for kind, m in (("attention", s.attn_out), ("MLP", s.mlp_out))]
    for i, kind, module in sites:
        if "norm" in type(module).__name__.lower() or not any(_out_features(m) for m in module.modules()):
            raise UserError(
                f"block {i}'s {kind} output is written to the residual stream through {type(module).__name__}, "
                "not a linear layer (a post-sub-layer 'sandwich' norm as in Gemma-2/3); no weight edit "
                "reproduces directional ablation there. Use the hook-based ablation (the `ablation` "
                "intervention) with this model instead of exporting")

    calls: dict[int, list[tuple[nn.Module, torch.Tensor]]] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []

    def record_linear(key):
        def hook(module, args, output):
            if _out_features(module) == d_model:
                calls.setdefault(key, []).append((module, output))
        return hook

    def record_site(key):
        def hook(module, args, output):
            outputs[key] = output[0] if isinstance(output, tuple) else output
        return hook

    try:
        for _, _, module in sites:
            key = id(module)
            handles.append(module.register_forward_hook(record_site(key)))
            for sub in module.modules():
                if _out_features(sub) is not None:
                    handles.append(sub.register_forward_hook(record_linear(key)))
        device = next(model.parameters()).device
        vocab = int(model.config.get_text_config().vocab_size)
        ids = torch.tensor([[min(t, vocab - 1) for t in (2, 10, 20, 30)]], device=device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()

    writers = []
    for i, kind, module in sites:
        seen = calls.get(id(module), [])
        out = outputs.get(id(module))
        if not seen or out is None or not torch.equal(seen[-1][1], out):
            raise UserError(
                f"block {i}'s {kind} module ({type(module).__name__}) does not return the output of one "
                f"linear layer with d_model={d_model} outputs (found {len(seen)} candidate calls); weight "
                "orthogonalization would not match directional ablation for this architecture (e.g. "
                "mixture-of-experts or a post-sub-layer norm). Use the hook-based ablation instead")
        writers.append(seen[-1][0])
    return writers


# --------------------------------------------------------------------------------------------------
# Export


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


# --------------------------------------------------------------------------------------------------
# Verification


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


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _greedy(lm: LoadedModel, batch: Sequence[str], max_new_tokens: int):
    """Prompt logits [batch, seq, vocab], ``max_new_tokens`` greedy tokens [batch, n], prompt mask."""
    enc = lm.tokenize(list(batch))
    mask = enc["attention_mask"]
    out = lm.model(**enc, position_ids=_position_ids(mask), use_cache=True)
    prompt_logits = out.logits
    cache, attn, pos = out.past_key_values, mask, _position_ids(mask)[:, -1:]
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


__all__ = ["EditedWeights", "orthogonalize_weights_", "check_dense", "untie_embeddings_", "find_residual_writers",
           "export_model", "direction_digest", "read_export_info", "load_exported", "verify_export", "EXPORT_INFO"]
