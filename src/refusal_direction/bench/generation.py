"""The benchmark's two generation paths on one workload: the paper's (HF ``generate`` + hooks, one batch at a
time) and the fast path, forced to the same number of tokens, with their agreement and token digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from typing import Iterator, Sequence

import torch

from ..accel import FastResult, generate_fast_ids, prompt_ids
from ..core.model import LoadedModel
from ..edits import Intervention, apply_intervention
from .timing import sync

log = logging.getLogger(__name__)


@contextlib.contextmanager
def no_stop_tokens(model: torch.nn.Module) -> Iterator[None]:
    """HF generate fills a missing eos from the model's generation config: clear it so runs are forced."""
    gen = getattr(model, "generation_config", None)
    old = getattr(gen, "eos_token_id", None)
    try:
        if gen is not None:
            gen.eos_token_id = None
        yield
    finally:
        if gen is not None:
            gen.eos_token_id = old


@torch.no_grad()
def paper_generate(lm: LoadedModel, instructions: Sequence[str], intervention: Intervention, new_tokens: int,
                   batch_size: int = 8, n_batches: int | None = None) -> tuple[list[list[int]], list[float]]:
    """The paper's approach (what `generation.generate_hf` does), forced to ``new_tokens``: HF ``generate``
    with the intervention's hooks, one batch of ``batch_size`` at a time. Returns the token ids of the
    prompts it ran and the seconds of each batch (only the first ``n_batches`` batches run)."""
    from ..core.decoding import greedy_config

    config = greedy_config(lm, new_tokens, None)
    batches = [instructions[i:i + batch_size] for i in range(0, len(instructions), batch_size)][:n_batches]
    tokens, seconds = [], []
    with no_stop_tokens(lm.model):
        for batch in batches:
            sync(lm)
            t0 = time.perf_counter()
            enc = lm.tokenize(list(batch))
            with apply_intervention(lm, intervention):
                seq = lm.model.generate(**enc, generation_config=config)
            new = seq[:, enc["input_ids"].shape[1]:].tolist()
            seconds.append(time.perf_counter() - t0)
            tokens.extend(new)
    return tokens, seconds


def fast_generate(lm: LoadedModel, instructions: Sequence[str], interventions: Sequence[Intervention],
                  new_tokens: int, decode: str = "auto", **kwargs) -> tuple[FastResult, float]:
    """`generate_fast_ids` forced to ``new_tokens``, timed end to end (tokenizing to tokens on the host)."""
    sync(lm)
    t0 = time.perf_counter()
    result = generate_fast_ids(lm, prompt_ids(lm, instructions), interventions, new_tokens, [],
                               force_tokens=True, decode=decode, **kwargs)
    sync(lm)
    return result, time.perf_counter() - t0


def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict:
    """Row-wise comparison of two greedy runs: identical rows, position-wise agreement, first divergence."""
    firsts, same = [], 0
    for a, b in zip(reference, other):
        n = min(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), n)
        firsts.append(first)
        same += sum(x == y for x, y in zip(a, b))
    total = sum(min(len(a), len(b)) for a, b in zip(reference, other))
    return {"rows": len(firsts), "identical_rows": sum(f == min(len(a), len(b)) for f, a, b
                                                     in zip(firsts, reference, other)),
            "token_agreement": same / total if total else 1.0,
            "mean_first_divergence": sum(firsts) / len(firsts) if firsts else 0.0,
            "min_first_divergence": min(firsts) if firsts else 0}


def token_digests(tokens: dict[str, list[list[int]]]) -> dict[str, str]:
    """Per condition, the sha256 of its generated token ids (``json.dumps`` of the list of rows): two runs with
    equal digests generated identical tokens."""
    return {name: hashlib.sha256(json.dumps([list(map(int, r)) for r in rows]).encode()).hexdigest()
            for name, rows in tokens.items()}


def time_paper(lm: LoadedModel, instructions: Sequence[str], conditions: Sequence[Intervention], new_tokens: int,
               batch_size: int, batches: int, n_tokens: int) -> tuple[dict, dict[str, list[list[int]]]]:
    """(a) The paper's approach, timed on ``batches`` batches per condition and scaled to all of them:
    (its result section, the tokens of the prompts it ran per condition)."""
    total_batches = math.ceil(len(instructions) / batch_size)
    timed = min(batches, total_batches)
    paper: dict = {"batch_size": batch_size, "batches_timed": timed, "batches_total": total_batches,
                   "scaled": timed < total_batches, "per_condition": {}}
    paper_tokens = {}
    for i, c in enumerate(conditions):
        toks, secs = paper_generate(lm, instructions, c, new_tokens, batch_size, timed)
        paper_tokens[c.name] = toks
        # The process's first full-length batch pays one-time costs (kernel/plan selection for every new
        # sequence length): keep it out of the per-batch time when another batch was timed, and report it.
        steady = secs[1:] if i == 0 and len(secs) > 1 else secs
        per_batch = sorted(steady)[len(steady) // 2]
        paper["per_condition"][c.name] = {"batch_seconds": secs, "seconds_per_batch": per_batch,
                                          "seconds": per_batch * total_batches}
        if steady is not secs:
            paper["first_batch_one_time_s"] = secs[0] - per_batch
        log.info("paper approach [%s]: %.2fs per batch of %d (batches: %s)", c.name, per_batch, batch_size,
                 ", ".join(f"{x:.2f}s" for x in secs))
    paper["seconds"] = sum(v["seconds"] for v in paper["per_condition"].values())
    paper["tokens_per_s"] = n_tokens / paper["seconds"]
    paper["note"] = (f"timed {timed} of {total_batches} batches per condition, median batch x {total_batches}"
                     if paper["scaled"] else f"median batch x {total_batches}")
    if "first_batch_one_time_s" in paper:
        paper["note"] += f"; first batch's one-time {paper['first_batch_one_time_s']:.1f}s not counted"
    return paper, paper_tokens


def time_fast(lm: LoadedModel, instructions: Sequence[str], conditions: Sequence[Intervention], new_tokens: int,
              fast_options: dict, n_tokens: int) -> tuple[dict, dict[str, FastResult]]:
    """(b) The fast path: the first call in the process, then a repeat: (its result section, both results)."""
    fast: dict = {}
    runs = {}
    for label in ("first", "repeat"):
        res, secs = fast_generate(lm, instructions, conditions, new_tokens, **fast_options)
        runs[label] = res
        fast[label] = {"seconds": secs, "tokens_per_s": n_tokens / secs, "rows": res.stats.rows,
                       "chunks": res.stats.chunks, "prefill_s": res.stats.prefill_s,
                       "capture_s": res.stats.capture_s, "decode_s": res.stats.decode_s,
                       "decode": res.stats.decode, "notes": list(res.stats.notes)}
        log.info("fast path (%s call): %.2fs (%s)", label, secs, res.stats.decode)
    fast["options"] = fast_options
    return fast, runs


def fast_variants(lm: LoadedModel, instructions: Sequence[str], conditions: Sequence[Intervention],
                  new_tokens: int, fast_options: dict, reference: FastResult, n_tokens: int, eager_check: bool,
                  compile_check: bool) -> dict:
    """The fast path without CUDA graphs ("eager"), without fused norm/rotary ("unfused"), on the own decode step
    ("own_step", two calls) and compiled ("compile"), each compared with ``reference`` (the graph run); only those
    that apply on this device."""
    out: dict = {}
    if eager_check and reference.stats.decode != "eager":
        res, secs = fast_generate(lm, instructions, conditions, new_tokens, decode="eager", **fast_options)
        out["eager"] = {"seconds": secs, "tokens_per_s": n_tokens / secs,
                        "identical_to_graph": res.tokens == reference.tokens,
                        "agreement": {n: agreement(res.tokens[n], reference.tokens[n]) for n in res.tokens}}
    if lm.device.type == "cuda" and fast_options.get("fuse", True):  # what the fused RMSNorm and rotary bring
        res, secs = fast_generate(lm, instructions, conditions, new_tokens, **{**fast_options, "fuse": False})
        out["unfused"] = {"seconds": secs, "decode_s": res.stats.decode_s,
                          "agreement": {n: agreement(res.tokens[n], reference.tokens[n]) for n in res.tokens}}
    if fast_options.get("step", "hf") == "hf":  # the own decode step (accel.own_step) against HF's step
        calls = [fast_generate(lm, instructions, conditions, new_tokens, **{**fast_options, "step": "own"})
                 for _ in range(2)]
        res = calls[0][0]
        out["own_step"] = {"seconds": calls[0][1], "repeat_seconds": calls[1][1], "decode_s": res.stats.decode_s,
                           "repeat_decode_s": calls[1][0].stats.decode_s, "used": any(
                               n.startswith("own decode step with") for n in res.stats.notes),
                           "notes": list(res.stats.notes), "identical_to_hf_step": res.tokens == reference.tokens,
                           "agreement": {n: agreement(res.tokens[n], reference.tokens[n]) for n in res.tokens}}
    if compile_check and lm.device.type == "cuda":
        try:
            res, secs = fast_generate(lm, instructions, conditions, new_tokens, decode="compile", **fast_options)
            res2, secs2 = fast_generate(lm, instructions, conditions, new_tokens, decode="compile", **fast_options)
            out["compile"] = {"first_seconds": secs, "first_compile_s": res.stats.capture_s,
                              "repeat_seconds": secs2, "repeat_decode_s": res2.stats.decode_s,
                              "identical_to_graph": res2.tokens == reference.tokens}
        except Exception as exc:  # torch.compile support varies by model and version: report it
            out["compile"] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out
