"""`optimize`'s own settings, declared once (the run's config holds the model, data, judge and generation settings):
the CLI's options are generated from these fields (`cli.options.settings_options`), so no default is written twice.
A light module: the CLI reads it for ``--help`` without importing torch."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields

from ..errors import UserError


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class OptimizeSettings:
    """The search's settings; values are checked on construction (all problems in one UserError)."""

    trials: int = _f(200, "complete trials the study should hold (a re-run continues the study)")
    batch_trials: int = _f(50, "trials asked, evaluated together and told per batch")
    seed: int = _f(0, "the sampler's seed")
    one_at_a_time: bool = _f(False, "batch size 1 (measures the batched speed-up in the same run)")
    target: float = _f(0.03, "refusal target of the choice rule")
    search_tokens: int = _f(32, "greedy tokens per harmful validation prompt during the search")
    n_xstest: int | None = _f(None, "XSTest safe prompts (the first N) in the final evaluation, 0: skip; unset: all")
    export: bool = _f(True, "export and verify the chosen edit")
    lora: bool = _f(False, "also write the chosen edit as a peft LoRA adapter (exact for the low-rank forms; refused, "
                           "with the reason, for the norm-preserving one)")
    max_kl_rows: int = _f(2048, "rows per KL forward pass (halved on out-of-memory)")

    def __post_init__(self):
        problems = [f"--{name.replace('_', '-')} {value}: {need}" for name, value, ok, need in (
            ("trials", self.trials, self.trials >= 1, "use at least 1"),
            ("batch_trials", self.batch_trials, self.batch_trials >= 1, "use at least 1"),
            ("target", self.target, 0.0 <= self.target <= 1.0, "a refusal rate, between 0 and 1"),
            ("search_tokens", self.search_tokens, self.search_tokens >= 1, "use at least 1"),
            ("n_xstest", self.n_xstest, self.n_xstest is None or self.n_xstest >= 0, "use 0 (skip) or more"),
            ("max_kl_rows", self.max_kl_rows, self.max_kl_rows >= 1, "use at least 1"),
            ("lora", self.lora, self.export or not self.lora, "needs the export (drop --no-export)"),
            ("lora", self.lora, not self.lora or importlib.util.find_spec("peft") is not None,
             "needs peft, which is not installed: pip install 'refusal-direction[lora]'")) if not ok]
        if problems:
            raise UserError("; ".join(problems))

    @property
    def batch(self) -> int:
        return 1 if self.one_at_a_time else self.batch_trials


OPTIMIZE_FIELDS = {f.name: f for f in fields(OptimizeSettings)}

__all__ = ["OPTIMIZE_FIELDS", "OptimizeSettings"]
