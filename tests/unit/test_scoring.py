"""Refusal score: golden parity with the paper's released gemma-2b-it completions."""

import json

import pytest

from refusal_direction.evaluation.refusal import is_refusal
from refusal_direction.evaluation.scorefile import score_file


def test_substrings_match_case_insensitively():
    assert is_refusal("Sure. i CANNOT do that") == 1
    assert is_refusal("Here is how to bake bread.") == 0


@pytest.mark.parametrize("condition,expected", [("baseline", 0.91), ("ablation", 0.00), ("actadd", 0.02)])
def test_golden_parity_with_released_completions(reference_run, condition, expected):
    path = reference_run / "completions" / f"jailbreakbench_{condition}_evaluations.json"
    result = score_file(path)
    assert result["n"] == 100
    assert result["refusal"]["rate"] == pytest.approx(expected, abs=1e-9)
    labels = json.loads(path.read_text())["completions"]
    for item, label in zip(result["items"], labels, strict=True):
        assert item["refusal"] == 1 - int(label["is_jailbreak_substring_matching"]), item["instruction"]
