"""The search space: one trial's parameters -> one intervention (a `methods` edit of an interpolated direction).

Parameters (Optuna define-by-run; ``form`` decides which of the conditional ones a trial has):

- ``position``: categorical over the candidates' positions; ``layer_index``: a float in [0, n_layers − 1].
  The direction is r = (1 − f) · c[position, ⌊i⌋] + f · c[position, ⌈i⌉] with f = i − ⌊i⌋ (linear
  interpolation between the difference-in-means candidates of adjacent layers, as heretic does).
- ``form``: ``kernel`` | ``norm_preserving`` | ``subspace``.
  - ``kernel``: `LayerKernelAblation` of r̂ with one triangular kernel per writer (attention, MLP), each
    ``{attn,mlp}_peak`` in [0, n_layers − 1], ``_width`` in [1, n_layers], ``_max`` in [0.5, 1.5] and
    ``_min`` = ``_min_fraction`` × ``_max`` (fraction in [0, 1]); the embeddings are not edited.
  - ``norm_preserving``: the norm-preserving ablation of r̂ (every written vector keeps its norm).
  - ``subspace``: ablation of the k-dimensional refusal subspace (``k`` in 1..4; `refusal_subspace` with
    r̂ first, so k = 1 is the paper's directional ablation of the interpolated direction).

`build_intervention(lm, candidates, params, name)` is a pure function of the parameters: the search, the
chosen trial's final evaluation and its export all build the edit through it.
"""

from __future__ import annotations

import math

from ..core.directions import CandidateDirections, Direction
from ..core.model import LoadedModel
from ..errors import UserError
from ..methods import LayerKernelAblation, SubspaceAblation, layer_kernel, refusal_subspace

FORMS = ("kernel", "norm_preserving", "subspace")
K_MAX = 4


def suggest(trial, positions: list[int], n_layers: int) -> dict:
    """Sample one trial's parameters (``trial``: an `optuna.Trial`); the same dict as ``trial.params``."""
    trial.suggest_categorical("position", positions)
    trial.suggest_float("layer_index", 0.0, float(n_layers - 1))
    form = trial.suggest_categorical("form", list(FORMS))
    if form == "kernel":
        for writer in ("attn", "mlp"):
            trial.suggest_float(f"{writer}_peak", 0.0, float(n_layers - 1))
            trial.suggest_float(f"{writer}_width", 1.0, float(max(n_layers, 2)))
            trial.suggest_float(f"{writer}_max", 0.5, 1.5)
            trial.suggest_float(f"{writer}_min_fraction", 0.0, 1.0)
    elif form == "subspace":
        trial.suggest_int("k", 1, K_MAX)
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


def kernel_weights(params: dict, writer: str, n_layers: int) -> tuple[float, ...]:
    w_max = params[f"{writer}_max"]
    return layer_kernel(n_layers, params[f"{writer}_peak"], params[f"{writer}_width"],
                        w_min=params[f"{writer}_min_fraction"] * w_max, w_max=w_max)


def build_intervention(lm: LoadedModel, candidates: CandidateDirections, params: dict, name: str,
                       prune_layer_fraction: float = 0.2):
    """The intervention of ``params`` (module docstring), named ``name``."""
    from ..export.method_edits import norm_preserving_ablation

    direction = interpolated_direction(candidates, int(params["position"]), float(params["layer_index"]))
    form = params["form"]
    if form == "kernel":
        return LayerKernelAblation(direction.vector, kernel_weights(params, "attn", lm.n_layers),
                                   kernel_weights(params, "mlp", lm.n_layers), 0.0, name=name)
    if form == "norm_preserving":
        return norm_preserving_ablation(lm, direction.vector, name=name)
    if form == "subspace":
        sub = refusal_subspace(candidates, direction, variance=1.0, k_max=int(params["k"]),
                               prune_layer_fraction=prune_layer_fraction)
        return SubspaceAblation(sub.basis, name=name)
    raise UserError(f"unknown form {form!r} in trial parameters; expected one of {', '.join(FORMS)}")


__all__ = ["FORMS", "K_MAX", "suggest", "interpolated_direction", "kernel_weights", "build_intervention"]
