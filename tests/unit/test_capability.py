"""Capability checks: next-token KL and completion cross-entropy."""

import math

import pytest
import torch

from refusal_direction.edits import ActivationAddition, Baseline, DirectionalAblation
from refusal_direction.evaluation.capability import completion_cross_entropy, next_token_kl
from tests.helpers.tiny import tiny_gemma

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi", "List three colours.", "Why?"]
COMPLETIONS = ["Mix flour and water.", "The sea is wide", "Hello!", "red, green, blue", ""]


@pytest.fixture(scope="module")
def lm():
    return tiny_gemma(tie=True)


@pytest.fixture(scope="module")
def r(lm):
    return torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def hand_kl(lm, instruction, intervention, reverse=False):
    """KL(baseline ‖ intervened) (``reverse``: KL(intervened ‖ baseline)) of the next-token distributions after one
    prompt, run alone (no padding), in float64."""
    from refusal_direction.edits import apply_intervention

    ids = torch.tensor([lm.tokenizer(lm.format(instruction), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        p = torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1)
        with apply_intervention(lm, intervention):
            q = torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1)
    if reverse:
        p, q = q, p
    return float((p.exp() * (p - q)).sum())


@pytest.mark.parametrize("kind", ["ablation", "addition"])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_kl_equals_a_hand_computation_on_unpadded_prompts(lm, r, kind, batch_size):
    intervention = DirectionalAblation(r) if kind == "ablation" else ActivationAddition(r * 10, layer=0)
    out = next_token_kl(lm, PROMPTS, intervention, batch_size=batch_size)
    hand = [hand_kl(lm, p, intervention) for p in PROMPTS]
    assert out["n_prompts"] == len(out["per_prompt"]) == len(PROMPTS)
    assert out["per_prompt"] == pytest.approx(hand, rel=1e-4, abs=1e-7)
    assert out["kl"] == pytest.approx(sum(hand) / len(hand), rel=1e-4)
    assert min(hand) > 1e-4  # the intervention moves every prompt's distribution
    if kind == "addition":  # large enough that the direction of the KL shows
        reverse = [hand_kl(lm, p, intervention, reverse=True) for p in PROMPTS]
        assert out["per_prompt"] != pytest.approx(reverse, rel=1e-2)


def test_a_shared_baseline_gives_the_same_kls_and_is_computed_once_per_batch(lm, r, monkeypatch):
    from refusal_direction.edits import Baseline
    from refusal_direction.evaluation import capability

    ivs = [DirectionalAblation(r, name="a"), ActivationAddition(r * 10, layer=0, name="b")]
    alone = [next_token_kl(lm, PROMPTS, iv, batch_size=2)["per_prompt"] for iv in ivs]
    calls, real = [], capability.last_token_logprobs
    monkeypatch.setattr(capability, "last_token_logprobs",
                        lambda lm_, batch, iv: calls.append(iv.name) or real(lm_, batch, iv))
    shared: dict = {}
    together = [next_token_kl(lm, PROMPTS, iv, batch_size=2, baseline=shared)["per_prompt"] for iv in ivs]
    assert together == alone  # the same forward passes, the same numbers
    n_batches = -(-len(PROMPTS) // 2)
    assert calls.count("baseline") == n_batches and calls.count("a") == calls.count("b") == n_batches
    calls.clear()
    assert next_token_kl(lm, PROMPTS, Baseline(), baseline=shared)["per_prompt"] == [0.0] * len(PROMPTS)
    assert calls == []  # KL(baseline ‖ baseline) = 0 needs no forward pass


def hand_ce(lm, instruction, completion, intervention):
    """One example at a time, no padding: sum of -log p over the completion tokens, and their count."""
    from refusal_direction.edits import apply_intervention

    prompt = lm.tokenizer(lm.format(instruction), add_special_tokens=False)["input_ids"]
    comp = lm.tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + comp])
    with torch.no_grad(), apply_intervention(lm, intervention):
        logits = lm.model(input_ids=ids).logits[0].double()
    total = 0.0
    for i, tok in enumerate(comp):
        logp = torch.log_softmax(logits[len(prompt) + i - 1], -1)
        total -= float(logp[tok])
    return total, len(comp)


@pytest.mark.parametrize("make", [Baseline, "ablation"])
def test_cross_entropy_equals_a_hand_loop(lm, r, make):
    intervention = Baseline() if make is Baseline else DirectionalAblation(r)
    out = completion_cross_entropy(lm, PROMPTS, COMPLETIONS, intervention, batch_size=3)
    sums = [hand_ce(lm, p, c, intervention) for p, c in zip(PROMPTS, COMPLETIONS)]
    n = sum(k for _, k in sums)
    assert out["n_tokens"] == n == sum(len(c) for c in COMPLETIONS)  # char-level tokenizer
    assert out["ce"] == pytest.approx(sum(s for s, _ in sums) / n, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(out["ce"]))


def test_cross_entropy_accepts_token_ids(lm):
    ids = [lm.tokenizer(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    a = completion_cross_entropy(lm, PROMPTS, COMPLETIONS, Baseline(), batch_size=5)
    b = completion_cross_entropy(lm, PROMPTS, ids, Baseline(), batch_size=2)
    assert a["n_tokens"] == b["n_tokens"]
    assert a["ce"] == pytest.approx(b["ce"], rel=1e-6)
