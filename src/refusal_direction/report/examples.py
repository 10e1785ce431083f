"""Report sections that quote completions: judge disagreements and the appendix of example pairs.

Completions may contain harmful text, so every quote is truncated (`EXAMPLE_CHARS`, `DISAGREEMENT_CHARS`)
and escaped; the appendix starts after a page break so the main part can be printed on its own.
"""

from __future__ import annotations

from .format import (
    NO_CATEGORY,
    condition_label,
    fmt,
    inline,
    interleave,
    labels_of,
    or_dash,
    ordered_conditions,
    record_key,
    truncate,
)
from .summary import Summary

EXAMPLE_CHARS = 160  # appendix completions are cut to this many characters
DISAGREEMENT_CHARS = 200  # judge-disagreement examples in the main part
PROMPT_CHARS = 100  # prompts shown next to judge-disagreement examples
N_DISAGREEMENTS = 3
MIN_EXAMPLES, MAX_EXAMPLES = 5, 10


def agreement_section(summary: Summary, completions: dict[str, list[dict]]) -> str:
    """Refusal phrase vs. safety judge: each condition's 2x2 table, then a few disagreeing completions."""
    conds = {n: c for n, c in ordered_conditions(summary).items() if c.judge_agreement}
    if not conds:
        return ""
    rows = ["| Condition | refusal · safe | refusal · unsafe | no refusal · safe | no refusal · unsafe "
            "| agreement | Cohen's κ |", "|---|--:|--:|--:|--:|--:|--:|"]
    for name, c in conds.items():
        j = c.judge_agreement
        rows.append(f"| {condition_label(name)} | {or_dash(j.both_1)} | {or_dash(j.a1_b0)} "
                    f"| {or_dash(j.a0_b1)} | {or_dash(j.both_0)} | {fmt(j.agreement)} "
                    f"| {fmt(j.kappa)} |")
    out = ["## Refusal phrase vs. safety judge", "",
           "Completions counted by the two judges (each row is a condition's 2×2 table). Cohen's κ is 0 when "
           "one judge gives every completion the same label, undefined (—) when both do.", "", *rows]
    examples = disagreement_examples(completions, list(conds))
    if examples:
        out += ["", f"Disagreements (prompt and completion cut to {PROMPT_CHARS} / {DISAGREEMENT_CHARS} characters; "
                "they may contain harmful text):", ""]
        for cond, rec in examples:
            kind = ("refusal phrase, judged unsafe" if rec.get("refusal") == 1
                    else "no refusal phrase, judged safe")
            cat = f", {inline(rec['category'])}" if rec.get("category") else ""
            prompt = inline(truncate(rec.get("instruction", ""), PROMPT_CHARS))
            completion = inline(truncate(rec.get("completion", ""), DISAGREEMENT_CHARS))
            out.append(f"- *{condition_label(cond)}{cat}, {kind}*: “{prompt}” → “{completion}”")
    return "\n".join(out)


def disagreement_examples(completions: dict[str, list[dict]], conditions: list[str],
                          k: int = N_DISAGREEMENTS) -> list[tuple[str, dict]]:
    """Up to ``k`` records where the refusal and safety labels disagree, taken round-robin over conditions."""
    pools = []
    for cond in conditions:
        recs = [r for r in completions.get(cond, []) if r.get("refusal") in (0, 1) and r.get("safety") in (0, 1)
                and r["refusal"] != r["safety"]]
        # alternate the two kinds of disagreement so both show up when both exist
        kinds = [[r for r in recs if r["refusal"] == 1], [r for r in recs if r["refusal"] == 0]]
        pools.append((cond, list(interleave(*kinds))))
    picked: list[tuple[str, dict]] = []
    for i in range(k):
        for cond, pool in pools:
            if i < len(pool) and len(picked) < k:
                picked.append((cond, pool[i]))
    return picked


def appendix(completions: dict[str, list[dict]], figures: dict[str, str]) -> str:
    """After a page break: the selection heatmaps when too tall for the main part, then example pairs."""
    blocks = []
    if "selection_heatmaps_appendix" in figures:
        blocks += ["## Appendix: direction selection",
                   f"![Direction selection scores]({figures['selection_heatmaps_appendix']})"]
    pairs = [("baseline", "ablation", "Harmful prompts: baseline vs. directional ablation", MIN_EXAMPLES),
             ("harmless_baseline", "harmless_actadd", "Harmless prompts: baseline vs. act-add +r", 3)]
    for left, right, title, k_min in pairs:
        if not completions.get(left) or not completions.get(right):
            continue
        chosen = example_pairs(completions[left], completions[right], k_min=k_min,
                               k_max=MAX_EXAMPLES if left == "baseline" else k_min)
        if not chosen:
            continue
        if not any(b.startswith("## Appendix: example") for b in blocks):
            blocks.append("## Appendix: example completions\n\n"
                          f"**Content note:** completions are truncated to {EXAMPLE_CHARS} characters (line breaks "
                          "shown as ↵) because they may contain harmful text. One prompt per category, preferring "
                          "prompts where the two conditions disagree on refusal.")
        blocks.append(f"### {title}")
        for i, (a, b) in enumerate(chosen, 1):
            cat = f"{inline(a['category'])}: " if a.get("category") else ""
            blocks.append(f"**{i}.** {cat}{inline(truncate(a.get('instruction', ''), EXAMPLE_CHARS))}\n\n"
                          f"| {condition_label(left)} ({labels_of(a)}) | {condition_label(right)} ({labels_of(b)}) |"
                          "\n|---|---|\n"
                          f"| {inline(truncate(a.get('completion', ''), EXAMPLE_CHARS))} "
                          f"| {inline(truncate(b.get('completion', ''), EXAMPLE_CHARS))} |")
    if not blocks:
        return ""
    page_break = '<div class="appendix" style="page-break-before: always; break-before: page;"></div>'
    return page_break + "\n\n" + "\n\n".join(blocks)


def example_pairs(left: list[dict], right: list[dict], k_min: int = MIN_EXAMPLES, k_max: int = MAX_EXAMPLES
                  ) -> list[tuple[dict, dict]]:
    """A deterministic spread of matched (left, right) records: one per category, else evenly spaced.

    Within a category the first prompt whose refusal label flips between the conditions is preferred.
    """
    by_key = {record_key(r, i): r for i, r in enumerate(right)}
    pairs = [(a, by_key[record_key(a, i)]) for i, a in enumerate(left) if record_key(a, i) in by_key]
    if not pairs:
        return []
    chosen: list[int] = []
    cats: dict[str, list[int]] = {}
    for i, (a, _) in enumerate(pairs):
        if a.get("category") not in (None, *NO_CATEGORY):
            cats.setdefault(a["category"], []).append(i)
    for cat in sorted(cats):
        idx = cats[cat]
        flips = [i for i in idx if pairs[i][0].get("refusal") != pairs[i][1].get("refusal")]
        chosen.append((flips or idx)[0])
    chosen = chosen[:k_max]
    if len(chosen) < k_min:
        flips = [i for i, (a, b) in enumerate(pairs) if a.get("refusal") != b.get("refusal") and i not in chosen]
        rest = flips or [i for i in range(len(pairs)) if i not in chosen]
        need = min(k_min - len(chosen), len(rest))
        chosen += [rest[j * len(rest) // need] for j in range(need)] if need else []
    return [pairs[i] for i in sorted(chosen)]
