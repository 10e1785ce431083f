"""On CUDA the fused RMSNorm and rotary stand-ins are swapped in and keep the greedy tokens.

The stand-ins are within one unit in the last place of the modules they replace, which in bf16 can still flip an
argmax of this tiny random model after some steps (seen on an H200, 2026-12-01): in bf16 each row's first 4 tokens
must agree, in float32 (where only the rotary stand-in is taken) every token."""

import torch

from tests.helpers.tiny import tiny_gemma


def test_fused_norms_on_cuda_keep_greedy_tokens():
    from refusal_direction.accel.fast_generation import generate_fast_ids, prompt_ids
    from refusal_direction.core.interventions import Baseline, DirectionalAblation

    for dtype in (torch.bfloat16, torch.float32):
        lm = tiny_gemma(n_layers=3, hidden=64, seed=0)
        lm.model.to("cuda", dtype)
        prompts = prompt_ids(lm, ["How do I bake bread?", "Tell me a story", "Write a poem about rain"])
        ivs = [Baseline(), DirectionalAblation(torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1)))]
        fused = generate_fast_ids(lm, prompts, ivs, 32, [], force_tokens=True, fuse=True)
        plain = generate_fast_ids(lm, prompts, ivs, 32, [], force_tokens=True, fuse=False)
        assert "fused rotary embedding (1 attention module)" in fused.stats.notes, dtype
        assert not any(n.startswith("fused") for n in plain.stats.notes)
        if dtype == torch.bfloat16:
            assert "fused RMSNorm: scale_fp32 x7" in fused.stats.notes, fused.stats.notes
            for name, rows in fused.tokens.items():
                assert [r[:4] for r in rows] == [r[:4] for r in plain.tokens[name]], name
        else:
            assert fused.tokens == plain.tokens
