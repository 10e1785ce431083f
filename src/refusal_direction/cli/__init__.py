"""Command-line interface (``refusal-direction``): `common` (the app, logging, errors), `run_commands`
(replicate, stages, score, report, demo), `tools` (export, verify-export, fetch-model, select, bench, compare),
`optimize` (the Optuna search)."""

from __future__ import annotations

import sys

from . import optimize, run_commands, tools  # noqa: F401  (registers the commands on the app)
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
