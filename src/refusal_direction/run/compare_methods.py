"""The methods `compare` runs, built from one run's artifacts (candidates, means, the selected direction).

Every row uses the run's direction r (selected as `replicate` does) unless its method says otherwise:

| name | intervention |
|---|---|
| baseline | none |
| dim | directional ablation of r (the paper; the reference row of the paired tests) |
| projected | directional ablation of r minus its harmless-mean component |
| norm_preserving | biprojected, norm-preserving: the projected r removed, each written vector keeping its norm |
| layer_kernel | scaled projection of r, weight a triangular kernel over layers (peak: r's layer, width n_layers/2) |
| subspace | ablation of the k-dimensional refusal subspace (`methods.build.refusal_subspace`'s rule) |
| ace | ACE: projection on r̂ set to the harmless mean's at every block input |
| cosmic | directional ablation of the candidate COSMIC selects (cosine similarity, no generation) |

ACE's addition form (``methods.AffineAddition``) induces refusal instead of removing it, so it has no row here.
"""

from __future__ import annotations

import json
import logging

from ..core.directions import CandidateDirections, Direction, load_candidates
from ..core.interventions import Baseline, DirectionalAblation
from ..errors import UserError
from ..fileio import atomic_write_json
from ..methods import (
    AffineAblation,
    LayerKernelAblation,
    SubspaceAblation,
    ace_offset,
    cosmic_select,
    layer_kernel,
    projected_direction,
    refusal_subspace,
)
from .rundir import Run

log = logging.getLogger(__name__)

METHODS = ("baseline", "dim", "projected", "norm_preserving", "layer_kernel", "subspace", "ace", "cosmic")


def parse_methods(spec: str | None) -> list[str]:
    """Comma-separated method names (default: all); ``dim`` is always included (the paired tests' reference)."""
    names = list(METHODS) if not spec else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    names = list(dict.fromkeys(names))
    return names if "dim" in names else ["dim", *names]


def _means(run: Run) -> tuple[CandidateDirections, CandidateDirections]:
    d = run.out / "directions"
    paths = [d / "mean_harmful.safetensors", d / "mean_harmless.safetensors"]
    if not all(p.is_file() for p in paths):
        raise UserError(f"{run.out} has no mean activations (directions/mean_*.safetensors); compare needs an "
                        "extracted run: drop --direction-file, or run `refusal-direction extract` on it")
    return load_candidates(paths[0]), load_candidates(paths[1])


def _cosmic_direction(run: Run, samples, candidates: CandidateDirections, harmful, harmless) -> Direction:
    path = run.out / "compare" / "cosmic.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return candidates.get(saved["position"], saved["layer"])
    c = run.config
    result = cosmic_select(run.lm, candidates, harmful.vectors, harmless.vectors,
                           [i.text for i in samples.harmful_val], [i.text for i in samples.harmless_val],
                           prune_layer_fraction=c.prune_layer_fraction, batch_size=c.batch_size)
    atomic_write_json(path, {"position": result.position, "layer": result.layer,
                             "reference_layers": list(result.reference_layers), "scores": result.scores,
                             "criterion": "max cos(ablated harmful, harmless mean) + cos(added harmless, "
                                          "harmful mean) over the least-similar layers (methods.cosmic)"})
    return candidates.get(result.position, result.layer)


def build_methods(run: Run, samples, candidates: CandidateDirections, direction: Direction,
                  names: list[str]) -> tuple[dict, dict]:
    """{name: intervention} and {name: parameters for the table} for ``names``."""
    from ..export.method_edits import norm_preserving_ablation

    harmful, harmless = _means(run)
    lm, c = run.lm, run.config
    ivs, info = {}, {}
    for name in names:
        if name == "baseline":
            ivs[name] = Baseline()
        elif name == "dim":
            ivs[name] = DirectionalAblation(direction.vector, name="dim")
        elif name in ("projected", "norm_preserving"):
            projected = projected_direction(direction, harmless)
            ivs[name] = (DirectionalAblation(projected.vector, name=name) if name == "projected"
                         else norm_preserving_ablation(lm, projected.vector, name=name))
        elif name == "layer_kernel":
            kernel = layer_kernel(lm.n_layers, peak=direction.layer, width=lm.n_layers / 2)
            ivs[name] = LayerKernelAblation(direction.vector, kernel, kernel, 0.0, name=name)
            info[name] = {"peak": direction.layer, "width": lm.n_layers / 2, "w_min": 0.0, "w_max": 1.0}
        elif name == "subspace":
            sub = refusal_subspace(candidates, direction, prune_layer_fraction=c.prune_layer_fraction)
            ivs[name] = SubspaceAblation(sub.basis, name=name)
            info[name] = {"k": sub.k, "rule": sub.rule, "explained": list(sub.explained)}
        elif name == "ace":
            ivs[name] = AffineAblation(direction.vector, ace_offset(direction, harmless), name=name)
        elif name == "cosmic":
            chosen = _cosmic_direction(run, samples, candidates, harmful, harmless)
            ivs[name] = DirectionalAblation(chosen.vector, name=name)
            info[name] = {"layer": chosen.layer, "position": chosen.position}
        info.setdefault(name, {})
        info[name] = {**ivs[name].describe(), **info[name]}
    return ivs, info


def method_intervention(run: Run, name: str):
    """One method's intervention for a run with a direction (for `export --method` / `verify-export --method`)."""
    from .extract import stage_extract, stage_samples

    if name not in METHODS or name == "baseline":
        raise UserError(f"--method {name!r}: choose one of {', '.join(m for m in METHODS if m != 'baseline')}")
    samples = stage_samples(run)
    candidates = stage_extract(run, samples)
    ivs, _ = build_methods(run, samples, candidates, run.saved_direction(), [name])
    return ivs[name]
