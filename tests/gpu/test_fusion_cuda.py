"""On CUDA the fused RMSNorm and rotary stand-ins are swapped in and keep the greedy tokens.

The stand-ins are within one unit in the last place of the modules they replace, which in bf16 can still flip an
argmax of this tiny random model after some steps (it does on an H200): in bf16 each row's first 4 tokens
must agree, in float32 (where only the rotary stand-in is taken) every token."""

import torch

from tests.helpers.tiny import tiny_gemma


def test_fused_norms_on_cuda_keep_greedy_tokens():
    from refusal_direction.accel.fast_generation import generate_fast_ids, prompt_ids
    from refusal_direction.edits import Baseline, DirectionalAblation

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


def _norms_match_their_fused_forms(device: str) -> int:
    """Every RMSNorm of a bf16 tiny Gemma on ``device`` against the fused form chosen for it, on inputs other than
    the probes it was chosen on: within one unit in the last place of bf16, elementwise. Returns norms checked."""
    from refusal_direction.accel.fusion import fused_form

    lm = tiny_gemma(n_layers=3, hidden=64, seed=0)
    lm.model.to(device, torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(256, lm.d_model, generator=g) * torch.logspace(-1, 2, 256).unsqueeze(-1)).to(device,
                                                                                                  torch.bfloat16)
    checked = 0
    with torch.no_grad():
        for module in lm.model.modules():
            form = fused_form(module)
            if form is None:
                continue
            ref, out = module(x).float(), form[1](x).float()
            assert ((out - ref).abs() <= torch.finfo(torch.bfloat16).eps * ref.abs() + 1e-30).all(), form[0]
            checked += 1
    return checked


def test_fused_rms_norms_match_their_modules_in_bf16_on_cuda():
    assert _norms_match_their_fused_forms("cuda") == 7  # 3 blocks x 2 + the final norm
