"""ACE, affine concept editing (Marshall et al., arXiv 2411.09003): the projection on r̂ set to a constant instead
of to 0.

- `AffineAblation`: x ← x − (r̂·x − c) r̂ at every block input and y ← y − (r̂·y) r̂ at attn_out / mlp_out, where
  c = r̂·μ_harmless at the direction's site: every residual's projection on r̂ is set to the harmless mean's.
- `AffineAddition` (ACE's addition form): x ← x − (r̂·x − c) r̂ at one block's input, with c = r̂·μ_harmful
  (the projection set to the harmful mean's, to induce refusal).

Weight form of the ablation: v ← v − P v everywhere, and every token-embedding row gets + (c / γ) r̂, where γ is the
gain from the embedding output to block 0's input (√d_model in Gemma, measured by a probe, `embedding_gain`). Every
residual then has projection exactly c, as with the hooks. The per-layer variant (a different c at each layer) would
need a bias on writers that have none (Qwen/Llama/Gemma), which transformers drops on reload; it is not offered.
The addition form has none: it changes the residual at one block's input only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.directions import CandidateDirections, Direction
from ...core.hooks import hook_block_input, hook_sites, on_rows, unit
from ...errors import UserError
from ..base import Edit, register
from .addition import ONE_SITE, check_layer


def ace_offset(direction: Direction, mean: CandidateDirections, layer: int | None = None) -> float:
    """r̂·μ of ``mean`` at the direction's position and ``layer`` (default: the direction's layer)."""
    mu = mean.get(direction.position, direction.layer if layer is None else layer).vector.double()
    return float(direction.unit().double() @ mu)


def embedding_gain(lm_or_model, direction: torch.Tensor) -> float:
    """γ: the change of block 0's input along r̂ when a token's embedding row gains r̂ (probe of 4 tokens; the
    rows are restored bit for bit). Measured on the weight, so a scale inside the embedding module counts."""
    from ..weights import _model_and_blocks, unit64

    model, blocks = _model_and_blocks(lm_or_model)
    weight = model.get_input_embeddings().weight
    r = unit64(direction).to(device=weight.device, dtype=torch.float32)
    vocab = int(model.config.get_text_config().vocab_size)
    tokens = [min(t, vocab - 1) for t in (2, 10, 20, 30)]
    ids = torch.tensor([tokens], device=weight.device)
    seen = []

    def capture(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).float())

    saved = weight[tokens].clone()
    handle = blocks[0].block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
            weight[tokens] += r.to(weight.dtype)
            model(input_ids=ids, use_cache=False)
    finally:
        with torch.no_grad():
            weight[tokens] = saved
        handle.remove()
    change = (seen[1] - seen[0])[0]  # [4, d]
    gain = change @ r  # [4]
    if (change - gain[:, None] * r).abs().max() > 1e-3 * gain.abs().max() or gain.std() > 1e-3 * gain.abs().mean():
        raise UserError("block 0's input is not a uniformly scaled copy of the token embedding in this model; "
                        "ACE's weight form cannot be exact here (use the hook form)")
    return float(gain.mean())


@register("ace")
@dataclass(frozen=True, eq=False)
class AffineAblation(Edit):
    """ACE: the projection on r̂ set to ``offset`` (= r̂·μ_harmless) at every block input; writers r̂-free."""

    direction: torch.Tensor  # [d_model]
    offset: float  # c = r̂·μ_harmless at the direction's layer and position
    name: str = "ace"
    order = 6
    compare = True
    reasons = {"stacked": "an affine map, not a projection: hooked with its own row switch",
               "own_step": "an affine map: the own decode step ablates one direction",
               "search": "the search covers the linear ablations"}

    def describe(self) -> dict:
        return {"type": "affine_concept_ablation", "offset": self.offset,
                "sites": "resid_pre (affine), attn_out, mlp_out (linear) of every block"}

    def hooks(self, lm, rows=None) -> list:
        r = unit(self.direction).to(device=lm.device, dtype=lm.dtype)
        c = float(self.offset)

        def affine(x):
            return on_rows(rows, x, -((x @ r).unsqueeze(-1) - c) * r)

        def linear(y):
            return on_rows(rows, y, -(y @ r).unsqueeze(-1) * r)

        return hook_sites(lm, affine, linear)

    def weights_(self, model):
        """r̂ projected out of every written vector, + (c/γ) r̂ on each token-embedding row."""
        from ..weights import edit_written_vectors_, unit64

        r = unit64(self.direction)
        gain = embedding_gain(model, self.direction)

        def edit(kind, layer, v):
            out = v - torch.outer(v @ r, r)
            return out + (self.offset / gain) * r if kind == "token_embedding" else out

        return edit_written_vectors_(model, edit)

    @classmethod
    def from_run(cls, inputs, name: str) -> AffineAblation:
        return cls(inputs.direction.vector, ace_offset(inputs.direction, inputs.mean_harmless()), name=name)


@register("ace_add")
@dataclass(frozen=True, eq=False)
class AffineAddition(Edit):
    """ACE's addition form: at block ``layer``'s input the projection on r̂ is set to ``target`` (r̂·μ_harmful)."""

    direction: torch.Tensor  # [d_model]
    layer: int
    target: float
    name: str = "ace_add"
    order = 21
    reasons = {"weights": ONE_SITE, "lora": ONE_SITE,
               "stacked": "an affine map at one site: hooked with its own row switch",
               "own_step": "an affine map: the own decode step adds or ablates one vector",
               "search": "it induces refusal; the search removes it"}

    def describe(self) -> dict:
        return {"type": "affine_concept_addition", "layer": self.layer, "target": self.target}

    def hooks(self, lm, rows=None) -> list:
        check_layer(self.layer, lm)
        r = unit(self.direction).to(device=lm.device, dtype=lm.dtype)
        c = float(self.target)

        def fn(x):
            return on_rows(rows, x, -((x @ r).unsqueeze(-1) - c) * r)

        return [hook_block_input(lm, self.layer, fn)]

    @classmethod
    def from_run(cls, inputs, name: str) -> AffineAddition:
        """The harmful mean's projection at the direction's layer (induces refusal)."""
        d = inputs.direction
        return cls(d.vector, d.layer, ace_offset(d, inputs.mean_harmful()), name=name)
