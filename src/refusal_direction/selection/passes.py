"""The sweep's forward passes, two implementations behind one interface, and the choice between them.

Both give last-position logits of rows where row i ablates candidate cands[i] everywhere, or adds it at its
layer if induce[i]; the chat template's opening is computed once per distinct intervention:

- `HFPasses`: HF's forward with per-row hooks (`core.hooks.per_row_interventions`): any
  architecture; the reference. Each shortcut (shared opening, shared prefix) is checked once against the
  model's own full passes and dropped (with a log line) if it does not reproduce them.
- `FastPasses`: `accel.fast_forward.SweepDecoder`, the sweep's own forward for standard pre-norm decoders
  (Llama, Mistral, Qwen2, Gemma): no padding mask, the last block's MLP at the last position only, fused
  Triton kernels on CUDA. Used when it reproduces the reference on rows of every kind; kept per model until a
  weight changes.

Each offers ``rows`` (ablation / addition rows), ``baseline`` (unintervened logits and, optionally, what a
replay needs), ``replay_matches`` and ``replay`` (induce rows started at their layer from the baseline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from ..accel import (
    BUILT_DECODER,
    RowInterventions,
    SweepDecoder,
    cat_interventions,
    shared_decoder,
    weights_key,
)
from ..core.model import LoadedModel
from ..core.padding import device_tensor
from ..edits import per_row_interventions
from .logits import last_logits, opening_cache, opening_matches, reproduces_logits
from .prefix import Prefix, capture_prefix, replay, replay_matches

log = logging.getLogger(__name__)

OPENING_BYTES = 2**30  # most memory for the openings' keys and values under every intervention (sweep forward)
CHECKED_DECODER = "sweep_decoder"  # key in LoadedModel.extra: (weights key, settings, SweepDecoder that matched,
# the opening it was checked with: the asked-for one, or none where sharing it did not reproduce full passes)


def _distinct(cands: Sequence[int], induce: Sequence[bool]) -> tuple[list[tuple[int, bool]], list[int]]:
    """The distinct (candidate, induce) pairs of a batch, and each row's index among them."""
    distinct: dict[tuple[int, bool], int] = {}
    slot = [distinct.setdefault((c, a), len(distinct)) for c, a in zip(cands, induce)]
    return list(distinct), slot


def _row_interventions(unit_dirs, add_vecs, keys, cands: Sequence[int], induce: Sequence[bool]):
    """(directions to ablate [rows, d] or None, vectors to add [rows, d] or None, layer to add at per row, -1: none)
    for rows that ablate candidate cands[i], or add it at its layer if induce[i]."""
    cand = device_tensor(list(cands), unit_dirs.device)
    dirs = None if all(induce) else \
        unit_dirs[cand] * device_tensor([not a for a in induce], unit_dirs.device, unit_dirs.dtype).unsqueeze(-1)
    adds = add_vecs[cand] if any(induce) else None
    return dirs, adds, tuple(keys[c][1] if a else -1 for c, a in zip(cands, induce))


@dataclass(eq=False)
class HFPasses:
    lm: LoadedModel
    unit_dirs: torch.Tensor  # [n_candidates, d] (zero rows: not ablatable)
    add_vecs: torch.Tensor  # [n_candidates, d]
    keys: list[tuple[int, int]]  # (position, layer) per candidate
    opening: list[int]
    name: str = "HF forward with per-row hooks"

    def _hooks(self, cands: Sequence[int], induce: Sequence[bool]):
        return per_row_interventions(self.lm, *_row_interventions(self.unit_dirs, self.add_vecs, self.keys, cands,
                                                                  induce))

    def rows(self, seqs, cands, induce) -> torch.Tensor:
        past = None
        if self.opening:
            distinct, slot = _distinct(cands, induce)
            with self._hooks(*zip(*distinct)):
                past = opening_cache(self.lm, self.opening, len(distinct))
            past.reorder_cache(device_tensor(slot, self.lm.device))
            seqs = [s[len(self.opening):] for s in seqs]
        with self._hooks(cands, induce):
            return last_logits(self.lm, seqs, past, len(self.opening))

    def baseline(self, seqs, capture: bool):
        return capture_prefix(self.lm, seqs) if capture else (last_logits(self.lm, seqs), None)

    def replay_matches(self, prefix, logits) -> bool:
        return replay_matches(self.lm, prefix, logits)

    def replay(self, prefix: Prefix, prompts, cands) -> torch.Tensor:
        vectors = self.add_vecs[device_tensor(list(cands), self.lm.device)]
        return replay(self.lm, prefix, prompts, [self.keys[c][1] for c in cands], vectors)


@dataclass(eq=False)
class FastPasses:
    decoder: SweepDecoder
    unit_dirs: torch.Tensor
    add_vecs: torch.Tensor
    keys: list[tuple[int, int]]
    opening: list[int]
    name: str = "sweep forward (fast_forward)"

    def __post_init__(self):
        # The opening under every intervention of the sweep, once: slot 0 none, 1 + c ablates candidate c,
        # 1 + n + c adds it at its layer (a few tokens for 2n + 1 rows: one small pass instead of one per batch)
        self.prefix = None
        d = self.decoder
        size = 2 * (2 * len(self.keys) + 1) * len(self.opening) * d.n_kv * d.head_dim * len(d.blocks) * \
            self.unit_dirs.element_size()
        if self.opening and size > OPENING_BYTES:
            log.info("the sweep forward recomputes the %d-token opening in every row: keeping it for all %d "
                     "interventions would take %.1f GiB", len(self.opening), 2 * len(self.keys) + 1, size / 2**30)
            self.opening = []
        if self.opening:
            n = len(self.keys)
            rows = self._interventions(list(range(n)) * 2, [False] * n + [True] * n)
            zero = RowInterventions(torch.zeros_like(self.unit_dirs[:1]), torch.zeros_like(self.add_vecs[:1]), (-1,))
            self.prefix = self.decoder.kv_prefix(self.opening, cat_interventions([zero, rows], [1, 2 * n],
                                                                                self.unit_dirs.shape[1],
                                                                                self.unit_dirs), 2 * n + 1)

    def _interventions(self, cands, induce) -> RowInterventions:
        return RowInterventions(*_row_interventions(self.unit_dirs, self.add_vecs, self.keys, cands, induce))

    def _slots(self, cands, induce) -> torch.Tensor | None:
        if self.prefix is None:
            return None
        n = len(self.keys)
        return device_tensor([1 + c + (n if a else 0) for c, a in zip(cands, induce)], self.unit_dirs.device)

    def rows(self, seqs, cands, induce) -> torch.Tensor:
        seqs = [s[len(self.opening):] for s in seqs]
        return self.decoder.last_logits(seqs, self._interventions(cands, induce), self.prefix,
                                        self._slots(cands, induce))

    def baseline(self, seqs, capture: bool):
        slots = None if self.prefix is None else torch.zeros(len(seqs), dtype=torch.long, device=self.unit_dirs.device)
        seqs = [s[len(self.opening):] for s in seqs]
        logits, resid, last = self.decoder.capture(seqs, self.prefix, slots)
        return logits, (resid, last, [len(s) for s in seqs]) if capture else None

    def replay_matches(self, prefix, logits) -> bool:
        return True  # checked with the rest of this path by _fast_matches

    def replay(self, prefix, prompts, cands) -> torch.Tensor:
        resid, last, lengths = prefix
        width = max(lengths[p] for p in prompts)  # right padding: positions past every row's end can go
        resid = [r[:, :width] for r in resid]
        starts = [self.keys[c][1] for c in cands]
        vectors = self.add_vecs[device_tensor(list(cands), self.unit_dirs.device)]
        return self.decoder.replay(resid, last, prompts, starts, vectors, self.prefix,
                                   self._slots(cands, [True] * len(cands)))


def choose_passes(lm: LoadedModel, unit_dirs, add_vecs, keys, opening: list[int], check: Sequence[Sequence[int]],
                  finite: torch.Tensor, fast_forward: bool, fuse: bool) -> HFPasses | FastPasses:
    """The sweep forward if it supports ``lm`` and matches HF's forward with hooks, else HF's forward (with the
    shared opening only if it reproduces full passes). A decoder that matched is kept for later sweeps of the
    same model until a weight changes (in ``lm.extra``), so only a process's first sweep pays for the checks."""
    settings = (fuse, tuple(opening), lm.device, lm.dtype)
    if fast_forward:
        cached = lm.extra.get(CHECKED_DECODER)
        if cached is not None and cached[2].lm is lm and cached[:2] == (weights_key(lm.model), settings):
            return FastPasses(cached[2], unit_dirs, add_vecs, keys, list(cached[3]))  # the opening as checked
        lm.extra.pop(CHECKED_DECODER, None)  # a stale one (weights changed) would keep its q/k/v copy alive
    if opening and not opening_matches(lm, opening, check[:8], last_logits(lm, check[:8])):
        opening = []
    reference = HFPasses(lm, unit_dirs, add_vecs, keys, opening)
    decoder = shared_decoder(lm, fuse) if fast_forward else None
    if decoder is None:
        return reference
    fast = FastPasses(decoder, unit_dirs, add_vecs, keys, opening)
    # checked against full passes, not against the opening shortcut: two checks' errors do not add up
    if not _fast_matches(fast, HFPasses(lm, unit_dirs, add_vecs, keys, []), check, finite):
        lm.extra.pop(BUILT_DECODER, None)  # not used: free its q/k/v copy
        return reference
    lm.extra[CHECKED_DECODER] = (weights_key(lm.model), settings, decoder, tuple(opening))
    return fast


def _fast_matches(fast: FastPasses, full: HFPasses, seqs: Sequence[Sequence[int]], finite: torch.Tensor) -> bool:
    """Whether the sweep forward reproduces HF's full passes with hooks on a few rows of every kind: ablation,
    addition, a baseline capture and a replay from it (each row one at a time too, for the bound in bf16)."""
    seqs = list(seqs[:4])
    usable = [c for c in range(len(fast.keys)) if finite[c]]
    if not seqs or not usable:
        return False
    cands = [usable[i * (len(usable) - 1) // 3] for i in range(4)][:len(seqs)] * 2
    cands, seqs2 = cands[:2 * len(seqs)], seqs * 2
    induce = [i >= len(seqs) for i in range(len(seqs2))]

    def one_at_a_time(rows, cs, ind):
        return lambda: torch.cat([full.rows([r], [c], [i]) for r, c, i in zip(rows, cs, ind)])

    if not reproduces_logits(fast.decoder.lm, "sweep forward", lambda: fast.rows(seqs2, cands, induce),
                             full.rows(seqs2, cands, induce), one_at_a_time(seqs2, cands, induce)):
        return False

    def replayed():
        _, capture = fast.baseline(seqs, True)
        return fast.replay(capture, list(range(len(seqs))), cands[len(seqs):])

    added = [True] * len(seqs)
    return reproduces_logits(fast.decoder.lm, "sweep forward replay", replayed,
                             full.rows(seqs, cands[len(seqs):], added), one_at_a_time(seqs, cands[len(seqs):], added))
