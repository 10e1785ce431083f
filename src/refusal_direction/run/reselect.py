"""`select --from-scores`: the layer count and thresholds of a saved selection, unless the user gives them.

Our selection.json stores ``n_layers`` and the ``thresholds`` it was made with (the induce threshold as
applied, i.e. already relative to the harmless baseline when ``induce_relative`` was on); re-selecting
uses those, so the run's own choice is reproduced. The paper's direction_evaluations.json stores neither:
then the config's defaults apply and ``n_layers`` falls back to the largest scored layer + 1.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import FIELDS
from ..errors import UserError
from ..fileio import read_json

if TYPE_CHECKING:
    from ..selection import SelectionResult

log = logging.getLogger(__name__)

THRESHOLDS = ("kl_threshold", "induce_threshold", "prune_layer_fraction")  # the run config's keys, and defaults
DEFAULTS = {key: FIELDS[key].default for key in THRESHOLDS}


def select(from_scores: str | Path, n_layers: int | None = None, *, kl_threshold: float | None = None,
           induce_threshold: float | None = None, prune_layer_fraction: float | None = None) -> SelectionResult:
    """The paper's filtering and ranking on saved scores (our selection.json or the paper's
    direction_evaluations.json), no model: a `selection.SelectionResult`. Values left None: the file's stored
    ones, else the run config's defaults."""
    from ..selection import SelectionThresholds, select_from_scores_file

    n_layers, given = stored_selection_args(Path(from_scores), n_layers, {
        "kl_threshold": kl_threshold, "induce_threshold": induce_threshold,
        "prune_layer_fraction": prune_layer_fraction})
    return select_from_scores_file(Path(from_scores), n_layers, SelectionThresholds(**given))


def stored_selection_args(path: Path, n_layers: int | None, given: dict[str, float | None]
                          ) -> tuple[int | None, dict[str, float]]:
    """(n_layers, thresholds): the user's values, else the file's stored ones, else the defaults."""
    if not Path(path).is_file():
        raise UserError(f"--from-scores {path} does not exist; pass a run's selection.json or the paper's "
                        "direction_evaluations.json")
    data = read_json(path, "scores file", expect=None, fix="pass a run's selection.json or the paper's "
                                                            "direction_evaluations.json")
    stored = data.get("thresholds") if isinstance(data, dict) else None
    stored = stored if isinstance(stored, dict) else {}
    out = {}
    for key, default in DEFAULTS.items():
        value = given.get(key)
        if value is None:
            value = stored.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{key}={value!r} (from {path if given.get(key) is None else 'the command line'}) is "
                            "not a finite number; pass --" + key.replace("_", "-") + " explicitly")
        out[key] = float(value)
    if n_layers is None and isinstance(data, dict) and data.get("n_layers") is not None:
        n_layers = data["n_layers"]
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise UserError(f"{path}: stored n_layers={n_layers!r} is not a positive integer; pass --n-layers")
        log.info("n_layers %d and thresholds %s: stored in %s", n_layers, out, path)
    if n_layers is not None and n_layers < 1:
        raise UserError(f"--n-layers {n_layers} must be at least 1")
    return n_layers, out
