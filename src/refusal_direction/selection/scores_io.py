"""Candidate scores and selection results as JSON: ours, and the paper's direction_evaluations.json.

Saved scores can be filtered again without the model (`select_from_scores_file`), e.g. with other thresholds.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from .rules import CandidateScore, SelectionResult, SelectionThresholds, filter_and_rank

log = logging.getLogger(__name__)


def score_to_json(s: CandidateScore) -> dict:
    def num(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {"position": s.position, "layer": s.layer,
            "bypass_score": num(s.bypass), "induce_score": num(s.induce), "kl_score": num(s.kl),
            # the paper's keys, for tools that read direction_evaluations.json
            "refusal_score": num(s.bypass), "steering_score": num(s.induce), "kl_div_score": num(s.kl)}


def scores_to_json(scores: Sequence[CandidateScore]) -> list[dict]:
    return [score_to_json(s) for s in scores]


_KEYS = {"bypass": ("bypass_score", "refusal_score"), "induce": ("induce_score", "steering_score"),
         "kl": ("kl_score", "kl_div_score")}


def scores_from_json(rows: list, source: str = "scores") -> list[CandidateScore]:
    """Rows in our format or the paper's (``refusal_score``, ``steering_score``, ``kl_div_score``)."""
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "position" not in row or "layer" not in row:
            raise UserError(f"{source}: entry {i} is not an object with 'position' and 'layer' ({str(row)[:80]})")
        values = {}
        for name, keys in _KEYS.items():
            key = next((k for k in keys if k in row), None)
            if key is None:
                raise UserError(f"{source}: entry {i} (position {row['position']}, layer {row['layer']}) has none "
                                f"of the keys {' / '.join(keys)}; expected our selection scores or the paper's "
                                "direction_evaluations.json")
            values[name] = float("nan") if row[key] is None else float(row[key])
        out.append(CandidateScore(int(row["position"]), int(row["layer"]), **values))
    return out


def load_scores(path: str | Path) -> list[CandidateScore]:
    """Read candidate scores: a JSON list (ours or the paper's), or our selection.json (key ``scores``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"scores file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"scores file {path} is not valid JSON ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("scores"), list):
        data = data["scores"]
    if not isinstance(data, list) or not data:
        raise UserError(f"scores file {path} holds no list of candidate scores (expected a JSON list like the "
                        "paper's direction_evaluations.json, or a selection.json)")
    return scores_from_json(data, str(path))


def result_to_json(result: SelectionResult, scores: Sequence[CandidateScore] | None = None) -> dict:
    """The choice, thresholds, ordered survivors, and every scored candidate with its discard reasons."""
    reasons = {(s.position, s.layer): r for s, r in result.discarded}
    all_scores = list(scores) if scores is not None else list(result.survivors) + [s for s, _ in result.discarded]
    return {
        "chosen": score_to_json(result.chosen),
        "thresholds": {"kl_threshold": result.thresholds.kl_threshold,
                       "induce_threshold": result.thresholds.induce_threshold,
                       "prune_layer_fraction": result.thresholds.prune_layer_fraction,
                       "first_pruned_layer": result.max_layer},
        "n_layers": result.n_layers,
        "survivors": [{"position": s.position, "layer": s.layer} for s in result.survivors],
        "scores": [{**score_to_json(s), "discarded": list(reasons.get((s.position, s.layer), ()))}
                   for s in all_scores],
    }


def select_from_scores_file(
    path: str | Path, n_layers: int | None = None, thresholds: SelectionThresholds = SelectionThresholds()
) -> SelectionResult:
    """Re-run the filters on saved scores (no model needed); ``n_layers`` defaults to max layer + 1."""
    scores = load_scores(path)
    if n_layers is None:
        n_layers = max(s.layer for s in scores) + 1
        log.info("n_layers not given: assuming %d (largest scored layer + 1)", n_layers)
    return filter_and_rank(scores, n_layers, thresholds)
