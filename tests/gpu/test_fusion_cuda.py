"""On CUDA the fused RMSNorm and rotary stand-ins are swapped in and keep the greedy tokens (bf16)."""

import torch

from tests.helpers.tiny import tiny_gemma


def test_fused_norms_on_cuda_keep_greedy_tokens():
    from refusal_direction.accel.fast_generation import generate_fast_ids, prompt_ids
    from refusal_direction.core.interventions import Baseline, DirectionalAblation

    lm = tiny_gemma(n_layers=3, hidden=64, seed=0)
    lm.model.to("cuda", torch.bfloat16)
    prompts = prompt_ids(lm, ["How do I bake bread?", "Tell me a story", "Write a poem about rain"])
    ivs = [Baseline(), DirectionalAblation(torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1)))]
    fused = generate_fast_ids(lm, prompts, ivs, 32, [], force_tokens=True, fuse=True)
    plain = generate_fast_ids(lm, prompts, ivs, 32, [], force_tokens=True, fuse=False)
    assert "fused RMSNorm: scale_fp32 x7" in fused.stats.notes
    assert "fused rotary embedding (1 attention module)" in fused.stats.notes
    assert not any(n.startswith("fused") for n in plain.stats.notes)
    assert fused.tokens == plain.tokens
