"""Directional ablation and activation addition: properties on a tiny Gemma."""

import pytest
import torch

from refusal_direction.core.activations import mean_resid_pre
from refusal_direction.core.directions import diff_in_means
from refusal_direction.edits import ActivationAddition, Baseline, DirectionalAblation, apply_intervention
from tests.helpers.prompts import PROMPTS


def _direction(lm, seed=0, dtype=torch.float32):
    return torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _no_hooks_left(lm) -> bool:
    return all(not s.block._forward_pre_hooks and not s.attn_out._forward_hooks and not s.mlp_out._forward_hooks
               for s in lm.blocks)


def _residuals(lm, prompts):
    """Every block input and the final residual (input of the final norm): [n_layers + 1] tensors."""
    seen = []
    hooks = [s.block.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).clone()),
                                               with_kwargs=True) for s in lm.blocks]
    hooks.append(lm.final_norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone())))
    try:
        with torch.no_grad():
            logits = lm.model(**lm.tokenize(prompts)).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def test_ablation_removes_the_direction_everywhere(tiny_lm):
    r = _direction(tiny_lm, dtype=torch.float64)
    r_hat = (r / r.norm()).float()
    before, _ = _residuals(tiny_lm, PROMPTS)
    assert max((x @ r_hat).abs().max().item() for x in before) > 1e-2  # the direction is there to begin with
    with apply_intervention(tiny_lm, DirectionalAblation(r)):
        after, _ = _residuals(tiny_lm, PROMPTS)
    assert len(after) == tiny_lm.n_layers + 1
    for x in after:
        assert (x @ r_hat).abs().max().item() <= 1e-5


def test_hooks_are_removed_and_outputs_bit_identical(tiny_lm):
    r = _direction(tiny_lm, seed=1)
    _, ref = _residuals(tiny_lm, PROMPTS)
    for iv in (DirectionalAblation(r), ActivationAddition(r, 1, 4.0)):
        with apply_intervention(tiny_lm, iv):
            _, changed = _residuals(tiny_lm, PROMPTS)
        assert not torch.equal(changed, ref)
        _, again = _residuals(tiny_lm, PROMPTS)
        assert torch.equal(again, ref)
    assert _no_hooks_left(tiny_lm)


@pytest.mark.parametrize("make", [DirectionalAblation, lambda r: ActivationAddition(r, 1, 4.0)],
                         ids=["ablation", "addition"])
def test_hooks_removed_on_error(tiny_lm, make):
    _, ref = _residuals(tiny_lm, PROMPTS[:2])
    with pytest.raises(RuntimeError, match="boom"), apply_intervention(tiny_lm, make(_direction(tiny_lm, seed=2))):
        assert not _no_hooks_left(tiny_lm)  # the hooks are in place inside the context
        raise RuntimeError("boom")
    assert _no_hooks_left(tiny_lm)
    assert torch.equal(_residuals(tiny_lm, PROMPTS[:2])[1], ref)


def test_baseline_is_a_noop(tiny_lm):
    _, ref = _residuals(tiny_lm, PROMPTS)
    with apply_intervention(tiny_lm, Baseline()):
        _, out = _residuals(tiny_lm, PROMPTS)
    assert torch.equal(out, ref)


def test_row_mask_applies_only_to_selected_rows(tiny_lm):
    r = _direction(tiny_lm, seed=3)
    _, base = _residuals(tiny_lm, PROMPTS)
    with apply_intervention(tiny_lm, DirectionalAblation(r)):
        _, abl = _residuals(tiny_lm, PROMPTS)
    rows = torch.tensor([i % 2 for i in range(len(PROMPTS))])
    with apply_intervention(tiny_lm, DirectionalAblation(r), rows=rows):
        _, mixed = _residuals(tiny_lm, PROMPTS)
    for i in range(len(PROMPTS)):
        assert not torch.allclose(abl[i], base[i], atol=1e-3), i  # the ablation changes every row
        expect = abl[i] if rows[i] else base[i]
        assert torch.allclose(mixed[i], expect, atol=1e-5), i


def test_diff_in_means_recovers_a_planted_direction(tiny_lm):
    """Harmful = the same prompts with v added at block 0's input: the layer-0 difference is exactly v."""
    v = _direction(tiny_lm, seed=4, dtype=torch.float64) * 3
    plain = mean_resid_pre(tiny_lm, PROMPTS, batch_size=4)
    with apply_intervention(tiny_lm, ActivationAddition(v, 0, 1.0)):
        planted = mean_resid_pre(tiny_lm, PROMPTS, batch_size=4)
    c = diff_in_means(planted, plain)
    assert c.positions == [-5, -4, -3, -2, -1]
    for p in range(5):
        assert torch.allclose(c.vectors[p, 0], v, atol=1e-4)


def test_mean_is_independent_of_batching(tiny_lm):
    a = mean_resid_pre(tiny_lm, PROMPTS, batch_size=1)
    b = mean_resid_pre(tiny_lm, PROMPTS, batch_size=6)
    assert a.dtype == torch.float64 and torch.allclose(a, b, atol=1e-5)
