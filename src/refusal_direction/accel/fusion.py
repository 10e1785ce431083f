"""Fused stand-ins for small model modules on the GPU, each verified against the module it replaces.

A decode step of a 2B model at a few hundred rows is dominated not by its matrix products but by small
element-wise kernels and the gaps between them. The largest group is RMSNorm: HF computes it in float32
with about eight separate kernels (cast, square, mean, add eps, rsqrt, multiply, weight, cast back), and a
model calls it twice per block. `fused_rms_norms` swaps each RMSNorm's ``forward`` for PyTorch's fused
``F.rms_norm`` (one kernel on CUDA since torch 2.9) wrapped in the same casts, for the duration of a
``with`` block.

Nothing is assumed about a module from its name beyond "this may be an RMSNorm": two arithmetic forms are
tried and a form is used only if it reproduces the module's own output on probe inputs, in the module's
dtype and device, to within one unit in the last place of that dtype (most elements bit-identical; the
fused kernel sums the squares in a different order). A module no form reproduces is left alone.

- ``scale_fp32``: ``rms_norm(x.float()) * (1 + w).float()``, cast back (Gemma, Gemma 2/3);
- ``weight_after_cast``: ``w * rms_norm(x.float()).to(dtype)`` (Llama, Qwen2, Mistral, ...).

The second group is the rotary position embedding: HF's ``apply_rotary_pos_emb`` spends five kernels on the
queries and five on the keys (two products, a negation, a concatenation, a sum each). `fused_rotary` puts
queries and keys side by side once and rotates them together, with ``rotate_half(x) * sin`` computed as
``roll(x) * sin_signed`` (exact: only a sign moves): five kernels per layer instead of ten, with the same
roundings, so the results are bit-identical. It swaps the function in the attention module's namespace
only after checking, on probe tensors of the model's head shapes, that it is bit-identical there.

`fused_kernels` applies both. Used by the fast generation path and the selection sweep on CUDA only: on the
CPU the fused norm is not a single kernel, and the CPU tests demand bit-identical tokens from the plain path.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..core.sdpa import SDPA_NAMES, restricted_sdpa  # noqa: F401  (re-exported for accel's callers)

log = logging.getLogger(__name__)

PROBE_ROWS = 64


def norm_eps(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _forms(module: torch.nn.Module, eps: float) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Candidate fused forwards of an RMSNorm-like module (weights read once, here)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return {}
    shape = (weight.shape[0],)
    scale = (1.0 + weight.detach().float()).contiguous()  # Gemma's float32 scale, made once

    def scale_fp32(x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), shape, scale, eps).to(x.dtype)

    def weight_after_cast(x: torch.Tensor) -> torch.Tensor:
        return weight * F.rms_norm(x.float(), shape, None, eps).to(x.dtype)

    return {"scale_fp32": scale_fp32, "weight_after_cast": weight_after_cast}


def _reproduces(module: torch.nn.Module, fn: Callable, probe: torch.Tensor) -> bool:
    """Whether ``fn`` gives ``module``'s output on ``probe`` to within one ulp of its dtype, elementwise."""
    try:
        ref, out = module(probe), fn(probe)
    except Exception:  # noqa: BLE001 - a form that cannot run does not reproduce the module
        return False
    if not isinstance(ref, torch.Tensor) or ref.shape != out.shape or ref.dtype != out.dtype:
        return False
    if torch.equal(ref, out):
        return True
    if not ref.dtype.is_floating_point:
        return False
    ref32, out32 = ref.float(), out.float()
    tol = torch.finfo(ref.dtype).eps * ref32.abs() + torch.finfo(ref.dtype).tiny
    return bool(((out32 - ref32).abs() <= tol).all())


def _probe(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Hidden-state-like probe rows [PROBE_ROWS, d]: residual streams span several orders of magnitude, so the
    rows range from 1e-2 to 1e3 in scale."""
    g = torch.Generator(device="cpu").manual_seed(0)
    scales = torch.logspace(-2, 3, PROBE_ROWS, dtype=torch.float32).unsqueeze(-1)
    return (torch.randn(PROBE_ROWS, d, generator=g) * scales).to(device=device, dtype=dtype)


def fused_form(module: torch.nn.Module, probes: dict | None = None) -> tuple[str, Callable] | None:
    """(form name, fused forward) that reproduces ``module`` on probe inputs, or None. ``probes``: a dict to
    reuse probe tensors across modules of one model."""
    if not type(module).__name__.lower().endswith("rmsnorm"):
        return None
    eps = norm_eps(module)
    weight = getattr(module, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        return None
    key = (weight.shape[-1], weight.dtype, weight.device)
    probes = {} if probes is None else probes
    if key not in probes:
        probes[key] = _probe(*key)
    with torch.no_grad():
        for name, fn in _forms(module, eps).items():
            if _reproduces(module, fn, probes[key]):
                return name, fn
    return None


@contextlib.contextmanager
def fused_rms_norms(model: torch.nn.Module, enabled: bool = True,
                    device_types: tuple[str, ...] = ("cuda",)) -> Iterator[dict[str, int]]:
    """Swap every RMSNorm of ``model`` that a fused form reproduces, for the block (on ``device_types``).

    Yields {form name: modules swapped} (empty when nothing was swapped). The original ``forward`` is
    restored on exit, also on error.
    """
    swapped: list[tuple[torch.nn.Module, object]] = []
    counts: dict[str, int] = {}
    first = next(model.parameters(), None)
    if not enabled or first is None or first.device.type not in device_types:
        yield counts
        return
    probes: dict = {}
    try:
        for module in model.modules():
            form = fused_form(module, probes)
            if form is None:
                continue
            name, fn = form
            swapped.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = fn  # an instance attribute shadows the class's forward; nn.Module.__call__ uses it
            counts[name] = counts.get(name, 0) + 1
        log.debug("fused RMSNorm: %s", counts)
        yield counts
    finally:
        for module, previous in reversed(swapped):
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous


_MISSING = object()


# --------------------------------------------------------------------------------------------------
# Rotary position embedding


def _signed_sin(sin: torch.Tensor, cache: list) -> torch.Tensor:
    """sin with its first half negated, made once per sin tensor (one forward pass shares cos and sin across
    layers; the strong reference kept in ``cache`` stops the id from being reused)."""
    if cache and cache[0] is sin:
        return cache[1]
    half = sin.shape[-1] // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    cache[:] = [sin, signed]
    return signed


def make_fused_rotary(original: Callable) -> Callable:
    """A drop-in for HF's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``; other calls go to ``original``."""
    cache: list = []

    def apply_rotary_pos_emb(q, k, cos, sin, *args, unsqueeze_dim=1, **kwargs):
        if (args or kwargs or unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or q.dtype != k.dtype
                or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.shape[-1] % 2
                or cos.shape[-1] != q.shape[-1]):
            return original(q, k, cos, sin, *args, unsqueeze_dim=unsqueeze_dim, **kwargs)
        qk = torch.cat([q, k], dim=1)  # [batch, h_q + h_kv, seq, d]
        out = qk * cos.unsqueeze(1) + qk.roll(q.shape[-1] // 2, dims=-1) * _signed_sin(sin, cache).unsqueeze(1)
        return out[:, :q.shape[1]], out[:, q.shape[1]:]

    return apply_rotary_pos_emb


def _rotary_namespaces(model: torch.nn.Module) -> dict[str, object]:
    """Python modules whose ``apply_rotary_pos_emb`` the model's attention layers call."""
    out = {}
    for m in model.modules():
        if not type(m).__name__.endswith("Attention"):
            continue
        module = sys.modules.get(type(m).__module__)
        if module is not None and callable(getattr(module, "apply_rotary_pos_emb", None)):
            out[module.__name__] = module
    return out


def _rotary_reproduces(original: Callable, fused: Callable, model: torch.nn.Module) -> bool:
    """Bit-identical q and k on probe tensors of the model's head shapes, dtype and device."""
    cfg = model.config.get_text_config() if hasattr(model, "config") else None
    first = next(model.parameters(), None)
    if cfg is None or first is None:
        return False
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0))
    if not heads or not head_dim:
        return False
    g = torch.Generator().manual_seed(0)
    kw = {"device": first.device, "dtype": first.dtype}
    q = (torch.randn(3, heads, 5, head_dim, generator=g) * 4).to(**kw)
    k = (torch.randn(3, kv_heads, 5, head_dim, generator=g) * 4).to(**kw)
    angle = torch.rand(3, 5, head_dim, generator=g) * 100
    cos, sin = angle.cos().to(**kw), angle.sin().to(**kw)
    try:
        with torch.no_grad():
            ref, out = original(q, k, cos, sin), fused(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - cannot run: not reproduced
        return False
    return all(torch.equal(a, b) for a, b in zip(ref, out)) and len(ref) == len(out) == 2


@contextlib.contextmanager
def fused_rotary(model: torch.nn.Module, enabled: bool = True,
                 device_types: tuple[str, ...] = ("cuda",)) -> Iterator[int]:
    """Swap the rotary function of the model's attention modules for the block; yields how many were swapped."""
    first = next(model.parameters(), None)
    swapped: list[tuple[object, Callable]] = []
    try:
        if enabled and first is not None and first.device.type in device_types:
            for module in _rotary_namespaces(model).values():
                original = module.apply_rotary_pos_emb
                fused = make_fused_rotary(original)
                if _rotary_reproduces(original, fused, model):
                    module.apply_rotary_pos_emb = fused
                    swapped.append((module, original))
                else:
                    log.debug("rotary embedding of %s left as it is (the fused form differs)", module.__name__)
        yield len(swapped)
    finally:
        for module, original in reversed(swapped):
            module.apply_rotary_pos_emb = original


@contextlib.contextmanager
def fused_kernels(model: torch.nn.Module, enabled: bool = True,
                  device_types: tuple[str, ...] = ("cuda",)) -> Iterator[list[str]]:
    """`fused_rms_norms` and `fused_rotary` together; yields what was swapped, as notes for logs."""
    with fused_rms_norms(model, enabled, device_types) as norms, fused_rotary(model, enabled, device_types) as rot:
        notes = [f"fused RMSNorm: {name} x{n}" for name, n in norms.items()]
        if rot:
            notes.append(f"fused rotary embedding ({rot} attention module{'s' if rot > 1 else ''})")
        yield notes
