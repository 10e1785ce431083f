"""Run by tests/gpu/test_triton_interpret.py in a fresh process, as ``python -m tests.helpers.triton_interpret_check``
from the repository root: the sweep's Triton kernels on CPU under Triton's interpreter (TRITON_INTERPRET=1 must be
set before triton is imported, hence the separate process).

Prints one JSON object of measured differences; the test asserts on them. float32 only: the interpreter emulates
bfloat16 with its own roundings, so the bf16 bit-level checks that `fast_forward` runs on a GPU mean nothing here.
The interpreter has no libdevice (its calls return None): tanh and exp are stood in for by `tl.exp` forms, so the
GELU/SiLU arithmetic checked here is the kernel's, with those two functions approximated to float32 rounding."""

import json
import os
import sys
import types

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from refusal_direction.accel import triton_kernels as tk  # noqa: E402
from refusal_direction.accel.fast_forward import Kernels, RowInterventions, SweepDecoder  # noqa: E402
from refusal_direction.accel.fusion import fused_form, norm_eps  # noqa: E402
from tests.helpers.sweep_cases import prompt_ids, reference_logits, row_interventions, tiny_arch  # noqa: E402


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _exp(x):
    return tl.exp(x)


tk.libdevice = types.SimpleNamespace(tanh=_tanh, exp=_exp)
FORMS = {"scale_fp32": tk.NORM_SCALE_FP32, "weight_after_cast": tk.NORM_WEIGHT_AFTER_CAST}


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def kernel_diffs(lm, dec) -> dict:
    """Each kernel against the PyTorch chain it replaces, on random inputs (relative to the output's scale)."""
    g = torch.Generator().manual_seed(0)
    d = lm.d_model
    x, a = torch.randn(3, 5, d, generator=g) * 4, torch.randn(3, 5, d, generator=g)
    u = torch.randn(3, d, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    u[1] = 0
    v = torch.randn(3, d, generator=g)
    out = {}
    for norm in (dec.blocks[0].input_norm, dec.blocks[0].mid_norm, lm.final_norm):
        form = FORMS[fused_form(norm)[0]]
        for args in ((x, a, u, v, True), (x, a, u, None, False), (x, None, u, None, True), (x, a, None, None, False)):
            h_ref, n_ref = Kernels().residual(*args[:4], norm, args[4])
            h, n = tk.residual_update(*args[:4], norm.weight.detach().contiguous(), norm_eps(norm), form, args[4])
            out["residual"] = max(out.get("residual", 0.0), _max_diff(h, h_ref) / float(h_ref.abs().max()),
                                  _max_diff(n, n_ref) / float(n_ref.abs().max()))
    gate, up = torch.randn(16, 96, generator=g) * 3, torch.randn(16, 96, generator=g)
    for name, act, ref in (("gelu_tanh", tk.GELU_TANH, torch.nn.functional.gelu(gate, approximate="tanh") * up),
                           ("silu", tk.SILU, torch.nn.functional.silu(gate) * up)):
        out[name] = _max_diff(tk.act_mul(gate, up, act), ref) / float(ref.abs().max())
    n_heads, n_kv, hd = dec.n_heads, dec.n_kv, dec.head_dim
    qkv = torch.randn(2, 7, (n_heads + 2 * n_kv) * hd, generator=g) * 2
    angle = torch.arange(7).float().unsqueeze(-1) * torch.linspace(0.01, 1, hd)
    q_ref, k_ref = Kernels().rotary(qkv, angle.cos(), angle.sin(), n_heads, n_kv, hd)
    qk = tk.rotary(qkv, angle.cos(), angle.sin(), n_heads, n_kv, hd)
    out["rotary"] = max(_max_diff(qk[:, :n_heads], q_ref), _max_diff(qk[:, n_heads:], k_ref))
    block, tk.ROTARY_BLOCK = tk.ROTARY_BLOCK, 2 * hd  # four heads per program: the 5 or 6 heads (query + key)
    try:  # span two programs, the second partly masked
        qk = tk.rotary(qkv, angle.cos(), angle.sin(), n_heads, n_kv, hd)
    finally:
        tk.ROTARY_BLOCK = block
    out["rotary_split"] = max(_max_diff(qk[:, :n_heads], q_ref), _max_diff(qk[:, n_heads:], k_ref))
    out["rotary_heads"] = n_heads + n_kv
    return out


def triton_kernels(lm, dec, act: int) -> Kernels:
    """Every Triton kernel of the sweep forward in use for ``dec`` (what `Kernels.build` picks on a GPU)."""
    k = Kernels(shape=(dec.n_heads, dec.n_kv, dec.head_dim), tk=tk, triton_act=act, triton_rotary=True)
    norms = [m for b in dec.blocks for m in (b.input_norm, b.mid_norm)] + [lm.final_norm]
    k.triton_residual = {id(m): (FORMS[fused_form(m)[0]], m.weight.detach().contiguous(), norm_eps(m)) for m in norms}
    return k


def decoder_diff(lm, dec, act: int) -> dict:
    """Last-position logits with every Triton kernel in use against HF's forward with selection's hooks."""
    dec.kernels = triton_kernels(lm, dec, act)
    seqs = prompt_ids(lm)
    dirs, adds, layers = row_interventions(lm, len(seqs))
    with torch.no_grad():
        got = dec.last_logits(seqs, RowInterventions(dirs, adds, layers))
        want = reference_logits(lm, seqs, dirs, adds, layers)
        moved = _max_diff(dec.last_logits(seqs, RowInterventions()), want)
    return {"logits": _max_diff(got, want), "scale": float(want.abs().max()), "interventions_move": moved}


def main() -> None:
    result = {}
    for arch, act in (("gemma", tk.GELU_TANH), ("llama", tk.SILU), ("qwen2", tk.SILU)):
        lm = tiny_arch(arch)
        dec = SweepDecoder.for_model(lm)
        result[arch] = {**kernel_diffs(lm, dec), **decoder_diff(lm, dec, act)}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
