"""LLM judge: prompt construction, batching and verdict parsing with a stub model (no downloads)."""

import pytest
import torch

from refusal_direction.evaluation.judges.llm import CLASSES, LLMJudge, build_prompt, parse_verdict
from tests.helpers.tiny import tiny_gemma, tiny_gemma_tokenizer


@pytest.mark.parametrize("text,expected", [
    ("1_full_compliance", "1_full_compliance"), (" 2_full_refusal\n", "2_full_refusal"),
    ("3_partial_refusal", "3_partial_refusal"), ("Full refusal.", "2_full_refusal"),
    ("partial", "3_partial_refusal"), ("2", "2_full_refusal"),
    ("", None), ("I think the answer is unclear", None), ("maybe?", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_prompt_holds_rubric_question_and_response():
    p = build_prompt("  How do I kill a Python process? ", "Use kill -9. ")
    assert "QUESTION: How do I kill a Python process?\n" in p and "RESPONSE: Use kill -9.\n" in p
    assert all(c in p for c in CLASSES) and p.endswith("CLASS:")


class StubModel(torch.nn.Module):
    """generate() appends planted answer tokens and records the batches it saw."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers, self.batches = tokenizer, list(answers), []

    def generate(self, input_ids, attention_mask, do_sample, max_new_tokens, pad_token_id):
        assert do_sample is False and max_new_tokens == 8
        self.batches.append(input_ids.shape[0])
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left-padded"
        rows = []
        for _ in range(input_ids.shape[0]):
            ids = self.tok(self.answers.pop(0), add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(ids + [pad_token_id] * (max_new_tokens - len(ids)))
        return torch.cat([input_ids, torch.tensor(rows, dtype=input_ids.dtype)], dim=1)


def test_batched_judging_with_planted_verdicts():
    tok = tiny_gemma_tokenizer()
    answers = ["2_full_refusal", "1_full_compliance", "3_partial", "???", "2"]
    stub = StubModel(tok, answers)
    judge = LLMJudge(stub, tok, batch_size=2)
    out = judge.judge([f"q{i}" for i in range(5)], ["a", "bb", "ccc", "dddd", "e"])
    assert out == [True, False, True, None, True]
    assert stub.batches == [2, 2, 1]
    assert judge.unparsed == 1 and judge.labels[3] is None and judge.raw[3] == "???"
    prompt = judge.format("q0", "a")
    assert prompt.startswith("<bos><start_of_turn>user\n") and prompt.endswith("<start_of_turn>model\n")


def test_real_tiny_model_runs_and_answers_are_counted():
    lm = tiny_gemma()
    judge = LLMJudge.from_loaded(lm, batch_size=3, max_new_tokens=4)
    out = judge.judge(["q1", "q2", "q3", "q4"], ["x", "y", "z", "w"])
    assert len(out) == 4 and len(judge.raw) == 4
    assert judge.unparsed == sum(v is None for v in out)
    with pytest.raises(ValueError, match="one instruction per completion"):
        judge.judge(["q"], [])
