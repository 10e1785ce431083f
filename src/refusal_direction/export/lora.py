"""A LoRA adapter (peft) that holds an edit exactly, for the forms whose weight change is low-rank.

The weight forms (`Edit.weights_`, `edits`) change a module's weight by ΔW = W_edited − W. For directional and
subspace ablation, the per-layer kernel and ACE, ΔW has rank k (the number of ablated directions: 1, or the
subspace's k) in every module they touch — writers' matrices (ΔW = −Q Qᵀ W, scaled per layer for the kernel) and
the token embedding (ΔE = −(E Q) Qᵀ, plus ACE's constant row) — so a rank-k LoRA adapter ``B A`` (scaling 1)
reproduces it. The norm-preserving ablation rescales every written vector: its ΔW is full-rank and has no exact
adapter, and an edit that changes a bias (GPT-2-style writers) has none either (LoRA leaves biases alone); both are
refused with the reason.

`lora_factors(source, edited)` finds every changed ``nn.Linear`` / ``nn.Embedding`` by comparing the two models,
factors its ΔW with a randomised low-rank SVD (`torch.svd_lowrank`), and checks that the factors reconstruct ΔW
(relative Frobenius error ≤ ``rtol``): the adapter is built from what the merged export actually changed, not from
a second derivation of the method. `save_lora(base, factors, out)` writes it through peft (``LoraConfig`` /
``get_peft_model`` / ``save_pretrained``) on a copy of the base model. Loading it is peft's
``PeftModel.from_pretrained(base, out)``; `export.verify.verify_method_export` compares it with the hooks.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..fileio import atomic_write_text

log = logging.getLogger(__name__)

INSTALL = "pip install 'refusal-direction[lora]'"
MAX_RANK = 8  # larger than any edit here produces (subspace k <= 4); the sketch's size


class LoraUnsupported(UserError):
    """The edit has no exact LoRA form (full-rank change, a changed bias, a module type LoRA does not cover)."""


def import_peft():
    try:
        import peft
    except ImportError:
        raise UserError(f"a LoRA export needs peft, which is not installed: {INSTALL}") from None
    return peft


@torch.no_grad()
def lora_factors(source: nn.Module, edited: nn.Module, rtol: float = 1e-4) -> dict[str, tuple[torch.Tensor, ...]]:
    """{module name: (A [r, in], B [out, r])} with B A = ΔW for a Linear, (A [r, n_embeddings], B [dim, r]) with
    (B A)ᵀ = ΔE for an Embedding (peft's layouts); every factor has the same r (zero-padded), the largest numerical
    rank found. Raises `LoraUnsupported` naming the first module that a rank-`MAX_RANK` adapter cannot hold."""
    src = dict(source.named_modules())
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (U S, V) with ΔW (or ΔEᵀ) = U S Vᵀ
    for name, module in edited.named_modules():
        other = src.get(name)
        weight = getattr(module, "weight", None)
        if other is None or not isinstance(weight, torch.Tensor) or getattr(other, "weight", None) is None:
            continue
        delta = weight.detach().float() - other.weight.detach().float().to(weight.device)
        bias, old_bias = getattr(module, "bias", None), getattr(other, "bias", None)
        if bias is not None and old_bias is not None and not torch.equal(bias, old_bias.to(bias.device)):
            raise LoraUnsupported(f"{name}: the edit changes its bias, which a LoRA adapter cannot hold; use the "
                                  "merged export")
        if not delta.any():
            continue
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise LoraUnsupported(f"{name}: a {type(module).__name__} is changed; the LoRA export covers Linear and "
                                  "Embedding modules; use the merged export")
        mat = delta if isinstance(module, nn.Linear) else delta.T  # [out, in] or [dim, n_embeddings]
        found[name] = _low_rank(name, mat, rtol)
    if not found:
        raise LoraUnsupported("the edit changes no weight; there is nothing to put in an adapter")
    rank = max(us.shape[1] for us, _ in found.values())
    out = {}
    for name, (us, v) in found.items():
        pad = rank - us.shape[1]
        b = torch.cat([us, us.new_zeros(us.shape[0], pad)], dim=1)  # [out, r]
        a = torch.cat([v.T, v.new_zeros(pad, v.shape[0])], dim=0)  # [r, in]
        out[name] = (a.contiguous(), b.contiguous())
    return out


def _low_rank(name: str, mat: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U S [m, r], V [n, r]) of ``mat`` at its numerical rank r ≤ MAX_RANK, checked to reconstruct it."""
    q = min(MAX_RANK + 2, *mat.shape)
    devices = [mat.device] if mat.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # its random sketch: seeded, and the caller's RNG state untouched
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(mat, q=q, niter=4)
    keep = int((s > s[0] * 1e-5).sum()) if s[0] > 0 else 0
    u, s, v = u[:, :keep], s[:keep], v[:, :keep]
    err = float((mat - (u * s) @ v.T).norm() / mat.norm())
    if keep > MAX_RANK or err > rtol:
        raise LoraUnsupported(f"{name}: the edit changes it at a rank above {MAX_RANK} (relative error {err:.1e} "
                              f"at rank {keep}); the norm-preserving ablation rescales every written vector and "
                              "has no exact LoRA form; use the merged export")
    return u * s, v


def save_lora(base: nn.Module, factors: dict[str, tuple[torch.Tensor, ...]], out: Path,
              base_name: str | None = None) -> dict:
    """Write a peft LoRA adapter of ``factors`` for ``base`` to ``out`` (peft wraps ``base`` in place for the save
    and unwraps it after: it comes back as it was); returns {"rank", "modules", "embeddings", "dir"}."""
    peft = import_peft()
    rank = next(iter(factors.values()))[0].shape[0]
    embeddings = [n for n in factors if isinstance(base.get_submodule(n), nn.Embedding)]
    config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=list(factors),
                             init_lora_weights=False, base_model_name_or_path=base_name)
    wrapped = peft.get_peft_model(base, config)
    if base_name:  # peft takes the name from the model; the run's model spec (Hub id, directory or GGUF) is ours
        wrapped.peft_config["default"].base_model_name_or_path = base_name
    try:
        inner = wrapped.get_base_model()
        for name, (a, b) in factors.items():
            layer = inner.get_submodule(name)
            if name in embeddings:
                layer.lora_embedding_A["default"].data.copy_(a)
                layer.lora_embedding_B["default"].data.copy_(b)
            else:
                layer.lora_A["default"].weight.data.copy_(a)
                layer.lora_B["default"].weight.data.copy_(b)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        wrapped.save_pretrained(str(out), save_embedding_layers=False)  # the base embedding itself is unchanged
        atomic_write_text(out / "README.md", _readme(base_name, rank, list(factors), embeddings))  # peft's template out
    finally:
        wrapped.unload()  # the LoRA layers out again: ``base`` holds its own modules only
    log.info("LoRA adapter of rank %d on %d modules written to %s", rank, len(factors), out)
    return {"rank": rank, "modules": len(factors), "embeddings": embeddings, "dir": str(out)}


def _readme(base_name: str | None, rank: int, modules: list[str], embeddings: list[str]) -> str:
    tied = ("\nThe adapter edits the token embedding. If the base model ties `lm_head` to it, do not merge the "
            "adapter into the weights (`merge_and_unload`): the tied `lm_head` would change too, which the hooks do "
            "not do; load it unmerged, or use the tool's merged export, which unties them.\n" if embeddings else "")
    return f"""# LoRA adapter: the refusal direction removed (research artifact)

**For safety research and evaluation only. Not for deployment, not for upload to any model hub.**
This adapter was made by `refusal-direction`, a tool replicating and extending Arditi et al. (2024), "Refusal in
Language Models Is Mediated by a Single Direction". It removes the base model's refusal behaviour on purpose so
that this can be studied; with it the model will comply with harmful requests. Keep it private.

Base model: `{base_name or "(not recorded)"}`. Rank {rank} (scaling 1) on {len(modules)} modules: the exact
weight change of the edit chosen by `refusal-direction optimize` (each module's change has rank ≤ {rank}), checked
against the hook-based edit (logits and greedy tokens) when it was written.
{tied}
## Loading

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base_name or "BASE"}")
model = PeftModel.from_pretrained(base, "path/to/this/dir")
```
"""


def load_lora(base: nn.Module, adapter: Path) -> nn.Module:
    """A copy of ``base`` with the adapter in ``adapter`` loaded through peft, as the plain model it wraps (the
    copy costs one more model in memory: the verification needs the hooked source beside it)."""
    peft = import_peft()
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).get_base_model().eval()


__all__ = ["INSTALL", "LoraUnsupported", "MAX_RANK", "import_peft", "load_lora", "lora_factors", "save_lora"]
