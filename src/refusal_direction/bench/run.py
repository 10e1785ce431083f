"""The benchmark run: every timed workload in order, one JSON-able result, and its plain-text report."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from ..accel import prompt_ids
from ..core.model import LoadedModel
from ..edits import Baseline, DirectionalAblation, Intervention
from ..errors import UserError
from .generation import agreement, fast_generate, fast_variants, paper_generate, time_fast, time_paper, token_digests
from .stages import time_activations, time_selection
from .synthetic import bench_model, synthetic_instructions
from .timing import generation_floor, measure_ceilings

log = logging.getLogger(__name__)


def describe_environment(lm: LoadedModel) -> dict:
    import transformers

    device = lm.device
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "device_type": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "dtype": str(lm.dtype).removeprefix("torch."), "dtype_reason": lm.dtype_reason}


@torch.no_grad()
def run_benchmark(
    lm_or_config: str | LoadedModel = "tiny",
    n_prompts: int = 100,
    new_tokens: int = 512,
    paper_batches: int = 2,
    paper_batch_size: int = 8,
    activation_prompts: int = 128,
    selection_prompts: int = 32,
    seed: int = 0,
    device: str = "auto",
    eager_check: bool = True,
    compile_check: bool = False,
    fast_options: dict | None = None,
) -> dict:
    """Time the paper's generation and the fast path on the same synthetic workload; see the package doc.

    ``fast_options``: keyword arguments for `generate_fast_ids` (e.g. ``sdpa_backends``), recorded in the result.
    """
    fast_options = dict(fast_options or {})
    if n_prompts < 1 or new_tokens < 1 or paper_batches < 1:
        raise UserError(f"n_prompts={n_prompts}, new_tokens={new_tokens}, paper_batches={paper_batches}: "
                        "each must be at least 1")
    lm = bench_model(lm_or_config, device=device, seed=seed)
    instructions = synthetic_instructions(lm, n_prompts, seed)
    lengths = [len(p) for p in prompt_ids(lm, instructions)]
    conditions = bench_conditions(lm, seed)
    n_tokens = n_prompts * new_tokens * len(conditions)
    result = describe_workload(lm, conditions, n_prompts, new_tokens, lengths)
    log.info("bench: %s on %s, %d prompts x %d conditions x %d tokens", lm.model_id,
             result["environment"]["device"], n_prompts, len(conditions), new_tokens)

    # Warm-up (kernels, cuBLAS handles) for both paths, on a few tokens.
    paper_generate(lm, instructions[:paper_batch_size], conditions[1], 2, paper_batch_size, 1)
    fast_generate(lm, instructions[:2], conditions, 4)

    paper, paper_tokens = time_paper(lm, instructions, conditions, new_tokens, paper_batch_size, paper_batches,
                                     n_tokens)
    result["paper"] = paper
    fast, runs = time_fast(lm, instructions, conditions, new_tokens, fast_options, n_tokens)
    result["fast"] = fast
    result["speedup"] = paper["seconds"] / fast["first"]["seconds"]
    result["speedup_repeat"] = paper["seconds"] / fast["repeat"]["seconds"]
    result["fast_repeat_identical"] = runs["first"].tokens == runs["repeat"].tokens
    result["token_digest"] = token_digests(runs["first"].tokens)  # compare across runs / code versions
    rows = [r for v in runs["first"].tokens.values() for r in v]
    result["distinct_tokens_per_row"] = sum(len(set(r)) for r in rows) / len(rows)  # ~1: degenerate (repeats)

    # Token agreement of the two paths on the prompts the paper's approach ran.
    n_ref = len(next(iter(paper_tokens.values())))
    result["agreement"] = {c.name: agreement(paper_tokens[c.name], runs["first"].tokens[c.name][:n_ref])
                           for c in conditions}
    result.update(fast_variants(lm, instructions, conditions, new_tokens, fast_options, runs["first"], n_tokens,
                                eager_check, compile_check))

    ceilings = measure_ceilings(lm.device)
    result["ceilings"] = ceilings
    result["floor"] = generation_floor(lm, n_prompts * len(conditions), max(lengths), new_tokens, ceilings)
    result["floor_ratio"] = fast["first"]["seconds"] / result["floor"]["seconds"]
    if "own_step" in result:
        # the repeat call: the first builds the shared decoder and checks its Triton kernels (the HF step's first
        # call follows a warm-up instead)
        result["own_step"]["floor_ratio"] = result["own_step"]["repeat_seconds"] / result["floor"]["seconds"]

    result["activations"] = time_activations(lm, activation_prompts, seed)
    result["selection"] = time_selection(lm, selection_prompts, seed, ceilings=ceilings)
    # the same sweep through HF's forward with per-row hooks (the reference path), for comparison
    result["selection_hf_forward"] = time_selection(lm, selection_prompts, seed, repeats=2, fast_forward=False)
    return result


def bench_conditions(lm: LoadedModel, seed: int = 0) -> list[Intervention]:
    """The benchmark's two conditions: baseline, and directional ablation along a random direction (``seed``)."""
    g = torch.Generator().manual_seed(seed)
    return [Baseline(), DirectionalAblation(torch.randn(lm.d_model, generator=g))]


def describe_workload(lm: LoadedModel, conditions: list[Intervention], n_prompts: int, new_tokens: int,
                      lengths: list[int]) -> dict:
    """The result's first sections: environment, model and workload."""
    return {
        "environment": describe_environment(lm),
        "model": {"name": lm.model_id, "params": sum(p.numel() for p in lm.model.parameters()),
                  "n_layers": lm.n_layers, "d_model": lm.d_model},
        "workload": {"n_prompts": n_prompts, "conditions": [c.name for c in conditions], "new_tokens": new_tokens,
                     "tokens": n_prompts * new_tokens * len(conditions), "forced": True,
                     "prompt_tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}},
    }


def bench_main(model: str = "tiny", n_prompts: int = 100, new_tokens: int = 512, paper_batches: int = 2,
               json_path: str | Path | None = None, device: str = "auto", **kwargs) -> dict:
    """What ``refusal-direction bench`` runs: the benchmark, written to ``json_path`` if given."""
    result = run_benchmark(model, n_prompts=n_prompts, new_tokens=new_tokens, paper_batches=paper_batches,
                           device=device, **kwargs)
    result["command"] = (f"refusal-direction bench --model {model} --n-prompts {n_prompts} --new-tokens {new_tokens} "
                         f"--paper-batches {paper_batches}")
    if json_path:
        from ..fileio import atomic_write_json

        atomic_write_json(json_path, result)
    return result


def format_report(r: dict) -> str:
    """The benchmark as a short plain-text table (the CLI prints it)."""
    env, w, p, f, fl = r["environment"], r["workload"], r["paper"], r["fast"], r["floor"]
    lines = [
        f"{r['model']['name']} ({r['model']['params'] / 1e6:,.1f} M params, {env['dtype']}) on {env['device']}; "
        f"torch {env['torch']}, transformers {env['transformers']}",
        f"workload: {w['n_prompts']} prompts ({w['prompt_tokens']['min']}-{w['prompt_tokens']['max']} tokens) x "
        f"{len(w['conditions'])} conditions x {w['new_tokens']} forced new tokens = {w['tokens']} tokens",
        "",
        f"{'path':<44}{'seconds':>10}{'tokens/s':>12}",
        f"{'(a) paper: HF generate + hooks, batch ' + str(p['batch_size']):<44}{p['seconds']:>10.2f}"
        f"{p['tokens_per_s']:>12.0f}   {p['note']}",
    ]
    for label in ("first", "repeat"):
        x = f[label]
        lines.append(f"{'(b) fast path, ' + label + ' call':<44}{x['seconds']:>10.2f}{x['tokens_per_s']:>12.0f}   "
                     f"{x['decode']}, {x['rows']} rows; prefill {x['prefill_s']:.2f}s, capture {x['capture_s']:.2f}s, "
                     f"decode {x['decode_s']:.2f}s")
    if "eager" in r:
        e = r["eager"]
        lines.append(f"{'    fast path without CUDA graphs':<44}{e['seconds']:>10.2f}{e['tokens_per_s']:>12.0f}   "
                     f"tokens identical to graph run: {e['identical_to_graph']}")
    if "unfused" in r:
        u = r["unfused"]
        same = sum(a["identical_rows"] for a in u["agreement"].values())
        rows = sum(a["rows"] for a in u["agreement"].values())
        label = "    fast path without fused norm/rotary"
        lines.append(f"{label:<44}{u['seconds']:>10.2f}{w['tokens'] / u['seconds']:>12.0f}   "
                     f"decode {u['decode_s']:.2f}s; {same}/{rows} rows identical to the fused run")
    if "own_step" in r:
        o = r["own_step"]
        same = sum(a["identical_rows"] for a in o["agreement"].values())
        rows = sum(a["rows"] for a in o["agreement"].values())
        state = "" if o["used"] else " (not used: HF's step ran, see the notes)"
        label = "    fast path on the own decode step"
        lines.append(f"{label:<44}{o['seconds']:>10.2f}{w['tokens'] / o['seconds']:>12.0f}   "
                     f"repeat {o['repeat_seconds']:.2f}s, decode {o['decode_s']:.2f}s; {same}/{rows} rows identical "
                     f"to HF's step{state}")
    if "compile" in r:
        c = r["compile"]
        text = c.get("failed") or (f"first {c['first_seconds']:.2f}s (compile {c['first_compile_s']:.1f}s), "
                                   f"repeat {c['repeat_seconds']:.2f}s")
        lines.append(f"    torch.compile(mode='reduce-overhead'): {text}")
    lines += [
        f"{'device floor (decode)':<44}{fl['seconds']:>10.2f}{w['tokens'] / fl['seconds']:>12.0f}   "
        f"memory {fl['memory_s']:.2f}s at {r['ceilings']['copy_bandwidth_GBps']:.0f} GB/s, compute "
        f"{fl['compute_s']:.2f}s at {r['ceilings']['matmul_TFLOPs']:.3g} TFLOP/s",
        "",
        f"speed-up (a)/(b): {r['speedup']:.1f}x first call, {r['speedup_repeat']:.1f}x repeat; "
        f"fast path / floor: {r['floor_ratio']:.1f}x"
        + (f" (own decode step: {r['own_step']['floor_ratio']:.1f}x)" if "own_step" in r else ""),
    ]
    for name, a in r["agreement"].items():
        lines.append(f"agreement with (a) [{name}]: {a['identical_rows']}/{a['rows']} rows identical, "
                     f"{a['token_agreement']:.1%} of tokens, first divergence at token "
                     f"{a['mean_first_divergence']:.0f} on average")
    if r.get("distinct_tokens_per_row", 2) < 2:
        lines.append("  (the completions repeat one token, so this agreement says little about numerics)")
    act = r["activations"]
    lines.append(f"activations: mean resid_pre of {act['prompts']} prompts, {act['layers']} layers x "
                 f"{act['positions']} positions: {act['seconds']:.2f}s (target {act['target_s']:.0f}s)")
    sel = r["selection"]
    floor = f"; matmul floor {sel['floor']['seconds']:.2f}s" if "floor" in sel else ""
    lines.append(f"selection: {sel['candidates']} candidates, {sel['prompts']} prompts: {sel['seconds']:.2f}s warm, "
                 f"{sel['cold_s']:.2f}s first call (target {sel['target_s']:.0f}s{floor}); "
                 + {"own": "the sweep's own forward", "hf": "HF's forward with hooks"}.get(sel.get("forward"),
                                                                                          "forward not recorded"))
    if "selection_hf_forward" in r:
        lines.append(f"  same sweep through HF's forward with hooks: {r['selection_hf_forward']['seconds']:.2f}s warm")
    return "\n".join(lines)
