"""Time the full selection sweep at gemma-2b-it's exact shape (random weights, bf16): first call, then warm.

Usage (GPU machine): PYTHONPATH=src python3 benchmarks/selection_gpu.py [--sdpa efficient,math | --sdpa default]
[--no-share-prefix] [--no-share-opening] [--no-fuse] [--no-fast-forward] [--compare]. One setting per process, since
only the process's first call is cold. ``--compare`` then scores the same sweep through HF's forward with hooks (the
reference path) and prints how far the scores are apart. Prints one JSON object. 90 candidates (5 positions x 18
layers), 32 harmful + 32 harmless synthetic prompts with JailbreakBench-like lengths. ``--sdpa default`` is torch's
own kernel choice; without ``--sdpa`` the package's default is used.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from refusal_direction.bench import random_model, time_selection


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdpa", help="comma-separated SDPA backends, or 'default' for torch's pick")
    ap.add_argument("--no-share-prefix", action="store_true")
    ap.add_argument("--no-share-opening", action="store_true")
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--no-fast-forward", action="store_true")
    ap.add_argument("--compare", action="store_true", help="also score through the reference path; print the gap")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # kernels chosen, paths taken
    options: dict = {}
    if args.sdpa:
        options["sdpa"] = None if args.sdpa == "default" else tuple(args.sdpa.split(","))
    for flag, key in ((args.no_share_prefix, "share_prefix"), (args.no_share_opening, "share_opening"),
                      (args.no_fuse, "fuse"), (args.no_fast_forward, "fast_forward")):
        if flag:
            options[key] = False
    lm = random_model("gemma-2b-shape", device="cuda")
    r = time_selection(lm, 32, 0, repeats=2, **options)
    out = {"device": torch.cuda.get_device_name(), "options": {k: v for k, v in options.items()},
           "candidates": r["candidates"], "prompts": r["prompts"], "first_call_s": round(r["cold_s"], 3),
           "warm_s": [round(x, 3) for x in r["warm_s"]]}
    if args.compare:
        out["compare"] = compare(lm, options)
    print(json.dumps(out, indent=2))


def compare(lm, options: dict) -> dict:
    """Scores of this setting vs the reference path (HF forward with hooks) on the same sweep."""
    from refusal_direction.bench import sweep_inputs
    from refusal_direction.selection import score_candidates

    candidates, harmful, harmless, ids = sweep_inputs(lm, 32, 0)
    got = score_candidates(lm, candidates, harmful, harmless, refusal_ids=ids, **options)
    ref = score_candidates(lm, candidates, harmful, harmless, refusal_ids=ids, **{**options, "fast_forward": False})
    # bfloat16 noise floor: the reference path against itself with other batches (other GEMM tilings, padding)
    alt = score_candidates(lm, candidates, harmful, harmless, refusal_ids=ids,
                           **{**options, "fast_forward": False, "max_batch_rows": 200})
    return {"this_vs_reference": gaps(got, ref), "reference_vs_reference_other_batches": gaps(alt, ref)}


def gaps(got, ref) -> dict:
    out = {}
    for name in ("bypass", "induce", "kl"):
        a = torch.tensor([getattr(s, name) for s in got], dtype=torch.float64)
        b = torch.tensor([getattr(s, name) for s in ref], dtype=torch.float64)
        ok = ~(a.isnan() | b.isnan())
        a, b = a[ok], b[ok]
        rank = lambda v: v.argsort().argsort().double()  # noqa: E731
        ra, rb = rank(a) - rank(a).mean(), rank(b) - rank(b).mean()
        out[name] = {"max_abs_diff": float((a - b).abs().max()), "ref_range": float(b.max() - b.min()),
                     "spearman": float((ra * rb).sum() / (ra.norm() * rb.norm())), "n": int(ok.sum())}
    best = lambda scores: min((s for s in scores if s.bypass == s.bypass), key=lambda s: s.bypass)  # noqa: E731
    out["lowest_bypass_same"] = (best(got).position, best(got).layer) == (best(ref).position, best(ref).layer)
    return out


if __name__ == "__main__":
    main()
