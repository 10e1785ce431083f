"""Digests of the fast path's generated tokens on the bench's workload, to compare two versions of the code.

Builds the bench's model (a named random-weight shape with the bench's seed, or a model directory), its
synthetic prompts and its two conditions (baseline, directional ablation along the seeded random direction),
generates with the fast path forced to ``--new-tokens``, and prints, per condition, the sha256 of the token ids
(``json.dumps`` of the list of rows, as the bench's ``token_digest``). Equal digests: identical tokens.

Works against this layout (``refusal_direction.edits``) and the one before it (``refusal_direction.core.interventions``,
up to commit 69bf7a9), so a change of the edits' home can be checked token for token::

    PYTHONPATH=src python benchmarks/token_digest.py --model gemma-2b-shape --n-prompts 100 --new-tokens 512 \
        --json new.json
    git archive 69bf7a9 src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src python benchmarks/token_digest.py --model gemma-2b-shape --n-prompts 100 \
        --new-tokens 512 --json old.json

``--initializer-range 0.08`` makes the random model's completions varied (the bench's default init repeats
one token), so equal digests say more; use the same flags for both runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch


def _relative(path: str) -> str:
    """``path`` relative to the working directory (the repository root) when it lies below it."""
    from pathlib import Path

    p = Path(path).resolve()
    return str(p.relative_to(Path.cwd().resolve())) if p.is_relative_to(Path.cwd().resolve()) else p.name


def digests(tokens: dict) -> dict[str, str]:
    """sha256 of ``json.dumps`` of each condition's rows of token ids (the same bytes as the bench's digest)."""
    return {name: hashlib.sha256(json.dumps([list(map(int, r)) for r in rows]).encode()).hexdigest()
            for name, rows in tokens.items()}


def library():
    """(bench module, Baseline, DirectionalAblation, layout name) of whichever layout is importable."""
    from refusal_direction import bench

    try:
        from refusal_direction.edits import Baseline, DirectionalAblation
        layout = "edits"
    except ImportError:  # the layout before edits/ (commit 69bf7a9 and earlier)
        from refusal_direction.core.interventions import Baseline, DirectionalAblation
        layout = "core.interventions"
    return bench, Baseline, DirectionalAblation, layout


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="bench shape (tiny, gemma-2b-shape) or a model directory")
    parser.add_argument("--n-prompts", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="the bench's seed (weights, prompts, direction)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--initializer-range", type=float, default=None,
                        help="random shapes only: weight init std (the bench's default 0.02 gives degenerate "
                             "completions that repeat one token; 0.08 gives varied tokens, a stronger check)")
    parser.add_argument("--repeats", type=int, default=1, help="fast-path runs; all must give the same digests")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)

    bench, Baseline, DirectionalAblation, layout = library()
    if args.initializer_range is not None and args.model in bench.SHAPES:
        lm = bench.random_model(args.model, args.device, "auto", args.seed, initializer_range=args.initializer_range)
    else:
        lm = bench.bench_model(args.model, device=args.device, seed=args.seed)
    instructions = bench.synthetic_instructions(lm, args.n_prompts, args.seed)
    g = torch.Generator().manual_seed(args.seed)  # as run_benchmark draws its ablation direction
    conditions = [Baseline(), DirectionalAblation(torch.randn(lm.d_model, generator=g))]
    runs = []
    for _ in range(max(1, args.repeats)):
        result, seconds = bench.fast_generate(lm, instructions, conditions, args.new_tokens)
        runs.append((digests(result.tokens), seconds, result.stats.decode))
    rows = [r for v in result.tokens.values() for r in v]
    out = {"layout": layout, "module": _relative(bench.__file__), "model": lm.model_id, "device": str(lm.device),
           "dtype": str(lm.dtype).removeprefix("torch."), "n_prompts": args.n_prompts,
           "new_tokens": args.new_tokens, "seed": args.seed, "initializer_range": args.initializer_range,
           "decode": runs[0][2], "distinct_tokens_per_row": sum(len(set(r)) for r in rows) / len(rows),
           "seconds": [r[1] for r in runs], "repeats_identical": all(r[0] == runs[0][0] for r in runs),
           "token_digest": runs[0][0]}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["repeats_identical"] else 1)
