"""How far HF's own forward moves from itself in a low-precision dtype: the noise floor under selection's checks.

    python benchmarks/check_noise.py --model llama-3-8b-shape [--init 0.08] [--prompts 8]

Random weights of the shape in bf16; next-token logits of n synthetic prompts by HF's forward (no hooks) computed
as one batch, one prompt at a time, and in reverse order, then the same in float32 (the model converted in
place). Prints each one's relative error against the batch and against float32, by the checks' measure
(`selection.logits.relative_error`: the largest row's ||a - b|| / ||b - mean(b)||) and over the whole batch (the
measure benchmarks/results/h200-noise-*.json hold): what two mathematically equal bf16 computations differ by.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b-shape")
    ap.add_argument("--init", type=float, default=None, help="initializer_range (default: the config's)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    from refusal_direction.bench import SHAPES, random_model, sweep_inputs
    from refusal_direction.selection.logits import last_logits, relative_error, tokenize_each

    def rel(a, b):  # the checks' measure (largest row) and the whole batch's
        return {"row": round(relative_error(a, b), 5), "batch": round(relative_error(a, b, per_row=False), 5)}

    if args.model not in SHAPES:
        print(f"--model {args.model!r}: use one of {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    if args.prompts < 2:
        print(f"--prompts {args.prompts}: at least 2 (one at a time vs a batch)", file=sys.stderr)
        return 2
    config = {} if args.init is None else {"initializer_range": args.init}
    lm = random_model(args.model, device=args.device, dtype="bfloat16", **config)
    _, _, harmless, _ = sweep_inputs(lm, args.prompts, 0)
    seqs = tokenize_each(lm, harmless)
    with torch.inference_mode():
        batch = last_logits(lm, seqs)
        one = torch.cat([last_logits(lm, [s]) for s in seqs])
        rev = last_logits(lm, seqs[::-1]).flip(0)
        lm.model.float()
        exact = last_logits(lm, seqs)
        exact_one = torch.cat([last_logits(lm, [s]) for s in seqs])
    out = {"model": args.model, "config": config, "prompts": len(seqs), "device": str(lm.device),
           "bf16 one-at-a-time vs bf16 batch": rel(one, batch), "bf16 reversed vs bf16 batch": rel(rev, batch),
           "bf16 batch vs fp32": rel(batch, exact), "bf16 one-at-a-time vs fp32": rel(one, exact),
           "fp32 one-at-a-time vs fp32 batch": rel(exact_one, exact)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
