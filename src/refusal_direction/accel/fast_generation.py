"""Fast greedy generation: all conditions in one batch, a static KV cache, a CUDA graph per decode step.

The paper's path (`generation.generate_hf`) runs HF ``generate`` once per condition at a small batch
size, so every step re-reads all weights for a handful of prompts and spends most of its time in Python.
Here, for the same greedy tokens:

- all conditions share ONE batch: row ``c * n_prompts + i`` is prompt i under intervention c, and each
  intervention's hooks get a per-row switch (``apply_intervention(lm, iv, rows=mask)``), so the weights
  are read once per step for every condition; `generate_fast_sets` puts several prompt sets, each under its
  own conditions, into the same batch (a run's JailbreakBench, harmless and XSTest sets decode in one loop);
- prompts are left-padded and prefilled once with HF's position ids (``cumsum(mask) - 1``); only the last
  position's logits are computed (``logits_to_keep=1``);
- a transformers `StaticCache` keeps every tensor address fixed, so the single-token decode step (HF
  forward, argmax and bookkeeping, all on the device) is captured once as a CUDA graph and replayed;
- the host checks "all rows finished?" every `CHECK_EVERY` steps (one sync); rows that finished earlier
  keep decoding but are cut at their first stop token, which is what HF ``generate`` returns too;
- grouped-query attention under a padding mask is folded (the query heads that share a KV head become
  query rows of that head), so SDPA reads each KV head once instead of HF's per-step ``repeat_kv`` copy.
- on CUDA, RMSNorms and the rotary embedding run with fewer kernels (`fusion.fused_kernels`), each swap
  made only where it is verified to reproduce the original on the model's own shapes and dtype;
- on CUDA in bfloat16/float16, each decode step's attention runs on a Triton kernel that reads the static cache
  only as far as the mask lets through (`decode_attention`; SDPA reads every slot, written or not), used once it
  matches SDPA on probes of the model's head shapes.

Nothing is model-specific. A model this cannot run (encoder-decoder, no ``position_ids`` /
``past_key_values``, no `StaticCache`) falls back to `generate_hf` per condition, with the reason logged.
Models with sliding-window cache layers decode without CUDA graphs (their cache keeps a Python counter).

This module is the entry point and the sizing; one batch is `static_decode.generate_chunk`, the folded
attention is `folded_attention`, the fused norms and rotary are `fusion`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.batching import run_batched
from ..core.decoding import Generated, GenerationSettings, generate_hf, stop_ids
from ..core.model import LoadedModel
from ..edits import Intervention
from .folded_attention import FOLDED_SDPA, folded_gqa_attention, folded_sdpa_attention
from .own_step import STEPS
from .partial import PartialResults, intervention_digest, unit_key
from .static_decode import CHECK_EVERY, WARMUP_STEPS, FastPathUnsupported, FastStats, generate_chunk

__all__ = ["CHECK_EVERY", "DECODE_MODES", "FOLDED_SDPA", "SDPA_BACKENDS", "STEPS", "WARMUP_STEPS",
           "FastPathUnsupported", "FastResult", "FastStats", "check_supported", "folded_gqa_attention",
           "folded_sdpa_attention", "generate_fast", "generate_fast_ids", "generate_fast_sets", "kv_bytes_per_token",
           "prompt_ids", "prompts_per_chunk", "resolve_decode"]

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "cuda-graph", "compile", "eager")
# SDPA kernels allowed on CUDA, in torch's order of preference. Measured on an H200 (gemma-2b shape, 200 rows):
# memory-efficient attention decodes in 3.08 s against 3.44 s for torch's default pick (cuDNN); math is the
# fallback for shapes it does not take. None: torch's choice.
SDPA_BACKENDS = ("efficient", "math")


@dataclass(frozen=True)
class FastResult:
    tokens: dict[str, list[list[int]]]  # per intervention name, per prompt: new token ids
    stopped: dict[str, list[bool]]  # per intervention name, per prompt: ended on a stop token
    stats: FastStats


def generate_fast(
    lm: LoadedModel,
    instructions: Sequence[str],
    interventions: Sequence[Intervention],
    settings: GenerationSettings = GenerationSettings(),
    progress: bool = False,
    **options,
) -> dict[str, list[Generated]]:
    """Greedy completions of ``instructions`` under every intervention at once: {intervention name: list}.

    Same tokens as `generate_hf` (exactly so in float32). ``settings.batch_size`` is not used: the batch
    holds every prompt under every condition unless ``max_rows`` (default: sized from free device
    memory) splits it. Options (`generate_fast_ids`): ``force_tokens`` ignores stop tokens and decodes exactly
    ``max_new_tokens``; ``fuse``: on CUDA, run RMSNorms and the rotary embedding with fewer kernels wherever
    that is verified to reproduce them (`fusion.fused_kernels`), and bfloat16/float16 decode attention on
    `decode_attention`; ``step``: "hf" (HF's forward with hooks, the default) or "own" (`own_step.OwnStep`:
    the sweep forward's fused pieces on the static cache, for standard pre-norm decoders under baseline,
    ablation and activation addition); ``decode``, ``max_rows``, ``sdpa_backends``.
    """
    return generate_fast_sets(lm, [(instructions, interventions)], settings, progress, **options)[0]


def generate_fast_sets(
    lm: LoadedModel,
    sets: Sequence[tuple[Sequence[str], Sequence[Intervention]]],
    settings: GenerationSettings = GenerationSettings(),
    progress: bool = False,
    **options,
) -> list[dict[str, list[Generated]]]:
    """Several prompt sets, each under its own interventions, decoded in one batch (one decode loop for all):
    per set, {intervention name: completions}. An intervention object shared by sets is one condition; a row
    exists only for a (prompt, intervention) pair some set asks for. Same tokens as separate calls in float32
    (the padding width is the batch's longest prompt, which HF's position ids and masks make invisible)."""
    conditions: list[Intervention] = []
    index: dict[int, int] = {}  # id(intervention) -> condition index
    for _, ivs in sets:
        names = [iv.name for iv in ivs]
        if len(set(names)) != len(names):
            raise ValueError(f"intervention names must be unique within a set, got {names}")
        for iv in ivs:
            if id(iv) not in index:
                index[id(iv)] = len(conditions)
                conditions.append(iv)
    _unique_names(conditions)
    eos = stop_ids(lm, settings)
    units = [(ids, tuple(index[id(iv)] for iv in ivs)) for instructions, ivs in sets
             for ids in prompt_ids(lm, instructions)]
    try:
        result, _ = _generate_units(lm, units, conditions, settings.max_new_tokens, eos, progress=progress,
                                    **options)
    except FastPathUnsupported as exc:
        log.warning("fast generation is not available for %s (%s); falling back to HF generate per condition",
                    lm.model_id, exc)
        return [{iv.name: generate_hf(lm, list(instructions), iv, settings, progress) for iv in ivs}
                for instructions, ivs in sets]
    out, start = [], 0
    for instructions, ivs in sets:
        per_unit = result[start:start + len(instructions)]
        start += len(instructions)
        rows = {iv.name: [u[index[id(iv)]] for u in per_unit] for iv in ivs}  # (ids, stopped) per prompt
        out.append({name: [Generated(lm.tokenizer.decode(ids, skip_special_tokens=True), ids, stopped)
                           for ids, stopped in got] for name, got in rows.items()})
    return out


def _unique_names(conditions: Sequence[Intervention]) -> None:
    names = [iv.name for iv in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"intervention names must be unique to share a batch, got {names} (sets that share a "
                         "condition must pass the same intervention object)")


def prompt_ids(lm: LoadedModel, instructions: Sequence[str]) -> list[list[int]]:
    """Chat-formatted token ids of each instruction, unpadded (the same ids `LoadedModel.tokenize` pads)."""
    if not instructions:
        return []
    enc = lm.tokenizer([lm.format(x) for x in instructions], add_special_tokens=False)
    return [list(ids) for ids in enc["input_ids"]]


@torch.no_grad()
def generate_fast_ids(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    interventions: Sequence[Intervention],
    max_new_tokens: int,
    stop: Sequence[int],
    **options,
) -> FastResult:
    """The fast path on token ids (no tokenizer needed), every prompt under every intervention. Raises
    `FastPathUnsupported` for unsupported models. Options: ``force_tokens``, ``decode``, ``max_rows``,
    ``progress``, ``sdpa_backends``, ``fuse``, ``step`` (see `generate_fast`)."""
    _unique_names(interventions)
    every = tuple(range(len(interventions)))
    per_unit, stats = _generate_units(lm, [(list(p), every) for p in prompts], interventions, max_new_tokens,
                                      stop, **options)
    tokens = {iv.name: [u[c][0] for u in per_unit] for c, iv in enumerate(interventions)}
    stopped = {iv.name: [u[c][1] for u in per_unit] for c, iv in enumerate(interventions)}
    return FastResult(tokens, stopped, stats)


@torch.no_grad()
def _generate_units(lm: LoadedModel, units: Sequence[tuple[list[int], tuple[int, ...]]],
                    interventions: Sequence[Intervention], max_new_tokens: int, stop: Sequence[int], *,
                    force_tokens: bool = False, decode: str = "auto", max_rows: int | None = None,
                    progress: bool = False, sdpa_backends: Sequence[str] | None = SDPA_BACKENDS,
                    fuse: bool = True, step: str = "hf", partial: PartialResults | None = None
                    ) -> tuple[list[dict[int, tuple[list[int], bool]]], FastStats]:
    """Per unit (prompt ids, the conditions it is decoded under): {condition: (new ids, stopped)}, and the stats. A
    batch's rows are condition-major: every unit of the batch under condition 0, then 1, ... (row c·n + i for one
    set). ``partial``: units found there are not decoded again; each finished batch's units are added to it."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if any(len(p) == 0 for p, _ in units):
        raise ValueError("every prompt needs at least one token")
    check_supported(lm)
    if step not in STEPS:
        raise ValueError(f"step={step!r}: use one of {', '.join(STEPS)}")
    mode = resolve_decode(decode, lm.device)
    n_cond = len(interventions)
    if not units or not n_cond:
        return [{} for _ in units], FastStats(0, 0, 0, 0, 0.0, 0.0, 0.0, mode)
    keys, digests, per_unit, todo = _resumed(lm, units, interventions, max_new_tokens, stop, force_tokens, partial,
                                             step)
    stats: list[FastStats] = []

    def run_chunk(chunk: Sequence[int]) -> list[dict[int, tuple[list[int], bool]]]:
        rows = [(units[u][0], c) for c in range(n_cond) for u in chunk if c in units[u][1]]
        if not rows:  # only units of a set without interventions
            return [{} for _ in chunk]
        out, st = generate_chunk(lm, rows, interventions, max_new_tokens, stop, force_tokens, mode, progress,
                                 sdpa_backends, fuse, step)
        stats.append(st)
        it = iter(out)
        per = [{} for _ in chunk]
        for c in range(n_cond):
            for i, u in enumerate(chunk):
                if c in units[u][1]:
                    per[i][c] = next(it)
        if partial is not None:  # durable before the next batch starts
            partial.put([(keys[u][c], {digests[c]: r}) for u, res in zip(chunk, per) for c, r in res.items()])
        return per

    if todo:
        longest = max(len(units[u][0]) for u in todo)
        per_chunk = prompts_per_chunk(lm, len(todo), max(len(units[u][1]) for u in todo), longest + max_new_tokens,
                                      max_rows)
        for u, res in zip(todo, run_batched(run_chunk, todo, per_chunk, desc="generate [fast]")):
            per_unit[u] = res
    if not stats:
        return per_unit, FastStats(0, 0, 0, 0, 0.0, 0.0, 0.0, mode, ("every unit resumed",) if units else ())
    total = FastStats(rows=max(s.rows for s in stats), chunks=len(stats), prompt_len=max(s.prompt_len for s in stats),
                      steps=max(s.steps for s in stats), prefill_s=sum(s.prefill_s for s in stats),
                      capture_s=sum(s.capture_s for s in stats), decode_s=sum(s.decode_s for s in stats),
                      decode=stats[-1].decode, notes=tuple(dict.fromkeys(n for s in stats for n in s.notes)))
    log.info("fast generation: %d prompts x %d conditions (%d rows) in %d batch(es) of <=%d rows, %d new tokens, "
             "%s; prefill %.2fs, capture %.2fs, decode %.2fs%s%s", len(todo), n_cond,
             sum(len(units[u][1]) for u in todo), total.chunks, total.rows, total.steps, total.decode,
             total.prefill_s, total.capture_s, total.decode_s,
             f" ({len(units) - len(todo)} units resumed)" if len(todo) < len(units) else "",
             "".join(f"; {n}" for n in total.notes))  # e.g. which decode step ran, or why not the asked-for one
    return per_unit, total


def _resumed(lm: LoadedModel, units, interventions, max_new_tokens: int, stop: Sequence[int], force_tokens: bool,
             partial: PartialResults | None, step: str) -> tuple[list[dict], list[str], list[dict], list[int]]:
    """(per unit {condition: key}, condition digests, per-unit results with the resumed ones filled in, indices of
    the units still to decode); without ``partial`` no keys and every unit to decode. One key per (prompt,
    condition): a resumed call asking for fewer conditions (some completion files written) still finds its rows."""
    per_unit: list[dict] = [{} for _ in units]
    if partial is None:
        return [], [], per_unit, list(range(len(units)))
    digests = [intervention_digest(iv) for iv in interventions]
    model = f"{lm.model_id}|{lm.dtype}|{step}"  # rows of one decode step only (bf16 roundings differ)
    keys = [{c: unit_key(model, p, [digests[c]], max_new_tokens, stop, force_tokens) for c in conds}
            for p, conds in units]
    todo = []
    for u, (_, conds) in enumerate(units):
        got = {c: (partial.get(keys[u][c]) or {}).get(digests[c]) for c in conds}
        if all(v is not None for v in got.values()):
            per_unit[u] = got
        else:
            todo.append(u)
    return keys, digests, per_unit, todo


# --------------------------------------------------------------------------------------------------
# Checks and sizing


def check_supported(lm: LoadedModel) -> None:
    """Raise `FastPathUnsupported` when the model cannot be driven step by step with a `StaticCache`."""
    config = lm.model.config
    if lm.placement:
        raise FastPathUnsupported(f"the model is {lm.placement}; the static cache and CUDA graphs need one GPU")
    if getattr(config, "is_encoder_decoder", False):
        raise FastPathUnsupported("encoder-decoder models are not supported")
    params = inspect.signature(lm.model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [k for k in ("position_ids", "past_key_values", "attention_mask") if k not in params and not takes_any]
    if missing:
        raise FastPathUnsupported(f"{type(lm.model).__name__}.forward does not take {', '.join(missing)}")
    try:
        from transformers import StaticCache  # noqa: F401
    except ImportError as exc:  # pragma: no cover - transformers too old
        raise FastPathUnsupported(f"transformers has no StaticCache ({exc}); pip install -U transformers") from exc


def resolve_decode(decode: str, device: torch.device) -> str:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: use one of {', '.join(DECODE_MODES)}")
    if decode == "auto":
        return "cuda-graph" if device.type == "cuda" else "eager"
    if decode in ("cuda-graph", "compile") and device.type != "cuda":
        log.info("decode=%s needs CUDA (model on %s); decoding eagerly", decode, device)
        return "eager"
    return decode


def kv_bytes_per_token(lm: LoadedModel) -> int:
    """Bytes of K and V one token adds to the cache, over all layers."""
    cfg = lm.model.config.get_text_config()
    heads = int(getattr(cfg, "num_attention_heads", 1))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return 2 * lm.n_layers * kv_heads * head_dim * lm.dtype.itemsize


def prompts_per_chunk(lm: LoadedModel, n_prompts: int, n_cond: int, total_len: int, max_rows: int | None) -> int:
    """Prompts per batch so that conditions x prompts rows fit: ``max_rows`` or about half the free memory."""
    if max_rows is None:
        if lm.device.type != "cuda":
            return n_prompts
        cfg = lm.model.config.get_text_config()
        free, _ = torch.cuda.mem_get_info(lm.device)
        inter = int(getattr(cfg, "intermediate_size", 4 * lm.d_model))
        per_row = (kv_bytes_per_token(lm) * total_len  # static KV cache
                   + 3 * int(cfg.vocab_size) * 4  # last-position logits and argmax temporaries
                   + 4 * total_len * (lm.d_model + inter) * lm.dtype.itemsize)  # prefill activations
        max_rows = max(n_cond, int(0.5 * free // per_row))
    if max_rows < n_cond:
        raise ValueError(f"max_rows={max_rows} is smaller than the {n_cond} conditions that share each prompt")
    return max(1, min(n_prompts, max_rows // n_cond))
