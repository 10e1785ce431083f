"""Greedy generation: deterministic, batch-independent, explicit stopping."""

import torch

from refusal_direction.core.decoding import GenerationSettings, generate_hf
from refusal_direction.edits import Baseline, DirectionalAblation
from tests.helpers.prompts import PROMPTS


def test_greedy_generation_is_deterministic_and_batch_independent(tiny_lm):
    s = GenerationSettings(max_new_tokens=12, batch_size=6)
    a = generate_hf(tiny_lm, PROMPTS, Baseline(), s)
    b = generate_hf(tiny_lm, PROMPTS, Baseline(), s)
    c = generate_hf(tiny_lm, PROMPTS, Baseline(), GenerationSettings(max_new_tokens=12, batch_size=1))
    assert [g.token_ids for g in a] == [g.token_ids for g in b] == [g.token_ids for g in c]
    assert all(len(g.token_ids) == 12 and not g.stopped for g in a)  # this model never ends a turn in 12 tokens


def test_ablation_changes_completions(tiny_lm):
    s = GenerationSettings(max_new_tokens=12, batch_size=6)
    r = torch.randn(tiny_lm.d_model, generator=torch.Generator().manual_seed(1))
    base = generate_hf(tiny_lm, PROMPTS, Baseline(), s)
    abl = generate_hf(tiny_lm, PROMPTS, DirectionalAblation(r * 10), s)
    assert [g.token_ids for g in base] != [g.token_ids for g in abl]


def test_stop_at_end_of_turn_is_explicit(tiny_lm):
    eot = tiny_lm.post_instruction_ids[0]
    assert tiny_lm.end_of_turn_ids() == [tiny_lm.tokenizer.eos_token_id, eot]
    # Force <end_of_turn> to be the argmax from the first step by boosting its unembedding logit.
    lm_head = tiny_lm.model.get_output_embeddings()
    handle = lm_head.register_forward_hook(lambda m, a, out: out + 100 * torch.nn.functional.one_hot(
        torch.tensor(eot), out.shape[-1]).to(out.dtype))
    try:
        stop = generate_hf(tiny_lm, PROMPTS[:2], Baseline(), GenerationSettings(8, 2, stop_at_end_of_turn=True))
        run_on = generate_hf(tiny_lm, PROMPTS[:2], Baseline(), GenerationSettings(8, 2, stop_at_end_of_turn=False))
    finally:
        handle.remove()
    assert all(g.stopped and g.token_ids == [eot] for g in stop)
    assert all(not g.stopped and len(g.token_ids) == 8 for g in run_on)
