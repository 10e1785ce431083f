"""Lazy selection: the full sweep's choice while computing induce and KL for only a few candidates."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Sequence

from ..core.directions import CandidateDirections
from ..core.model import LoadedModel
from ..errors import UserError
from .rules import (
    CandidateScore,
    SelectionResult,
    SelectionThresholds,
    discard_reasons,
    filter_and_rank,
    nothing_survives_message,
)
from .sweep import score_candidates

log = logging.getLogger(__name__)


def select_lazy(
    lm: LoadedModel,
    candidates: CandidateDirections,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    thresholds: SelectionThresholds = SelectionThresholds(),
    layers: Sequence[int] | None = None,
    group: int = 4,
    refusal_ids: Sequence[int] | None = None,
    max_batch_rows: int | None = None,
    progress: bool = False,
) -> tuple[SelectionResult, list[CandidateScore]]:
    """The paper's choice at a fraction of the cost: same answer as `score_candidates` + `filter_and_rank`.

    The choice is the lowest-bypass candidate that passes the filters. So: skip layers the layer filter
    removes anyway, compute only the bypass score of the rest, then compute induce and KL in ascending
    bypass order, ``group`` candidates at a time, and stop at the first candidate that passes. Every
    candidate with a lower bypass score was evaluated and failed, so the choice equals the full sweep's.
    Unevaluated candidates keep NaN induce/KL (the survivors list holds evaluated candidates only).
    """
    n_layers = candidates.n_layers
    max_layer = thresholds.max_layer(n_layers)
    layers = [x for x in (range(n_layers) if layers is None else layers) if x < max_layer]
    keys = [(p, x) for p in candidates.positions for x in layers]
    bypass = score_candidates(lm, candidates, harmful_val, harmless_val, refusal_ids, max_batch_rows=max_batch_rows,
                              progress=progress, keys=keys, kinds=("bypass",))
    scores = {(s.position, s.layer): s for s in bypass}
    order = sorted((s for s in bypass if math.isfinite(s.bypass)), key=lambda s: s.bypass)
    chosen = None
    for start in range(0, len(order), group):
        chunk = [(s.position, s.layer) for s in order[start:start + group]]
        rest = score_candidates(lm, candidates, harmful_val, harmless_val, refusal_ids,
                                max_batch_rows=max_batch_rows, keys=chunk, kinds=("induce", "kl"))
        for r in rest:
            scores[(r.position, r.layer)] = replace(scores[(r.position, r.layer)], induce=r.induce, kl=r.kl)
        for key in chunk:
            if not discard_reasons(scores[key], n_layers, thresholds):
                chosen = key
                break
        if chosen:
            break
    evaluated = [s for s in scores.values() if math.isfinite(s.induce) or math.isfinite(s.kl)]
    if chosen is None:
        raise UserError(nothing_survives_message(evaluated or list(scores.values()), n_layers, thresholds))
    result = filter_and_rank(evaluated, n_layers, thresholds)
    assert (result.position, result.layer) == chosen
    log.info("lazy selection: bypass for %d candidates, induce/KL for %d", len(keys), len(evaluated))
    return result, [scores[k] for k in keys]
