"""Does the selection sweep run its own forward on a bench shape, and how close is it to HF's forward with hooks?

    python benchmarks/sweep_forward_check.py --model llama-3-8b-shape [--layers 4] [--init 0.08] [--dtype bfloat16]

Random weights of the shape (optionally fewer blocks, another ``initializer_range``), one `score_candidates` call
on n + n synthetic prompts; prints the forward the sweep used and the checks' log lines (the relative logit error
of each check against HF's forward with hooks, and why a check failed). On CPU or GPU (the device "auto" picks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b-shape")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: the shape's)")
    ap.add_argument("--init", type=float, default=None, help="initializer_range (default: the config's 0.02)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompts", type=int, default=4, help="harmful and harmless prompts each")
    args = ap.parse_args(argv)
    from refusal_direction.bench import SHAPES

    if args.model not in SHAPES:
        print(f"--model {args.model!r}: use one of {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    if (args.layers is not None and args.layers < 1) or args.prompts < 1:
        print("--layers and --prompts must be at least 1", file=sys.stderr)
        return 2
    from refusal_direction.bench import forward_log, random_model, selection_log, sweep_forward, sweep_inputs
    from refusal_direction.selection import score_candidates

    config = {k: v for k, v in (("num_hidden_layers", args.layers), ("initializer_range", args.init)) if v is not None}
    lm = random_model(args.model, device=args.device, dtype=args.dtype, **config)
    candidates, harmful, harmless, refusal_ids = sweep_inputs(lm, args.prompts, 0)
    t0 = time.perf_counter()
    with selection_log(debug=True) as lines:
        score_candidates(lm, candidates, harmful, harmless, refusal_ids=refusal_ids)
    out = {"model": args.model, "config": config, "dtype": args.dtype, "device": str(lm.device),
           "seconds": round(time.perf_counter() - t0, 2),
           "forward": sweep_forward(lines), "log": forward_log(lines)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
