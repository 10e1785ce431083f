"""The search's composite (`optimize`): one trial's parameters → one edit of an interpolated direction.

Parameters (Optuna define-by-run; ``form`` decides which method's own parameters a trial has):

- ``position``: categorical over the candidates' positions; ``layer_index``: a float in [0, n_layers − 1]. The
  direction is r = (1 − f) · c[position, ⌊i⌋] + f · c[position, ⌈i⌉] with f = i − ⌊i⌋ (linear interpolation between
  the difference-in-means candidates of adjacent layers, as heretic does).
- ``form``: the name of a searchable method (``Edit.searchable``), in alphabetical order — today ``layer_kernel``,
  ``norm_preserving``, ``subspace`` — then that method's own parameters (its ``suggest``), and the edit is its
  ``from_params`` on r.

`build` is a pure function of the parameters: the search, the chosen trial's final evaluation, its export and
``from_run`` (the run's chosen trial, store key ``optimize``) all build the edit through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...core.directions import CandidateDirections, Direction
from ...errors import UserError
from ..base import Edit, EditInputs, register, registry

NOT_AN_EDIT = "the composite builds one of the searchable methods' edits, which carry every form"


def searchable() -> dict[str, type[Edit]]:
    """The search's forms: every searchable method, by name in alphabetical order (the sampler's choice order)."""
    return dict(sorted((name, cls) for name, cls in registry().items() if cls.searchable))


def suggest(trial, positions: list[int], n_layers: int) -> dict:
    """Sample one trial's parameters (``trial``: an `optuna.Trial`); the same dict as ``trial.params``."""
    trial.suggest_categorical("position", positions)
    trial.suggest_float("layer_index", 0.0, float(n_layers - 1))
    forms = searchable()
    form = trial.suggest_categorical("form", list(forms))
    forms[form].suggest(trial, n_layers)
    return dict(trial.params)


def interpolated_direction(candidates: CandidateDirections, position: int, layer_index: float) -> Direction:
    """(1 − f) c[position, ⌊i⌋] + f c[position, ⌈i⌉]; its ``layer`` is the nearest layer (for the sidecar)."""
    if not 0 <= layer_index <= candidates.n_layers - 1 or not math.isfinite(layer_index):
        raise UserError(f"layer_index={layer_index} is outside 0..{candidates.n_layers - 1}")
    lo, hi = math.floor(layer_index), math.ceil(layer_index)
    f = layer_index - lo
    a_dir = candidates.get(position, lo)
    a = a_dir.vector.double()
    b = candidates.get(position, hi).vector.double()
    return Direction((1 - f) * a + f * b, int(round(layer_index)), position, a_dir.model_id)


def build(inputs: EditInputs, params: dict, name: str) -> Edit:
    """The edit of ``params`` (module docstring), named ``name``."""
    forms = searchable()
    form = params.get("form")
    if form not in forms:
        raise UserError(f"unknown form {form!r} in trial parameters; expected one of {', '.join(forms)}")
    direction = interpolated_direction(inputs.candidates, int(params["position"]), float(params["layer_index"]))
    return forms[form].from_params(inputs, direction, params, name)


@register("optimize")
@dataclass(frozen=True, eq=False)
class SearchedEdit(Edit):
    """The run's chosen `optimize` trial; ``from_run`` returns that trial's edit (a searchable method's)."""

    name: str = "optimize"
    order = 30
    reasons = {form: NOT_AN_EDIT for form in ("hooks", "stacked", "own_step", "weights", "lora", "search")}

    def describe(self) -> dict:
        return {"type": "optimize_choice"}

    @classmethod
    def from_run(cls, inputs: EditInputs, name: str) -> Edit:
        chosen = None if inputs.store is None else inputs.store.read("optimize")
        if not chosen or "params" not in chosen:
            raise UserError("the run has no chosen optimize trial (optimize/front.json); run `refusal-direction "
                            "optimize --out RUN` first")
        return build(inputs, chosen["params"], name)
