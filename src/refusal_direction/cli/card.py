"""The ``card`` command: BASE and edited models on one report card (`run.card`); its options are generated from
`run.card_settings.CardSettings`' fields."""

from __future__ import annotations

from pathlib import Path

import typer

from ..run.card_settings import CARD_FIELDS
from .common import app, setup_logging, user_errors
from .options import config_options


@app.command("card")
@user_errors
@config_options(fields=CARD_FIELDS, parameter="settings")
def card_cmd(
    base: str = typer.Option(..., "--base", help="the base model: HF Hub id, local directory or .gguf file"),
    models: list[str] = typer.Option([], "--model", help="a row NAME=PATH (repeat): one of our run directories "
                                     "(RUN or RUN@METHOD: dim, optimize, a compare method), a peft adapter, a .gguf "
                                     "file or an HF model directory"),
    out: Path = typer.Option(..., "--out", help="card directory (card.md, card.html, card.json, plots, completions)"),
    settings: dict | None = None,
) -> None:
    """Score BASE and every --model on the same prompts, judges and metrics: refusal, over-refusal, KL, HumanEval."""
    from ..run.card import card
    from ..run.card_rows import check_specs, parse_model_spec
    from ..run.card_settings import CardSettings

    s = CardSettings(**settings)  # bad values fail before any model loads
    check_specs([parse_model_spec(m) for m in models])
    setup_logging(out)
    result = card(base, models, out, s, progress=True)
    for row in result.rows:
        if row.status != "ok":
            print(f"{row.name}: failed: {row.reason}")
            continue
        kl = row.damage["first_token_kl"]["value"] if row.damage else None
        he = row.humaneval["pass_at_1"]["rate"] if row.humaneval else None
        print(f"{row.name}: refusal {row.refusal['learned']['rate']:.2f} (learned judge), first-token KL "
              f"{kl:.3f}" + (f", HumanEval pass@1 {he:.3f}" if he is not None else ""))
    print(f"card: {Path(out) / 'card.md'} ({result.timings['total_s']:.0f} s; for safety research and evaluation "
          "only: the edited models are never for deployment)")
