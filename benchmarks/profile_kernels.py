"""Where the GPU time of the fast paths goes: CUDA kernel time by kind, for decode steps and the selection sweep.

    python benchmarks/profile_kernels.py --model llama-3-8b-shape --out prof.json

Runs on a random-weight model of a bench shape (or a model path): (1) eager decode of ``--rows`` rows
(``--rows / 2`` prompts x 2 conditions) for ``--steps`` tokens under torch.profiler; (2) the attention of
one decode step alone, at the static cache's full length (what every CUDA-graph step reads); (3) one
selection sweep under torch.profiler. Prints kernel-time shares by kind (matmul, attention, norm /
element-wise, copy, other) and the top kernels; writes them as JSON. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

# attention before matmul: PyTorch's attention kernels carry "cutlass" in their names (fmha_cutlassF_...,
# pytorch_flash::flash_fwd_kernel<... cutlass::bfloat16_t>), which would otherwise count them as matrix products
KINDS = (("attention", ("fmha", "flash", "attention", "efficient", "softmax")),
         ("matmul", ("gemm", "cutlass", "sm90", "nvjet", "cublas", "splitk")),
         ("copy", ("copy", "memcpy", "memset", "cat", "index")),
         ("norm/elementwise", ("elementwise", "reduce", "norm", "triton", "mul", "add", "vectorized")))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def kernel_table(prof, top: int = 15) -> dict:
    """CUDA kernel seconds by kind and the ``top`` kernels, from a finished torch.profiler run."""
    by_name: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if getattr(ev, "device_type", None) is not None and str(ev.device_type).endswith("CUDA") and ev.device_time:
            by_name[ev.name] += ev.device_time / 1e6
            counts[ev.name] += 1
    kinds: dict[str, float] = defaultdict(float)
    for name, s in by_name.items():
        kinds[kind_of(name)] += s
    total = sum(by_name.values())
    rows = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"total_s": total, "by_kind": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:110], "s": round(s, 4), "calls": counts[n]} for n, s in rows]}


def show(title: str, table: dict) -> None:
    print(f"\n== {title}: {table['total_s']:.3f} s of kernels")
    for k, v in table["by_kind"].items():
        print(f"  {k:<18}{v:8.3f} s  {100 * v / max(table['total_s'], 1e-12):5.1f} %")
    for row in table["top"]:
        print(f"    {row['s']:8.4f} s  x{row['calls']:<6} {row['name']}")


def profile_decode(lm, rows: int, steps: int, step: str = "hf") -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from refusal_direction.accel import generate_fast_ids, prompt_ids
    from refusal_direction.bench import bench_conditions, synthetic_instructions

    prompts = prompt_ids(lm, synthetic_instructions(lm, rows // 2, 0))
    conds = bench_conditions(lm)
    generate_fast_ids(lm, prompts, conds, 4, [], force_tokens=True, decode="eager", step=step)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate_fast_ids(lm, prompts, conds, steps, [], force_tokens=True, decode="eager", step=step)
        torch.cuda.synchronize()
    table = kernel_table(prof)
    t0 = time.perf_counter()
    res = generate_fast_ids(lm, prompts, conds, steps, [], force_tokens=True, decode="cuda-graph", step=step)
    torch.cuda.synchronize()
    table["graph_wall_s"] = time.perf_counter() - t0
    table["step"], table["notes"] = step, list(res.stats.notes)
    table["graph_decode_s_per_step"] = res.stats.decode_s / max(res.stats.steps - 1, 1)
    table["prompt_len"] = res.stats.prompt_len
    return table


def time_attention(lm, rows: int, cache_len: int, repeats: int = 20) -> dict:
    """One decode step's SDPA (folded GQA, padding mask) at the full static cache length, per layer and per step."""
    import torch

    cfg = lm.model.config.get_text_config()
    h_q, h_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h_q
    dev, dt = lm.device, lm.dtype
    q = torch.randn(rows, h_kv, h_q // h_kv, d, device=dev, dtype=dt)
    k = torch.randn(rows, h_kv, cache_len, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    mask = torch.zeros(rows, 1, h_q // h_kv, cache_len, device=dev, dtype=dt)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, backend in (("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        with sdpa_kernel([backend]):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(repeats):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            torch.cuda.synchronize()
        out[name + "_s_per_layer"] = (time.perf_counter() - t0) / repeats
    kv_bytes = 2 * k.numel() * k.element_size()
    out.update(rows=rows, cache_len=cache_len, kv_bytes_per_layer=kv_bytes, layers=lm.n_layers,
               efficient_GBps=kv_bytes / out["efficient_s_per_layer"] / 1e9,
               efficient_s_per_step=out["efficient_s_per_layer"] * lm.n_layers)
    return out


def profile_sweep(lm, n: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from refusal_direction.bench import forward_log, selection_log, sweep_inputs
    from refusal_direction.selection import score_candidates

    candidates, harmful, harmless, refusal_ids = sweep_inputs(lm, n, 0)
    with selection_log() as lines:  # which forward the sweep runs (the own one falls back if its check fails)
        score_candidates(lm, candidates, harmful, harmless, refusal_ids=refusal_ids)  # warm-up (cold call)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        score_candidates(lm, candidates, harmful, harmless, refusal_ids=refusal_ids)
        torch.cuda.synchronize()
    table = kernel_table(prof)
    table["wall_s_profiled"] = time.perf_counter() - t0
    table["forward_log"] = forward_log(lines)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b-shape")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--cache-len", type=int, default=567)
    ap.add_argument("--sweep-prompts", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from refusal_direction.bench import gpu_script_problem

    problem = gpu_script_problem(args.model, "profile_kernels.py (torch.profiler's CUDA kernel times)")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from refusal_direction.bench import SHAPES, bench_model, random_model

    lm = random_model(args.model, initializer_range=0.08) if args.model in SHAPES else bench_model(args.model)
    result = {"model": lm.model_id}
    result["decode"] = profile_decode(lm, args.rows, args.steps)
    show(f"decode, {args.rows} rows x {args.steps} steps (eager)", result["decode"])
    print("  graph decode per step: %.2f ms" % (1e3 * result["decode"]["graph_decode_s_per_step"]))
    result["decode_own_step"] = profile_decode(lm, args.rows, args.steps, step="own")
    show(f"decode on the own step, {args.rows} rows x {args.steps} steps (eager)", result["decode_own_step"])
    print("  graph decode per step: %.2f ms" % (1e3 * result["decode_own_step"]["graph_decode_s_per_step"]))
    result["attention"] = time_attention(lm, args.rows, args.cache_len)
    print("\n== attention alone:", json.dumps(result["attention"]))
    result["sweep"] = profile_sweep(lm, args.sweep_prompts)
    show("selection sweep", result["sweep"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
