"""The rows of a report card: what each ``--model NAME=PATH`` is, and the model (or BASE + edit) it stands for.

PATH may be
- one of our run directories, ``RUN`` or ``RUN@METHOD``: BASE with the run's edit as hooks, no export needed —
  ``dim`` (the run's chosen direction, the default), ``optimize`` (its chosen trial) or any registered method
  (`edits.registry`, as `compare` builds it); the run must have been made on BASE;
- a peft LoRA adapter directory (``adapter_config.json``): loaded over a copy of BASE;
- a ``.gguf`` file or an HF model directory (``config.json``): loaded as it is, in the card's dtype and device; its
  tokenizer must encode the card's prompts as BASE's does.

`parse_model_spec` checks the text; `resolve_row` opens what it names. A row that cannot be loaded is not fatal:
`load_row` returns the reason, and the card shows the row as failed with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..core.model import LoadedModel
from ..errors import UserError

log = logging.getLogger(__name__)

KINDS = ("base", "edit", "hf", "gguf", "lora")


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model NAME=PATH``: the row's name, the path and, for a run directory, the method."""

    name: str
    path: str
    method: str | None = None  # for a run directory: the edit to apply (dim, optimize, a registered method)


@dataclass
class Row:
    """A loaded row: the model to generate with and, for an edit row, the edit (hooks on BASE)."""

    spec: ModelSpec
    kind: str
    lm: LoadedModel | None  # BASE itself for base and edit rows
    edit: object | None = None  # an `edits.Edit` for an edit row
    reason: str | None = None  # why the row could not be loaded (then lm is None)

    @property
    def ok(self) -> bool:
        return self.reason is None


def parse_model_spec(text: str) -> ModelSpec:
    """``NAME=PATH`` or ``NAME=RUN@METHOD``; the name is a short identifier (it names files)."""
    name, sep, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise UserError(f"--model {text!r}: write NAME=PATH (e.g. dim=runs/q05 or heretic=exports/heretic-0)")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"--model {text!r}: the name {name!r} may hold letters, digits, '-', '_' and '.' only")
    if name == "base":
        raise UserError(f"--model {text!r}: 'base' is BASE's row; choose another name")
    method = None
    if "@" in path and not Path(path).exists():
        path, method = path.rsplit("@", 1)
        if not method:
            raise UserError(f"--model {text!r}: name the method after '@' (e.g. RUN@dim, RUN@optimize)")
    return ModelSpec(name, path, method)


def check_specs(specs: list[ModelSpec]) -> None:
    """Unique names; every path exists (a missing one is a typo, caught before any model loads)."""
    seen = [s.name for s in specs]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise UserError(f"--model names must be unique; {', '.join(dup)} given twice")
    for s in specs:
        if not Path(s.path).exists():
            raise UserError(f"--model {s.name}={s.path}: {s.path} does not exist")


def kind_of(spec: ModelSpec) -> str:
    """What PATH is (module docstring); UserError for a path that is none of them."""
    p = Path(spec.path)
    if p.is_dir() and (p / "config.json").is_file() and (p / "run" / "manifest").is_file():
        return "edit"
    if spec.method is not None:
        raise UserError(f"--model {spec.name}: '@{spec.method}' names a method of a run directory, and {p} is not one "
                        "(it has no config.json and run/manifest)")
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return "lora"
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir() and (p / "config.json").is_file():
        return "hf"
    raise UserError(f"--model {spec.name}={p}: not a model (expected one of our run directories, a peft adapter "
                    "directory with adapter_config.json, a .gguf file or an HF model directory with config.json)")


def same_model(a: str, b: str) -> bool:
    """Two model specs name the same model: equal Hub ids, or paths to the same file or directory."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def run_edit(spec: ModelSpec, base: LoadedModel, base_spec: str):
    """The edit of a run directory row, built on BASE's loaded model (the run is reopened with BASE as its model)."""
    from .compare_methods import method_edit
    from .outdir import read_saved_config, release_lock
    from .rundir import open_run

    made_on = read_saved_config(Path(spec.path))["config"].get("model", "")
    if not same_model(made_on, base_spec):
        raise UserError(f"run {spec.path} was made on {made_on}, not on BASE {base_spec}; card it against its own "
                        "base model")
    run = open_run(spec.path, loader=lambda _config: base)
    try:
        return method_edit(run, spec.method or "dim")
    finally:
        release_lock(run.out)


def load_row(spec: ModelSpec, base: LoadedModel, base_spec: str, device: str, dtype: str) -> Row:
    """The loaded row of ``spec``; a row that fails to load (a bad adapter, another tokenizer, …) keeps the reason."""
    try:
        kind = kind_of(spec)
        if kind == "edit":
            return Row(spec, kind, base, edit=run_edit(spec, base, base_spec))
        if kind == "lora":
            return Row(spec, kind, lora_model(spec, base))
        from ..core.model import load_model

        return Row(spec, kind, load_model(spec.path, device=device, dtype=dtype))
    except UserError as exc:
        log.warning("card: row %s not loaded: %s", spec.name, exc)
        return Row(spec, "failed", None, reason=str(exc))
    except Exception as exc:  # a model file that transformers or peft cannot read: the row fails, the card goes on
        log.warning("card: row %s not loaded: %s: %s", spec.name, type(exc).__name__, exc)
        return Row(spec, "failed", None, reason=f"cannot load {spec.path}: {type(exc).__name__}: {exc}"[:300])


def lora_model(spec: ModelSpec, base: LoadedModel) -> LoadedModel:
    """BASE with the adapter at ``spec.path`` (a copy of BASE's weights; BASE itself is left as it is)."""
    from ..core.model import wrap_model
    from ..export.lora import load_lora

    try:
        model = load_lora(base.model, Path(spec.path))
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or module names of another base model
        raise UserError(f"--model {spec.name}: the adapter {spec.path} does not fit BASE {base.model_id} "
                        f"({type(exc).__name__}: {str(exc)[:200]}); it was made for another base model") from None
    return wrap_model(model, base.tokenizer, model_id=f"{base.model_id} + {Path(spec.path).name}",
                      revision=base.revision, dtype_reason=base.dtype_reason)


__all__ = ["KINDS", "ModelSpec", "Row", "check_specs", "kind_of", "load_row", "parse_model_spec", "same_model"]
