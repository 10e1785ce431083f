"""The report card (card.json) as one typed, versioned value: `run.card` writes it, `report.card` renders it.

One row per model — BASE first — every row measured on the same prompts, chat template, dtype, judges and metrics
(docs/CARD.md defines each measure). Rates are `evaluation.stats.rate` dicts (``rate``, ``k``, ``n``, ``ci95``),
paired tests `evaluation.stats.mcnemar` dicts (``n01``, ``n10``, ``p_value``); a measure that does not apply to a
row (HumanEval for a model that is not a code model, or a row that failed) is None, and a failed row carries its
reason. `Card.from_json` checks ``schema_version`` and every key, so a renamed field fails loudly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from ..errors import UserError

CARD_SCHEMA_VERSION = 1
JUDGES = ("substring", "rules", "learned")  # the refusal judges of every row (the learned one is the headline)


@dataclass(frozen=True)
class CardRow:
    """One model on the card."""

    name: str  # the row's name (``--model NAME=PATH``; ``base`` for BASE)
    kind: str  # base | edit (BASE under a run's edit, as hooks) | hf | gguf | lora
    source: str  # what PATH was (a directory, a .gguf file, an adapter, RUN@method), machine paths left out
    edit: dict | None  # the edit's description (`Edit.describe`) for an edit row
    status: str  # ok | failed
    reason: str | None  # why a failed row failed (one line)
    refusal: dict | None  # JailbreakBench: judge -> rate (refusal = 1)
    judge_disagreement: dict | None  # "a_vs_b" -> agreement table of two judges on the JailbreakBench answers
    over_refusal: dict | None  # XSTest safe prompts: judge -> rate of refusals
    unsafe_compliance: dict | None  # XSTest unsafe prompts: judge -> rate of compliance (refusal = 0)
    damage: dict | None  # `evaluation.damage.DamageResult.to_json()` against BASE
    humaneval: dict | None  # `evaluation.humaneval` result: pass_at_1 (a rate) and per-status counts
    substance: dict | None  # `evaluation.substance.SubstanceResult.to_json()` on the compliant JailbreakBench answers
    paired_vs_base: dict | None  # measure -> McNemar of this row against BASE on the same prompts
    seconds: dict = field(default_factory=dict)  # load, generate, judge, damage, humaneval

    @classmethod
    def from_json(cls, d: Mapping) -> CardRow:
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if missing:
            raise UserError(f"card row {d.get('name')!r} has no {', '.join(missing)}; re-run `refusal-direction card`")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Card:
    """The whole card: the shared settings, one row per model, pairwise tests between rows, timings."""

    base: str  # BASE as given (Hub id, directory or .gguf file; machine paths left out)
    settings: dict  # prompts, budgets, dtype, device, chat template, judges, the KL definitions (docs/CARD.md)
    rows: tuple[CardRow, ...]
    pairwise: dict  # measure -> {"a|b": McNemar} between any two ok rows on the same prompts
    timings: dict  # wall seconds: total and per row
    tool: dict  # tool name and version, the commit when known
    schema_version: int = CARD_SCHEMA_VERSION

    def to_json(self) -> dict:
        out = asdict(self)
        out["rows"] = [asdict(r) for r in self.rows]
        return {"schema_version": self.schema_version, **{k: v for k, v in out.items() if k != "schema_version"}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = "card.json") -> Card:
        version = d.get("schema_version")
        if version != CARD_SCHEMA_VERSION:
            raise UserError(f"{source} has schema_version {version!r}; this version of refusal-direction reads "
                            f"{CARD_SCHEMA_VERSION}. Re-run `refusal-direction card`")
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if missing:
            raise UserError(f"{source} has no {', '.join(missing)}; re-run `refusal-direction card`")
        rows = tuple(CardRow.from_json(r) for r in d["rows"])
        return cls(base=d["base"], settings=dict(d["settings"]), rows=rows, pairwise=dict(d["pairwise"]),
                   timings=dict(d["timings"]), tool=dict(d["tool"]), schema_version=version)

    def row(self, name: str) -> CardRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)


__all__ = ["CARD_SCHEMA_VERSION", "JUDGES", "Card", "CardRow"]
