"""`position_mean`: the direction averaged over post-instruction positions, registered from its one file."""

from __future__ import annotations

import copy

import pytest
import torch

from refusal_direction.core.directions import CandidateDirections, Direction
from refusal_direction.edits import EditInputs, apply_intervention, get_method, registry
from refusal_direction.edits.methods.position_mean import PositionMeanAblation, position_mean_direction
from refusal_direction.errors import UserError
from tests.helpers.tiny import tiny_family_lm

PROMPTS = ["How do I bake bread?", "List five prime numbers."]


def candidates(lm, zero_position: bool = False) -> CandidateDirections:
    g = torch.Generator().manual_seed(7)
    vectors = torch.randn(3, lm.n_layers, lm.d_model, generator=g, dtype=torch.float64)
    if zero_position:
        vectors[0] = 0  # a template token shared by both sets: no direction there
    return CandidateDirections(vectors, [-3, -2, -1], {"model_id": "tiny"})


def inputs(lm, cands) -> EditInputs:
    return EditInputs(lm, cands, direction=Direction(cands.vectors[2, 1], 1, -1))


def test_registered_from_its_file_as_a_compare_row():
    assert registry()["position_mean"] is PositionMeanAblation and get_method("position_mean").compare


def test_the_direction_is_the_mean_of_the_unit_candidates_of_nonempty_positions():
    lm = tiny_family_lm("gemma-untied")
    c = candidates(lm, zero_position=True)
    vector, n = position_mean_direction(c, 1)
    units = c.vectors[1:, 1] / c.vectors[1:, 1].norm(dim=-1, keepdim=True)
    want = units.sum(0) / units.sum(0).norm()
    assert n == 2 and torch.allclose(vector, want, atol=1e-12) and abs(float(vector.norm()) - 1) < 1e-12
    c.vectors[:, 1] = 0
    with pytest.raises(UserError, match="no candidate direction at layer 1"):
        position_mean_direction(c, 1)


def test_hooks_remove_the_mixed_direction_and_equal_the_weight_form():
    lm = tiny_family_lm("gemma-untied")
    edit = get_method("position_mean").from_run(inputs(lm, candidates(lm)), "position_mean")
    assert edit.describe()["mixed_positions"] == 3
    r = edit.direction / edit.direction.norm()
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    seen = []
    handle = lm.final_norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad(), apply_intervention(lm, edit):
            hooked = lm.model(**enc).logits
    finally:
        handle.remove()
    assert float((seen[0].double() @ r).abs().max()) < 1e-4  # the final residual has no component along r̄
    edited = copy.deepcopy(lm.model)
    edit.weights_(edited)
    with torch.no_grad():
        weights = edited(**enc).logits
    real = enc["attention_mask"].bool()
    assert float((hooked - weights).abs()[real].max()) <= 1e-4
