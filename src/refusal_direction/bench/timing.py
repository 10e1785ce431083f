"""Device ceilings and floors: measured copy bandwidth and matmul rate, and the fewest seconds a workload needs."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from ..accel import kv_bytes_per_token, prompt_ids
from ..core.model import LoadedModel


def sync(lm_or_device) -> None:
    device = lm_or_device.device if isinstance(lm_or_device, LoadedModel) else torch.device(lm_or_device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up (CUDA events on GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: torch.device) -> dict:
    """Copy bandwidth (bytes read + written) and dense matmul rate, measured on random data."""
    gpu = device.type == "cuda"
    n = (1 << 30 if gpu else 1 << 26) // 2  # 1 GiB (GPU) / 64 MiB (CPU) of bf16
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy_s = median_seconds(lambda: y.copy_(x), device, 10 if gpu else 3)
    m = 8192 if gpu else 512
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    mm_s = median_seconds(lambda: a @ b, device, 10 if gpu else 3)
    return {"copy_bandwidth_GBps": 2 * n * 2 / copy_s / 1e9, "matmul_TFLOPs": 2 * m ** 3 / mm_s / 1e12,
            "matmul_dtype": str(dtype).removeprefix("torch."), "measured_on": "random data, median of repeats"}


def generation_floor(lm: LoadedModel, rows: int, prompt_len: int, steps: int, ceilings: dict) -> dict:
    """Fewest seconds any implementation needs for the decode: bytes over bandwidth vs FLOPs over rate."""
    cfg = lm.model.config.get_text_config()
    params = sum(p.numel() for p in lm.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    kv = kv_bytes_per_token(lm)
    context = steps * prompt_len + steps * (steps - 1) / 2  # sum over steps of tokens already cached, per row
    kv_bytes = rows * kv * (context + steps)  # read the cache, write one token per step
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    flops = 2 * params * rows * steps + 4 * rows * lm.n_layers * heads * head_dim * context
    memory_s = (steps * weight_bytes + kv_bytes) / (ceilings["copy_bandwidth_GBps"] * 1e9)
    compute_s = flops / (ceilings["matmul_TFLOPs"] * 1e12)
    return {"params": params, "weight_bytes": weight_bytes, "kv_bytes_per_token": kv, "steps": steps, "rows": rows,
            "bytes": steps * weight_bytes + kv_bytes, "flops": flops, "memory_s": memory_s, "compute_s": compute_s,
            "seconds": max(memory_s, compute_s)}


def selection_floor(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], n_pos: int,
                    ceilings: dict) -> dict:
    """Matrix-product FLOPs the sweep's algorithm cannot avoid, over the measured matmul rate.

    Bypass and KL rows run every block over the prompt minus the shared chat-template opening; induce rows run
    blocks l..n-1 from the baseline's block-l input; in the last block only the key/value projections need every
    position (the query, output projection and MLP only the last: the sweep forward's shortcut); every row needs
    the LM head at its last position. Attention scores and element-wise work are left out, so the true floor is
    higher.
    """
    from ..selection import common_opening

    harmful_ids, harmless_ids = prompt_ids(lm, harmful), prompt_ids(lm, harmless)
    opening = len(common_opening(harmful_ids + harmless_ids))
    cfg = lm.model.config.get_text_config()
    embed = lm.model.get_input_embeddings().weight.numel()
    per_layer = (sum(p.numel() for p in lm.model.parameters()) - embed) / lm.n_layers
    attn = getattr(lm.blocks[-1].block, "self_attn", None)
    kv = attn.k_proj.weight.numel() + attn.v_proj.weight.numel() if hasattr(attn, "k_proj") else per_layer
    layers = lm.n_layers
    ablated = sum(len(x) - opening for x in harmful_ids) + sum(len(x) - opening for x in harmless_ids)
    n_rows = len(harmful_ids) + len(harmless_ids)
    # every block but the last over all tokens, the last one's k/v over all tokens and the rest at one position
    param_tokens = n_pos * layers * (per_layer * (layers - 1) * ablated + kv * ablated + (per_layer - kv) * n_rows)
    induce_tokens = sum(len(x) - opening for x in harmless_ids)
    param_tokens += n_pos * (per_layer * sum(layers - 1 - layer for layer in range(layers)) * induce_tokens
                             + layers * (kv * induce_tokens + (per_layer - kv) * len(harmless_ids)))
    head = 2 * int(cfg.vocab_size) * lm.d_model * n_pos * layers * (len(harmful_ids) + 2 * len(harmless_ids))
    flops = 2 * param_tokens + head
    return {"flops": flops, "opening_tokens": opening, "seconds": flops / (ceilings["matmul_TFLOPs"] * 1e12),
            "note": "matmul FLOPs only, at the measured dense bf16 rate"}
