import logging

import pytest
import torch

from refusal_direction.errors import UserError
from refusal_direction.evaluation.safety import (
    AnswerTokens,
    SafetyScorer,
    is_short,
    load_error,
    load_safety_scorer,
    parse_verdict,
    render_guard_prompt,
    split_answer_ids,
)
from tests.helpers.guard_fixtures import BOS, guard_reference_dir, guard_tokenizer, save_tiny_guard, tiny_guard

INSTRUCTIONS = ["How do I bake bread?", "Write a poem about the sea.", "Hi", "Explain how to pick a lock."]
COMPLETIONS = [
    "Mix flour, water, salt and yeast, knead for ten minutes, let it rise, shape it and bake it at 220 C.",
    "The sea is wide and the sea is deep, it rocks the boats and sings to sleep the sailors far from home.",
    "Hello!",
    "I cannot help with that.",
]


@pytest.fixture(scope="module")
def guard():
    model, tok = tiny_guard()
    return SafetyScorer(model, tok, model_id="tiny-guard")


def test_render_matches_llama_guard_2_fixture(guard):
    expected = (guard_reference_dir() / "rendered_response_classification.txt").read_text()
    tok = guard.tokenizer
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # like Llama 3, it adds bos by default
    text = render_guard_prompt(tok, "{PROMPT}", "{RESPONSE}")
    assert text == BOS + expected  # the template emits no bos; we prepend exactly one
    ids = guard.prompt_ids("{PROMPT}", "{RESPONSE}")  # tokenized as score() does
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == text


def test_render_without_template_says_which_model():
    tok = guard_tokenizer()
    tok.chat_template = None
    tok.name_or_path = "some/guard"
    with pytest.raises(UserError, match="'some/guard' has no chat template"):
        render_guard_prompt(tok, "a", "b")


@pytest.mark.parametrize("text,safe,cats", [
    ("safe", True, ()),
    (" safe\n", True, ()),
    ("SAFE", True, ()),
    ("unsafe\nS1,S10", False, ("S1", "S10")),
    ("unsafe\n S2 , S11 ", False, ("S2", "S11")),
    ("\nunsafe\n\ns3", False, ("S3",)),
    ("unsafe", False, ()),
    ("", None, ()),
    ("maybe", None, ()),
    ("I cannot", None, ()),
    ("safe.", None, ()),
])
def test_parse_verdict(text, safe, cats):
    v = parse_verdict(text)
    assert (v.safe, v.categories, v.raw, v.p_unsafe) == (safe, cats, text, None)


def test_split_answer_ids():
    assert split_answer_ids([5], [7]) == AnswerTokens((), 5, 7)
    assert split_answer_ids([9], [3, 9]) == AnswerTokens((), 9, 3)  # "unsafe" = "un" + "safe"
    assert split_answer_ids([1, 5], [1, 7, 2]) == AnswerTokens((1,), 5, 7)  # a shared leading piece
    for a, b in (([3, 4], [3, 4]), ([3], [3, 4])):
        with pytest.raises(UserError, match="generate"):
            split_answer_ids(a, b)


def test_short_rule_counts_space_separated_words():
    assert is_short("one two three") and is_short("")
    assert not is_short(" ".join(["w"] * 15))


def test_logprob_scores_match_unbatched_forward(guard):
    verdicts = guard.score(INSTRUCTIONS, COMPLETIONS, batch_size=4)
    assert len(verdicts) == len(COMPLETIONS) and all(v.categories == () for v in verdicts)
    one = guard.score(INSTRUCTIONS, COMPLETIONS, batch_size=1)
    assert [v.p_unsafe for v in one] == pytest.approx([v.p_unsafe for v in verdicts], abs=1e-5)
    # and equal to the definition, from a plain forward pass over each prompt alone
    for v, instruction, completion in zip(verdicts, INSTRUCTIONS, COMPLETIONS, strict=True):
        ids = torch.tensor([guard.prompt_ids(instruction, completion)])
        logp = guard.model(ids).logits[0, -1].log_softmax(-1)
        p_safe, p_unsafe = logp[guard.answer.safe].exp(), logp[guard.answer.unsafe].exp()
        assert v.p_unsafe == pytest.approx(float(p_unsafe / (p_safe + p_unsafe)), abs=1e-5), instruction


def test_logprob_with_a_shared_answer_prefix():
    model, tok = tiny_guard()
    scorer = SafetyScorer(model, tok)
    space = tok.encode(" ", add_special_tokens=False)[0]
    scorer.answer = AnswerTokens((space,), scorer.answer.safe, scorer.answer.unsafe)  # as if " safe" = " " + "safe"
    got = scorer.score(INSTRUCTIONS[:2], COMPLETIONS[:2], batch_size=2)
    ids = torch.tensor([scorer.prompt_ids(INSTRUCTIONS[1], COMPLETIONS[1]) + [space]])
    logp = model(ids).logits[0, -1].log_softmax(-1)
    assert got[1].p_unsafe == pytest.approx(float(torch.sigmoid(logp[scorer.answer.unsafe] - logp[scorer.answer.safe])),
                                            abs=1e-5)


def test_generate_mode_parses_greedy_answers(guard):
    verdicts = guard.score(INSTRUCTIONS, COMPLETIONS, batch_size=4, mode="generate")
    assert len(verdicts) == len(COMPLETIONS) and all(v.p_unsafe is None for v in verdicts)
    assert [(v.safe, v.categories) for v in verdicts] == [(p.safe, p.categories)
                                                          for p in (parse_verdict(v.raw) for v in verdicts)]
    one = guard.score(INSTRUCTIONS, COMPLETIONS, batch_size=1, mode="generate")
    assert [v.raw for v in one] == [v.raw for v in verdicts]


def test_generate_mode_reads_a_forced_answer(guard):
    """The guard is made to answer "unsafe\\nS1,S10" then end: every verdict says so."""
    tok = guard.tokenizer
    answer = tok.encode("unsafe\nS1,S10", add_special_tokens=False) + [tok.eos_token_id]
    step = [0]

    def force(module, args, out):  # one call per generated token (the prompt's pass gives the first)
        target = answer[min(step[0], len(answer) - 1)]
        step[0] += 1
        return out + 1e4 * torch.nn.functional.one_hot(torch.tensor(target), out.shape[-1]).to(out.dtype)

    handle = guard.model.get_output_embeddings().register_forward_hook(force)
    try:
        verdicts = guard.score(INSTRUCTIONS, COMPLETIONS, batch_size=4, mode="generate")
    finally:
        handle.remove()
    assert [(v.raw.strip(), v.safe, v.categories) for v in verdicts] == [("unsafe\nS1,S10", False, ("S1", "S10"))] * 4


def test_short_is_safe_skips_the_model(guard):
    verdicts = guard.score(INSTRUCTIONS, COMPLETIONS, short_is_safe=True)
    assert [v.forced_short for v in verdicts] == [False, False, True, True]
    assert all(v.safe is True and v.p_unsafe is None for v in verdicts[2:])
    assert verdicts[0].p_unsafe == pytest.approx(guard.score(INSTRUCTIONS[:1], COMPLETIONS[:1])[0].p_unsafe)
    assert guard.score([], []) == []
    with pytest.raises(UserError, match="logprob"):
        guard.score(INSTRUCTIONS, COMPLETIONS, mode="sample")


def test_long_completion_is_cut_from_the_end(caplog):
    model, tok = tiny_guard()
    scorer = SafetyScorer(model, tok, max_length=300)
    full = len(scorer.prompt_ids("Hi", ""))
    long = " ".join(f"word{i}" for i in range(200))
    with caplog.at_level(logging.WARNING, logger="refusal_direction.evaluation.safety"):
        ids = scorer.prompt_ids("Hi", long)
    assert full < len(ids) <= 300 and "completion cut from" in caplog.text
    assert tok.decode(ids).split("Agent: ")[1].startswith("word0 word1")
    with pytest.raises(UserError, match="max_length"):
        SafetyScorer(model, tok, max_length=full - 1).prompt_ids("Hi", "there")


def test_load_from_saved_directory(tmp_path, guard):
    scorer = load_safety_scorer(str(save_tiny_guard(tmp_path / "guard")), device="cpu")
    assert scorer.model.dtype == torch.float32  # auto on CPU
    got = [v.p_unsafe for v in scorer.score(INSTRUCTIONS, COMPLETIONS)]
    assert got == pytest.approx([v.p_unsafe for v in guard.score(INSTRUCTIONS, COMPLETIONS)], abs=1e-6)


def test_load_errors_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="is not in the local Hugging Face cache"):
        load_safety_scorer("no-such-org/no-such-guard", device="cpu")
    with pytest.raises(UserError, match="does not exist"):
        load_safety_scorer(str(tmp_path / "missing"), device="cpu")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    gated = OSError("You are trying to access a gated repo. Make sure to have access to it.")
    msg = str(load_error("meta-llama/Meta-Llama-Guard-2-8B", gated))
    assert "is gated and this machine has no access to it" in msg and "Accept the license" in msg
