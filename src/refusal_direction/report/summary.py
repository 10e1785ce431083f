"""The run summary (summary.json) as one typed, versioned value: the pipeline writes it, report and cli read it.

`report.summarize.summarize` builds one from a run's records (pure). `Summary.to_json` is the dict
written to summary.json; `Summary.from_json` reads one back, checking ``schema_version`` and every key,
so a field the pipeline drops or renames fails loudly instead of showing "—" in the report. The JSON is
keyed as the dataclasses' fields, plus ``schema_version``.

Per condition, beside the substring score, the second refusal judge: ``judge`` (its name), ``judged_refusal``
(its refusal score with a Wilson interval), ``refusal_judges_agreement`` (substring (a) vs that judge (b)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import UserError
from ..evaluation.stats import agreement_table, mcnemar, rate

SCHEMA_VERSION = 2
READABLE_VERSIONS = (SCHEMA_VERSION,)
_FIRST_N = re.compile(r"refusal_first_(\d+)_tokens")


class _Json:
    """One JSON object of a summary file; a missing key raises a UserError naming the file, the key and the fix."""

    def __init__(self, data: Any, where: str, source: str):
        if not isinstance(data, dict):
            raise UserError(f"{source}: {where} should be a JSON object, got {type(data).__name__}; "
                            "re-run `refusal-direction score <run dir>` to rewrite summary.json")
        self.data, self.where, self.source = data, where, source

    def __getitem__(self, key: str) -> Any:
        if key not in self.data:
            raise UserError(f"{self.source}: {self.where} has no {key!r} (summary schema_version {SCHEMA_VERSION}); "
                            "re-run `refusal-direction score <run dir>` to rewrite summary.json")
        return self.data[key]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def obj(self, key: str, where: str | None = None) -> _Json | None:
        """The object under ``key`` wrapped for further reads; None when the value is null."""
        value = self[key]
        return None if value is None else _Json(value, where or f"{self.where}.{key}", self.source)


class _Plain:
    """JSON of a dataclass whose fields are all plain JSON values, one key per field, in field order."""

    @classmethod
    def from_json(cls, d: Mapping | _Json):
        """Every field's key is required (a missing one raises the UserError of `_Json`)."""
        return cls(**{name: d[name] for name in cls.__dataclass_fields__})

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Score:
    """Share of 1s with its 95% Wilson interval; ``rate`` and the interval are None when ``n == 0``."""

    rate: float | None
    k: int
    n: int
    ci95: tuple[float | None, float | None]

    @classmethod
    def of(cls, values: Sequence[int | bool]) -> Score:
        return cls.from_json(rate(values))

    @classmethod
    def from_json(cls, d: Mapping | _Json) -> Score:
        lo, hi = d["ci95"]
        return cls(rate=d["rate"], k=d["k"], n=d["n"], ci95=(lo, hi))

    def to_json(self) -> dict:
        return {"rate": self.rate, "k": self.k, "n": self.n, "ci95": list(self.ci95)}


@dataclass(frozen=True)
class McNemar(_Plain):
    """Exact McNemar test of paired 0/1 outcomes (n01: a=0, b=1; n10: a=1, b=0)."""

    n01: int | None
    n10: int | None
    statistic: int | None
    p_value: float | None
    method: str | None

    @classmethod
    def of(cls, a: Sequence[int | bool], b: Sequence[int | bool]) -> McNemar:
        return cls.from_json(mcnemar(a, b))


@dataclass(frozen=True)
class PairedTest:
    """McNemar tests of one condition against another on the same prompts (None: not computable)."""

    refusal: McNemar | None
    safety: McNemar | None

    def to_json(self) -> dict:
        return {"refusal": _json(self.refusal), "safety": _json(self.safety)}


@dataclass(frozen=True)
class JudgeAgreement(_Plain):
    """2x2 table of refusal phrase (a) vs. safety judge (b), raw agreement and Cohen's kappa."""

    both_1: int
    a1_b0: int
    a0_b1: int
    both_0: int
    n: int
    agreement: float | None
    kappa: float | None

    @classmethod
    def of(cls, a: Sequence[int | bool], b: Sequence[int | bool]) -> JudgeAgreement:
        return cls(**agreement_table(a, b))


@dataclass(frozen=True)
class CategoryScores:
    """Refusal (and, with a judge, safety) score of one prompt category; ``safety`` is omitted from JSON when None."""

    refusal: Score
    safety: Score | None = None

    def to_json(self) -> dict:
        return {"refusal": self.refusal.to_json(), **({"safety": self.safety.to_json()} if self.safety else {})}


@dataclass(frozen=True)
class Capability:
    """Capability numbers of one condition on harmless prompts (capability.json); ce/perplexity may be absent."""

    kl: float | None
    dataset: str | None
    ce: float | None = None
    perplexity: float | None = None
    ce_n_tokens: int | None = None

    @classmethod
    def from_json(cls, d: Mapping) -> Capability:
        return cls(kl=d.get("kl"), dataset=d.get("dataset"), ce=d.get("ce"), perplexity=d.get("perplexity"),
                   ce_n_tokens=d.get("ce_n_tokens"))

    def to_json(self) -> dict:
        optional = {"ce": self.ce, "perplexity": self.perplexity, "ce_n_tokens": self.ce_n_tokens}
        return {"kl": self.kl, "dataset": self.dataset, **{k: v for k, v in optional.items() if v is not None}}


@dataclass(frozen=True)
class ConditionResult:
    """Scores of one condition (a dataset under one intervention); None where not computed."""

    dataset: str | None
    intervention: dict[str, Any] | None  # Intervention.describe() without the direction norm
    n: int | None
    refusal_score: float | None
    refusal: Score | None
    safety_score: float | None
    safety: Score | None
    safety_status: str | None  # "computed" or "not computed: <reason>"
    per_category: dict[str, CategoryScores] | None
    mean_completion_tokens: float | None
    first_n_tokens: int | None  # N of the JSON key "refusal_first_<N>_tokens"
    refusal_first_n: Score | None  # refusal phrase within the first N completion tokens
    stopped_fraction: float | None  # share of completions that ended before the token limit
    safety_unparsed: int | None  # judge answers that could not be parsed (excluded from the safety score)
    judge_agreement: JudgeAgreement | None
    capability: Capability | None
    judge: str | None = None  # the second refusal judge (schema 2), e.g. "learned"
    judged_refusal: Score | None = None  # its refusal score
    refusal_judges_agreement: JudgeAgreement | None = None  # substring (a) vs the second judge (b)

    @classmethod
    def from_json(cls, d: _Json) -> ConditionResult:
        first = [k for k in d.data if _FIRST_N.fullmatch(k)]
        key = first[0] if first else "refusal_first_<N>_tokens"
        cats, agreement, capability = d.obj("per_category"), d.obj("judge_agreement"), d["capability"]
        both = d.obj("refusal_judges_agreement")
        judged = {"judge": d["judge"], "judged_refusal": _score(d.obj("judged_refusal")),
                  "refusal_judges_agreement": None if both is None else JudgeAgreement.from_json(both)}
        return cls(**judged,
            dataset=d["dataset"], intervention=d["intervention"], n=d["n"], refusal_score=d["refusal_score"],
            refusal=_score(d.obj("refusal")), safety_score=d["safety_score"], safety=_score(d.obj("safety")),
            safety_status=d["safety_status"],
            per_category=None if cats is None else {
                k: CategoryScores(Score.from_json(v["refusal"]), Score.from_json(v["safety"]) if v.get("safety")
                                  else None) for k, v in cats.data.items()},
            mean_completion_tokens=d["mean_completion_tokens"],
            first_n_tokens=int(_FIRST_N.fullmatch(key).group(1)) if first else None,
            refusal_first_n=_score(d.obj(key)), stopped_fraction=d["stopped_fraction"],
            safety_unparsed=d["safety_unparsed"],
            judge_agreement=None if agreement is None else JudgeAgreement.from_json(agreement),
            capability=None if capability is None else Capability.from_json(capability))

    def to_json(self) -> dict:
        cats = None if self.per_category is None else {k: v.to_json() for k, v in self.per_category.items()}
        return {"dataset": self.dataset, "intervention": self.intervention, "n": self.n,
                "refusal_score": self.refusal_score, "refusal": _json(self.refusal),
                "safety_score": self.safety_score, "safety": _json(self.safety), "safety_status": self.safety_status,
                "per_category": cats, "mean_completion_tokens": self.mean_completion_tokens,
                f"refusal_first_{self.first_n_tokens}_tokens": _json(self.refusal_first_n),
                "stopped_fraction": self.stopped_fraction, "safety_unparsed": self.safety_unparsed,
                "judge_agreement": _json(self.judge_agreement), "capability": _json(self.capability),
                "judge": self.judge, "judged_refusal": _json(self.judged_refusal),
                "refusal_judges_agreement": _json(self.refusal_judges_agreement)}


@dataclass(frozen=True)
class DirectionInfo(_Plain):
    """The refusal direction used: block index, prompt position (negative), how it was chosen, its norm."""

    layer: int | None
    position: int | None
    selected_by: str | None  # "fixed" (config), "auto" (selection), ...
    norm: float | None


@dataclass(frozen=True)
class Settings(_Plain):
    """The generation and judging settings the scores depend on."""

    max_new_tokens: int | None
    stop_at_end_of_turn: bool | None
    dtype: str | None
    device: str | None
    n_train: int | None
    n_eval: int | None
    safety_model: str | None  # None when the safety judge did not run
    safety_mode: str | None
    safety_short_is_safe: bool | None
    refusal_matching: str | None
    generation_backend: str | None = None  # "fast" | "hf", as the generate stage ran (environment.json)
    decode_step: str | None = None  # on the fast path: "own" | "hf" (asked for; each batch's notes say what ran)


@dataclass(frozen=True)
class PaperScore:
    """A paper value for one condition; ``safety_score`` is None (and omitted from JSON) where not reported."""

    refusal_score: float | None
    safety_score: float | None = None

    def to_json(self) -> dict:
        return {"refusal_score": self.refusal_score,
                **({"safety_score": self.safety_score} if self.safety_score is not None else {})}


@dataclass(frozen=True)
class PaperNumbers:
    """The paper's values per condition: from its released gemma-2b-it run, and as stated in the task text."""

    reference_run: dict[str, PaperScore]
    task_text: dict[str, PaperScore]
    source: str | None

    @classmethod
    def from_json(cls, d: Mapping | _Json) -> PaperNumbers:
        def table(t: Mapping) -> dict[str, PaperScore]:
            return {k: PaperScore(v.get("refusal_score"), v.get("safety_score")) for k, v in (t or {}).items()}

        return cls(reference_run=table(d["reference_run"]), task_text=table(d["task_text"]), source=d["source"])

    def to_json(self) -> dict:
        return {"reference_run": {k: v.to_json() for k, v in self.reference_run.items()},
                "task_text": {k: v.to_json() for k, v in self.task_text.items()}, "source": self.source}


@dataclass(frozen=True)
class Summary:
    """Everything a run's report shows, as written to summary.json."""

    model: str | None  # a Hub id, or a local model's directory / file name
    direction: DirectionInfo | None
    settings: Settings | None
    conditions: dict[str, ConditionResult]
    paired_tests: dict[str, PairedTest]  # "<after>_vs_<before>" -> tests
    paper: PaperNumbers | None
    timings: dict[str, float]  # stage -> seconds
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "model": self.model, "direction": _json(self.direction),
                "settings": _json(self.settings),
                "conditions": {k: v.to_json() for k, v in self.conditions.items()},
                "paired_tests": {k: v.to_json() for k, v in self.paired_tests.items()},
                "paper": _json(self.paper), "timings": dict(self.timings)}

    @classmethod
    def from_json(cls, data: Mapping, source: str | Path = "summary.json") -> Summary:
        """Read a summary.json dict; raises UserError for an unknown or missing version or a missing key."""
        d = _Json(data, "summary", str(source))
        version = d.data.get("schema_version")
        if version not in READABLE_VERSIONS:
            seen = "has no schema_version" if version is None else f"has schema_version {version!r}"
            raise UserError(f"{source} {seen}; this version of refusal-direction reads schema_version "
                            f"{' or '.join(map(str, READABLE_VERSIONS))}. Re-run `refusal-direction score <run dir>` "
                            "to rewrite it.")
        direction, settings, paper = d.obj("direction"), d.obj("settings"), d.obj("paper")
        conditions = d.obj("conditions") or _Json({}, "conditions", str(source))
        tests = d.obj("paired_tests") or _Json({}, "paired_tests", str(source))
        return cls(
            model=d["model"],
            direction=None if direction is None else DirectionInfo.from_json(direction),
            settings=None if settings is None else Settings.from_json(settings),
            conditions={k: ConditionResult.from_json(conditions.obj(k, f"conditions[{k!r}]"))
                        for k in conditions.data},
            paired_tests={k: _paired(tests.obj(k, f"paired_tests[{k!r}]")) for k in tests.data},
            paper=None if paper is None else PaperNumbers.from_json(paper),
            timings=dict(d["timings"] or {}),
            schema_version=version)

    @classmethod
    def load(cls, path: str | Path) -> Summary:
        import json

        return cls.from_json(json.loads(Path(path).read_text()), source=path)


def _json(value) -> dict | None:
    return None if value is None else value.to_json()


def _score(d: _Json | None) -> Score | None:
    return None if d is None else Score.from_json(d)


def _paired(d: _Json | None) -> PairedTest:
    if d is None:
        return PairedTest(None, None)
    refusal, safety = d.obj("refusal"), d.obj("safety")
    return PairedTest(None if refusal is None else McNemar.from_json(refusal),
                      None if safety is None else McNemar.from_json(safety))
