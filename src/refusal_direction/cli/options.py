"""Typer options generated from `RunConfig`'s fields, so that no default or help text is written twice.

A field ``name`` becomes ``--kebab-name`` (a bool: ``--name/--no-name``; a tuple: a comma-separated list)
with the field's help and its default shown in brackets. The option's own default is None, "not given", so
a flag left out does not override the TOML file: CLI flags > TOML file > the config's defaults.

`config_options` decorates a command whose signature has a parameter ``overrides``: in its place the command
gets one option per field named, and the function receives the given ones as ``overrides={field: value}``. The same
for another settings dataclass's fields (``fields=``, e.g. `run.optimize_settings.OPTIMIZE_FIELDS`, into another
parameter, ``parameter=``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import Field
from typing import Any, Callable, Mapping

import typer

from ..config import FIELDS


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cli_type(f: Field) -> type:
    """The option's value type: bool, int, float, else str (tuples are comma-separated; `build_config` splits)."""
    kind = str(f.type)
    return next((t for t in (bool, int, float) if kind.startswith(t.__name__)), str)


def shown_default(value: Any) -> str | None:
    """A default as --help shows it: yes/no, a comma-separated list, the value; None shows nothing (the help
    says what unset means)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def option_help(name: str, default: Any, default_text: str | None = None, fields: Mapping[str, Field] = FIELDS
                ) -> str:
    """The field's help and, in brackets, its default (``default_text``, with ``{}`` for the default, when the
    command's default is not the config's, e.g. "the run's")."""
    text = fields[name].metadata["help"]
    shown = shown_default(default)
    if default_text is not None:
        shown = default_text.format(shown)
    return f"{text} [{shown}]" if shown is not None else text


def config_parameter(name: str, defaults: Mapping[str, Any] | None = None,
                     default_text: str | None = None, fields: Mapping[str, Field] = FIELDS) -> inspect.Parameter:
    """The typer option of one field (of `RunConfig`, or of ``fields``), as a signature parameter (default None:
    not given)."""
    f = fields[name]
    kind = cli_type(f)
    default = (defaults or {}).get(name, f.default)
    decl = f"{flag(name)}/--no-{flag(name)[2:]}" if kind is bool else flag(name)
    option = typer.Option(None, decl, help=option_help(name, default, default_text, fields), show_default=False)
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option,
                             annotation=kind | None)


def config_options(*names: str, defaults: Mapping[str, Any] | None = None,
                   default_text: str | None = None, fields: Mapping[str, Field] = FIELDS,
                   parameter: str = "overrides") -> Callable:
    """Decorator: the command's ``overrides`` parameter becomes one option per `RunConfig` field in ``names``
    (every field when none are named). ``defaults``: the command's own defaults where they differ from the
    config's (`demo`), shown in --help; ``default_text``: what the default is, for commands whose default is
    not a config value (a run directory's command: "the run's")."""
    chosen = names or tuple(fields)
    unknown = [n for n in chosen if n not in fields]
    assert not unknown, f"not fields of the settings: {unknown}"

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        assert parameter in signature.parameters, f"{fn.__name__} needs a {parameter!r} parameter"
        params = []
        for p in signature.parameters.values():
            if p.name == parameter:
                params += [config_parameter(n, defaults, default_text, fields) for n in chosen]
            else:
                params.append(p)

        @functools.wraps(fn)
        def command(**kwargs):
            given = {n: kwargs.pop(n) for n in chosen}
            return fn(**kwargs, **{parameter: {k: v for k, v in given.items() if v is not None}})

        command.__signature__ = signature.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
