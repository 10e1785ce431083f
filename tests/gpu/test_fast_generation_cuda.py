"""On CUDA the fast path's CUDA-graph decode gives HF generate's tokens (float32) and the eager decode's (bf16)."""

import torch

from refusal_direction.accel.fast_generation import generate_fast, generate_fast_ids, prompt_ids
from refusal_direction.core.decoding import GenerationSettings, generate_hf
from tests.helpers.generation_cases import INSTRUCTIONS, conditions
from tests.helpers.tiny import tiny_gemma


def test_cuda_graph_path_gives_the_tokens_of_hf_generate_fp32():
    lm = tiny_gemma(n_layers=3, hidden=64, seed=0)
    lm.model.to("cuda")
    settings = GenerationSettings(max_new_tokens=40, batch_size=4, stop_at_end_of_turn=True)
    ivs = conditions(lm)
    prompts = prompt_ids(lm, INSTRUCTIONS)
    res = generate_fast_ids(lm, prompts, ivs, 40, [1, 5], decode="cuda-graph")
    assert res.stats.decode == "cuda-graph"
    assert any("SDPA backends" in n for n in res.stats.notes)
    fast = generate_fast(lm, INSTRUCTIONS, ivs, settings)
    for iv in ivs:
        ref = generate_hf(lm, INSTRUCTIONS, iv, settings)
        assert [g.token_ids for g in fast[iv.name]] == [g.token_ids for g in ref], iv.name
    # the conditions really differ, so the per-row switches were applied
    assert [g.token_ids for g in fast["baseline"]] != [g.token_ids for g in fast["ablation"]]


def test_cuda_graph_decode_equals_eager_decode_bf16():
    lm = tiny_gemma(n_layers=3, hidden=64, seed=0)
    lm.model.to("cuda", torch.bfloat16)
    prompts = prompt_ids(lm, INSTRUCTIONS)
    kw = {"force_tokens": True}
    graph = generate_fast_ids(lm, prompts, conditions(lm), 48, [], decode="cuda-graph", **kw)
    eager = generate_fast_ids(lm, prompts, conditions(lm), 48, [], decode="eager", **kw)
    assert graph.stats.decode == "cuda-graph" and eager.stats.decode == "eager"
    assert graph.tokens == eager.tokens
    assert graph.tokens["baseline"] != graph.tokens["ablation"]


def test_own_step_in_a_cuda_graph_gives_hf_steps_tokens_fp32():
    lm = tiny_gemma(n_layers=3, hidden=64, seed=0)
    lm.model.to("cuda")
    prompts = prompt_ids(lm, INSTRUCTIONS)
    kw = {"force_tokens": True, "decode": "cuda-graph"}
    hf = generate_fast_ids(lm, prompts, conditions(lm), 40, [], **kw)
    own = generate_fast_ids(lm, prompts, conditions(lm), 40, [], step="own", **kw)
    assert own.stats.decode == "cuda-graph" and any(n.startswith("own decode step with") for n in own.stats.notes)
    assert own.tokens == hf.tokens
    assert own.tokens["baseline"] != own.tokens["ablation"]


def test_own_step_bf16_agrees_with_hf_step_on_triton_kernels():
    """bf16 on the GPU's kernels (Triton residual/act/rotary, decode attention): the same kernels' roundings as
    HF's step, so nearly every token agrees (a bf16 tie can flip one; random weights make ties common)."""
    lm = tiny_gemma(n_layers=3, hidden=64, seed=0)
    lm.model.to("cuda", torch.bfloat16)
    prompts = prompt_ids(lm, INSTRUCTIONS)
    kw = {"force_tokens": True, "decode": "cuda-graph"}
    hf = generate_fast_ids(lm, prompts, conditions(lm), 48, [], **kw)
    own = generate_fast_ids(lm, prompts, conditions(lm), 48, [], step="own", **kw)
    assert "own decode step with the decode attention kernel" in own.stats.notes, own.stats.notes
    first_equal = [a[:8] == b[:8] for c in hf.tokens for a, b in zip(hf.tokens[c], own.tokens[c])]
    assert sum(first_equal) >= 0.8 * len(first_equal), first_equal
