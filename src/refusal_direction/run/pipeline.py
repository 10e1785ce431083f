"""The pipeline: the only code that reads and writes the run directory (with the stage modules of ``run/``).

Stages run in order and each writes its outputs atomically; a stage whose outputs exist is skipped
unless forced, so re-running an interrupted command resumes where it stopped::

    samples -> extract -> direction (fixed or auto-selected) -> generate -> score -> capability -> report

Run directory layout: `layout.RunLayout` (README, "Run directory"). This module keeps the entry points
(`replicate`, the Python API under the command; `start_run`, `run_stages`, `run_stage`, `stage_score`,
`stage_report`) and re-exports the stages.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import RunConfig, validate
from ..core.directions import load_candidates
from ..errors import UserError, UserErrors
from ..fileio import atomic_write_json, read_json, record_in_manifest
from ..report.summary import Summary
from .direction import select_direction, stage_direction
from .evaluate import stage_capability, stage_safety
from .extract import stage_extract, stage_samples
from .generate import check_completions, condition_intervention, load_completions, stage_generate, write_completions
from .outdir import release_lock
from .preflight import check_paths, preflight, probe_model
from .results import ReplicateResult
from .rundir import (
    CONDITION_FILES,
    Run,
    clear_outputs,
    config_mismatch,
    log_to_run_dir,
    open_run,
    prepare_run,
    process_age_s,
    write_environment,
)
from .summary import PAPER, build_summary, display_name

__all__ = [
    "CONDITION_FILES", "PAPER", "ReplicateResult", "Run", "build_summary", "clear_outputs", "condition_intervention",
    "config_mismatch", "display_name", "load_completions", "log_to_run_dir", "open_run", "preflight", "prepare_run",
    "probe_model", "replicate", "run_stage", "run_stages", "select_direction", "stage_capability", "stage_direction",
    "stage_extract", "stage_generate", "stage_report", "stage_safety", "stage_samples", "stage_score", "start_run",
    "write_completions", "write_environment",
]


def start_run(out: str | Path, config: RunConfig, force: bool = False, progress: bool = False,
              loader=None) -> Run:
    """Preflight (skipped when a test injects a ``loader``), then create or reopen ``out`` for ``config``."""
    t0 = time.perf_counter()
    check_paths(Path(out), config, force)
    if loader is None:
        preflight(Path(out), config, force)
    run = prepare_run(out, config, force=force, progress=progress, loader=loader)
    run.timing("preflight_s", time.perf_counter() - t0)
    return run


def run_stage(run: Run, name: str, force: bool = False) -> None:
    """Run one stage command (extract | direction | generate) of an existing run, after its prerequisites."""
    samples = stage_samples(run)
    if name == "extract":
        stage_extract(run, samples, force)
        return
    candidates = stage_extract(run, samples, False)
    direction = stage_direction(run, samples, candidates, force and name == "direction")
    if name == "generate":
        stage_generate(run, samples, direction, force)


def stage_score(run: Run, force: bool = False) -> dict:
    t0 = time.perf_counter()
    check_completions(run, stage_samples(run))
    safety_status = stage_safety(run, force)
    cap_path = run.layout.capability
    capability = read_json(cap_path, "run file") if cap_path.is_file() else {}
    run.timing("score_s", time.perf_counter() - t0)  # before the summary, which lists the timings
    summary = build_summary(run, safety_status, capability)
    atomic_write_json(run.layout.summary, summary)
    return summary


def stage_report(run: Run) -> dict:
    from ..report import build_report

    t0 = time.perf_counter()
    layout = run.layout
    if not layout.summary.is_file():
        raise UserError(f"{run.out} has no summary.json yet; run `refusal-direction score {run.out}` first")
    check_completions(run, stage_samples(run))
    summary = Summary.from_json(read_json(layout.summary, "run file"), source=str(layout.summary))
    selection = read_json(layout.selection, "run file") if layout.selection.is_file() else None
    tensors = {}
    for name in ("candidates", "mean_harmful", "mean_harmless"):
        p = layout.directions_file(name)
        tensors[name] = load_candidates(p).vectors if p.is_file() else None
    paths = build_report(summary, load_completions(run), run.out, selection=selection,
                         candidates=tensors["candidates"], mean_harmful=tensors["mean_harmful"],
                         mean_harmless=tensors["mean_harmless"])
    record_figures(run)
    run.timing("report_s", time.perf_counter() - t0)
    return paths


def record_figures(run: Run) -> None:
    """Figures are written by matplotlib, not fileio: list them in the manifest (only ours: *.png we name)."""
    figures = run.layout.figures_dir
    for p in figures.glob("*.png") if figures.is_dir() else ():
        record_in_manifest(run.out, p)
    for path in (run.layout.report_md, run.layout.report_html):
        if path.is_file():
            record_in_manifest(run.out, path)


def replicate(config: RunConfig, out: str | Path, *, force: bool = False, progress: bool = False,
              loader=None) -> ReplicateResult:
    """The whole replication of ``config`` in the run directory ``out``: samples, extraction, direction,
    generation, scores, report. A re-run resumes from the completed stages (``force``: recompute them; another
    config's run: delete only its files). ``loader`` (tests): a function of the config giving the model."""
    problems = validate(config)  # a RunConfig built directly, not by build_config, is checked too
    if problems:
        raise UserErrors(problems)
    imported = process_age_s()  # the command line tool: interpreter start-up and the imports until here
    run = start_run(out, config, force=force, progress=progress, loader=loader)
    try:
        if imported is not None:
            run.timing("startup_s", imported)
        summary = run_stages(run, force=force)
        age = process_age_s()
        if age is not None:  # this process's whole time: start-up, preflight, the stages it ran (or skipped), report
            run.timing("process_s", age)
    finally:
        release_lock(run.out)
    return ReplicateResult(run.out, config, Summary.from_json(summary, source=str(run.layout.summary)))


def run_stages(run: Run, force: bool = False) -> dict:
    """Run every stage of ``run``; completed stages are reused (resume) unless ``force``. summary.json's content."""
    samples = stage_samples(run)
    # A given direction file needs no extraction (the report then has no candidate plots).
    candidates = None if run.config.direction_file else stage_extract(run, samples, force)
    direction = stage_direction(run, samples, candidates, force)
    stage_generate(run, samples, direction, force)
    stage_capability(run, samples, direction, force)
    summary = stage_score(run, force)
    stage_report(run)
    return summary
