"""The ``optimize`` command: an Optuna search for the least damaging edit that removes refusal (run.optimize)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import CONFIG, OUT, app, setup_logging, user_errors


@app.command()
@user_errors
def optimize(
    out: Path = OUT,
    model: str | None = typer.Option(None, help="HF Hub id, directory or .gguf file"),
    config: Path | None = CONFIG,
    trials: int = typer.Option(200, help="complete trials the study should hold (a re-run continues the study)"),
    batch_trials: int = typer.Option(50, help="trials evaluated together per batch"),
    seed: int = typer.Option(0, help="the sampler's seed"),
    one_at_a_time: bool = typer.Option(False, "--one-at-a-time",
                                       help="batch size 1 (measures the batched speed-up in the same run)"),
    target: float = typer.Option(0.03, help="refusal target of the choice rule"),
    search_tokens: int = typer.Option(32, help="greedy tokens per harmful validation prompt during the search"),
    n_xstest: int = typer.Option(250, help="XSTest safe prompts in the final evaluation, 0: skip"),
    export: bool = typer.Option(True, "--export/--no-export", help="export and verify the chosen edit"),
    lora: bool = typer.Option(False, "--lora", help="also write the chosen edit as a peft LoRA adapter (exact for "
                              "the low-rank forms; refused, with the reason, for the norm-preserving one)"),
    force: bool = False,
) -> None:
    """Search direction, layer kernels, norm preservation and subspace size for low refusal at low KL (OUT/optimize)."""
    from ..run.optimize import OptimizeSettings, optimize_main

    settings = OptimizeSettings(trials=trials, batch_trials=batch_trials, seed=seed, one_at_a_time=one_at_a_time,
                                target=target, search_tokens=search_tokens, n_xstest=n_xstest, export=export,
                                lora=lora)
    print(optimize_main(out, model, config, settings, force, setup_logging))
