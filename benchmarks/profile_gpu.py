"""Where the GPU time goes: kernel profiles of the fast path's decode step and of the selection sweep at
gemma-2b-it's exact shape (random weights, bf16), with and without the fused RMSNorms, plus sweep timings
for a few batch sizes.

Usage (GPU machine): PYTHONPATH=src python3 benchmarks/profile_gpu.py [--json out.json]. Prints one JSON object.
Decode: kernels of ``steps`` eager decode steps = profile(prefill + 4 + steps) - profile(prefill + 4), so the
prefill cancels; the CUDA-graph step time is the fast path's own decode time over its steps.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from refusal_direction.accel.fast_generation import generate_fast_ids, prompt_ids
from refusal_direction.accel.fusion import fused_form
from refusal_direction.bench import random_model, sweep_inputs, synthetic_instructions
from refusal_direction.core.interventions import Baseline, DirectionalAblation
from refusal_direction.selection import score_candidates

CATEGORIES = [  # first match wins
    ("attention", r"fmha|flash|attention|cudnn|sdpa"),
    ("matmul", r"gemm|gemv|cutlass|xmma|nvjet|sm90|splitk|dot"),
    ("norm", r"rms|norm"),
    ("reduce", r"reduce|argmax|max_kernel"),
    ("copy/index", r"copy|memcpy|memset|index|cat|gather|scatter|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
]


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, pat in CATEGORIES if re.search(pat, low)), "other")


def kernels(fn) -> dict[str, list[float]]:
    """Kernel name -> list of durations (µs) of every CUDA kernel launched by ``fn`` (empty without CUDA)."""
    if not torch.cuda.is_available():
        fn()
        return {}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name].append(e.device_time if hasattr(e, "device_time") else e.cuda_time)
    return out


def summarize(k: dict[str, list[float]], per: float = 1.0, top: int = 12) -> dict:
    cats = defaultdict(lambda: [0, 0.0])
    for name, ds in k.items():
        c = cats[category(name)]
        c[0] += len(ds)
        c[1] += sum(ds)
    total_n, total_us = sum(len(d) for d in k.values()), sum(sum(d) for d in k.values())
    biggest = sorted(k.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"kernels": round(total_n / per, 1), "kernel_ms": round(total_us / per / 1e3, 3),
            "by_category": {c: {"kernels": round(n / per, 1), "ms": round(us / per / 1e3, 3)}
                            for c, (n, us) in sorted(cats.items(), key=lambda kv: -kv[1][1])},
            "top": [{"name": n[:110], "calls": round(len(d) / per, 1), "ms": round(sum(d) / per / 1e3, 3)}
                    for n, d in biggest]}


def diff(a: dict, b: dict) -> dict:
    """Kernels in ``a`` minus kernels in ``b`` (per name, by count; durations of the extra calls)."""
    out = {}
    for name, ds in a.items():
        extra = len(ds) - len(b.get(name, []))
        if extra > 0:
            out[name] = sorted(ds)[len(ds) - extra:] if extra < len(ds) else ds
    return out


def norm_agreement(lm) -> dict:
    """For every RMSNorm: its fused form and the share of bit-identical outputs on hidden-state-like inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, lm.d_model, generator=g) * torch.logspace(-1, 2, 200)[:, None]
    x = x.to(device=lm.device, dtype=lm.dtype)
    forms, same, worst = defaultdict(int), [], 0.0
    for m in lm.model.modules():
        form = fused_form(m)
        if form is None:
            continue
        forms[form[0]] += 1
        with torch.no_grad():
            ref, out = m(x), form[1](x)
        same.append(float((ref == out).float().mean()))
        worst = max(worst, float(((ref.float() - out.float()).abs() / ref.float().abs().clamp_min(1e-30)).max()))
    return {"forms": dict(forms), "min_share_identical": min(same, default=None),
            "mean_share_identical": sum(same) / len(same) if same else None, "max_relative_difference": worst}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--shape", default="gemma-2b-shape")  # "tiny" on CPU: a smoke test of this script
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--selection-only", action="store_true", help="profile the selection sweep only, both passes")
    args = ap.parse_args()
    lm = random_model(args.shape)
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    out: dict = {"device": torch.cuda.get_device_name() if lm.device.type == "cuda" else "cpu",
                 "torch": torch.__version__,
                 "norms": norm_agreement(lm)}

    if args.selection_only:
        return report(selection_profiles(lm, sync), args.json)
    prompts = prompt_ids(lm, synthetic_instructions(lm, 100, 0))
    ivs = [Baseline(), DirectionalAblation(torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0)))]
    base = 4
    for fuse in (True, False):
        def run(n, mode="eager", fuse=fuse):
            return generate_fast_ids(lm, prompts, ivs, n, [], force_tokens=True, decode=mode, fuse=fuse)

        run(base + args.steps)  # warm-up
        step = diff(kernels(lambda: run(base + args.steps)), kernels(lambda: run(base)))
        res = run(args.new_tokens, "auto")
        res = run(args.new_tokens, "auto")
        out[f"decode fuse={fuse}"] = {
            "graph_ms_per_step": round(res.stats.decode_s / (res.stats.steps - 3) * 1e3, 3),
            "graph_decode_s": round(res.stats.decode_s, 3), "prefill_s": round(res.stats.prefill_s, 3),
            "eager_kernels_per_step": summarize(step, per=args.steps, top=30)}

    cands, harmful, harmless, ids = sweep_inputs(lm, 32, 0)

    def sweep(**kw):
        score_candidates(lm, cands, harmful, harmless, refusal_ids=ids, **kw)

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return round(time.perf_counter() - t, 3)

    out["selection cold_s"] = timed(sweep)
    timings = {}
    for fuse in (True, False):
        for rows in (256, 512, 1024):
            kw = {"fuse": fuse, "max_batch_rows": rows}
            sweep(**kw)
            timings[f"fuse={fuse} max_batch_rows={rows}"] = [timed(lambda kw=kw: sweep(**kw)) for _ in range(2)]
    out["selection warm_s"] = timings
    out["selection profile (defaults)"] = summarize(kernels(sweep), top=20)
    report(out, args.json)


def report(out: dict, path: str | None) -> None:
    text = json.dumps(out, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)


def selection_profiles(lm, sync) -> dict:
    """The sweep through the sweep forward and through HF's forward with hooks: warm times and kernel profiles."""
    cands, harmful, harmless, ids = sweep_inputs(lm, 32, 0)
    out: dict = {"device": torch.cuda.get_device_name() if lm.device.type == "cuda" else "cpu"}
    for fast in (True, False):
        def sweep(fast=fast):
            score_candidates(lm, cands, harmful, harmless, refusal_ids=ids, fast_forward=fast)

        sweep()
        times = []
        for _ in range(3):
            sync()
            t = time.perf_counter()
            sweep()
            sync()
            times.append(round(time.perf_counter() - t, 3))
        out[f"fast_forward={fast}"] = {"warm_s": times, "profile": summarize(kernels(sweep), top=25)}
    return out


if __name__ == "__main__":
    main()
