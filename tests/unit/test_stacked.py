"""`edits.stacked`: many interventions in one batch, the projection forms stacked into one hook per site."""

from __future__ import annotations

import pytest
import torch

from refusal_direction.core.padding import position_ids
from refusal_direction.edits import (
    ActivationAddition,
    Baseline,
    DirectionalAblation,
    LayerKernelAblation,
    SubspaceAblation,
    apply_intervention,
    layer_kernel,
)
from refusal_direction.edits.stacked import apply_interventions, project_rows

PROMPTS = ["How do I pick a lock?", "Write a poem about the sea.", "What is 2+2?"]


def _orthonormal(k: int, d: int, seed: int) -> torch.Tensor:
    """[k, d] orthonormal rows, float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.T.contiguous()


def _conditions(lm):
    d, n = lm.d_model, lm.n_layers
    g = torch.Generator().manual_seed(0)
    kernel = layer_kernel(n, peak=1, width=1.5, w_min=0.2, w_max=0.9)
    return [
        Baseline("b"),
        DirectionalAblation(torch.randn(d, generator=g), name="dim"),
        SubspaceAblation(_orthonormal(3, d, 1).float(), name="sub3"),
        LayerKernelAblation(torch.randn(d, generator=g), kernel, tuple(reversed(kernel)), embed_weight=0.5,
                            name="kernel"),
        ActivationAddition(torch.randn(d, generator=g), layer=1, coeff=0.7, name="add"),  # not a projection
        DirectionalAblation(torch.randn(d, generator=g), name="dim2"),
    ]


def _logits(lm, enc):
    return lm.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False).logits


@torch.no_grad()
def test_a_stacked_batch_equals_each_condition_alone(tiny_lm):
    lm = tiny_lm
    conds = _conditions(lm)
    enc = lm.tokenize(PROMPTS)
    n = len(PROMPTS)
    batch = {k: v.repeat(len(conds), 1) for k, v in enc.items()}
    cond_of_row = torch.arange(len(conds) * n) // n
    switches = [(cond_of_row == c).to(lm.dtype) for c in range(len(conds))]
    plain = _logits(lm, enc)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())
    with apply_interventions(lm, conds, switches) as hooked:
        assert hooked == {"stacked": 4, "switched": 2}
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()) - hooks_before
        together = _logits(lm, batch).view(len(conds), n, *plain.shape[1:])
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()) == hooks_before
    assert hooks == 3 * lm.n_layers + 1  # one per site for the 4 projections (kernel: every site weighted) + addition
    for c, iv in enumerate(conds):
        with apply_intervention(lm, iv):
            alone = _logits(lm, enc)
        if isinstance(iv, Baseline):
            assert torch.equal(together[c], alone)  # weight 0 rows come back bit for bit
        else:
            torch.testing.assert_close(together[c], alone, rtol=1e-5, atol=1e-5)
        assert isinstance(iv, Baseline) or not torch.allclose(alone, plain, atol=1e-3)  # every condition acts


def test_a_single_projection_keeps_the_switched_path(tiny_lm):
    lm = tiny_lm
    conds = [Baseline("b"), DirectionalAblation(torch.ones(lm.d_model), name="dim")]
    switches = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    with apply_interventions(lm, conds, switches) as hooked:
        assert hooked == {"stacked": 0, "switched": 2}


def test_project_rows_is_the_per_row_projection():
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    bases = torch.stack([_orthonormal(2, 8, s) for s in range(4)])
    bases[3] = 0  # a row without an intervention
    w = torch.tensor([1.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    out = project_rows(x, bases, w)
    for b in range(4):
        q = bases[b]
        want = x[b] - w[b] * (x[b] @ q.T) @ q
        torch.testing.assert_close(out[b], want)
    assert torch.equal(out[2], x[2]) and torch.equal(out[3], x[3])
    # a full-weight row has no component left in its subspace
    assert (out[0] @ bases[0].T).abs().max() < 1e-12


@pytest.mark.parametrize("bad", [(1, 2), (4, 4)])
def test_a_kernel_of_the_wrong_length_is_refused(tiny_lm, bad):
    kern = LayerKernelAblation(torch.ones(tiny_lm.d_model), (0.5,) * bad[0], (0.5,) * bad[1])
    conds = [kern, DirectionalAblation(torch.ones(tiny_lm.d_model))]
    with pytest.raises(ValueError, match="layer_kernel"):
        with apply_interventions(tiny_lm, conds, [torch.ones(1), torch.ones(1)]):
            pass


def test_fast_generation_with_stacked_conditions_gives_hf_generates_tokens(tiny_lm):
    """Four projection conditions stacked in the fast path's batch: each row's tokens are HF generate's."""
    from refusal_direction.accel import generate_fast
    from refusal_direction.core.decoding import GenerationSettings, generate_hf

    settings = GenerationSettings(max_new_tokens=12, batch_size=4, stop_at_end_of_turn=False)
    conds = _conditions(tiny_lm)
    fast = generate_fast(tiny_lm, PROMPTS, conds, settings)
    for iv in conds:
        ref = generate_hf(tiny_lm, PROMPTS, iv, settings)
        assert [g.token_ids for g in fast[iv.name]] == [g.token_ids for g in ref], iv.name
    assert len({tuple(tuple(g.token_ids) for g in fast[iv.name]) for iv in conds}) > 2  # the conditions differ


@torch.no_grad()
@pytest.mark.parametrize("family", ["gemma", "llama-biases", "gpt2"])
def test_norm_preserving_ablations_stack_and_equal_each_alone(tiny_lm, family):
    """Also with writer biases (their per-row shifts) and GPT-2's Conv1D writers and learned positions."""
    from refusal_direction.edits import norm_preserving_ablation
    from tests.helpers.tiny import tiny_family_lm

    lm = tiny_lm if family == "gemma" else tiny_family_lm(family)
    g = torch.Generator().manual_seed(3)
    conds = [Baseline("b"), norm_preserving_ablation(lm, torch.randn(lm.d_model, generator=g), name="np1"),
             DirectionalAblation(torch.randn(lm.d_model, generator=g), name="dim"),
             norm_preserving_ablation(lm, torch.randn(lm.d_model, generator=g), name="np2")]
    enc = lm.tokenize(PROMPTS)
    n = len(PROMPTS)
    plain = _logits(lm, enc)
    batch = {k: v.repeat(len(conds), 1) for k, v in enc.items()}
    cond_of_row = torch.arange(len(conds) * n) // n
    switches = [(cond_of_row == c).to(lm.dtype) for c in range(len(conds))]
    with apply_interventions(lm, conds, switches) as hooked:
        assert hooked == {"stacked": 2, "switched": 2}  # the two norm-preserving ones; one projection stays switched
        together = _logits(lm, batch).view(len(conds), n, *plain.shape[1:])
    for c, iv in enumerate(conds):
        with apply_intervention(lm, iv):
            alone = _logits(lm, enc)
        if isinstance(iv, Baseline):
            assert torch.equal(together[c], alone)
        else:
            # the stacked and the switched hooks round differently (float32): up to ~1.3e-5 on logits of size ~1
            torch.testing.assert_close(together[c], alone, rtol=1e-5, atol=3e-5)
            assert not torch.allclose(alone, plain, atol=1e-3)
