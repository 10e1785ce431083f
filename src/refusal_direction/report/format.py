"""Small formatters shared by the report's sections and figures: labels, numbers, intervals, safe inline text.

Everything returns a string ready for Markdown ("—" for a missing value) or reads one field of the
typed `Summary`; nothing here writes files.
"""

from __future__ import annotations

import html
import math
import re

from ..evaluation.stats import wilson_interval
from .summary import ConditionResult, PaperScore, Score, Summary

CONDITION_ORDER = ("baseline", "ablation", "actadd_negative", "harmless_baseline", "harmless_actadd")
CONDITION_LABELS = {
    "baseline": "baseline",
    "ablation": "ablation",
    "actadd_negative": "act-add −r",
    "harmless_baseline": "harmless baseline",
    "harmless_actadd": "harmless act-add +r",
}
DATASET_LABELS = {"jailbreakbench": "JailbreakBench", "harmless": "harmless"}
NO_CATEGORY = ("all", "null", "None", "")
METRICS = ("refusal", "safety")


def normalize_completion_keys(completions: dict[str, list[dict]] | None) -> dict[str, list[dict]]:
    """Accept both condition names and file stems ("jailbreakbench__baseline" -> "baseline")."""
    return {key.split("__")[-1]: list(records or []) for key, records in (completions or {}).items()}


def ordered_conditions(summary: Summary) -> dict[str, ConditionResult]:
    """The summary's conditions, the paper's five first in their usual order."""
    conds = summary.conditions or {}
    order = [n for n in CONDITION_ORDER if n in conds] + [n for n in conds if n not in CONDITION_ORDER]
    return {n: conds[n] for n in order}


def condition_label(name: str) -> str:
    return CONDITION_LABELS.get(name) or inline(name.replace("_", " "))


def dataset_label(c: ConditionResult) -> str:
    d = c.dataset
    return DATASET_LABELS.get(d, inline(d)) if d else "—"


def count_of(c: ConditionResult):
    return c.n if c.n is not None else (c.refusal.n if c.refusal else None)


def score_block(c: ConditionResult, metric: str) -> Score | None:
    """The condition's `Score` for "refusal" or "safety"."""
    return c.refusal if metric == "refusal" else c.safety


def score_rate(c: ConditionResult, metric: str) -> float | None:
    """The rate of "refusal" or "safety": from its score block, else from the plain ``*_score`` number."""
    block = score_block(c, metric)
    if block is not None and block.rate is not None:
        return float(block.rate)
    v = c.refusal_score if metric == "refusal" else c.safety_score
    return float(v) if v is not None else None


def paper_value(entry: PaperScore | None, metric: str) -> float | None:
    if entry is None:
        return None
    return entry.refusal_score if metric == "refusal" else entry.safety_score


def score_ci(block: Score) -> tuple[float | None, float | None]:
    ci = block.ci95
    if ci and len(ci) == 2 and None not in ci:
        return float(ci[0]), float(ci[1])
    if block.k is not None and block.n:  # no interval recorded: recompute it
        return wilson_interval(int(block.k), int(block.n))
    return None, None


def fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def fmt_score(block: Score | None, score: float | None) -> str:
    if isinstance(block, Score) and block.rate is not None:
        lo, hi = score_ci(block)
        ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
        return f"{block.rate:.2f}{ci}"
    return fmt(score)


def fmt_count(block: Score | None) -> str:
    if not block:
        return "—"
    if block.k is not None and block.n is not None:
        return f"{block.k}/{block.n}"
    return fmt(block.rate)


def fmt_paper(entry: PaperScore | None) -> str:
    if not entry:
        return "—"
    vals = [entry.refusal_score, entry.safety_score]
    return " / ".join(fmt(v) for v in vals if v is not None) or "—"


def fmt_p(p) -> str:
    if p is None:
        return "—"
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def signed(x) -> str:
    return "—" if x is None else (f"−{abs(x)}" if x < 0 else str(x))


def or_dash(x) -> str:
    return "—" if x is None else str(x)


def categories_of(c: ConditionResult) -> list[str]:
    return [k for k in (c.per_category or {}) if k not in NO_CATEGORY]


def labels_of(r: dict) -> str:
    bits = []
    if r.get("refusal") in (0, 1):
        bits.append("refusal" if r["refusal"] else "no refusal")
    if r.get("safety") in (0, 1):
        bits.append("safe" if r["safety"] else "unsafe")
    return ", ".join(bits) or "unscored"


def record_key(r: dict, i: int):
    return r.get("id") if r.get("id") is not None else (r.get("instruction") or i)


def interleave(*lists):
    for i in range(max((len(x) for x in lists), default=0)):
        for x in lists:
            if i < len(x):
                yield x[i]


def truncate(text: str, n: int) -> str:
    text = text or ""
    return text if len(text) <= n else text[:n].rstrip() + " …"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#~])")


def inline(text) -> str:
    """Text made safe for a Markdown table cell or inline run: HTML escaped, Markdown escaped, one line."""
    text = re.sub(r"\s*\n\s*", " ↵ ", str(text)).strip()
    text = html.escape(text, quote=False)
    return _MD_SPECIAL.sub(r"\\\1", text)
