"""Damage on harmless prompts: first-token KL (heretic's definition), multi-token KL and CE on BASE's answers."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from refusal_direction.core.model import wrap_model
from refusal_direction.edits import Baseline, DirectionalAblation, apply_intervention
from refusal_direction.errors import UserError
from refusal_direction.evaluation.damage import (
    HERETIC_SYSTEM_PROMPT,
    answer_scores,
    damage,
    first_token_kl,
    first_token_logprobs,
    per_prompt_kl,
    with_system_prompt,
)
from refusal_direction.generation import GenerationSettings, generate
from tests.helpers.tiny import tiny_family_lm

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi", "List three colours.", "Why?"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def lm():
    return tiny_family_lm("gemma-untied")


@pytest.fixture(scope="module")
def ablation(lm):
    return DirectionalAblation(torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3)))


def greedy_answers(lm, n_tokens=6):
    gens = generate(lm, PROMPTS, Baseline(), GenerationSettings(max_new_tokens=n_tokens, batch_size=8, backend="hf"))
    return [g.token_ids for g in gens]


@pytest.fixture(scope="module")
def answers(lm):
    return greedy_answers(lm)


def alone_logprobs(lm, ids, edit=None):
    """log p(next token) after ``ids``, one unpadded row, float64: [vocab]."""
    with torch.no_grad(), apply_intervention(lm, edit or Baseline()):
        return torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)


def test_kl_of_a_model_with_itself_is_exactly_zero(lm, answers):
    twin = wrap_model(copy.deepcopy(lm.model), lm.tokenizer, model_id="tiny-twin")  # a separately loaded copy
    for other in (lm, twin):
        out = damage(lm, other, PROMPTS, answers, batch_size=2)
        assert out.first_token_kl.value == 0.0 and out.multi_token_kl.value == 0.0
        assert set(out.first_token_kl.per_prompt) == {0.0} and set(out.multi_token_kl.per_prompt) == {0.0}
        assert out.ce == out.base_ce and out.ce_increase.value == 0.0
        assert out.n_prompts == out.n_answers == len(PROMPTS) and out.n_tokens == sum(map(len, answers))


def test_first_token_kl_is_torch_kl_div_batchmean_and_matches_unpadded_prompts(lm, ablation):
    base = first_token_logprobs(lm, PROMPTS, batch_size=2)
    edited = first_token_logprobs(lm, PROMPTS, ablation, batch_size=3)
    assert base.shape == (len(PROMPTS), len(lm.tokenizer)) and base.dtype == torch.float32
    direct = F.kl_div(edited.double(), base.double(), reduction="batchmean", log_target=True).item()
    assert first_token_kl(base, edited) == direct > 1e-4
    per = per_prompt_kl(base, edited)
    assert sum(per) / len(per) == pytest.approx(direct, rel=1e-12)
    hand = []
    for p in PROMPTS:
        b, m = alone_logprobs(lm, lm.encode(p)), alone_logprobs(lm, lm.encode(p), ablation)
        hand.append(float((b.exp() * (b - m)).sum()))
    assert per == pytest.approx(hand, rel=1e-4, abs=1e-6)
    assert first_token_kl(base, base) == 0.0
    with pytest.raises(UserError, match="different shapes"):
        first_token_kl(base, edited[:, :-1])


def test_teacher_forcing_equals_step_by_step_scoring(lm, ablation, answers):
    scores = answer_scores(lm, lm, PROMPTS, answers, ablation, batch_size=3)
    for prompt, answer, s in zip(PROMPTS, answers, scores):
        ids = lm.encode(prompt)
        assert s.n_tokens == len(answer) > 0
        for t, token in enumerate(answer):
            b, m = alone_logprobs(lm, ids + answer[:t]), alone_logprobs(lm, ids + answer[:t], ablation)
            assert s.kl[t] == pytest.approx(float((b.exp() * (b - m)).sum()), rel=1e-4, abs=1e-6)
            assert s.nll[t] == pytest.approx(-float(m[token]), rel=1e-5, abs=1e-5)
            assert s.base_nll[t] == pytest.approx(-float(b[token]), rel=1e-5, abs=1e-5)


def test_the_first_answer_position_is_the_first_token_kl_but_the_mean_is_not(lm, ablation, answers):
    """Position 0 of an answer is predicted from the prompt alone: the first-token distribution. The multi-token
    mean weighs every answer token, so it differs; an empty answer has no position 0 and no per-token mean."""
    padded = answers[:2] + [[]] + answers[3:]
    out = damage(lm, lm, PROMPTS, padded, ablation, batch_size=2)
    scores = answer_scores(lm, lm, PROMPTS, padded, ablation, batch_size=4)
    first = [s.kl[0] if s.n_tokens else None for s in scores]
    assert first[2] is None and out.multi_token_kl.per_prompt[2] is None
    kept = [i for i in range(len(PROMPTS)) if first[i] is not None]
    assert [first[i] for i in kept] == pytest.approx([out.first_token_kl.per_prompt[i] for i in kept],
                                                     rel=1e-4, abs=1e-6)
    assert out.multi_token_kl.value != pytest.approx(out.first_token_kl.value, rel=1e-2)
    assert out.n_tokens == sum(map(len, padded)) and out.n_answers == len(PROMPTS)


@pytest.mark.parametrize("family, tol", [("gemma-tied", 1e-5), ("gemma-untied", 1e-5), ("llama-biases", 1e-6)])
def test_an_edit_as_hooks_equals_the_exported_weight_edit(family, tol):
    """float32 throughout; the tiny Llama's KL is ~1e-4 (its random weights are small), so it gets a tighter bound."""
    lm = tiny_family_lm(family)
    edit = DirectionalAblation(torch.randn(lm.d_model, generator=torch.Generator().manual_seed(5)))
    exported = copy.deepcopy(lm.model)
    edit.weights_(exported)
    other = wrap_model(exported, lm.tokenizer, model_id=f"{family}-edited")
    answers = greedy_answers(lm, 5)
    hooks = damage(lm, lm, PROMPTS, answers, edit, batch_size=2)
    weights = damage(lm, other, PROMPTS, answers, batch_size=3)
    assert hooks.model == f"{lm.model_id} + ablation" and weights.model == f"{family}-edited"
    assert hooks.first_token_kl.value > 50 * tol and hooks.multi_token_kl.value > 50 * tol
    for name in ("first_token_kl", "multi_token_kl", "ce", "base_ce", "ce_increase"):
        a, b = getattr(hooks, name), getattr(weights, name)
        assert a.per_prompt == pytest.approx(b.per_prompt, abs=tol), name
        assert a.value == pytest.approx(b.value, abs=tol), name


def test_different_token_ids_for_the_same_prompts_raise_naming_both_models(lm, answers):
    chatml = wrap_model(lm.model, lm.tokenizer, model_id="tiny-chatml", chat_template=CHATML)
    with pytest.raises(UserError, match="tiny-gemma and tiny-chatml tokenize chat prompt 0"):
        damage(lm, chatml, PROMPTS, answers)
    with pytest.raises(UserError, match="tiny-chatml"):
        answer_scores(lm, chatml, PROMPTS, answers)


def test_with_system_prompt_renders_heretic_messages_and_refuses_a_template_without_a_system_role(lm):
    chatml = wrap_model(lm.model, lm.tokenizer, model_id="tiny-chatml", chat_template=CHATML)
    heretic = with_system_prompt(chatml, chat_template=CHATML)
    expected = lm.tokenizer.apply_chat_template(
        [{"role": "system", "content": HERETIC_SYSTEM_PROMPT}, {"role": "user", "content": PROMPTS[0]}],
        chat_template=CHATML, add_generation_prompt=True, tokenize=False)
    assert heretic.format(PROMPTS[0]) == expected and heretic.model is chatml.model
    assert chatml.format(PROMPTS[0]) != expected and HERETIC_SYSTEM_PROMPT in heretic.chat.source
    with pytest.raises(UserError, match="cannot take the system prompt"):
        with_system_prompt(lm)  # the Gemma template raises on a system role, as heretic would meet it


def test_the_result_is_json(lm, ablation, answers):
    out = damage(lm, lm, PROMPTS, answers, ablation, batch_size=5)
    data = json.loads(json.dumps(out.to_json()))
    assert data["first_token_kl"]["value"] == out.first_token_kl.value
    lo, hi = data["multi_token_kl"]["ci95"]
    assert lo <= out.multi_token_kl.value <= hi and data["n_tokens"] == out.n_tokens
    assert data["ce_increase"]["value"] == pytest.approx(out.ce.value - out.base_ce.value, abs=1e-9)
