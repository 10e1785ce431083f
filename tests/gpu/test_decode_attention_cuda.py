"""The decode-attention kernel on CUDA: it passes its probe check in bfloat16 for Gemma-2b's and Llama-3-8B's head
shapes, the fast path reports using it, and its bf16 tokens agree with the SDPA run's (bf16 rounding may flip a
near-tie, so most tokens, not all)."""

import pytest
import torch

pytest.importorskip("triton")  # CPU-only PyTorch builds (CI) have none; decode_attention imports it

from refusal_direction.accel import folded_attention  # noqa: E402
from refusal_direction.accel.decode_attention import decode_attention  # noqa: E402
from refusal_direction.accel.fast_generation import generate_fast_ids, prompt_ids  # noqa: E402
from refusal_direction.bench import bench_conditions, random_model, synthetic_instructions  # noqa: E402


@pytest.mark.parametrize("heads,kv,dim", [(8, 1, 256), (32, 8, 128), (14, 2, 64)])
def test_probe_check_passes_in_bf16(heads, kv, dim):
    ok, detail = folded_attention.verify_decode_kernel(decode_attention, heads, kv, dim, torch.bfloat16, "cuda")
    assert ok, detail


def test_fast_path_uses_the_kernel_and_agrees_with_sdpa():
    lm = random_model("tiny", device="cuda", dtype="bfloat16", initializer_range=0.08)
    prompts = prompt_ids(lm, synthetic_instructions(lm, 16, 0))
    conds = bench_conditions(lm)
    on = generate_fast_ids(lm, prompts, conds, 64, [], force_tokens=True, fuse=True)
    off = generate_fast_ids(lm, prompts, conds, 64, [], force_tokens=True, fuse=False)
    assert any(n.startswith("decode attention kernel: ") for n in on.stats.notes), on.stats.notes
    same = sum(a == b for c in on.tokens for ra, rb in zip(on.tokens[c], off.tokens[c]) for a, b in zip(ra, rb))
    total = sum(len(r) for c in on.tokens for r in on.tokens[c])
    assert same / total > 0.5, same / total
