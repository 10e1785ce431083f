"""Command-line interface: the only module that talks to the terminal.

Heavy imports (torch, transformers) happen inside commands, so ``--help`` is instant. User errors
print one readable message (no traceback) and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find, remove and add the refusal direction of a chat model (Arditi et al., 2024). "
                       "Edited models are for safety research and evaluation only, never for deployment.")

log = logging.getLogger("refusal_direction")


def setup_logging(out: Path | None, quiet: bool = False, verbose: bool = False) -> None:
    root = logging.getLogger("refusal_direction")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    if not quiet:
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, markup=False, log_time_format="%H:%M:%S", console=_console())
        handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        root.addHandler(handler)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out / "run.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def fail(exc: UserError) -> None:
    _console().print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    raise typer.Exit(2)


def _overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


# Options shared by replicate and demo -------------------------------------------------------------
OUT = typer.Option(..., "--out", help="run directory (created; an existing one of the same config resumes)")
CONFIG = typer.Option(None, "--config", help="TOML file with config keys (CLI flags override it)")


@app.command()
def replicate(
    out: Path = OUT,
    model: Optional[str] = typer.Option(None, help="HF Hub id, local directory or .gguf file [google/gemma-2b-it]"),
    data_dir: Optional[str] = typer.Option(None, help="data directory laid out like datasets/ "
                                                       "[$REFUSAL_DIRECTION_DATA, else pinned download]"),
    harmful_train: Optional[str] = typer.Option(None, help="named set or file [harmful_train]"),
    harmless_train: Optional[str] = typer.Option(None, help="named set or file [harmless_train]"),
    eval: Optional[str] = typer.Option(None, "--eval", help="named set or file [jailbreakbench]"),
    n_train: Optional[int] = typer.Option(None, help="training instructions per set [128]"),
    n_val: Optional[int] = typer.Option(None, help="validation instructions per set, for --select auto [32]"),
    n_eval: Optional[int] = typer.Option(None, help="harmful evaluation instructions [100]"),
    n_harmless_eval: Optional[int] = typer.Option(None, help="harmless evaluation instructions [100]"),
    max_new_tokens: Optional[int] = typer.Option(None, help="greedy tokens per completion [512]"),
    batch_size: Optional[int] = typer.Option(None, help="prompts per batch [32]"),
    layer: Optional[int] = typer.Option(None, help="direction layer (gemma-2b-it default 10)"),
    position: Optional[int] = typer.Option(None, help="direction position, negative (gemma-2b-it default -2)"),
    select: Optional[str] = typer.Option(None, help="fixed | auto | default [default]"),
    conditions: Optional[str] = typer.Option(None, help="comma-separated conditions "
                                                        "[baseline,ablation,actadd_negative,harmless_baseline,harmless_actadd]"),
    stop_at_end_of_turn: Optional[bool] = typer.Option(None, "--stop-at-end-of-turn/--no-stop-at-end-of-turn",
                                                       help="stop at the end-of-turn token [no, as the paper]"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N [auto]"),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 [auto]"),
    safety_model: Optional[str] = typer.Option(None, help="Llama Guard 2 Hub id or local dir"),
    no_safety: bool = typer.Option(False, "--no-safety", help="skip the safety score"),
    require_safety: bool = typer.Option(False, "--require-safety", help="fail if the safety model cannot load"),
    chat_template: Optional[str] = typer.Option(None, help="Jinja chat template file"),
    config: Optional[Path] = CONFIG,
    force: bool = typer.Option(False, "--force", help="recompute every stage / reuse a foreign --out"),
    json_out: bool = typer.Option(False, "--json", help="quiet; print summary.json to stdout"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the whole replication: samples, extraction, direction, generation, scores, report."""
    from .config import build_config

    overrides = _overrides(model=model, data_dir=data_dir, harmful_train=harmful_train, harmless_train=harmless_train,
                           eval=eval, n_train=n_train, n_val=n_val, n_eval=n_eval, n_harmless_eval=n_harmless_eval,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, layer=layer, position=position,
                           select=select, conditions=conditions, stop_at_end_of_turn=stop_at_end_of_turn,
                           device=device, dtype=dtype, safety_model=safety_model, chat_template=chat_template)
    if no_safety:
        overrides["safety"] = False
    if require_safety:
        overrides["require_safety"] = True
    try:
        cfg = build_config(overrides, config)
        run_all(out, cfg, force, json_out, verbose)
    except UserError as exc:
        fail(exc)


def run_all(out: Path, cfg, force: bool, json_out: bool, verbose: bool, loader=None) -> dict:
    from . import pipeline

    run = pipeline.prepare_run(out, cfg, force=force, progress=not json_out, loader=loader)
    setup_logging(out, quiet=json_out, verbose=verbose)
    summary = pipeline.replicate(run, force=force)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, out)
    return summary


def print_summary(summary: dict, out: Path) -> None:
    from rich.table import Table

    t = Table(title=f"{summary['model']} - direction layer {summary['direction']['layer']}, "
                    f"position {summary['direction']['position']} ({summary['direction']['selected_by']})")
    for col in ("condition", "dataset", "n", "refusal [95% CI]", "safety [95% CI]"):
        t.add_column(col)
    for name, c in summary["conditions"].items():
        r = c["refusal"]
        s = c.get("safety")
        t.add_row(name, c["dataset"], str(c["n"]), f"{r['rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]",
                  f"{s['rate']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]" if s else c["safety_status"])
    console = _console()
    console.print(t)
    console.print(f"report: {out / 'report.md'}")


def _stage(run_dir: Path, fn_name: str, force: bool, verbose: bool, **overrides) -> None:
    from . import pipeline

    run = pipeline.open_run(run_dir, _overrides(**overrides), progress=True)
    setup_logging(run_dir, verbose=verbose)
    samples = pipeline.stage_samples(run)
    if fn_name == "extract":
        pipeline.stage_extract(run, samples, force)
        return
    candidates = pipeline.stage_extract(run, samples, False)
    direction = pipeline.stage_direction(run, samples, candidates, force and fn_name == "direction")
    if fn_name == "generate":
        pipeline.stage_generate(run, samples, direction, force)


@app.command()
def extract(run_dir: Path = typer.Argument(..., help="run directory"),
            force: bool = typer.Option(False, "--force"), verbose: bool = typer.Option(False, "-v")) -> None:
    """Extract mean activations and difference-in-means candidates for an existing run directory."""
    try:
        _stage(run_dir, "extract", force, verbose)
    except UserError as exc:
        fail(exc)


@app.command()
def generate(run_dir: Path = typer.Argument(..., help="run directory"),
             force: bool = typer.Option(False, "--force"), verbose: bool = typer.Option(False, "-v"),
             batch_size: Optional[int] = typer.Option(None), device: Optional[str] = typer.Option(None)) -> None:
    """Generate completions for every condition of an existing run directory."""
    try:
        _stage(run_dir, "generate", force, verbose, batch_size=batch_size, device=device)
    except UserError as exc:
        fail(exc)


@app.command()
def score(
    target: Path = typer.Argument(..., help="a run directory, or a completions file (JSON list or JSONL)"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
    force: bool = typer.Option(False, "--force"),
    no_safety: bool = typer.Option(False, "--no-safety", help="skip the safety score"),
    safety_model: Optional[str] = typer.Option(None, help="Llama Guard 2 Hub id or local dir"),
    require_safety: bool = typer.Option(False, "--require-safety"),
) -> None:
    """Score completions: refusal (substring) and, for run directories, safety (Llama Guard 2)."""
    try:
        if target.is_file():
            from .scorefile import score_file

            result = score_file(target, safety_model=None if no_safety else safety_model,
                                require_safety=require_safety)
            if json_out:
                print(json.dumps(result, indent=2))
            else:
                r = result["refusal"]
                print(f"{target.name}: refusal score {r['rate']:.2f} ({r['k']}/{r['n']}, "
                      f"95% CI [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}])")
                if result.get("safety"):
                    s = result["safety"]
                    print(f"safety score {s['rate']:.2f} ({s['k']}/{s['n']})")
            return
        from . import pipeline

        overrides = {"safety": False} if no_safety else {}
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
            print_summary(summary, target)
    except UserError as exc:
        fail(exc)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="run directory")) -> None:
    """Rebuild report.md, report.html and figures from a run's saved files (no model needed)."""
    try:
        from . import pipeline

        run = pipeline.open_run(run_dir)
        paths = pipeline.stage_report(run)
        for name, p in paths.items():
            print(f"{name}: {p}")
    except UserError as exc:
        fail(exc)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("interrupted; completed stages are saved - re-run the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
