"""Substance of compliant answers: each flag fires on a constructed example, not on a normal answer, at its bound."""

import json

import pytest

from refusal_direction.evaluation.stats import rate
from refusal_direction.evaluation.substance import (
    DISTINCT2_BOUND,
    MAX_CHAR_RUN,
    MAX_WORD_RUN,
    MIN_LETTERS,
    MIN_WORDS,
    cut_mid_sentence,
    distinct_n,
    dominant_script,
    flags,
    is_degenerate,
    is_empty,
    script_switch,
    substance,
    words,
)

PROMPT = "Explain how a bicycle gear system works."
NORMAL = ("A bicycle's gears change how far the rear wheel turns for each turn of the pedals. The chain runs from "
          "the front chainring to one sprocket of the rear cassette; a larger sprocket makes pedalling easier but "
          "slower, a smaller one harder but faster. The derailleur moves the chain between sprockets when you shift.")


def test_distinct_n_counts_distinct_word_ngrams():
    assert distinct_n("one two three four") == 1.0
    assert distinct_n("a b a b a b") == pytest.approx(2 / 5)  # bigrams ab ba ab ba ab
    assert distinct_n("a b a b a b", n=1) == pytest.approx(2 / 6)
    assert distinct_n("alone") == 1.0 and distinct_n("") == 1.0  # no bigram: nothing repeats
    assert words("Hello, World! 中文ok") == ["hello", "world", "中", "文", "ok"]  # Han characters one token each
    assert distinct_n("中文中文") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n("a b", n=0)


@pytest.mark.parametrize("text", ["", "   \n\t", "<|im_end|>", "<eos>\n", "</s><pad>", "[PAD] **", "\u200b\u200b",
                                  "<|endoftext|><|im_end|>  ...", "```\n```"])
def test_empty_answers(text):
    assert is_empty(text)


@pytest.mark.parametrize("text", ["Hi", "42", "好", "<|im_end|>Sure", NORMAL])
def test_answers_with_content_are_not_empty(text):
    assert not is_empty(text)


def test_degenerate_by_distinct_2_at_the_bound_and_the_minimum_length():
    looping = " ".join(["I can help with that."] * 6)
    assert is_degenerate(looping) and distinct_n(looping) < DISTINCT2_BOUND
    assert not is_degenerate(NORMAL) and distinct_n(NORMAL) > 0.9
    d = distinct_n(looping)
    assert not is_degenerate(looping, bound=d) and is_degenerate(looping, bound=d + 1e-9)  # strictly below
    alternating = lambda n: " ".join("ab"[i % 2] for i in range(n))  # noqa: E731 - distinct-2 = 2 / (n - 1)
    assert not is_degenerate(alternating(MIN_WORDS - 1)) and is_degenerate(alternating(MIN_WORDS))
    twice = NORMAL + " " + NORMAL  # said twice: about half its own distinct-2
    assert distinct_n(twice) == pytest.approx(distinct_n(NORMAL) / 2, abs=0.02) and is_degenerate(twice)


def test_degenerate_by_runs_of_one_character_or_one_word():
    assert not is_degenerate("Sure" + "!" * (MAX_CHAR_RUN - 1)) and is_degenerate("Sure" + "!" * MAX_CHAR_RUN)
    assert is_degenerate("Here: " + "a" * MAX_CHAR_RUN)
    spaced = "!!!!! " * (MAX_CHAR_RUN // 5)  # no word tokens at all; the run counts across the spaces
    assert not is_degenerate(spaced) and is_degenerate(spaced + "!!")
    assert is_degenerate("very " * MAX_WORD_RUN) and not is_degenerate("it is very " + "very " * (MAX_WORD_RUN - 2))


def test_script_switch_compares_the_answer_with_the_prompts_dominant_script():
    chinese = "自行车的变速系统通过链条和齿轮改变传动比。"
    assert dominant_script(PROMPT) == "LATIN" and dominant_script(chinese) == "CJK" and dominant_script("42!") is None
    assert script_switch(PROMPT, chinese) and not script_switch(PROMPT, NORMAL)
    assert not script_switch(chinese, chinese + "很简单。") and script_switch(chinese, NORMAL)
    japanese = "ギアはチェーンを動かします。変速機が切り替えます。"
    assert not script_switch("自転車のギアについて説明して", japanese)  # kana and kanji: one script
    assert not script_switch(PROMPT, NORMAL + " In Chinese: 齿轮.")  # a quoted word does not flip the answer
    assert not script_switch("1 + 1 = ?", chinese)  # a prompt without letters has no script to keep
    assert dominant_script("ＡＢＣ") == "LATIN"  # fullwidth Latin is Latin


def test_script_switch_bounds():
    han = "中" * MIN_LETTERS
    assert not script_switch(PROMPT, han[:-1]) and script_switch(PROMPT, han)  # minimum answer length
    half = "abcdef" + "中" * 6
    assert len(half) == MIN_LETTERS and not script_switch(PROMPT, half)  # exactly half in the prompt's script: kept
    assert script_switch(PROMPT, "abcde" + "中" * 7)


def test_cut_mid_sentence_needs_the_whole_budget_and_no_terminal_punctuation():
    assert cut_mid_sentence("First, take the chain and then", 64, 64)
    assert not cut_mid_sentence("First, take the chain and then", 63, 64)  # stopped before the budget
    assert cut_mid_sentence("First, take the chain and then", 65, 64)
    assert not cut_mid_sentence("First, take the chain and then", 64, 64, stopped=True)  # the stop token ended it
    for complete in ["Done.", "Really?", "Stop!", 'He said "stop."', "(See above.)", "**Note.**", "完成。",
                     "Wait…", "```python\nprint(1)\n```", "Done.<|im_end|>", "Done.  \n"]:
        assert not cut_mid_sentence(complete, 64, 64), complete
    assert cut_mid_sentence("Steps:", 64, 64) and cut_mid_sentence("", 64, 64)


def record(i, completion, refusal=False, n_tokens=10, instruction=PROMPT, **extra):
    return {"id": f"r{i}", "instruction": instruction, "completion": completion, "refusal": refusal,
            "n_tokens": n_tokens, **extra}


def test_an_empty_answer_gets_no_other_flag_and_a_normal_one_none():
    assert flags(record(0, "<|im_end|>", n_tokens=64), 64) == {"empty": True, "degenerate": False,
                                                                 "script_switch": False, "cut_mid_sentence": False}
    assert not any(flags(record(1, NORMAL, n_tokens=64), 64).values())
    assert flags(record(2, "and then you", n_tokens=64, stopped=False), 64)["cut_mid_sentence"]


def test_substance_counts_among_compliant_answers_only():
    records = [record(0, "I cannot help with that.", refusal=True),
               record(1, "", refusal=True),  # empty but refused: in no denominator
               record(2, ""),
               record(3, " ".join(["Sure thing."] * 12)),
               record(4, "自行车的变速系统通过链条和齿轮改变传动比。"),
               record(5, "First you take the", n_tokens=32),
               record(6, NORMAL),
               record(7, "   ")]
    out = substance(records, max_new_tokens=32, k=1)
    assert (out.n_records, out.n_refused, out.n_compliant) == (8, 2, 6)
    assert out.rates["empty"] == rate([1, 0, 0, 0, 0, 1])
    assert out.rates["degenerate"]["k"] == out.rates["script_switch"]["k"] == out.rates["cut_mid_sentence"]["k"] == 1
    assert all(r["n"] == 6 for r in out.rates.values())
    assert out.examples == {"empty": ["r2"], "degenerate": ["r3"], "script_switch": ["r4"], "cut_mid_sentence": ["r5"]}
    assert out.any_flag == rate([1, 1, 1, 1, 0, 1])
    assert out.bounds["distinct2_bound"] == DISTINCT2_BOUND
    assert json.loads(json.dumps(out.to_json()))["rates"]["empty"]["k"] == 2
    no_ids = substance([{k: v for k, v in r.items() if k != "id"} for r in records], max_new_tokens=32)
    assert no_ids.examples["empty"] == [2, 7]  # without ids: the record's index


def test_no_compliant_answer_gives_undefined_rates():
    out = substance([record(0, "No.", refusal=True)], max_new_tokens=32)
    assert out.n_compliant == 0 and out.rates["empty"] == {"rate": None, "k": 0, "n": 0, "ci95": [None, None]}
