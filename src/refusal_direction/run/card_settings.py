"""The report card's settings, declared once: the CLI's options are generated from these fields
(`cli.options.config_options(fields=CARD_FIELDS)`), so no default is written twice. The model-loading and generation
defaults are the run config's own (`config.FIELDS`). A light module: ``--help`` reads it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..config import FIELDS
from ..errors import UserError


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


def _run(name: str):  # a run-config field's default and help
    return field(default=FIELDS[name].default, metadata={"help": FIELDS[name].metadata["help"]})


@dataclass(frozen=True)
class CardSettings:
    """Prompts, budgets and measures of a card; every row is scored with the same ones (docs/CARD.md)."""

    data_dir: str | None = _run("data_dir")
    device: str = _run("device")
    dtype: str = _run("dtype")
    batch_size: int = _run("batch_size")
    generation_backend: str = _run("generation_backend")
    decode_step: str = _run("decode_step")
    stop_at_end_of_turn: bool = _run("stop_at_end_of_turn")
    eval: str = _f("jailbreakbench", "harmful prompts whose refusal is scored: a named set or a file")
    n_eval: int | None = _f(100, "harmful prompts (the first N of --eval); unset: all")
    max_new_tokens: int = _f(512, "greedy tokens per answer (harmful, XSTest and HumanEval prompts)")
    n_xstest: int | None = _f(None, "XSTest prompts per set (the first N of its 250 safe and 200 unsafe); 0: skip; "
                                    "unset: all")
    n_harmless: int = _f(100, "harmless prompts of the KL and CE measures (the first N of harmless_val)")
    harmless_tokens: int = _f(128, "BASE's greedy answer tokens to each harmless prompt (multi-token KL, CE)")
    heretic_system_prompt: bool = _f(True, "first-token KL prompts carry heretic's system turn 'You are a helpful "
                                           "assistant.' (as heretic measures it); off: the model's own template")
    humaneval: bool | None = _f(None, "HumanEval pass@1 (greedy); unset: on for code models (BASE's name says "
                                      "'code' or 'coder')")
    n_humaneval: int | None = _f(None, "HumanEval problems (the first N of 164); unset: all")
    humaneval_timeout: float = _f(10.0, "seconds each generated program may run in the sandbox")

    def __post_init__(self):
        problems = [f"--{name.replace('_', '-')} {value}: {need}" for name, value, ok, need in (
            ("n_eval", self.n_eval, self.n_eval is None or self.n_eval >= 1, "use at least 1"),
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "use at least 1"),
            ("n_xstest", self.n_xstest, self.n_xstest is None or self.n_xstest >= 0, "use 0 (skip) or more"),
            ("n_harmless", self.n_harmless, self.n_harmless >= 1, "use at least 1"),
            ("harmless_tokens", self.harmless_tokens, self.harmless_tokens >= 1, "use at least 1"),
            ("n_humaneval", self.n_humaneval, self.n_humaneval is None or self.n_humaneval >= 1, "use at least 1"),
            ("humaneval_timeout", self.humaneval_timeout, 0 < self.humaneval_timeout <= 600, "seconds, 0 to 600"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "use at least 1")) if not ok]
        if problems:
            raise UserError("; ".join(problems))

    def humaneval_on(self, base: str) -> bool:
        """Whether the card runs HumanEval: as set, else for a code model."""
        if self.humaneval is not None:
            return self.humaneval
        name = base.lower().rsplit("/", 1)[-1]
        return "code" in name


CARD_FIELDS = {f.name: f for f in fields(CardSettings)}

__all__ = ["CARD_FIELDS", "CardSettings"]
