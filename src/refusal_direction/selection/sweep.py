"""The sweep: bypass, induce and KL scores of every candidate direction, in a few big batches.

For each candidate r = candidates[position, layer], on small validation sets:

- bypass score: mean refusal metric on harmful prompts with r ablated everywhere;
- induce score: mean refusal metric on harmless prompts with +r (raw, coefficient 1) added at block
  ``layer``'s input, every position;
- KL score: mean KL(baseline ‖ ablated) of the next-token distribution at the last prompt position
  on harmless prompts.

Candidates are not scored one forward pass at a time. Every (candidate, prompt, kind) is one row of a big
batch; each row carries its own unit direction to ablate ([rows, d_model]) or its own vector and layer to add.
Rows are sorted by prompt length so a batch pads little, only the last position's logits are computed, and the
baseline distribution for the KL is computed once. Induce rows start from the baseline's saved block-l input
(`prefix`), and the chat template's opening is computed once per distinct intervention (`logits`). The passes
run through HF's forward with hooks or the sweep's own forward (`passes`).

gemma-2b-it shape on one H200, bf16, 90 candidates, 32 + 32 prompts: 1.87 s warm (HF's forward with hooks 2.60-2.63 s);
Llama-3-8B shape, 160 candidates: 10.81 s (HF's 15.2 s); BENCHMARKS.md "Selection sweep".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..accel import fused_kernels, restricted_sdpa
from ..core.batching import run_batched
from ..core.directions import CandidateDirections
from ..core.model import LoadedModel
from ..core.padding import device_tensor
from ..errors import UserError
from .logits import common_opening, tokenize_each
from .metric import default_refusal_ids, refusal_metric
from .passes import choose_passes
from .rules import CandidateScore

log = logging.getLogger(__name__)

REDUCE_ROWS = 256  # rows per float64 log-softmax (bounds memory at large vocabularies)
PREFIX_GROUP_ROWS_FACTOR = 4  # induce rows per shared-prefix group = this x max_batch_rows (H200-tuned)

# Row kinds of the batched sweep.
BYPASS, INDUCE, KL = 0, 1, 2


def default_max_batch_rows(lm: LoadedModel) -> int:
    return 512 if lm.device.type == "cuda" else 64


def score_candidates(
    lm: LoadedModel,
    candidates: CandidateDirections,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    max_batch_rows: int | None = None,
    progress: bool = False,
    share_prefix: bool = True,
    keys: Sequence[tuple[int, int]] | None = None,
    kinds: Sequence[str] = ("bypass", "induce", "kl"),
    fuse: bool = True,
    share_opening: bool = True,
    sdpa: Sequence[str] | None = ("efficient", "math"),
    fast_forward: bool = True,
) -> list[CandidateScore]:
    """Bypass, induce and KL scores of every (position, layer) candidate (``layers``: a subset to score).

    ``max_batch_rows``: (candidate, prompt) rows per forward pass (default 512 on CUDA, 64 on CPU; halved
    on CUDA out-of-memory). ``share_prefix``: start the induce rows from the baseline's input of their
    block (checked once against the model's own logits; falls back to full passes if they differ).
    Returned in position-major order (position, then layer), like the paper's file. ``keys``: explicit
    (position, layer) candidates instead of ``layers``; ``kinds``: the scores to compute (others are NaN).
    ``fuse``: on CUDA, RMSNorm and rotary embedding run with fewer kernels where that is verified (`fusion`).
    ``share_opening``: compute the chat template's opening tokens (shared by every prompt) once per distinct
    intervention in a batch instead of once per row (checked once against full passes, as for share_prefix).
    ``sdpa``: attention kernels allowed on CUDA, in order of preference (`fusion.restricted_sdpa`); None: torch's
    pick. Default memory-efficient attention: on an H200 at gemma-2b shape torch's pick (cuDNN) builds a plan for
    every new shape, and the sweep's batches have many (HF forward path: first call 6.0-10.2 s vs 3.3-3.6 s).
    ``fast_forward``: run the passes with `fast_forward.SweepDecoder` where it supports the model
    (standard pre-norm decoders; checked once against HF's forward with hooks, which is used otherwise).
    """
    with fused_kernels(lm.model, fuse), restricted_sdpa(lm.device, sdpa):
        return _score_candidates(lm, candidates, harmful_val, harmless_val, refusal_ids, layers, max_batch_rows,
                                 progress, share_prefix, keys, kinds, share_opening, fast_forward, fuse)


@dataclass(frozen=True, eq=False)
class _Directions:
    """The candidates being scored, on the model's device and in its dtype."""

    keys: list[tuple[int, int]]  # (position, layer) per candidate
    unit_dirs: torch.Tensor  # [n, d] unit directions to ablate (zero rows: not ablatable)
    add_vecs: torch.Tensor  # [n, d] raw vectors to add
    ablatable: torch.Tensor  # [n] bool: a nonzero, finite direction
    finite: torch.Tensor  # [n] bool: every entry finite


@dataclass(frozen=True, eq=False)
class _Baseline:
    """The unintervened harmless passes, in groups of similar length."""

    logp: torch.Tensor | None  # [n_harmless, vocab] float64 log-probabilities at the last position
    prefixes: list  # per group: what `passes.replay` starts from (None without shared prefixes)
    group_of: dict[int, tuple[int, int]]  # prompt -> (group, row in the group)
    share_prefix: bool  # shared prefixes requested and checked


@torch.no_grad()
def _score_candidates(lm: LoadedModel, candidates: CandidateDirections, harmful_val: Sequence[str],
                      harmless_val: Sequence[str], refusal_ids: Sequence[int] | None, layers: Sequence[int] | None,
                      max_batch_rows: int | None, progress: bool, share_prefix: bool,
                      keys: Sequence[tuple[int, int]] | None, kinds: Sequence[str],
                      share_opening: bool, fast_forward: bool, fuse: bool) -> list[CandidateScore]:
    """`score_candidates` inside its kernel choices."""
    wants = ("bypass" in kinds), ("induce" in kinds), ("kl" in kinds)
    layers = _checked_layers(lm, candidates, harmful_val, harmless_val, layers, keys, wants)
    refusal_ids = list(refusal_ids) if refusal_ids is not None else default_refusal_ids(lm)
    max_batch_rows = max_batch_rows or default_max_batch_rows(lm)
    t0 = time.perf_counter()

    keys = [(p, layer) for p in candidates.positions for layer in layers] if keys is None else list(keys)
    dirs = _directions(lm, candidates, keys)
    harmful_ids, harmless_ids = tokenize_each(lm, harmful_val), tokenize_each(lm, harmless_val)
    if not (wants[1] or wants[2]):
        harmless_ids = []  # no baseline pass needed

    opening = common_opening(harmful_ids + harmless_ids) if share_opening else []
    passes = choose_passes(lm, dirs.unit_dirs, dirs.add_vecs, keys, opening, harmless_ids or harmful_ids,
                           dirs.finite, fast_forward, fuse)
    base = _baseline(passes, harmless_ids, len(keys), max_batch_rows, share_prefix, lm.device)
    rows, replay_rows = _sweep_rows(dirs, harmful_ids, harmless_ids, wants, base)

    def step(batch: Sequence[tuple[int, int, int, int]]) -> Sequence[torch.Tensor]:
        _, kinds, cands, prompts = zip(*batch)
        seqs = [(harmful_ids if k == BYPASS else harmless_ids)[p] for k, p in zip(kinds, prompts)]
        logits = passes.rows(seqs, cands, [k == INDUCE for k in kinds])  # [batch, vocab]
        kl_rows = [i for i, k in enumerate(kinds) if k == KL]
        metric_rows = [i for i, k in enumerate(kinds) if k != KL]
        values = _row_values(logits, metric_rows, kl_rows, [prompts[i] for i in kl_rows], base.logp, refusal_ids)
        return values.unbind()  # one 0-d device tensor per row: no host sync per batch

    def replay_step(batch: Sequence[tuple[int, int, int, int]]) -> list[torch.Tensor]:
        out = []
        for g in sorted({base.group_of[r[3]][0] for r in batch}):  # batch is sorted by group
            part = [r for r in batch if base.group_of[r[3]][0] == g]
            logits = passes.replay(base.prefixes[g], [base.group_of[r[3]][1] for r in part], [r[2] for r in part])
            out += refusal_metric(logits, refusal_ids).unbind()
        return out

    values = run_batched(step, rows, max_batch_rows, "selection", progress)
    values += run_batched(replay_step, replay_rows, max_batch_rows, "selection (induce)", progress)
    values = torch.stack(values).cpu() if values else torch.zeros(0, dtype=torch.float64)  # [n_rows]
    rows += replay_rows
    scores = _mean_scores(keys, rows, values)
    notes = [passes.name] + ([f"a {len(passes.opening)}-token chat-template opening shared"] if passes.opening
                             else []) + (["induce rows from shared prefixes"] if base.share_prefix else [])
    log.info("scored %d candidates on %d harmful + %d harmless prompts (%d rows%s) in %.2fs", len(keys),
             len(harmful_val), len(harmless_val), len(rows), "".join(", " + n for n in notes),
             time.perf_counter() - t0)
    return scores


def _checked_layers(lm: LoadedModel, candidates: CandidateDirections, harmful_val: Sequence[str],
                    harmless_val: Sequence[str], layers: Sequence[int] | None,
                    keys: Sequence[tuple[int, int]] | None, wants: tuple[bool, bool, bool]) -> list[int]:
    """The layers to score (those of ``keys`` if given), after checking the inputs; raises UserError."""
    want_bypass, want_induce, want_kl = wants
    if (want_bypass and not harmful_val) or ((want_induce or want_kl) and not harmless_val):
        raise UserError(f"selection needs harmful and harmless validation instructions "
                        f"(got {len(harmful_val)} and {len(harmless_val)})")
    if candidates.d_model != lm.d_model:
        raise UserError(f"candidate directions have d_model {candidates.d_model} but {lm.model_id} has "
                        f"{lm.d_model}; extract the candidates from this model")
    if keys is not None:
        layers = sorted({layer for _, layer in keys})
    layers = list(range(candidates.n_layers)) if layers is None else list(layers)
    bad = [x for x in layers if not 0 <= x < min(candidates.n_layers, lm.n_layers)]
    if bad:
        raise UserError(f"layers {bad} are out of range for {lm.model_id} ({lm.n_layers} layers: "
                        f"0..{lm.n_layers - 1})")
    return layers


def _directions(lm: LoadedModel, candidates: CandidateDirections, keys: list[tuple[int, int]]) -> _Directions:
    """Unit directions to ablate and raw vectors to add, for the candidates at ``keys``."""
    raw = torch.stack([candidates.vectors[candidates.positions.index(p), layer] for p, layer in keys])  # [n, d]
    raw = raw.double()
    norms = raw.norm(dim=-1)
    ablatable = (norms > 0) & torch.isfinite(norms)  # a zero direction has no unit vector: NaN scores
    finite = torch.isfinite(raw).all(-1)
    unit_dirs = torch.where(ablatable.unsqueeze(-1), raw / norms.clamp_min(1e-300).unsqueeze(-1), 0)
    unit_dirs = unit_dirs.to(device=lm.device, dtype=lm.dtype)  # [n, d]
    add_vecs = raw.to(device=lm.device, dtype=lm.dtype)  # [n, d]
    if not ablatable.all():
        log.info("%d candidates have a zero or non-finite direction (e.g. layer 0, where every prompt has "
                 "the same token embedding): their bypass and KL scores are NaN", int((~ablatable).sum()))
    return _Directions(keys, unit_dirs, add_vecs, ablatable, finite)


def _baseline(passes, harmless_ids: list[list[int]], n_keys: int, max_batch_rows: int, share_prefix: bool,
              device: torch.device) -> _Baseline:
    """Baseline of the harmless prompts in groups of similar length (computed once, for the KL); with
    share_prefix, each group's block inputs are kept so the induce rows can start at their layer."""
    by_length = sorted(range(len(harmless_ids)), key=lambda i: len(harmless_ids[i]))
    group_size = max(1, PREFIX_GROUP_ROWS_FACTOR * max_batch_rows // max(1, n_keys)) if share_prefix \
        else max_batch_rows
    groups = [by_length[i:i + group_size] for i in range(0, len(by_length), group_size)]
    prefixes, base_parts = [], []
    for group in groups:
        logits, prefix = passes.baseline([harmless_ids[i] for i in group], share_prefix)
        if share_prefix and not prefixes and not passes.replay_matches(prefix, logits):
            share_prefix = False
        prefixes.append(prefix if share_prefix else None)
        base_parts.append(torch.log_softmax(logits.double(), dim=-1))
    base_logp = None
    if base_parts:
        base_logp = torch.empty(len(harmless_ids), base_parts[0].shape[-1], dtype=torch.float64, device=device)
        base_logp[device_tensor(by_length, device)] = torch.cat(base_parts)  # [n_harmless, vocab] float64
    group_of = {i: (g, j) for g, group in enumerate(groups) for j, i in enumerate(group)}  # prompt -> (group, row)
    return _Baseline(base_logp, prefixes, group_of, share_prefix)


def _sweep_rows(dirs: _Directions, harmful_ids: list[list[int]], harmless_ids: list[list[int]],
                wants: tuple[bool, bool, bool], base: _Baseline) -> tuple[list, list]:
    """One row per (candidate, kind, prompt): (prompt length, kind, candidate, prompt); full-pass rows sorted by
    length, and (with shared prefixes) the induce rows to replay, sorted by group, length, then start layer."""
    want_bypass, want_induce, want_kl = wants
    rows, replay_rows = [], []
    for c in range(len(dirs.keys)):
        if dirs.ablatable[c] and want_bypass:
            rows += [(len(s), BYPASS, c, i) for i, s in enumerate(harmful_ids)]
        if dirs.ablatable[c] and want_kl:
            rows += [(len(s), KL, c, i) for i, s in enumerate(harmless_ids)]
        if dirs.finite[c] and want_induce:
            (replay_rows if base.share_prefix else rows).extend(
                (len(s), INDUCE, c, i) for i, s in enumerate(harmless_ids))
    rows.sort(key=lambda r: r[0])  # similar lengths share a batch: little padding
    # by group, then length (a batch of the sweep forward pads only to its own longest prompt), then start layer
    replay_rows.sort(key=lambda r: (base.group_of[r[3]][0], r[0], dirs.keys[r[2]][1]))
    return rows, replay_rows


def _row_values(logits, metric_rows, kl_rows, kl_prompts, base_logp, refusal_ids) -> torch.Tensor:
    """Refusal metric of ``metric_rows``, KL(baseline ‖ row) of ``kl_rows``: [batch] float64, on device."""
    out = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    for s in range(0, len(metric_rows), REDUCE_ROWS):
        idx = device_tensor(metric_rows[s:s + REDUCE_ROWS], logits.device)
        out[idx] = refusal_metric(logits[idx], refusal_ids)
    for s in range(0, len(kl_rows), REDUCE_ROWS):
        idx = device_tensor(kl_rows[s:s + REDUCE_ROWS], logits.device)
        base = base_logp[device_tensor(kl_prompts[s:s + REDUCE_ROWS], logits.device)]  # [rows, vocab]
        logp = torch.log_softmax(logits[idx].double(), dim=-1)
        out[idx] = (base.exp() * (base - logp)).sum(-1)
    return out


def _mean_scores(keys: list[tuple[int, int]], rows: list, values: torch.Tensor) -> list[CandidateScore]:
    """Each candidate's mean value per kind over its rows (NaN for a kind with no rows)."""
    slot = torch.tensor([c * 3 + k for _, k, c, _ in rows])  # candidate-major (candidate, kind) cell
    sums = torch.zeros(len(keys) * 3, dtype=torch.float64).index_add_(0, slot, values)
    counts = torch.bincount(slot, minlength=len(keys) * 3).double()
    means = (sums / counts).view(len(keys), 3)  # 0/0 = NaN for candidates that were not scored
    return [CandidateScore(p, layer, float(means[c, BYPASS]), float(means[c, INDUCE]), float(means[c, KL]))
            for c, (p, layer) in enumerate(keys)]
