"""Fused RMSNorm stand-ins: the right form is found per architecture, verified, swapped and restored."""

from __future__ import annotations

import pytest
import torch

from refusal_direction.accel.fusion import fused_form, fused_kernels, fused_rms_norms, fused_rotary, make_fused_rotary
from tests.helpers.tiny import randomize_norms_, tiny_gemma


def tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    randomize_norms_(model, seed=1)
    return model.to(dtype).eval()


def norms_of(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_norms_take_the_float32_scale_form(dtype):
    model = tiny_gemma(n_layers=2, hidden=64).model.to(dtype)
    norms = norms_of(model)
    assert len(norms) == 2 * 2 + 1  # two per block and the final one
    assert {fused_form(m)[0] for m in norms} == {"scale_fp32"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_norms_take_the_weight_after_cast_form(dtype):
    norms = norms_of(tiny_llama(dtype))
    assert len(norms) == 2 * 2 + 1
    assert {fused_form(m)[0] for m in norms} == {"weight_after_cast"}


def test_a_norm_no_form_reproduces_is_left_alone():
    class CenteredRMSNorm(torch.nn.Module):  # subtracts the mean first: neither form reproduces it
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(d))
            self.eps = 1e-6

        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    assert fused_form(CenteredRMSNorm(16)) is None
    assert fused_form(torch.nn.LayerNorm(16)) is None  # not an RMSNorm by name: never probed


def test_swap_keeps_outputs_and_is_undone_on_exit_and_on_error():
    model = tiny_gemma(n_layers=2, hidden=64).model
    ids = torch.randint(8, 60, (3, 11))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with fused_rms_norms(model, device_types=("cpu",)) as counts:
            assert counts == {"scale_fp32": 5}
            assert all("forward" in m.__dict__ for m in norms_of(model))
            fused = model(input_ids=ids).logits
        assert all("forward" not in m.__dict__ for m in norms_of(model))
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="boom"), fused_rms_norms(model, device_types=("cpu",)):
            raise RuntimeError("boom")
        assert all("forward" not in m.__dict__ for m in norms_of(model))
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_nothing_is_swapped_off_the_listed_devices_or_when_disabled():
    model = tiny_gemma(n_layers=2, hidden=64).model
    with fused_rms_norms(model) as counts:  # default: CUDA only; this model is on the CPU
        assert counts == {} and all("forward" not in m.__dict__ for m in norms_of(model))
    with fused_rms_norms(model, enabled=False, device_types=("cpu",)) as counts:
        assert counts == {}


@pytest.mark.parametrize("make", ["gemma", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_is_bit_identical_and_restored(make, dtype):
    import sys

    model = (tiny_gemma(n_layers=2, hidden=64).model if make == "gemma" else tiny_llama()).to(dtype)
    namespace = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = namespace.apply_rotary_pos_emb
    ids = torch.randint(8, 60, (3, 11))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with fused_rotary(model, device_types=("cpu",)) as swapped:
            assert swapped == 1 and namespace.apply_rotary_pos_emb is not original
            fused = model(input_ids=ids).logits
        assert namespace.apply_rotary_pos_emb is original
    assert torch.equal(fused, ref)


def test_a_rotary_the_fused_form_does_not_reproduce_is_left_alone(monkeypatch):
    import sys

    model = tiny_gemma(n_layers=2, hidden=64).model
    namespace = sys.modules[type(model.model.layers[0].self_attn).__module__]

    def partial_rotary(q, k, cos, sin, unsqueeze_dim=1):  # a different rotation: must not be swapped
        return q * cos.unsqueeze(1), k * cos.unsqueeze(1)

    monkeypatch.setattr(namespace, "apply_rotary_pos_emb", partial_rotary)
    with fused_rotary(model, device_types=("cpu",)) as swapped:
        assert swapped == 0 and namespace.apply_rotary_pos_emb is partial_rotary


def test_calls_the_fused_rotary_does_not_cover_go_to_the_original():
    calls = []

    def original(q, k, cos, sin, unsqueeze_dim=1):
        calls.append(unsqueeze_dim)
        return q, k

    fused = make_fused_rotary(original)
    q, k = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 1, 16)  # [batch, seq, heads, d] layout
    assert fused(q, k, torch.randn(2, 3, 16), torch.randn(2, 3, 16), unsqueeze_dim=2) == (q, k)
    odd = torch.randn(2, 4, 3, 15)  # odd head_dim
    fused(odd, odd[:, :1], torch.randn(2, 3, 15), torch.randn(2, 3, 15))
    assert calls == [2, 1]


def test_fused_kernels_reports_both():
    model = tiny_gemma(n_layers=2, hidden=64).model
    with fused_kernels(model, device_types=("cpu",)) as notes:
        assert notes == ["fused RMSNorm: scale_fp32 x5", "fused rotary embedding (1 attention module)"]
