"""COSMIC's choice: directional ablation of the candidate chosen by cosine similarity of activations, with no
generation.

After COSMIC (Siu et al., "COSMIC: Generalized Refusal Direction Identification in LLM Activations",
Findings of ACL 2025). The criterion implemented here:

1. Reference layers L_low: the ``low_fraction`` of layers (at least one) where the harmful and harmless mean
   activations are least alike — lowest cosine similarity of mean_harmful[:, l] and mean_harmless[:, l],
   flattened over the post-instruction positions. That is where the two classes are represented apart.
2. For each candidate r[position, layer] (layers below the selection's pruning cutoff):
   - S_comply: cos(mean activation of the harmful validation prompts under directional ablation of r,
     mean_harmless), over L_low and every post-instruction position, flattened;
   - S_refuse: cos(mean activation of the harmless validation prompts under activation addition of r at its
     layer, mean_harmful), same sites.
3. The candidate with the highest S_comply + S_refuse wins: ablating it makes harmful prompts look
   harmless inside the model, adding it makes harmless prompts look harmful, with no refusal-token list,
   judge, or generation. (COSMIC averages per-prompt similarities; this uses the means, one forward pass
   per prompt and candidate.)

The choice is kept in the run (store key ``cosmic``) and reused: it costs two forward passes per candidate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from ...core.activations import mean_resid_pre
from ...core.directions import CandidateDirections
from ...core.model import LoadedModel
from ..base import apply_intervention, register
from .addition import ActivationAddition
from .directional import DirectionalAblation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CosmicResult:
    position: int
    layer: int
    reference_layers: tuple[int, ...]
    scores: dict  # "position,layer" -> {"comply": S_comply, "refuse": S_refuse, "total": sum}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def reference_layers(mean_harmful: torch.Tensor, mean_harmless: torch.Tensor, low_fraction: float = 0.1
                     ) -> tuple[int, ...]:
    """Layers of least harmful/harmless mean similarity; means [n_positions, n_layers, d_model]."""
    n_layers = mean_harmful.shape[1]
    sims = [_cos(mean_harmful[:, i], mean_harmless[:, i]) for i in range(n_layers)]
    n = max(1, round(low_fraction * n_layers))
    return tuple(sorted(sorted(range(n_layers), key=lambda i: sims[i])[:n]))


@torch.no_grad()
def cosmic_select(
    lm: LoadedModel,
    candidates: CandidateDirections,
    mean_harmful: torch.Tensor,
    mean_harmless: torch.Tensor,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    prune_layer_fraction: float = 0.2,
    low_fraction: float = 0.1,
    batch_size: int = 32,
) -> CosmicResult:
    """The COSMIC criterion over every candidate (module docstring); means [n_positions, n_layers, d_model]."""
    ref = list(reference_layers(mean_harmful, mean_harmless, low_fraction))
    cutoff = max(1, int(candidates.n_layers * (1 - prune_layer_fraction)))
    n_pos = mean_harmful.shape[0]
    scores, best = {}, None
    for pos in candidates.positions:
        for layer in range(cutoff):
            d = candidates.get(pos, layer)
            if float(d.vector.norm()) <= 1e-6 * float(candidates.vectors.norm(dim=-1).max()):
                continue  # the same token in both sets (e.g. layer 0 at a template position): no direction
            with apply_intervention(lm, DirectionalAblation(d.vector)):
                ablated = mean_resid_pre(lm, harmful_val, batch_size, n_pos, desc="cosmic harmful")
            with apply_intervention(lm, ActivationAddition(d.vector, layer)):
                added = mean_resid_pre(lm, harmless_val, batch_size, n_pos, desc="cosmic harmless")
            comply = _cos(ablated[:, ref], mean_harmless[:, ref])
            refuse = _cos(added[:, ref], mean_harmful[:, ref])
            scores[f"{pos},{layer}"] = {"comply": comply, "refuse": refuse, "total": comply + refuse}
            if best is None or comply + refuse > scores[best]["total"]:
                best = f"{pos},{layer}"
    pos, layer = (int(x) for x in best.split(","))
    log.info("COSMIC selection: position %d, layer %d (S_comply + S_refuse = %.4f; reference layers %s)",
             pos, layer, scores[best]["total"], ref)
    return CosmicResult(pos, layer, tuple(ref), scores)


CRITERION = ("max cos(ablated harmful, harmless mean) + cos(added harmless, harmful mean) over the least-similar "
             "layers (edits.methods.cosmic)")


@register("cosmic")
@dataclass(frozen=True, eq=False)
class CosmicAblation(DirectionalAblation):
    name: str = "cosmic"
    layer: int = -1  # the chosen candidate's layer and position (for the tables)
    position: int = 0
    order = 7
    reasons = {"search": "COSMIC is a selection rule; the search samples directions itself"}

    def describe(self) -> dict:
        return {**super().describe(), "layer": self.layer, "position": self.position}

    @classmethod
    def from_run(cls, inputs, name: str) -> CosmicAblation:
        saved = None if inputs.store is None else inputs.store.read("cosmic")
        if saved is None:
            harmful, harmless = inputs.mean_harmful(), inputs.mean_harmless()
            result = cosmic_select(inputs.lm, inputs.candidates, harmful.vectors, harmless.vectors,
                                   inputs.harmful_val, inputs.harmless_val,
                                   prune_layer_fraction=inputs.prune_layer_fraction, batch_size=inputs.batch_size)
            saved = {"position": result.position, "layer": result.layer,
                     "reference_layers": list(result.reference_layers), "scores": result.scores,
                     "criterion": CRITERION}
            if inputs.store is not None:
                inputs.store.write("cosmic", saved)
        chosen = inputs.candidates.get(saved["position"], saved["layer"])
        return cls(chosen.vector, name=name, layer=chosen.layer, position=chosen.position)
