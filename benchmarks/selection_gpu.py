"""Time the full selection sweep at gemma-2b-it's exact shape (random weights, bf16): first call, then warm.

Usage (GPU machine): PYTHONPATH=src python3 benchmarks/selection_gpu.py [--sdpa efficient,math | --sdpa default]
[--no-share-prefix] [--no-share-opening] [--no-fuse]. One setting per process, since only the process's first
call is cold. Prints one JSON object. 90 candidates (5 positions x 18 layers), 32 harmful + 32 harmless
synthetic prompts with JailbreakBench-like lengths. ``--sdpa default`` is torch's own kernel choice; without
``--sdpa`` the package's default is used.
"""

from __future__ import annotations

import argparse
import json

import torch

from refusal_direction.bench import random_model, time_selection


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdpa", help="comma-separated SDPA backends, or 'default' for torch's pick")
    ap.add_argument("--no-share-prefix", action="store_true")
    ap.add_argument("--no-share-opening", action="store_true")
    ap.add_argument("--no-fuse", action="store_true")
    args = ap.parse_args()
    options: dict = {}
    if args.sdpa:
        options["sdpa"] = None if args.sdpa == "default" else tuple(args.sdpa.split(","))
    for flag, key in ((args.no_share_prefix, "share_prefix"), (args.no_share_opening, "share_opening"),
                      (args.no_fuse, "fuse")):
        if flag:
            options[key] = False
    lm = random_model("gemma-2b-shape", device="cuda")
    r = time_selection(lm, 32, 0, repeats=2, **options)
    print(json.dumps({"device": torch.cuda.get_device_name(), "options": {k: v for k, v in options.items()},
                      "candidates": r["candidates"], "prompts": r["prompts"], "first_call_s": round(r["cold_s"], 3),
                      "warm_s": [round(x, 3) for x in r["warm_s"]]}, indent=2))


if __name__ == "__main__":
    main()
