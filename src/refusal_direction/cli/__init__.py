"""Command-line interface (``refusal-direction``): `common` (the app, logging, errors), `run_commands`
(replicate, stages, score, report, demo), `tools` (export, verify-export, fetch-model, select, bench, compare),
`optimize` (the Optuna search), `card` (the report card); `options` generates the options from the settings'
fields (`RunConfig`, `OptimizeSettings`, `CardSettings`). Each command calls the Python API
(`run.pipeline.replicate`, `run.reselect.select`, `run.export`, `run.compare`, `run.optimize`, `run.card`, ...) and
only prints its result."""

from __future__ import annotations

import sys

from . import card, optimize, run_commands, tools  # noqa: F401  (registers the commands on the app)
from .common import INTERRUPTED, app

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
