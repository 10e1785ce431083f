"""A model across several GPUs (issue 19): each stage's time and peak memory per GPU, with the device map.

    python benchmarks/multi_gpu.py --model llama-3-70b-shape --device-map auto --out multi.json \
        [--max-memory 0=130GiB,1=130GiB] [--n-prompts 100 --new-tokens 512] [--export-dir /big/disk/dir]

Random weights of a bench shape, built empty and filled on the devices accelerate's map gives them
(`bench.dispatched`); then, each timed with every GPU synchronised and its peak allocation recorded:
extraction (mean block inputs of n + n prompts), the selection sweep through HF's forward with hooks (the own
forward needs one device), greedy generation of n prompts x new tokens for baseline and directional ablation
through HF generate (forced to the full length), and, with ``--export-dir``, the model saved as a safetensors
checkpoint there and orthogonalized shard by shard (`export --streaming`'s code; a 70B checkpoint needs ~2 x 141 GB
of disk). ``--device-map FILE.json`` takes an explicit map (module name -> GPU index, "cpu" or "disk"; disk needs
``--offload-folder``); on a machine without GPUs such a map makes the same run on CPU and disk (a dry run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def timed(name: str, out: dict, fn):
    """Run ``fn()`` as stage ``name``: seconds and peak GiB per GPU into ``out["stages"][name]``; its result."""
    from refusal_direction.bench.dispatched import peak_memory, reset_peak_memory

    _sync()
    reset_peak_memory()
    t0 = time.perf_counter()
    result = fn()
    _sync()
    out["stages"][name] = {"seconds": round(time.perf_counter() - t0, 3), "peak_GiB": peak_memory()}
    print(f"{name}: {out['stages'][name]}", flush=True)
    return result


def generation(lm, n_prompts: int, new_tokens: int, batch_size: int) -> dict:
    """Baseline and ablation along a random direction, HF generate (the model is dispatched), forced length."""
    import torch

    from refusal_direction.bench import no_stop_tokens, synthetic_instructions
    from refusal_direction.core.decoding import GenerationSettings
    from refusal_direction.edits import Baseline, DirectionalAblation
    from refusal_direction.generation import generate_all

    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1))
    settings = GenerationSettings(max_new_tokens=new_tokens, batch_size=batch_size)
    with no_stop_tokens(lm.model):
        out = generate_all(lm, synthetic_instructions(lm, n_prompts, 0), [Baseline(), DirectionalAblation(direction)],
                           settings)
    return {name: sum(len(g.token_ids) for g in gens) for name, gens in out.items()}


def export(lm, directory: str) -> dict:
    """Save the model as a sharded safetensors checkpoint in DIR/source, then stream-orthogonalize it to DIR/edited."""
    from pathlib import Path

    import torch

    from refusal_direction.core.directions import Direction
    from refusal_direction.export.stream import export_streaming

    root = Path(directory)
    src = root / "source"
    t0 = time.perf_counter()
    lm.model.save_pretrained(src, max_shard_size="5GB")
    saved = time.perf_counter() - t0
    vector = torch.randn(lm.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    direction = Direction(vector, lm.n_layers // 2, -1)
    t1 = time.perf_counter()
    export_streaming(str(src), direction, root / "edited", force=True)
    return {"save_s": round(saved, 3), "stream_export_s": round(time.perf_counter() - t1, 3),
            "shards": len(list(src.glob("*.safetensors")))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-70b-shape")
    ap.add_argument("--device-map", default="auto", help="auto | balanced | balanced_low_0 | sequential | FILE.json")
    ap.add_argument("--max-memory", default=None, help="e.g. 0=130GiB,1=130GiB")
    ap.add_argument("--offload-folder", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n-extract", type=int, default=128, help="harmful and harmless prompts each, extraction")
    ap.add_argument("--sweep-prompts", type=int, default=32, help="harmful and harmless prompts each, the sweep")
    ap.add_argument("--sweep-layers", default=None, help="comma-separated layers to sweep (default: all)")
    ap.add_argument("--n-prompts", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32, help="generation batch (HF generate)")
    ap.add_argument("--export-dir", default=None, help="save + stream-export the checkpoint here (optional)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from refusal_direction.bench import SHAPES
    from refusal_direction.errors import UserError

    if args.model not in SHAPES:
        print(f"--model {args.model!r}: use one of {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    for flag, value in (("--n-extract", args.n_extract), ("--sweep-prompts", args.sweep_prompts),
                        ("--n-prompts", args.n_prompts), ("--new-tokens", args.new_tokens),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            print(f"{flag} {value}: must be at least 1", file=sys.stderr)
            return 2
    try:
        layers = None if args.sweep_layers is None else [int(x) for x in args.sweep_layers.split(",")]
    except ValueError:
        print(f"--sweep-layers {args.sweep_layers!r}: use comma-separated layer indices, e.g. 0,40,79", file=sys.stderr)
        return 2
    try:
        return run(args, layers)
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        return 2


def run(args, layers) -> int:
    import torch

    from refusal_direction.bench import time_activations, time_selection
    from refusal_direction.bench.dispatched import random_dispatched_model
    from refusal_direction.core.placement import parse_device_map, parse_max_memory

    device_map = parse_device_map(args.device_map)
    max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    out: dict = {"command": "python benchmarks/multi_gpu.py " + " ".join(sys.argv[1:]), "model": args.model,
                 "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                 if torch.cuda.is_available() else [], "stages": {}}
    lm = timed("build", out, lambda: random_dispatched_model(args.model, device_map, max_memory, args.dtype,
                                                             args.offload_folder))
    out["placement"] = lm.placement or "one device"
    out["device_map"] = {str(k): str(v) for k, v in lm.model.hf_device_map.items()}
    extraction = timed("extraction", out, lambda: time_activations(lm, args.n_extract))
    out["stages"]["extraction"]["detail"] = extraction
    sweep = timed("sweep", out, lambda: time_selection(lm, args.sweep_prompts, repeats=0,
                                                       **({"layers": layers} if layers else {})))
    out["stages"]["sweep"]["detail"] = {k: sweep[k] for k in ("candidates", "prompts", "forward", "log")}
    tokens = timed("generation", out, lambda: generation(lm, args.n_prompts, args.new_tokens, args.batch_size))
    out["stages"]["generation"]["tokens"] = tokens
    if args.export_dir:
        detail = timed("export", out, lambda: export(lm, args.export_dir))
        out["stages"]["export"]["detail"] = detail
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
