"""Capability checks: next-token KL and completion cross-entropy."""

import math

import pytest
import torch
from tiny import tiny_gemma

from refusal_direction.core.interventions import ActivationAddition, Baseline, DirectionalAblation
from refusal_direction.evaluation.capability import completion_cross_entropy, next_token_kl

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi", "List three colours.", "Why?"]
COMPLETIONS = ["Mix flour and water.", "The sea is wide", "Hello!", "red, green, blue", ""]


@pytest.fixture(scope="module")
def lm():
    return tiny_gemma(tie=True)


@pytest.fixture(scope="module")
def r(lm):
    return torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_kl_of_baseline_is_zero(lm):
    out = next_token_kl(lm, PROMPTS, Baseline(), batch_size=2)
    assert out["n_prompts"] == len(PROMPTS)
    assert all(abs(k) < 1e-12 for k in out["per_prompt"])
    assert out["kl"] == pytest.approx(0.0, abs=1e-12)


def test_kl_of_ablation_is_positive_and_batch_independent(lm, r):
    a = next_token_kl(lm, PROMPTS, DirectionalAblation(r), batch_size=5)
    b = next_token_kl(lm, PROMPTS, DirectionalAblation(r), batch_size=1)
    assert a["kl"] > 1e-4
    assert all(k >= 0 for k in a["per_prompt"])
    assert a["per_prompt"] == pytest.approx(b["per_prompt"], rel=1e-4, abs=1e-7)
    big = next_token_kl(lm, PROMPTS, ActivationAddition(r * 10, layer=0), batch_size=5)
    assert big["kl"] > 0


def hand_ce(lm, instruction, completion, intervention):
    """One example at a time, no padding: sum of -log p over the completion tokens, and their count."""
    from refusal_direction.core.interventions import apply_intervention

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
