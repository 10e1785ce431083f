"""Stage direction: a fixed (layer, position), a saved direction file, or automatic selection over the candidates."""

from __future__ import annotations

import logging
import time

from ..config import parse_layers
from ..core.directions import (
    CandidateDirections,
    Direction,
    check_finite_direction,
    check_position_layer,
    load_direction,
    save_direction,
)
from ..data.instructions import Samples
from ..fileio import atomic_write_json
from .rundir import Run

log = logging.getLogger(__name__)


def stage_direction(run: Run, samples: Samples, candidates: CandidateDirections | None,
                    force: bool = False) -> Direction:
    if run.direction_path.is_file() and not force:
        return load_direction(run.direction_path)
    if run.config.direction_file:
        direction = load_direction(run.config.direction_file, model_id=run.config.model, d_model=run.lm.d_model)
        save_direction(direction, run.direction_path, {"selected_by": f"file {run.config.direction_file}"})
        return direction
    mode, layer, position = run.config.resolved_direction()
    if mode == "auto":
        position, layer = select_direction(run, samples, candidates)
    check_position_layer(position, layer, candidates.positions, candidates.n_layers, run.config.model)
    direction = candidates.get(position, layer)
    check_finite_direction(direction.vector, f"the direction at layer {layer}, position {position}", nonzero=True)
    save_direction(direction, run.direction_path, {"selected_by": mode, "source_run": str(run.out)})
    log.info("direction: layer %d, position %d (%s), norm %.3f", layer, position, mode, float(direction.vector.norm()))
    return direction


def select_direction(run: Run, samples: Samples, candidates: CandidateDirections) -> tuple[int, int]:
    from .. import selection
    from ..report.selection_figure import plot_selection_heatmaps

    lm, c = run.lm, run.config
    t0 = time.perf_counter()
    harmful_val, harmless_val = [i.text for i in samples.harmful_val], [i.text for i in samples.harmless_val]
    if c.filter_val:
        harmful_val, harmless_val = selection.filter_validation(lm, harmful_val, harmless_val,
                                                                batch_size=c.batch_size)
    layers = parse_layers(c.select_layers, candidates.n_layers) if c.select_layers else None
    induce_threshold = c.induce_threshold
    baseline_harmless = None
    if c.induce_relative:
        baseline_harmless = float(selection.refusal_metrics(lm, harmless_val, batch_size=c.batch_size).mean())
        induce_threshold = baseline_harmless + c.induce_threshold
        log.info("induce threshold relative to the unintervened harmless metric %.3f: %.3f", baseline_harmless,
                 induce_threshold)
    thresholds = selection.SelectionThresholds(kl_threshold=c.kl_threshold, induce_threshold=induce_threshold,
                                               prune_layer_fraction=c.prune_layer_fraction)
    if c.select_strategy == "lazy":
        result, scores = selection.select_lazy(lm, candidates, harmful_val, harmless_val, thresholds, layers,
                                               progress=run.progress)
    else:
        scores = selection.score_candidates(lm, candidates, harmful_val, harmless_val, progress=run.progress,
                                            layers=layers)
        result = selection.filter_and_rank(scores, candidates.n_layers, thresholds)
    run.timing("select_s", time.perf_counter() - t0)
    (run.out / "figures").mkdir(exist_ok=True)
    plot_selection_heatmaps(scores, candidates.n_layers, candidates.positions,
                            run.out / "figures" / "selection_heatmaps.png",
                            chosen=(result.position, result.layer), thresholds=thresholds)
    atomic_write_json(run.out / "selection.json", {
        **selection.result_to_json(result, scores), "strategy": c.select_strategy,
        "n_harmful_val": len(harmful_val), "n_harmless_val": len(harmless_val), "filter_val": c.filter_val,
        "layers_scored": sorted({s.layer for s in scores}), "induce_relative": c.induce_relative,
        "baseline_harmless_metric": baseline_harmless,
    })
    return result.position, result.layer
