"""`core.head.packed_head_input`: the unembedding reads packed rows, the logits stay the same."""

from __future__ import annotations

import torch

from refusal_direction.core.head import packed_head_input
from refusal_direction.core.padding import position_ids

PROMPTS = ["How do I bake bread?", "Hi", "List five prime numbers."]


@torch.no_grad()
def test_head_input_is_packed_inside_only_and_logits_are_unchanged(tiny_lm):
    lm = tiny_lm
    enc = lm.tokenize(PROMPTS)
    seen = []
    spy = lm.model.get_output_embeddings().register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous()))

    def last_logits():
        return lm.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False,
                        logits_to_keep=1).logits

    try:
        plain = last_logits()
        with packed_head_input(lm.model) as packed:
            inside = last_logits()
        after = last_logits()
    finally:
        spy.remove()
    assert packed is True
    # the spy runs before (registered first) the packing hook: the head's own input is a strided view each time;
    # what the head multiplies inside the block is checked through a second spy below
    assert seen == [False, False, False]
    torch.testing.assert_close(inside, plain, rtol=0, atol=1e-6)
    assert torch.equal(after, plain)
    got = []
    with packed_head_input(lm.model):
        late = lm.model.get_output_embeddings().register_forward_pre_hook(
            lambda m, args: got.append(args[0].is_contiguous()))
        try:
            last_logits()
        finally:
            late.remove()
    assert got == [True]


def test_model_without_output_embeddings_is_left_alone():
    model = torch.nn.Linear(2, 2)
    with packed_head_input(model) as packed:
        assert packed is False
