"""HF's decode step against the own decode step (`accel.own_step`) on one device: seconds and token agreement.

    python benchmarks/own_step_cpu.py --model ~/.cache/refusal_direction/models/qwen2.5-coder-0.5b-instruct.gguf

Any device (CPU: float32 eager decode, where the own step's fewer kernels mean fewer PyTorch calls per step; this
says nothing about a GPU's CUDA-graph decode, which `decode_ab.py` measures). Baseline, ablation and activation
addition along a random direction at the middle block, n prompts x new tokens forced; each step timed twice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a bench shape, a model directory or a .gguf file")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    from pathlib import Path

    from refusal_direction.bench import SHAPES

    if args.model not in SHAPES and not Path(args.model).expanduser().exists():
        print(f"--model {args.model}: neither a bench shape nor an existing model path", file=sys.stderr)
        return 2
    if args.prompts < 1 or args.new_tokens < 2:
        print("--prompts must be at least 1 and --new-tokens at least 2", file=sys.stderr)
        return 2
    import torch

    from refusal_direction.accel import generate_fast_ids, prompt_ids
    from refusal_direction.bench import bench_model, synthetic_instructions
    from refusal_direction.core.interventions import ActivationAddition, Baseline, DirectionalAblation

    lm = bench_model(str(Path(args.model).expanduser()) if args.model not in SHAPES else args.model, args.device,
                     args.dtype)
    r = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0)) * 4
    conds = [Baseline(), DirectionalAblation(r), ActivationAddition(r, layer=lm.n_layers // 2)]
    prompts = prompt_ids(lm, synthetic_instructions(lm, args.prompts, 0))
    out: dict = {"model": lm.model_id, "device": str(lm.device), "dtype": str(lm.dtype), "rows": len(prompts) * 3,
                 "new_tokens": args.new_tokens}
    tokens = {}
    for step in ("hf", "own", "hf", "own"):
        t0 = time.perf_counter()
        res = generate_fast_ids(lm, prompts, conds, args.new_tokens, [], force_tokens=True, step=step, decode="eager")
        secs = time.perf_counter() - t0
        out.setdefault(step, {"seconds": [], "decode_s": []})
        out[step]["seconds"].append(round(secs, 3))
        out[step]["decode_s"].append(round(res.stats.decode_s, 3))
        out[step]["notes"] = list(res.stats.notes)
        tokens[step] = res.tokens
    out["tokens_identical"] = tokens["hf"] == tokens["own"]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
