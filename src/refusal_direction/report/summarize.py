"""Build the run `Summary` from a run's completion records and settings: pure, no files, no model.

The pipeline gathers the values (config, direction.json, environment, timings) and calls `summarize`;
tests build their summaries through the same function, so the report is tested on what the pipeline writes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..evaluation.refusal import per_category
from ..evaluation.stats import rate
from .summary import (
    Capability,
    CategoryScores,
    ConditionResult,
    DirectionInfo,
    JudgeAgreement,
    McNemar,
    PairedTest,
    PaperNumbers,
    Score,
    Settings,
    Summary,
)

PAIRED_CONDITIONS = (("baseline", "ablation"), ("baseline", "actadd_negative"),
                     ("harmless_baseline", "harmless_actadd"))  # (before, after) -> test "<after>_vs_<before>"


def summarize(
    completions: Mapping[str, Sequence[dict]],  # condition -> completion records (the completions/*.jsonl rows)
    *,
    model: str,
    direction: DirectionInfo,
    settings: Settings,
    datasets: Mapping[str, str],  # condition -> dataset name
    interventions: Mapping[str, dict],  # condition -> Intervention.describe() without the direction norm
    safety_status: Mapping,  # safety_status.json: {"computed": bool, "reason": ...}
    capability: Mapping[str, dict],  # capability.json: condition -> numbers
    first_n_tokens: int,
    paper: PaperNumbers,
    timings: Mapping[str, float],
    judge: str | None = None,  # name of the second refusal judge whose verdicts are the records' judged_refusal
) -> Summary:
    """The summary of a run from its records and settings (pure: reads no files)."""
    conditions = {
        cond: condition_result(records, dataset=datasets[cond], intervention=interventions[cond],
                               safety_status=safety_status, capability=capability.get(cond),
                               first_n_tokens=first_n_tokens, judge=judge)
        for cond, records in completions.items()}
    return Summary(model=model, direction=direction, settings=settings, conditions=conditions,
                   paired_tests=paired_tests(completions, conditions), paper=paper, timings=dict(timings))


def condition_result(records: Sequence[dict], *, dataset: str, intervention: dict, safety_status: Mapping,
                     capability: Mapping | None, first_n_tokens: int, judge: str | None = None) -> ConditionResult:
    """Scores of one condition's records; records without ``safety`` (unparsable judge answers) are left out of it.

    Token counts, early stopping, first-N refusal and the second judge's refusal (``judged_refusal``) are
    None unless every record has them (the paper's released completions have none).
    """
    refusal = [r["refusal"] for r in records]
    judged = [r for r in records if r.get("safety") is not None]
    safety = [r["safety"] for r in judged]
    has_safety = bool(safety_status.get("computed") and judged)
    cats = [r.get("category") for r in records]
    safety_cats = per_category(safety, [r.get("category") for r in judged]) if has_safety else {}
    per_cat = {k: CategoryScores(Score.from_json(v), Score.from_json(safety_cats[k]) if k in safety_cats else None)
               for k, v in per_category(refusal, cats).items()}
    n = max(1, len(records))
    tokens = _all_present(records, "n_tokens")
    stopped = _all_present(records, "stopped")
    first_n = _all_present(records, "refusal_first_n")
    judged_refusal = _all_present(records, "judged_refusal") if judge else None
    return ConditionResult(
        dataset=dataset, intervention=dict(intervention), n=len(records),
        refusal_score=rate(refusal)["rate"], refusal=Score.of(refusal),
        safety_score=rate(safety)["rate"] if has_safety else None, safety=Score.of(safety) if has_safety else None,
        safety_status="computed" if has_safety else f"not computed: {safety_status.get('reason', 'unknown')}",
        per_category=per_cat,
        mean_completion_tokens=None if tokens is None else sum(tokens) / n,
        first_n_tokens=first_n_tokens, refusal_first_n=None if first_n is None else Score.of(first_n),
        stopped_fraction=None if stopped is None else sum(bool(s) for s in stopped) / n,
        safety_unparsed=len(records) - len(judged) if has_safety else None,
        judge_agreement=JudgeAgreement.of([r["refusal"] for r in judged], safety) if has_safety else None,
        capability=None if capability is None else Capability.from_json(capability),
        judge=judge if judged_refusal is not None else None,
        judged_refusal=None if judged_refusal is None else Score.of(judged_refusal),
        refusal_judges_agreement=None if judged_refusal is None else JudgeAgreement.of(refusal, judged_refusal))


def paired_tests(completions: Mapping[str, Sequence[dict]], conditions: Mapping[str, ConditionResult]
                 ) -> dict[str, PairedTest]:
    """McNemar tests "<after>_vs_<before>" for the condition pairs run on the same prompts."""
    tests = {}
    for a, b in PAIRED_CONDITIONS:
        if a not in completions or b not in completions:
            continue
        refusal = McNemar.of([r["refusal"] for r in completions[a]], [r["refusal"] for r in completions[b]])
        safety = None
        if conditions[a].safety and conditions[b].safety:
            pairs = [(x["safety"], y["safety"]) for x, y in zip(completions[a], completions[b])
                     if x.get("safety") is not None and y.get("safety") is not None]
            safety = McNemar.of([x for x, _ in pairs], [y for _, y in pairs])
        tests[f"{b}_vs_{a}"] = PairedTest(refusal, safety)
    return tests


def _all_present(records: Sequence[dict], key: str) -> list | None:
    values = [r.get(key) for r in records]
    return None if any(v is None for v in values) else values
