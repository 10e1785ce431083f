"""The other stages timed on synthetic prompts: activation extraction and the selection sweep."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

import torch

from ..core.model import LoadedModel
from .synthetic import synthetic_instructions
from .timing import selection_floor, sync


def time_activations(lm: LoadedModel, n: int = 128, seed: int = 0, batch_size: int = 32) -> dict:
    """`activations.mean_resid_pre` over n harmful + n harmless prompts, all layers and post-instruction positions."""
    from ..core.activations import mean_resid_pre

    harmful, harmless = synthetic_instructions(lm, n, seed + 1), synthetic_instructions(lm, n, seed + 2)
    mean_resid_pre(lm, harmful[:batch_size], batch_size=batch_size)  # warm-up
    sync(lm)
    t0 = time.perf_counter()
    mean_resid_pre(lm, harmful, batch_size=batch_size)
    mean_resid_pre(lm, harmless, batch_size=batch_size)
    sync(lm)
    seconds = time.perf_counter() - t0
    return {"prompts": 2 * n, "batch_size": batch_size, "positions": lm.n_post_instruction, "layers": lm.n_layers,
            "seconds": seconds, "target_s": 2.0}


def sweep_inputs(lm: LoadedModel, n: int = 32, seed: int = 0):
    """A selection sweep's inputs: random candidates for every (position, layer), n harmful and n harmless
    synthetic instructions, and one ordinary token id as the refusal token (id text has no words)."""
    from ..core.directions import CandidateDirections

    g = torch.Generator().manual_seed(seed)
    n_pos = lm.n_post_instruction
    candidates = CandidateDirections(torch.randn(n_pos, lm.n_layers, lm.d_model, generator=g, dtype=torch.float64),
                                     list(range(-n_pos, 0)), {"model_id": lm.model_id})
    harmful, harmless = synthetic_instructions(lm, n, seed + 3), synthetic_instructions(lm, n, seed + 4)
    return candidates, harmful, harmless, [int(lm.extra.get("first_body_id", 8))]


def sweep_forward(lines: list[str]) -> str:
    """Which forward a sweep ran, from its `selection_log` lines: "own" (fast_forward) or "hf"."""
    return "own" if any("sweep forward (fast_forward)" in x for x in lines) else "hf"


def forward_log(lines: list[str]) -> list[str]:
    """The `selection_log` lines about the forward: which ran, each check's result, why one was unavailable."""
    return [x for x in lines if any(w in x for w in ("forward", "reproduce", "check", "unavailable"))]


@contextlib.contextmanager
def selection_log(debug: bool = False) -> Iterator[list[str]]:
    """The selection and sweep-forward log lines (INFO and up; DEBUG too with ``debug``: the checks' errors)
    emitted inside the block."""
    lines: list[str] = []
    level = logging.DEBUG if debug else logging.INFO

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    loggers = [logging.getLogger(n) for n in ("refusal_direction.selection", "refusal_direction.accel")]
    levels = [lg.level for lg in loggers]
    handler = Keep(level)
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(level)
    try:
        yield lines
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def time_selection(lm: LoadedModel, n: int = 32, seed: int = 0, repeats: int = 2, ceilings: dict | None = None,
                   **options) -> dict:
    """`selection.score_candidates` over every (position, layer) candidate with n harmful + n harmless prompts:
    the first call in the process (cold) and ``repeats`` more (warm). ``options`` go to score_candidates."""
    from ..selection import score_candidates

    candidates, harmful, harmless, refusal_ids = sweep_inputs(lm, n, seed)
    n_pos = lm.n_post_instruction

    def once() -> float:
        sync(lm)
        t0 = time.perf_counter()
        score_candidates(lm, candidates, harmful, harmless, refusal_ids=refusal_ids, **options)
        sync(lm)
        return time.perf_counter() - t0

    with selection_log() as lines:
        cold = once()
    warm = [once() for _ in range(repeats)]
    n_layers = len(options["layers"]) if options.get("layers") is not None else lm.n_layers
    out = {"candidates": n_pos * n_layers, "prompts": 2 * n, "seconds": sorted(warm)[len(warm) // 2] if warm
           else cold, "cold_s": cold, "warm_s": warm, "options": options, "target_s": 2.0,
           # which forward the sweep ran, and why (a failed check of the own forward falls back to HF's)
           "forward": sweep_forward(lines), "log": forward_log(lines)}
    if ceilings:
        out["floor"] = selection_floor(lm, harmful, harmless, n_pos, ceilings)
    return out
