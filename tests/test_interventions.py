"""Directional ablation and activation addition: properties on a tiny Gemma."""

import torch
from conftest import PROMPTS

from refusal_direction.core.activations import mean_resid_pre
from refusal_direction.core.directions import diff_in_means
from refusal_direction.core.interventions import ActivationAddition, Baseline, DirectionalAblation, apply_intervention


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
    r = torch.randn(tiny_lm.d_model, dtype=torch.float64)
    r_hat = (r / r.norm()).float()
    before, _ = _residuals(tiny_lm, PROMPTS)
    assert max((x @ r_hat).abs().max().item() for x in before) > 1e-2  # the direction is there to begin with
    with apply_intervention(tiny_lm, DirectionalAblation(r)):
        after, _ = _residuals(tiny_lm, PROMPTS)
    assert len(after) == tiny_lm.n_layers + 1
    for x in after:
        assert (x @ r_hat).abs().max().item() <= 1e-5


def test_hooks_are_removed_and_outputs_bit_identical(tiny_lm):
    r = torch.randn(tiny_lm.d_model)
    _, ref = _residuals(tiny_lm, PROMPTS)
    for iv in (DirectionalAblation(r), ActivationAddition(r, 1, 4.0)):
        with apply_intervention(tiny_lm, iv):
            _, changed = _residuals(tiny_lm, PROMPTS)
        assert not torch.equal(changed, ref)
        _, again = _residuals(tiny_lm, PROMPTS)
        assert torch.equal(again, ref)
    for site in tiny_lm.blocks:
        assert not site.block._forward_pre_hooks
        assert not site.attn_out._forward_hooks and not site.mlp_out._forward_hooks


def test_hooks_removed_on_error(tiny_lm):
    try:
        with apply_intervention(tiny_lm, DirectionalAblation(torch.randn(tiny_lm.d_model))):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(not s.block._forward_pre_hooks for s in tiny_lm.blocks)


def test_baseline_is_a_noop(tiny_lm):
    _, ref = _residuals(tiny_lm, PROMPTS)
    with apply_intervention(tiny_lm, Baseline()):
        _, out = _residuals(tiny_lm, PROMPTS)
    assert torch.equal(out, ref)


def test_row_mask_applies_only_to_selected_rows(tiny_lm):
    r = torch.randn(tiny_lm.d_model)
    _, base = _residuals(tiny_lm, PROMPTS)
    with apply_intervention(tiny_lm, DirectionalAblation(r)):
        _, abl = _residuals(tiny_lm, PROMPTS)
    rows = torch.tensor([i % 2 for i in range(len(PROMPTS))])
    with apply_intervention(tiny_lm, DirectionalAblation(r), rows=rows):
        _, mixed = _residuals(tiny_lm, PROMPTS)
    for i in range(len(PROMPTS)):
        expect = abl[i] if rows[i] else base[i]
        assert torch.allclose(mixed[i], expect, atol=1e-5)


def test_diff_in_means_recovers_a_planted_direction(tiny_lm):
    """Harmful = the same prompts with v added at block 0's input: the layer-0 difference is exactly v."""
    v = torch.randn(tiny_lm.d_model, dtype=torch.float64) * 3
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
