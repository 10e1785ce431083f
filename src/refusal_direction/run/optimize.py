"""Stage optimize: an Optuna search for the least damaging edit that removes refusal (`search`).

In the run directory (samples, extraction and the direction are the run's own, made or reused as in
`replicate`)::

    optimize/study.journal  the Optuna study (journal file): every asked and told trial; re-running continues it
    optimize/front.json     the Pareto front (validation objectives), front.md, front.png (every trial + front)
    optimize/final.json     the chosen edit and DiM on JailbreakBench (the run's max_new_tokens) and XSTest
                            safe prompts, with the run's judge and the substring judge; final.md
    optimize/export/        the chosen edit merged into the weights (export.export_edit), verified
    optimize/lora/          with --lora: the same edit as a peft LoRA adapter (export.lora), verified
    optimize/summary.json   settings, counts, the choice, speed (trials/s batched and one at a time), final

Objectives, on prompts the final evaluation never sees: the refusal rate on the run's harmful validation
prompts (greedy ``search_tokens`` tokens, the run's judge, default ``learned``) and the mean next-token KL on
its harmless validation prompts. Trial 0 of a new study is the paper's DiM ablation at the run's selected
direction (subspace form, k = 1), so the front is seen beside it. The choice rule is `search.study.choose`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import RunConfig
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, record_in_manifest
from .direction import stage_direction
from .extract import stage_extract, stage_samples
from .layout import RunLayout
from .optimize_settings import OptimizeSettings
from .outdir import release_lock
from .rundir import Run

log = logging.getLogger(__name__)

CHOICE_RULE = ("among the Pareto-front trials with validation refusal <= target, the lowest KL; if none reaches "
               "the target, the lowest refusal (ties: lowest KL, then lowest trial number)")


@dataclass(frozen=True)
class OptimizeResult:
    """`optimize`'s outcome: optimize/summary.json's content (settings, counts, the front and the chosen trial, speed,
    the final evaluation's rows, the export's verification) and the run directory."""

    out: Path
    summary: Mapping[str, Any]

    @property
    def chosen(self) -> dict | None:
        return self.summary["chosen"]

    @property
    def front(self) -> list[dict]:
        return list(self.summary["front"])

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.out)


def optimize(config: RunConfig, out: str | Path, settings: OptimizeSettings | None = None, *, force: bool = False,
             progress: bool = False) -> OptimizeResult:
    """The search on ``config``'s model in the run directory ``out`` (a re-run, also after a kill, continues the
    study), then the front, the chosen edit's final evaluation and its verified export (``settings``)."""
    from .pipeline import start_run

    t0 = time.perf_counter()
    run = start_run(out, config, force=force, progress=progress)
    try:
        return OptimizeResult(run.out, stage_optimize(run, settings or OptimizeSettings(), t0))
    finally:
        release_lock(run.out)


def _evaluator(run: Run, samples, s: OptimizeSettings):
    from ..evaluation.judges import get_judge
    from ..search import TrialEvaluator

    settings = run.generation.replace(max_new_tokens=s.search_tokens, progress=False)
    return TrialEvaluator(run.lm, [i.text for i in samples.harmful_val], [i.text for i in samples.harmless_val],
                          get_judge(run.config.judge), settings, max_rows=s.max_kl_rows)


def search(run: Run, samples, candidates, direction, s: OptimizeSettings):
    """Open (or continue) the study, recover killed trials, run the batches; (study, speed record)."""
    from ..edits import build, suggest
    from ..search import open_study, recover_running, run_batches
    from .compare_methods import edit_inputs

    study = open_study(run.layout.optimize_study, s.seed)
    record_in_manifest(run.out, run.layout.optimize_study)
    recovered = recover_running(study)
    if not study.trials:
        study.enqueue_trial({"position": direction.position, "layer_index": float(direction.layer),
                             "form": "subspace", "k": 1}, user_attrs={"reference": "dim"})
    evaluator = _evaluator(run, samples, s)
    inputs = edit_inputs(run, samples, candidates, direction)
    result = run_batches(
        study, s.trials, s.batch, suggest=lambda t: suggest(t, list(candidates.positions), run.lm.n_layers),
        build=lambda p, name: build(inputs, p, name),
        evaluate=evaluator.evaluate, progress=run.progress)
    result["phases"] |= {f"evaluate_{k}": v for k, v in evaluator.timings.items()}
    return study, {**result, "batch_trials": s.batch, "recovered_running": recovered}


def _row(t) -> dict:
    return {"number": t.number, "refusal": t.values[0], "kl": t.values[1],
            "n_refusals": t.user_attrs.get("n_refusals"), "n_harmful": t.user_attrs.get("n_harmful"),
            "params": dict(t.params), **({"reference": t.user_attrs["reference"]} if "reference" in t.user_attrs
                                         else {})}


def write_front(run: Run, study, s: OptimizeSettings) -> tuple[list[dict], dict | None]:
    """front.json / front.md / front.png; (front rows, chosen row)."""
    from ..report.optimize import front_markdown, front_png
    from ..search import choose, complete_trials, pareto_front

    front_trials = pareto_front(study)
    picked = choose(front_trials, s.target)
    front = [_row(t) for t in front_trials]
    chosen = _row(picked) if picked is not None else None
    number = None if chosen is None else chosen["number"]
    layout = run.layout
    atomic_write_json(layout.optimize_front("json"), {"schema_version": 1, "model": run.config.model, "front": front,
                                         "chosen": chosen, "target": s.target, "choice_rule": CHOICE_RULE})
    atomic_write_text(layout.optimize_front("md"), front_markdown(front, number))
    everything = [_row(t) for t in complete_trials(study)]
    atomic_write_bytes(layout.optimize_front("png"), front_png(everything, front, number,
                                                  f"{run.config.model}: {len(everything)} trials"))
    return front, chosen


def _speed(run: Run, record: dict, setup_s: float, s: OptimizeSettings) -> dict:
    """Latest speed record per mode (batched / one_at_a_time) with its phase seconds, kept across calls; the ratio
    when both exist."""
    path = run.layout.optimize_summary
    speed = dict(read_json(path, "run file").get("speed", {})) if path.is_file() else {}
    if record["told"]:
        speed["one_at_a_time" if s.batch == 1 else "batched"] = {
            "trials": record["told"], "seconds": round(record["seconds"], 3),
            "trials_per_s": record["trials_per_s"], "batch_trials": s.batch, "setup_s": round(setup_s, 3),
            "total_s": round(setup_s + record["seconds"], 3), "backend": run.config.generation_backend,
            "phases": {k: round(v, 3) for k, v in record.get("phases", {}).items()}}
    a, b = speed.get("batched"), speed.get("one_at_a_time")
    speed.pop("speedup", None)
    if a and b and b["trials_per_s"]:
        speed["speedup"] = a["trials_per_s"] / b["trials_per_s"]
    return speed


def _without_completions(final: dict | None) -> dict | None:
    """final.json's content for summary.json: the rows and the key, not the per-prompt records (completions stay in
    final.json in the run directory)."""
    if final is None:
        return None
    return {k: v for k, v in final.items() if k not in ("records", "kl_per_prompt")} | {"records": "final.json"}


def stage_optimize(run: Run, s: OptimizeSettings, t_start: float | None = None) -> dict:
    """Search, front, final evaluation and export (each resumable); optimize/summary.json's content."""
    from ..search import complete_trials
    from .optimize_final import export_chosen, final_evaluation

    t_start = time.perf_counter() if t_start is None else t_start
    samples = stage_samples(run)
    candidates = stage_extract(run, samples)
    direction = stage_direction(run, samples, candidates)
    run.layout.optimize_dir.mkdir(parents=True, exist_ok=True)
    _ = run.lm  # the model load counts as set-up
    setup_s = time.perf_counter() - t_start
    study, record = search(run, samples, candidates, direction, s)
    speed = _speed(run, record, setup_s, s)
    front, chosen = write_front(run, study, s)
    final = exported = None
    if chosen is not None:
        final = final_evaluation(run, samples, candidates, direction, chosen, s)
        if s.export:
            exported = export_chosen(run, samples, candidates, chosen, lora=s.lora)
    n_failed = sum(t.state.name == "FAIL" for t in study.get_trials(deepcopy=False))
    summary = {"schema_version": 1, "model": run.config.model, "settings": asdict(s),
               "sampler": "optuna TPESampler (multi-objective, constant_liar, multivariate, group)",
               "objectives": ["refusal rate on harmful_val (judge: " + run.config.judge + ")",
                              "mean next-token KL on harmless_val"],
               "n_complete": len(complete_trials(study)), "n_failed": n_failed, "target": s.target,
               "choice_rule": CHOICE_RULE, "chosen": chosen, "front": front, "speed": speed,
               "last_call": record, "final": _without_completions(final), "export": exported}
    atomic_write_json(run.layout.optimize_summary, summary)
    return summary


__all__ = ["CHOICE_RULE", "OptimizeResult", "OptimizeSettings", "optimize", "stage_optimize", "search",
           "write_front"]
