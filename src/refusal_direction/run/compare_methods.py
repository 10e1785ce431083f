"""The methods `compare` runs and `export --method` bakes in, built from one run's artifacts through the registry.

Every registered method with ``compare = True`` is a row of `compare` (`edits.registry()`, in table order); each is
built by its own ``from_run`` from the run's `EditInputs`: its selected direction r, the candidates, the means, the
validation prompts. The rows today: baseline, dim (the paper; the reference row of the paired tests), projected,
norm_preserving, layer_kernel, subspace, ace, cosmic — each described in its file under `edits/methods/`. Edits that
induce refusal (activation addition, ACE's addition form) have no row.

A method keeps what it computed in the run through `RunStore` (keys → files of the run directory): COSMIC's choice
(``cosmic`` → compare/cosmic.json) and `optimize`'s chosen trial (``optimize`` → optimize/front.json, read only).
"""

from __future__ import annotations

import json
import logging

from ..core.directions import CandidateDirections, Direction, load_candidates
from ..edits import Edit, EditInputs, get_method, registry
from ..errors import UserError
from ..fileio import atomic_write_json
from .rundir import Run

log = logging.getLogger(__name__)


def compare_methods() -> list[str]:
    """The rows of `compare`, in table order."""
    return [name for name, cls in registry().items() if cls.compare]


def parse_methods(spec: str | None) -> list[str]:
    """Comma-separated method names (default: all); ``dim`` is always included (the paired tests' reference)."""
    known = compare_methods()
    names = list(known) if not spec else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in known]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    names = list(dict.fromkeys(names))
    return names if "dim" in names else ["dim", *names]


class RunStore:
    """`edits.Store` on a run directory: what a method computed, kept in the run's files."""

    def __init__(self, run: Run):
        self.paths = {"cosmic": run.out / "compare" / "cosmic.json", "optimize": run.out / "optimize" / "front.json"}

    def read(self, key: str) -> dict | None:
        path = self.paths[key]
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return data.get("chosen") if key == "optimize" else data

    def write(self, key: str, data: dict) -> None:
        if key == "optimize":
            raise ValueError("optimize/front.json is written by `optimize` alone")
        self.paths[key].parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.paths[key], data)


def _means(run: Run) -> tuple[CandidateDirections, CandidateDirections]:
    d = run.out / "directions"
    paths = [d / "mean_harmful.safetensors", d / "mean_harmless.safetensors"]
    if not all(p.is_file() for p in paths):
        raise UserError(f"{run.out} has no mean activations (directions/mean_*.safetensors); this method needs an "
                        "extracted run: drop --direction-file, or run `refusal-direction extract` on it")
    return load_candidates(paths[0]), load_candidates(paths[1])


def edit_inputs(run: Run, samples, candidates: CandidateDirections, direction: Direction) -> EditInputs:
    """What the methods are built from, for ``run``."""
    c = run.config
    return EditInputs(lm=run.lm, direction=direction, candidates=candidates, means=lambda: _means(run),
                      harmful_val=[i.text for i in samples.harmful_val],
                      harmless_val=[i.text for i in samples.harmless_val],
                      prune_layer_fraction=c.prune_layer_fraction, batch_size=c.batch_size,
                      actadd_coeff=c.actadd_coeff, store=RunStore(run))


def build_methods(inputs: EditInputs, names: list[str]) -> tuple[dict[str, Edit], dict[str, dict]]:
    """{name: edit} and {name: its parameters for the table} for ``names``."""
    edits = {name: get_method(name).from_run(inputs, name) for name in names}
    return edits, {name: edit.describe() for name, edit in edits.items()}


def method_edit(run: Run, name: str) -> Edit:
    """One method's edit for a run with a direction (for `export --method` / `verify-export --method`)."""
    from .extract import stage_extract, stage_samples

    choices = [m for m in registry() if m != "baseline"]
    if name not in choices:
        raise UserError(f"--method {name!r}: choose one of {', '.join(choices)}")
    samples = stage_samples(run)
    candidates = stage_extract(run, samples)
    return get_method(name).from_run(edit_inputs(run, samples, candidates, run.saved_direction()), name)
