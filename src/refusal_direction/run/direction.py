"""Stage direction: a fixed (layer, position), a saved direction file, or automatic selection over the candidates."""

from __future__ import annotations

import logging
import math
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
    path = run.layout.direction
    if path.is_file() and not force:
        return load_direction(path)
    if run.config.direction_file:
        direction = load_direction(run.config.direction_file, model_id=run.config.model, d_model=run.lm.d_model)
        save_direction(direction, path, {"selected_by": f"file {run.config.direction_file}"})
        return direction
    mode, layer, position = run.config.resolved_direction()
    if mode == "auto":
        position, layer = select_direction(run, samples, candidates)
    check_position_layer(position, layer, candidates.positions, candidates.n_layers, run.config.model)
    direction = candidates.get(position, layer)
    check_finite_direction(direction.vector, f"the direction at layer {layer}, position {position}", nonzero=True)
    save_direction(direction, path, {"selected_by": mode, "source_run": str(run.out)})
    log.info("direction: layer %d, position %d (%s), norm %.3f", layer, position, mode, float(direction.vector.norm()))
    return direction


def select_direction(run: Run, samples: Samples, candidates: CandidateDirections) -> tuple[int, int]:
    """Automatic selection by ``select_rule`` (docs/SELECTION.md); writes selection.json and the heatmaps."""
    from ..report.selection_figure import plot_selection_heatmaps

    c = run.config
    t0 = time.perf_counter()
    train_answers = _baseline_answers(run, samples.harmful_train, "refusal_tokens", "refusal_tokens_s") \
        if not c.refusal_tokens or (c.select_rule == "generation" and c.select_train_prompts) else None
    tokens = _refusal_tokens(run, train_answers)
    val = _validation(run, samples, tokens.ids)
    layers = parse_layers(c.select_layers, candidates.n_layers) if c.select_layers else None
    if c.select_rule == "paper":
        result, scores, thresholds, record = _select_paper(run, candidates, val, tokens.ids, layers)
    else:
        pool, pool_record = _pool(run, samples, train_answers)
        result, scores, thresholds, record = _select_generation(run, candidates, val, tokens.ids, layers, pool,
                                                                0 if "fallback" in pool_record else None)
        record["generation"]["pool"] = pool_record
    run.timing("select_s", time.perf_counter() - t0)
    run.layout.figures_dir.mkdir(exist_ok=True)
    plot_selection_heatmaps(scores, candidates.n_layers, candidates.positions, run.layout.figure("selection_heatmaps"),
                            chosen=(result.position, result.layer), thresholds=thresholds)
    atomic_write_json(run.layout.selection, {
        **record, "strategy": c.select_strategy,
        "n_harmful_val": len(val.harmful), "n_harmless_val": len(val.harmless), "filter_val": c.filter_val,
        "validation": val.to_json(), "refusal_tokens": tokens.to_json(),
        "layers_scored": sorted({s.layer for s in scores}), "induce_relative": c.induce_relative,
    })
    log.info("selection (%s rule) in %.1fs: layer %d, position %d", c.select_rule, time.perf_counter() - t0,
             result.layer, result.position)
    return result.position, result.layer


def _baseline_answers(run: Run, instructions, name: str, timing: str):
    """Greedy unablated answers (``select_new_tokens`` tokens) to ``instructions``."""
    from ..edits import Baseline
    from ..generation import generate_all

    t0 = time.perf_counter()
    settings = run.generation.replace(max_new_tokens=run.config.select_new_tokens)
    answers = generate_all(run.lm, [i.text for i in instructions], [Baseline(name)], settings)[name]
    run.timing(timing, time.perf_counter() - t0)
    return answers


def _refusal_tokens(run: Run, train_answers):
    """The config's refusal words, else the first tokens of the model's own greedy refusals of the harmful
    training prompts (`selection.tokens`)."""
    from ..evaluation.refusal import is_refusal
    from ..selection.tokens import configured_refusal_tokens, derive_refusal_tokens

    if run.config.refusal_tokens:
        return configured_refusal_tokens(run.lm, run.config.refusal_tokens)
    return derive_refusal_tokens(run.lm, train_answers, is_refusal)


def _pool(run: Run, samples: Samples, train_answers) -> tuple[list[str], dict]:
    """The generation rule's judged pool: the harmful validation prompts the unablated model refuses, then up
    to ``select_train_prompts`` refused harmful training prompts (their answers are the refusal tokens')."""
    from ..evaluation.refusal import is_refusal
    from ..selection import judged_pool

    c = run.config
    val_answers = _baseline_answers(run, samples.harmful_val, "selection_baseline", "selection_baseline_s")
    train = [i.text for i in samples.harmful_train] if train_answers is not None else []
    train_refused = [is_refusal(g.text) for g in train_answers] if train_answers is not None else []
    pool, record = judged_pool([i.text for i in samples.harmful_val], [is_refusal(g.text) for g in val_answers],
                               train, train_refused, c.select_train_prompts)
    log.info("generation rule pool: %d of %d validation and %d of %d refused training prompts (the unablated "
             "model refuses them)", record["n_val_refused"], record["n_val"], record["n_train_used"],
             record["n_train_refused"])
    return pool, record


def _validation(run: Run, samples: Samples, refusal_ids: list[int]):
    """The validation prompts to score on: filtered (with a floor of min_val_prompts per kind) or all."""
    from .. import selection

    c = run.config
    harmful, harmless = [i.text for i in samples.harmful_val], [i.text for i in samples.harmless_val]
    if not c.filter_val:
        n, m = len(harmful), len(harmless)
        return selection.FilteredValidation(harmful, harmless, n, m, n, m, None)
    return selection.filter_validation_checked(run.lm, harmful, harmless, refusal_ids, c.batch_size,
                                               c.min_val_prompts)


def _select_paper(run: Run, candidates: CandidateDirections, val, refusal_ids: list[int], layers):
    """The paper's rule: lowest bypass score among candidates with KL <= kl_threshold, induce >= threshold and an
    early enough layer."""
    from .. import selection

    lm, c = run.lm, run.config
    induce_threshold, baseline_harmless = c.induce_threshold, None
    if c.induce_relative:
        baseline_harmless = float(selection.refusal_metrics(lm, val.harmless, refusal_ids, c.batch_size).mean())
        induce_threshold = baseline_harmless + c.induce_threshold
        log.info("induce threshold relative to the unintervened harmless metric %.3f: %.3f", baseline_harmless,
                 induce_threshold)
    thresholds = selection.SelectionThresholds(kl_threshold=c.kl_threshold, induce_threshold=induce_threshold,
                                               prune_layer_fraction=c.prune_layer_fraction)
    if c.select_strategy == "lazy":
        result, scores = selection.select_lazy(lm, candidates, val.harmful, val.harmless, thresholds, layers,
                                               refusal_ids=refusal_ids, progress=run.progress)
    else:
        scores = selection.score_candidates(lm, candidates, val.harmful, val.harmless, refusal_ids,
                                            progress=run.progress, layers=layers)
        result = selection.filter_and_rank(scores, candidates.n_layers, thresholds)
    record = {**selection.result_to_json(result, scores), "rule": "paper",
              "baseline_harmless_metric": baseline_harmless}
    return result, scores, thresholds, record


def _select_generation(run: Run, candidates: CandidateDirections, val, refusal_ids: list[int], layers,
                       pool: list[str], baseline_refused: int | None):
    """The generation rule: bypass and KL from the sweep (on the filtered validation prompts), then the top-k
    eligible candidates judged by their ablated greedy answers to ``pool`` (`_pool`; `selection.generated`)."""
    from .. import selection

    lm, c = run.lm, run.config
    rule = selection.GenerationRule(c.select_max_kl, c.select_top_k, c.prune_layer_fraction, c.select_new_tokens)
    if c.select_strategy == "lazy":
        scores = _lazy_bypass_kl(run, candidates, val, refusal_ids, layers, rule)
    else:
        scores = selection.score_candidates(lm, candidates, val.harmful, val.harmless, refusal_ids,
                                            progress=run.progress, layers=layers, kinds=("bypass", "kl"))
    settings = run.generation.replace(max_new_tokens=c.select_new_tokens)
    result = selection.select_by_generation(lm, candidates, scores, pool, rule, settings, baseline_refused)
    thresholds = selection.SelectionThresholds(kl_threshold=c.select_max_kl, induce_threshold=-math.inf,
                                               prune_layer_fraction=c.prune_layer_fraction)
    return result, scores, thresholds, selection.generation_result_to_json(result, scores)


def _lazy_bypass_kl(run: Run, candidates: CandidateDirections, val, refusal_ids: list[int], layers, rule):
    """Bypass for every unpruned candidate, KL in ascending bypass order until ``top_k`` have KL <= max_kl: the
    pre-filter keeps the same candidates as with KL for all (unevaluated ones keep NaN KL)."""
    from dataclasses import replace

    from .. import selection

    lm, max_layer = run.lm, rule.max_layer(candidates.n_layers)
    layers = [x for x in (range(candidates.n_layers) if layers is None else layers) if x < max_layer]
    keys = [(p, x) for p in candidates.positions for x in layers]
    scores = {(s.position, s.layer): s for s in selection.score_candidates(
        lm, candidates, val.harmful, val.harmless, refusal_ids, progress=run.progress, keys=keys, kinds=("bypass",))}
    order = sorted((k for k, s in scores.items() if math.isfinite(s.bypass)), key=lambda k: scores[k].bypass)
    eligible = 0
    for start in range(0, len(order), rule.top_k):
        chunk = order[start:start + rule.top_k]
        for r in selection.score_candidates(lm, candidates, val.harmful, val.harmless, refusal_ids, keys=chunk,
                                            kinds=("kl",)):
            scores[(r.position, r.layer)] = replace(scores[(r.position, r.layer)], kl=r.kl)
            eligible += r.kl <= rule.max_kl
        if eligible >= rule.top_k:
            break
    return [scores[k] for k in keys]
