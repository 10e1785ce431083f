"""A/B of the fast path's decode on a bench shape: the same forced workload with the fused kernels (RMSNorm,
rotary, Triton decode attention), without them, and on the own decode step (`accel.own_step`), wall seconds and
per-step decode, token agreement, plus the generation floor.

    python benchmarks/decode_ab.py --model llama-3-8b-shape --n-prompts 100 --new-tokens 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def attention_alone(lm, rows: int = 200, length: int = 567, filled: int = 300) -> dict:
    """One layer's decode attention, ms: SDPA (memory-efficient) vs the kernel at several tile settings, on a
    static cache of ``length`` slots of which the first ``filled`` are written."""
    import torch

    from refusal_direction.accel.decode_attention import decode_attention

    cfg = lm.model.config.get_text_config()
    h_q, h_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // h_q
    q = torch.randn(rows, h_kv, h_q // h_kv, dim, device="cuda", dtype=lm.dtype)
    k, v = (torch.randn(rows, h_kv, length, dim, device="cuda", dtype=lm.dtype) for _ in range(2))
    mask = (torch.arange(length, device="cuda") < filled).expand(rows, length)[:, None, None].contiguous()

    def ms(fn, repeats=20):  # inside a CUDA graph, as the decode step runs it: no launch overhead
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t0) / repeats

    out = {"sdpa": ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
           "bytes_filled": 2 * rows * h_kv * filled * dim * lm.dtype.itemsize}
    for block_n in (32, 64, 128):
        for warps in (2, 4):
            for stages in (2, 3):
                key = f"kernel_n{block_n}_w{warps}_s{stages}"
                try:
                    out[key] = ms(lambda n=block_n, w=warps, s=stages: decode_attention(
                        q, k, v, mask, dim ** -0.5, block_n=n, num_warps=w, num_stages=s))
                except Exception as exc:  # noqa: BLE001 - a setting the GPU cannot compile
                    out[key] = f"{type(exc).__name__}"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b-shape")
    ap.add_argument("--n-prompts", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from refusal_direction.bench import gpu_script_problem

    problem = gpu_script_problem(args.model, "decode_ab.py")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import torch

    from refusal_direction.accel import generate_fast_ids, prompt_ids
    from refusal_direction.bench import (
        SHAPES,
        bench_conditions,
        generation_floor,
        measure_ceilings,
        random_model,
        synthetic_instructions,
    )

    if args.model not in SHAPES:
        print(f"--model {args.model!r}: use one of {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    lm = random_model(args.model, initializer_range=0.08)
    prompts = prompt_ids(lm, synthetic_instructions(lm, args.n_prompts, 0))
    conds = bench_conditions(lm)
    out = {"model": lm.model_id, "rows": args.n_prompts * len(conds), "new_tokens": args.new_tokens}
    runs = (("fused", True, "hf"), ("unfused", False, "hf"), ("fused_repeat", True, "hf"), ("own", True, "own"),
            ("own_repeat", True, "own"))
    for name, fuse, step in runs:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = generate_fast_ids(lm, prompts, conds, args.new_tokens, [], force_tokens=True, fuse=fuse, step=step)
        torch.cuda.synchronize()
        out[name] = {"seconds": time.perf_counter() - t0, "decode_s": res.stats.decode_s,
                     "prefill_s": res.stats.prefill_s, "notes": list(res.stats.notes)}
        out.setdefault("tokens", {})[name] = res.tokens
    def agreement(a: str, b: str) -> float:
        same = sum(x == y for c in conds for ra, rb in zip(out["tokens"][a][c.name], out["tokens"][b][c.name])
                   for x, y in zip(ra, rb))
        return same / (out["rows"] * args.new_tokens)

    out["token_agreement_fused_vs_unfused"] = agreement("fused", "unfused")
    out["token_agreement_own_vs_hf_step"] = agreement("fused", "own")
    out["repeat_identical"] = out["tokens"]["fused"] == out["tokens"]["fused_repeat"]
    del out["tokens"]
    floor = generation_floor(lm, out["rows"], max(len(p) for p in prompts), args.new_tokens,
                             measure_ceilings(lm.device))
    out["floor_s"] = floor["seconds"]
    out["floor_ratio"] = out["fused_repeat"]["seconds"] / floor["seconds"]
    out["own_floor_ratio"] = out["own_repeat"]["seconds"] / floor["seconds"]
    out["attention_alone"] = attention_alone(lm)
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
