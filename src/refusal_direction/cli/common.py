"""The CLI's shared parts: the Typer app, logging to the terminal (and run.log through run/), error handling.

The CLI is the only code that talks to the terminal. Heavy imports (torch, transformers) happen inside
commands, so ``--help`` is instant (and plain: ``rich_markup_mode=None`` keeps "[128]"-style defaults).
User errors print one message, exit status 2; Ctrl-C says how to resume, exit status 130.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import typer

from ..errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
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
        from ..run.rundir import log_to_run_dir

        log_to_run_dir(out, root)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def fail(exc: UserError) -> None:
    text = str(exc)
    typer.echo(f"error:\n{text}" if "\n" in text else f"error: {text}", err=True)
    raise typer.Exit(2)


INTERRUPTED = "interrupted; completed stages are saved - re-run the same command to resume"


def user_errors(fn):
    """Command decorator: UserError -> one message, exit 2; Ctrl-C -> how to resume, exit 130; lock released."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..run.outdir import release_all_locks
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(exc)
        except KeyboardInterrupt:
            typer.echo(INTERRUPTED, err=True)
            raise typer.Exit(130) from None
        finally:
            release_all_locks()

    return wrapper


# Options that are not config keys (those are generated from RunConfig's fields: cli.options) ---------------
OUT = typer.Option(..., "--out", help="run directory (created; an existing one of the same config resumes)")
CONFIG = typer.Option(None, "--config", help="TOML file with config keys (CLI flags override it)")
RUNS_OWN = "the run's"  # the shown default of a config option on a command that reopens a run directory
# compare's and optimize's XSTest prompts: the first N safe ones, 0: none; unset: all, as n_xstest in a run
N_XSTEST_SAFE = typer.Option(None, "--n-xstest", help="XSTest safe prompts (the first N), 0: skip [all]")

