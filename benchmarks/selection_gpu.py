"""Time the full selection sweep at gemma-2b-it's exact shape (random weights, bf16), cold and warm.

Usage (GPU machine): python benchmarks/selection_gpu.py. Prints one JSON object. 90 candidates
(5 positions x 18 layers), 32 harmful + 32 harmless synthetic prompts with JailbreakBench-like lengths.
"""

from __future__ import annotations

import json
import time

import torch

from refusal_direction.bench import random_model, sweep_inputs
from refusal_direction.selection import score_candidates


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round(time.perf_counter() - t, 3)


def main() -> None:
    lm = random_model("gemma-2b-shape", device="cuda")
    cands, harmful, harmless, ids = sweep_inputs(lm, 32, 0)
    out = {"device": torch.cuda.get_device_name(), "candidates": lm.n_post_instruction * lm.n_layers,
           "prompts": "32+32"}
    for share in (True, False):
        def run(share=share):
            score_candidates(lm, cands, harmful, harmless, refusal_ids=ids, share_prefix=share)

        out[f"share_prefix={share}"] = {"cold_s": timed(run), "warm_s": [timed(run), timed(run)]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
