"""The report's Markdown: header, results with intervals and paired tests, categories, generation, direction, paper.

`render_markdown` joins the sections; each section is a pure function of the typed `Summary` (and the
completion records where it counts prompts) and returns "" when it has nothing to show. Sections that
quote completions live in `examples`.
"""

from __future__ import annotations

from .examples import agreement_section, appendix
from .format import (
    METRICS,
    categories_of,
    condition_label,
    count_of,
    dataset_label,
    fmt,
    fmt_count,
    fmt_p,
    fmt_paper,
    fmt_score,
    inline,
    normalize_completion_keys,
    or_dash,
    ordered_conditions,
    paper_value,
    record_key,
    score_block,
    score_ci,
    score_rate,
    signed,
)
from .summary import PaperNumbers, Summary
from .xstest_section import judge_name, judged_cell, xstest_section

REFERENCE_SETTINGS = {"model": "google/gemma-2b-it", "max_new_tokens": 512, "stop_at_end_of_turn": False}


def render_markdown(
    summary: Summary,
    completions: dict[str, list[dict]] | None = None,
    figures: dict[str, str] | None = None,
    selection: dict | None = None,
    geometry: dict | None = None,
) -> str:
    """The whole report as Markdown (GitHub tables, a little raw HTML for the appendix page break)."""
    completions = normalize_completion_keys(completions)
    figures = figures or {}
    parts = [
        _header(summary, selection),
        _results_section(summary, completions, figures),
        xstest_section(summary),
        _category_section(summary),
        agreement_section(summary, completions),
        _generation_section(summary),
        _direction_section(summary, figures, geometry),
        _comparison_section(summary),
        appendix(completions, figures),
    ]
    return "\n\n".join(p.strip() for p in parts if p and p.strip()) + "\n"


def _setting(summary: Summary, name: str):
    return getattr(summary.settings, name) if summary.settings is not None else None


def _paper_tables(summary: Summary) -> tuple[dict, dict]:
    paper = summary.paper or PaperNumbers({}, {}, None)
    return paper.reference_run or {}, paper.task_text or {}


def _header(summary: Summary, selection: dict | None) -> str:
    model = summary.model or "unknown model"
    d = summary.direction
    lines = [f"# Refusal direction: {inline(model)}", ""]
    if d is not None and d.layer is not None:
        norm = f", ‖r‖ = {d.norm:.2f}" if isinstance(d.norm, (int, float)) else ""
        lines.append(f"**Direction:** layer {d.layer}, position {signed(d.position)}{norm}; "
                     f"{_selection_text(d.selected_by, selection)}.  ")
    else:
        lines.append("**Direction:** not recorded in summary.json.  ")
    stop = _setting(summary, "stop_at_end_of_turn")
    stop_text = {True: "stops at the end-of-turn token",
                 False: "stops at eos only, may run past the end of the turn (as the reference did)",
                 None: "end-of-turn stopping not recorded"}[stop if isinstance(stop, bool) else None]
    settings = [
        f"max new tokens {or_dash(_setting(summary, 'max_new_tokens'))}",
        f"greedy, {stop_text}",
        f"dtype {or_dash(_setting(summary, 'dtype'))}",
        f"device {or_dash(_setting(summary, 'device'))}",
        f"n train {or_dash(_setting(summary, 'n_train'))}",
        f"n eval {or_dash(_setting(summary, 'n_eval'))}",
        f"safety judge: {inline(safety_judge_text(summary))}",
    ]
    lines.append("**Settings:** " + " · ".join(settings))
    return "\n".join(lines)


def _selection_text(selected_by: str | None, selection: dict | None) -> str:
    if selected_by == "fixed":
        text = "fixed by the config"
    elif selected_by == "auto" or selection:
        text = "selected automatically"
    else:
        text = f"selected by: {selected_by or 'not recorded'}"
    if not selection:
        return text
    scores = selection.get("scores") or []
    survivors = selection.get("survivors")
    n_ok = len(survivors) if isinstance(survivors, list) else sum(1 for r in scores if not r.get("discarded"))
    text += f" from {len(scores)} candidates ({n_ok} passed the filters)"
    chosen = selection.get("chosen") or {}
    row = next((r for r in scores if r.get("layer") == chosen.get("layer")
                and r.get("position") == chosen.get("position")), None)
    if row:
        named = [("bypass", ("bypass_score", "refusal_score")), ("induce", ("induce_score", "steering_score")),
                 ("KL", ("kl_score", "kl_div_score"))]
        vals = []
        for label, keys in named:
            v = next((row[k] for k in keys if isinstance(row.get(k), (int, float))), None)
            if v is not None:
                vals.append(f"{label} {v:.3g}")
        if vals:
            text += "; chosen scores: " + ", ".join(vals)
    return text + _rule_text(selection)


def _rule_text(selection: dict) -> str:
    """The selection rule with its thresholds, and the validation filter's counts (selection.json)."""
    t, gen, val = selection.get("thresholds") or {}, selection.get("generation") or {}, selection.get("validation")
    chosen = selection.get("chosen") or {}
    text = ""
    if selection.get("rule") == "generation" and gen:
        pool = gen.get("pool") or {}
        where = (f"{pool.get('n_val_refused')} validation + {pool.get('n_train_used')} training prompts the "
                 "unablated model refuses" if pool and "fallback" not in pool else "the harmful validation prompts")
        text += (f". Rule: generation — the lowest refusal rate of greedy answers ({t.get('new_tokens')} tokens) to "
                 f"{where}, with the candidate ablated, among the {t.get('top_k')} best-bypass candidates with KL ≤ "
                 f"{t.get('max_kl')} (ties: lower KL); chosen refuses {chosen.get('n_refused')}"
                 f"/{gen.get('n_prompts')} (unablated {gen.get('baseline_refused')}/{gen.get('n_prompts')})")
    elif selection.get("rule") == "paper":
        text += (f". Rule: paper — lowest bypass score with KL ≤ {t.get('kl_threshold')}, induce ≥ "
                 f"{t.get('induce_threshold')}")
    if isinstance(val, dict) and selection.get("filter_val"):
        text += (f". Validation filter: {val.get('n_harmful_passed')}/{val.get('n_harmful')} harmful and "
                 f"{val.get('n_harmless_passed')}/{val.get('n_harmless')} harmless passed; scored on "
                 f"{val.get('n_harmful_used')} + {val.get('n_harmless_used')}"
                 + (f" (topped up by metric rank to the minimum, min_val_prompts={val.get('min_prompts')})"
                    if val.get("topped_up") else ""))
    tokens = selection.get("refusal_tokens")
    if isinstance(tokens, dict) and tokens.get("texts"):
        cov = tokens.get("coverage")
        text += (f". Refusal tokens ({tokens.get('source')}): {inline(', '.join(repr(x) for x in tokens['texts']))}"
                 + (f", {cov:.0%} of {tokens.get('n_refusals')} refusals" if isinstance(cov, (int, float)) else ""))
    return text


def safety_judge_text(summary: Summary) -> str:
    """The judge's model id, or "not computed: <reason>" (the reason as the pipeline recorded it)."""
    conds = ordered_conditions(summary).values()
    statuses = [c.safety_status or "" for c in conds]
    model = _setting(summary, "safety_model")
    if model and any(st == "computed" or (not st and c.safety) for st, c in zip(statuses, conds)):
        short = _setting(summary, "safety_short_is_safe")
        return model + (" (completions under 15 words counted safe, as in the paper)" if short else "")
    reason = next((st for st in statuses if st.startswith("not computed")), None)
    return reason or "not computed"


def _results_section(summary: Summary, completions: dict[str, list[dict]], figures: dict[str, str]) -> str:
    conds = ordered_conditions(summary)
    if not conds:
        return "## Results\n\nNo conditions in summary.json."
    ref, task = _paper_tables(summary)
    judge = judge_name(summary)
    extra = (f" Refusal, {judge} judge [95% CI] |", "---|") if judge else ("", "")
    rows = ["| Condition | Dataset | n | Refusal score [95% CI] | Safety score [95% CI] | Paper run | Task text |"
            + extra[0], "|---|---|--:|---|---|---|---|" + extra[1]]
    for name, c in conds.items():
        safety = fmt_score(c.safety, c.safety_score) if c.safety or c.safety_score is not None else "—"
        rows.append(f"| {condition_label(name)} | {dataset_label(c)} | {or_dash(count_of(c))} "
                    f"| {fmt_score(c.refusal, c.refusal_score)} | {safety} "
                    f"| {fmt_paper(ref.get(name))} | {fmt_paper(task.get(name))} |"
                    + (f" {judged_cell(c)} |" if judge else ""))
    safety_judge = safety_judge_text(summary)
    note = ("Refusal score: share of completions containing a refusal phrase (substring match; the paper's "
            "score, the headline). "
            + (f"{judge} judge: the second refusal judge (evaluation.judges), checked against XSTest's human labels. "
               if judge else "")
            + ("Safety score: share judged safe by the safety judge. "
               if not safety_judge.startswith("not computed")
               else "Safety score: not computed (reason under Settings). ")
            + "Intervals: 95% Wilson. Paper columns give refusal / safety from the released gemma-2b-it run "
            "and from the task text.")
    out = ["## Results", "", *rows, "", note]
    tests = _paired_test_lines(summary, completions)
    if tests:
        out += ["", "Paired tests on the same prompts (McNemar):", "", *tests]
    if "scores" in figures:
        out += ["", f"![Refusal and safety score per condition]({figures['scores']})"]
    return "\n".join(out)


def _paired_test_lines(summary: Summary, completions: dict[str, list[dict]]) -> list[str]:
    """One line per paired test "<a>_vs_<b>": the change from b to a, discordant prompts, the p-value."""
    conds = ordered_conditions(summary)
    words = {"refusal": ("refusing", "not refusing"), "safety": ("safe", "unsafe")}
    lines = []
    for key, tests in (summary.paired_tests or {}).items():
        a, _, b = key.partition("_vs_")
        parts = []
        for metric in METRICS:
            t = getattr(tests, metric) if tests is not None else None
            if not t:
                continue
            ra = score_rate(conds[a], metric) if a in conds else None
            rb = score_rate(conds[b], metric) if b in conds else None
            change = f"{fmt(rb)} → {fmt(ra)}" if ra is not None and rb is not None else ""
            flips = _discordant(completions.get(b, []), completions.get(a, []), metric)
            if flips is not None:
                yes, no = words[metric]
                pairs = f"{flips[0]} prompts {yes} → {no}, {flips[1]} the other way"
            else:
                pairs = f"discordant n01 = {or_dash(t.n01)}, n10 = {or_dash(t.n10)}"
            method = f"McNemar {inline(t.method)}" if t.method else "McNemar"
            parts.append(f"{metric} {change} ({pairs}; {method} p {fmt_p(t.p_value)})")
        if parts:
            lines.append(f"- **{condition_label(a)} vs {condition_label(b) if b else '?'}**: " + "; ".join(parts))
    return lines


def _discordant(before: list[dict], after: list[dict], metric: str) -> tuple[int, int] | None:
    """(# prompts going 1 -> 0, # going 0 -> 1) between matched records, or None without records."""
    after_by = {record_key(r, i): r for i, r in enumerate(after)}
    pairs = [(r.get(metric), after_by[record_key(r, i)].get(metric)) for i, r in enumerate(before)
             if record_key(r, i) in after_by]
    pairs = [(x, y) for x, y in pairs if x in (0, 1) and y in (0, 1)]
    if not pairs:
        return None
    return sum(x == 1 and y == 0 for x, y in pairs), sum(x == 0 and y == 1 for x, y in pairs)


def _category_section(summary: Summary) -> str:
    conds = {n: c for n, c in ordered_conditions(summary).items() if categories_of(c)}
    if not conds:
        return ""
    cats = sorted({k for c in conds.values() for k in categories_of(c)})
    head = "| Category | " + " | ".join(condition_label(n) for n in conds) + " |"
    rows = [head, "|---|" + "--:|" * len(conds)]
    for cat in cats:
        cells = [fmt_count(c.per_category[cat].refusal if cat in c.per_category else None) for c in conds.values()]
        rows.append(f"| {inline(cat)} | " + " | ".join(cells) + " |")
    rows.append("| **All** | " + " | ".join(f"**{fmt_count(c.refusal)}**" for c in conds.values()) + " |")
    intro = "Refusals / n on the harmful set, per JailbreakBench category."
    return "## Refusal by category\n\n" + intro + "\n\n" + "\n".join(rows)


def _generation_section(summary: Summary) -> str:
    conds = ordered_conditions(summary)
    first_n = next((c.first_n_tokens for c in conds.values() if c.first_n_tokens is not None), 64)
    cols = [("Mean completion tokens", lambda c: fmt(c.mean_completion_tokens, 1)),
            ("Ended before token limit", lambda c: fmt(c.stopped_fraction)),
            (f"Refusal in first {first_n} tokens",
             lambda c: fmt_score(c.refusal_first_n if c.first_n_tokens == first_n else None, None)),
            ("KL vs baseline", lambda c: fmt(c.capability.kl if c.capability else None, 3)),
            ("CE loss", lambda c: fmt(c.capability.ce if c.capability else None, 3)),
            ("CE tokens", lambda c: or_dash(c.capability.ce_n_tokens if c.capability else None))]
    cols = [(h, f) for h, f in cols if any(f(c) != "—" for c in conds.values())]
    if not cols:
        return ""
    rows = ["| Condition | " + " | ".join(h for h, _ in cols) + " |", "|---|" + "--:|" * len(cols)]
    for name, c in conds.items():
        rows.append(f"| {condition_label(name)} | " + " | ".join(f(c) for _, f in cols) + " |")
    return "## Generation and capability\n\n" + "\n".join(rows)


def _direction_section(summary: Summary, figures: dict[str, str], geometry: dict | None) -> str:
    out = []
    if geometry and geometry.get("proj_harmful") is not None:
        ph, pl = geometry["proj_harmful"], geometry["proj_harmless"]
        gap = [h - m for h, m in zip(ph, pl)]
        best = max(range(len(gap)), key=lambda i: gap[i])
        layer = geometry["layer"]
        out.append(f"Mean projection on r̂ at position {signed(geometry['position'])}: at layer {layer} harmful "
                   f"{ph[layer]:.2f} vs harmless {pl[layer]:.2f} (gap {gap[layer]:.2f}); the gap is largest at "
                   f"layer {best} ({gap[best]:.2f}).")
    if geometry and geometry.get("cos_with_chosen") is not None:
        row = geometry["cos_with_chosen"][geometry["position_index"]]
        layer = geometry["layer"]
        near = [f"{row[i]:.2f} (layer {i})" for i in (layer - 1, layer + 1) if 0 <= i < len(row) and row[i] == row[i]]
        if near:
            out.append("Cosine of r̂ with the candidates of the neighbouring layers at the same position: "
                       + ", ".join(near) + ".")
    if len(out) == 2:
        out = [" ".join(out)]
    imgs = [f"![{alt}]({figures[key]})" for key, alt in
            (("cosines", "Cosine similarity of candidate directions"), ("projections", "Mean projection on r-hat"))
            if key in figures]
    if imgs:
        out.append(" ".join(imgs))  # one paragraph: the two figures sit side by side
    if "selection_heatmaps" in figures:
        out.append(f"![Direction selection scores]({figures['selection_heatmaps']})")
    if not out:
        return ""
    return "## Direction\n\n" + "\n\n".join(out)


def _setting_differences(summary: Summary) -> list[str]:
    """How this run's model and generation settings differ from the paper's released run."""
    diffs = []
    if summary.model and summary.model != REFERENCE_SETTINGS["model"]:
        diffs.append(f"the model is {inline(summary.model)}")
    max_new = _setting(summary, "max_new_tokens")
    if max_new is not None and max_new != REFERENCE_SETTINGS["max_new_tokens"]:
        diffs.append(f"it generates {max_new} new tokens, not 512 (later refusal phrases are missed, "
                     "unsafe text can be cut short)")
    if _setting(summary, "stop_at_end_of_turn") is True:
        diffs.append("it stops at the end-of-turn token, the reference did not")
    return diffs


def _comparison_section(summary: Summary) -> str:
    ref, task = _paper_tables(summary)
    conds = ordered_conditions(summary)
    if not (ref or task) or not conds:
        return ""
    diffs = _setting_differences(summary)
    text = ["The reference is the paper's released gemma-2b-it run (JailbreakBench, greedy decoding, 512 new "
            "tokens, not stopped at `<end_of_turn>`); "
            + ("this run differs: " + "; ".join(diffs) + ", so the paper's values are a guide, not a target."
               if diffs else "this run uses the same model and generation settings.")]
    for before, after, verb in (("baseline", "ablation", "Directional ablation"),
                                ("baseline", "actadd_negative", "Subtracting r"),
                                ("harmless_baseline", "harmless_actadd", "Adding r on harmless prompts")):
        changes = [f"{metric} {fmt(score_rate(conds[before], metric))} → {fmt(score_rate(conds[after], metric))}"
                   for metric in METRICS if before in conds and after in conds
                   and score_rate(conds[before], metric) is not None and score_rate(conds[after], metric) is not None]
        if changes:
            text.append(f"{verb}: {', '.join(changes)}.")
    inside, outside = 0, []
    for name, c in conds.items():
        for metric in METRICS:
            ours = score_block(c, metric)
            if not ours or ours.rate is None:
                continue
            lo, hi = score_ci(ours)
            for source, table in (("paper run", ref), ("task text", task)):
                v = paper_value(table.get(name), metric)
                if v is None or lo is None:
                    continue
                if lo - 1e-9 <= v <= hi + 1e-9:
                    inside += 1
                else:
                    outside.append(f"{condition_label(name)} {metric} {fmt(ours.rate)} vs {source} {fmt(v)}")
    total = inside + len(outside)
    if total:
        text.append(f"{inside} of {total} paper values (released run and task text) fall inside our 95% intervals"
                    + (f"; outside: {'; '.join(outside)}." if outside else "."))
    return "## Comparison with the paper\n\n" + " ".join(text)
