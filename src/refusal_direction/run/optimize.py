"""Stage optimize: an Optuna search for the least damaging edit that removes refusal (`search`).

In the run directory (samples, extraction and the direction are the run's own, made or reused as in
`replicate`)::

    optimize/study.journal  the Optuna study (journal file): every asked and told trial; re-running continues it
    optimize/front.json     the Pareto front (validation objectives), front.md, front.png (every trial + front)
    optimize/final.json     the chosen edit and DiM on JailbreakBench (the run's max_new_tokens) and XSTest
                            safe prompts, with the run's judge and the substring judge; final.md
    optimize/export/        the chosen edit merged into the weights (export.method_export), verified
    optimize/lora/          with --lora: the same edit as a peft LoRA adapter (export.lora), verified
    optimize/summary.json   settings, counts, the choice, speed (trials/s batched and one at a time), final

Objectives, on prompts the final evaluation never sees: the refusal rate on the run's harmful validation
prompts (greedy ``search_tokens`` tokens, the run's judge, default ``learned``) and the mean next-token KL on
its harmless validation prompts. Trial 0 of a new study is the paper's DiM ablation at the run's selected
direction (subspace form, k = 1), so the front is seen beside it. The choice rule is `search.study.choose`.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.decoding import GenerationSettings
from ..errors import UserError
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, record_in_manifest
from .direction import stage_direction
from .extract import stage_extract, stage_samples
from .rundir import Run

log = logging.getLogger(__name__)

STUDY_FILE = "study.journal"  # the Optuna study (search.study: journal storage)
CHOICE_RULE = ("among the Pareto-front trials with validation refusal <= target, the lowest KL; if none reaches "
               "the target, the lowest refusal (ties: lowest KL, then lowest trial number)")


@dataclass(frozen=True)
class OptimizeSettings:
    """The search's own settings (the run's config holds the model, data, judge and generation settings)."""

    trials: int = 200  # complete trials the study should hold when this call ends
    batch_trials: int = 50  # trials asked, evaluated together and told per batch
    seed: int = 0  # the sampler's seed
    one_at_a_time: bool = False  # batch size 1 (to measure the batched speed-up in the same run)
    target: float = 0.03  # refusal target of the choice rule
    search_tokens: int = 32  # greedy tokens per harmful validation prompt during the search
    n_xstest: int = 250  # XSTest safe prompts in the final evaluation (0: skip)
    export: bool = True  # export and verify the chosen edit
    lora: bool = False  # also a peft LoRA adapter of the chosen edit (export/lora.py), verified
    max_kl_rows: int = 2048  # rows per KL forward pass (halved on out-of-memory)

    def __post_init__(self):
        problems = [f"--{name.replace('_', '-')} {value}: {need}" for name, value, ok, need in (
            ("trials", self.trials, self.trials >= 1, "use at least 1"),
            ("batch_trials", self.batch_trials, self.batch_trials >= 1, "use at least 1"),
            ("target", self.target, 0.0 <= self.target <= 1.0, "a refusal rate, between 0 and 1"),
            ("search_tokens", self.search_tokens, self.search_tokens >= 1, "use at least 1"),
            ("n_xstest", self.n_xstest, self.n_xstest >= 0, "use 0 (skip) or more"),
            ("max_kl_rows", self.max_kl_rows, self.max_kl_rows >= 1, "use at least 1"),
            ("lora", self.lora, self.export or not self.lora, "needs the export (drop --no-export)"),
            ("lora", self.lora, not self.lora or importlib.util.find_spec("peft") is not None,
             "needs peft, which is not installed: pip install 'refusal-direction[lora]'")) if not ok]
        if problems:
            raise UserError("; ".join(problems))

    @property
    def batch(self) -> int:
        return 1 if self.one_at_a_time else self.batch_trials


def optimize_dir(run: Run) -> Path:
    return run.out / "optimize"


def optimize_main(out: Path, model: str | None, config: Path | None, settings: OptimizeSettings, force: bool,
                  setup_logging=None) -> str:
    """The ``optimize`` command: config from ``config`` (TOML, any run key) and ``model``; a text summary."""
    from ..config import build_config
    from .pipeline import start_run

    t0 = time.perf_counter()
    if setup_logging is not None:
        setup_logging(out)
    cfg = build_config({**({"model": model} if model else {}), "safety": False}, config)
    summary = stage_optimize(start_run(out, cfg, force=force, progress=True), settings, t0)
    c = summary["chosen"]
    lines = [f"trials complete: {summary['n_complete']} (failed/retried: {summary['n_failed']}); "
             f"front: {len(summary['front'])} trials",
             f"speed: {summary['speed']}",
             f"chosen: trial {c['number']} ({c['params']['form']}), validation refusal {c['refusal']:.3f}, "
             f"KL {c['kl']:.4f}" if c else "chosen: none"]
    if summary.get("final"):
        for r in summary["final"]["rows"]:
            lines.append(f"  {r['edit']}: JBB refusal {r['refusal']['rate']:.3f}, KL {r['kl']['value']:.4f}")
    if summary.get("export"):
        lines.append(f"export: {summary['export']['dir']} (verified: {summary['export']['verify']['ok']})")
        lora = summary["export"].get("lora")
        if lora:
            lines.append(f"LoRA adapter: {lora['dir']} (rank {lora['rank']}, verified: {lora['verify']['ok']})"
                         if "dir" in lora else f"LoRA adapter: not written ({lora['skipped']})")
    lines.append(f"outputs: {optimize_dir_for(out)}")
    return "\n".join(lines)


def optimize_dir_for(out: Path) -> Path:
    return Path(out) / "optimize"


def _evaluator(run: Run, samples, s: OptimizeSettings):
    from ..evaluation.judges import get_judge
    from ..search import TrialEvaluator

    c = run.config
    settings = GenerationSettings(s.search_tokens, c.batch_size, c.stop_at_end_of_turn)
    return TrialEvaluator(run.lm, [i.text for i in samples.harmful_val], [i.text for i in samples.harmless_val],
                          get_judge(c.judge), settings, backend=c.generation_backend, step=c.decode_step,
                          max_rows=s.max_kl_rows)


def search(run: Run, samples, candidates, direction, s: OptimizeSettings):
    """Open (or continue) the study, recover killed trials, run the batches; (study, speed record)."""
    from ..search import build_intervention, open_study, recover_running, run_batches, suggest

    study = open_study(optimize_dir(run) / STUDY_FILE, s.seed)
    record_in_manifest(run.out, optimize_dir(run) / STUDY_FILE)
    recovered = recover_running(study)
    if not study.trials:
        study.enqueue_trial({"position": direction.position, "layer_index": float(direction.layer),
                             "form": "subspace", "k": 1}, user_attrs={"reference": "dim"})
    evaluator = _evaluator(run, samples, s)
    lm, c = run.lm, run.config
    result = run_batches(
        study, s.trials, s.batch, suggest=lambda t: suggest(t, list(candidates.positions), lm.n_layers),
        build=lambda p, name: build_intervention(lm, candidates, p, name, c.prune_layer_fraction),
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
    d = optimize_dir(run)
    atomic_write_json(d / "front.json", {"schema_version": 1, "model": run.config.model, "front": front,
                                         "chosen": chosen, "target": s.target, "choice_rule": CHOICE_RULE})
    atomic_write_text(d / "front.md", front_markdown(front, number))
    everything = [_row(t) for t in complete_trials(study)]
    atomic_write_bytes(d / "front.png", front_png(everything, front, number,
                                                  f"{run.config.model}: {len(everything)} trials"))
    return front, chosen


def _speed(run: Run, record: dict, setup_s: float, s: OptimizeSettings) -> dict:
    """Latest speed record per mode (batched / one_at_a_time) with its phase seconds, kept across calls; the ratio
    when both exist."""
    path = optimize_dir(run) / "summary.json"
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
    optimize_dir(run).mkdir(parents=True, exist_ok=True)
    _ = run.lm  # the model load counts as set-up
    setup_s = time.perf_counter() - t_start
    study, record = search(run, samples, candidates, direction, s)
    speed = _speed(run, record, setup_s, s)
    front, chosen = write_front(run, study, s)
    final = exported = None
    if chosen is not None:
        final = final_evaluation(run, samples, candidates, direction, chosen, s, optimize_dir(run))
        if s.export:
            exported = export_chosen(run, samples, candidates, chosen, optimize_dir(run), lora=s.lora)
    n_failed = sum(t.state.name == "FAIL" for t in study.get_trials(deepcopy=False))
    summary = {"schema_version": 1, "model": run.config.model, "settings": asdict(s),
               "sampler": "optuna TPESampler (multi-objective, constant_liar, multivariate, group)",
               "objectives": ["refusal rate on harmful_val (judge: " + run.config.judge + ")",
                              "mean next-token KL on harmless_val"],
               "n_complete": len(complete_trials(study)), "n_failed": n_failed, "target": s.target,
               "choice_rule": CHOICE_RULE, "chosen": chosen, "front": front, "speed": speed,
               "last_call": record, "final": _without_completions(final), "export": exported}
    atomic_write_json(optimize_dir(run) / "summary.json", summary)
    return summary


__all__ = ["OptimizeSettings", "CHOICE_RULE", "optimize_main", "stage_optimize", "optimize_dir", "search",
           "write_front"]
