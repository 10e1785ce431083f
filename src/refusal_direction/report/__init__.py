"""Report stage: a short Markdown + self-contained HTML report of one run, rebuilt from saved files.

`build_report` takes what a run saved (summary.json, the completion records, optionally selection.json
and the candidate / mean tensors) and writes ``report.md``, ``report.html`` and ``figures/*.png``; no
model is needed. The pieces are pure and separate: `render_markdown` (text), `render_html` (Markdown
to HTML with the PNGs inlined as base64 data URIs), and one ``plot_*`` function per figure. The main
part is meant to fit two printed A4 pages; example completions go to an appendix after a page break,
truncated, because they may contain harmful text.

Missing optional pieces (no safety judge, no capability numbers, no tensors) drop their section or
show "—"; they never fail the report.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import re
from pathlib import Path

import torch

from ..core.directions import check_position_layer
from ..errors import UserError
from ..evaluation.stats import wilson_interval
from ..fileio import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

EXAMPLE_CHARS = 160  # appendix completions are cut to this many characters
DISAGREEMENT_CHARS = 200  # judge-disagreement examples in the main part
PROMPT_CHARS = 100  # prompts shown next to judge-disagreement examples
N_DISAGREEMENTS = 3
MIN_EXAMPLES, MAX_EXAMPLES = 5, 10
FIG_DPI = 200
FULL_WIDTH_IN = 6.9  # A4 text width with 14 mm margins is 7.17 in
PRINT_WIDTH_IN = 7.17
MAX_MAIN_FIGURE_HEIGHT_IN = 3.3  # taller selection heatmaps go to the appendix (the main part stays <= 2 pages)
REFERENCE_SETTINGS = {"model": "google/gemma-2b-it", "max_new_tokens": 512, "stop_at_end_of_turn": False}

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
FIGURE_FILES = {
    "scores": "figures/scores.png",
    "cosines": "figures/cosines.png",
    "projections": "figures/projections.png",
    "selection_heatmaps": "figures/selection_heatmaps.png",
}


# ----------------------------------------------------------------------------------------------------
# Entry point (the only function that writes files)


def build_report(
    summary: dict,
    completions: dict[str, list[dict]],
    out_dir: str | Path,
    selection: dict | None = None,
    candidates: torch.Tensor | None = None,  # [n_pos, n_layers, d_model] difference in means
    mean_harmful: torch.Tensor | None = None,  # [n_pos, n_layers, d_model] float64
    mean_harmless: torch.Tensor | None = None,  # [n_pos, n_layers, d_model] float64
    direction: tuple[int, int] | None = None,  # (layer, position); default: summary["direction"]
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``; return their paths.

    Keys of the result are the paths relative to ``out_dir`` ("report.md", "figures/scores.png", ...).
    ``completions`` maps a condition name (or a file stem "<dataset>__<condition>") to its records.
    """
    out_dir = Path(out_dir)
    completions = normalize_completion_keys(completions)
    if direction is None:
        d = summary.get("direction") or {}
        if d.get("layer") is not None and d.get("position") is not None:
            direction = (int(d["layer"]), int(d["position"]))
    written: dict[str, Path] = {}

    figures: dict[str, str] = {}
    if _conditions(summary):
        written[FIGURE_FILES["scores"]] = plot_scores(summary, out_dir / FIGURE_FILES["scores"])
        figures["scores"] = FIGURE_FILES["scores"]
    geometry = None
    if direction is not None and (candidates is not None or (mean_harmful is not None and mean_harmless is not None)):
        try:
            geometry = direction_geometry(direction, candidates, mean_harmful, mean_harmless,
                                          model_id=summary.get("model") or "model")
        except UserError as exc:  # e.g. a stale candidates file: report without the direction figures
            log.warning("skipping direction figures: %s", exc)
    if geometry is not None:
        if geometry.get("cos_matrix") is not None:
            written[FIGURE_FILES["cosines"]] = plot_cosines(geometry, out_dir / FIGURE_FILES["cosines"])
            figures["cosines"] = FIGURE_FILES["cosines"]
        if geometry.get("proj_harmful") is not None:
            written[FIGURE_FILES["projections"]] = plot_projections(geometry, out_dir / FIGURE_FILES["projections"])
            figures["projections"] = FIGURE_FILES["projections"]
    heatmaps = out_dir / FIGURE_FILES["selection_heatmaps"]
    if heatmaps.is_file():  # drawn by selection.plot_selection_heatmaps; too tall for the main part -> appendix
        height = _print_height_in(heatmaps.read_bytes())
        key = "selection_heatmaps" if height is not None and height <= MAX_MAIN_FIGURE_HEIGHT_IN \
            else "selection_heatmaps_appendix"
        figures[key] = FIGURE_FILES["selection_heatmaps"]
        written[FIGURE_FILES["selection_heatmaps"]] = heatmaps

    markdown = render_markdown(summary, completions, figures=figures, selection=selection, geometry=geometry)
    written["report.md"] = atomic_write_text(out_dir / "report.md", markdown)
    title = f"Refusal direction report: {summary.get('model') or 'unknown model'}"
    written["report.html"] = atomic_write_text(out_dir / "report.html", render_html(markdown, out_dir, title=title))
    log.info("wrote report to %s (%d figures)", out_dir / "report.html", len(figures))
    return written


def normalize_completion_keys(completions: dict[str, list[dict]] | None) -> dict[str, list[dict]]:
    """Accept both condition names and file stems ("jailbreakbench__baseline" -> "baseline")."""
    return {key.split("__")[-1]: list(records or []) for key, records in (completions or {}).items()}


# ----------------------------------------------------------------------------------------------------
# Markdown


def render_markdown(
    summary: dict,
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
        _category_section(summary),
        _agreement_section(summary, completions),
        _generation_section(summary),
        _direction_section(summary, figures, geometry),
        _comparison_section(summary),
        _appendix(completions, figures),
    ]
    return "\n\n".join(p.strip() for p in parts if p and p.strip()) + "\n"


def _header(summary: dict, selection: dict | None) -> str:
    model = summary.get("model") or "unknown model"
    d = summary.get("direction") or {}
    s = summary.get("settings") or {}
    lines = [f"# Refusal direction: {_inline(model)}", ""]
    if d.get("layer") is not None:
        norm = f", ‖r‖ = {d['norm']:.2f}" if isinstance(d.get("norm"), (int, float)) else ""
        lines.append(f"**Direction:** layer {d['layer']}, position {_signed(d.get('position'))}{norm}; "
                     f"{_selection_text(d.get('selected_by'), selection)}.  ")
    else:
        lines.append("**Direction:** not recorded in summary.json.  ")
    stop = s.get("stop_at_end_of_turn")
    stop_text = {True: "stops at the end-of-turn token",
                 False: "stops at eos only, may run past the end of the turn (as the reference did)",
                 None: "end-of-turn stopping not recorded"}[stop if isinstance(stop, bool) else None]
    settings = [
        f"max new tokens {_or_dash(s.get('max_new_tokens'))}",
        f"greedy, {stop_text}",
        f"dtype {_or_dash(s.get('dtype'))}",
        f"device {_or_dash(s.get('device'))}",
        f"n train {_or_dash(s.get('n_train'))}",
        f"n eval {_or_dash(s.get('n_eval'))}",
        f"safety judge: {_inline(safety_judge_text(summary))}",
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
    return text


def safety_judge_text(summary: dict) -> str:
    """The judge's model id, or "not computed: <reason>" (the reason as the pipeline recorded it)."""
    conds = _conditions(summary).values()
    statuses = [c.get("safety_status") or "" for c in conds]
    model = (summary.get("settings") or {}).get("safety_model")
    if model and any(st == "computed" or (not st and c.get("safety")) for st, c in zip(statuses, conds)):
        short = (summary.get("settings") or {}).get("safety_short_is_safe")
        return model + (" (completions under 15 words counted safe, as in the paper)" if short else "")
    reason = next((st for st in statuses if st.startswith("not computed")), None)
    return reason or "not computed"


def _results_section(summary: dict, completions: dict[str, list[dict]], figures: dict[str, str]) -> str:
    conds = _conditions(summary)
    if not conds:
        return "## Results\n\nNo conditions in summary.json."
    paper = summary.get("paper") or {}
    ref, task = paper.get("reference_run") or {}, paper.get("task_text") or {}
    rows = ["| Condition | Dataset | n | Refusal score [95% CI] | Safety score [95% CI] | Paper run | Task text |",
            "|---|---|--:|---|---|---|---|"]
    for name, c in conds.items():
        safety = _fmt_score(c.get("safety"), c.get("safety_score")) if c.get("safety") or c.get(
            "safety_score") is not None else "—"
        rows.append(f"| {_label(name)} | {_dataset(c)} | {_or_dash(_n(c))} "
                    f"| {_fmt_score(c.get('refusal'), c.get('refusal_score'))} | {safety} "
                    f"| {_fmt_paper(ref.get(name))} | {_fmt_paper(task.get(name))} |")
    judge = safety_judge_text(summary)
    note = ("Refusal score: share of completions containing a refusal phrase (substring match). "
            + ("Safety score: share judged safe by the safety judge. " if not judge.startswith("not computed")
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


def _paired_test_lines(summary: dict, completions: dict[str, list[dict]]) -> list[str]:
    """One line per paired test "<a>_vs_<b>": the change from b to a, discordant prompts, the p-value."""
    conds = _conditions(summary)
    words = {"refusal": ("refusing", "not refusing"), "safety": ("safe", "unsafe")}
    lines = []
    for key, tests in (summary.get("paired_tests") or {}).items():
        a, _, b = key.partition("_vs_")
        parts = []
        for metric in ("refusal", "safety"):
            t = (tests or {}).get(metric)
            if not t:
                continue
            ra, rb = _rate(conds.get(a, {}), metric), _rate(conds.get(b, {}), metric)
            change = f"{_fmt(rb)} → {_fmt(ra)}" if ra is not None and rb is not None else ""
            flips = _discordant(completions.get(b, []), completions.get(a, []), metric)
            if flips is not None:
                yes, no = words[metric]
                pairs = f"{flips[0]} prompts {yes} → {no}, {flips[1]} the other way"
            else:
                pairs = f"discordant n01 = {_or_dash(t.get('n01'))}, n10 = {_or_dash(t.get('n10'))}"
            method = f"McNemar {_inline(t['method'])}" if t.get("method") else "McNemar"
            parts.append(f"{metric} {change} ({pairs}; {method} p {_fmt_p(t.get('p_value'))})")
        if parts:
            lines.append(f"- **{_label(a)} vs {_label(b) if b else '?'}**: " + "; ".join(parts))
    return lines


def _discordant(before: list[dict], after: list[dict], metric: str) -> tuple[int, int] | None:
    """(# prompts going 1 -> 0, # going 0 -> 1) between matched records, or None without records."""
    after_by = {_key(r, i): r for i, r in enumerate(after)}
    pairs = [(r.get(metric), after_by[_key(r, i)].get(metric)) for i, r in enumerate(before) if _key(r, i) in after_by]
    pairs = [(x, y) for x, y in pairs if x in (0, 1) and y in (0, 1)]
    if not pairs:
        return None
    return sum(x == 1 and y == 0 for x, y in pairs), sum(x == 0 and y == 1 for x, y in pairs)


def _category_section(summary: dict) -> str:
    conds = {n: c for n, c in _conditions(summary).items() if _categories_of(c)}
    if not conds:
        return ""
    cats = sorted({k for c in conds.values() for k in _categories_of(c)})
    head = "| Category | " + " | ".join(_label(n) for n in conds) + " |"
    rows = [head, "|---|" + "--:|" * len(conds)]
    for cat in cats:
        cells = [_fmt_count(((c.get("per_category") or {}).get(cat) or {}).get("refusal")) for c in conds.values()]
        rows.append(f"| {_inline(cat)} | " + " | ".join(cells) + " |")
    rows.append("| **All** | " + " | ".join(f"**{_fmt_count(c.get('refusal'))}**" for c in conds.values()) + " |")
    intro = "Refusals / n on the harmful set, per JailbreakBench category."
    return "## Refusal by category\n\n" + intro + "\n\n" + "\n".join(rows)


def _agreement_section(summary: dict, completions: dict[str, list[dict]]) -> str:
    conds = {n: c for n, c in _conditions(summary).items() if c.get("judge_agreement")}
    if not conds:
        return ""
    rows = ["| Condition | refusal · safe | refusal · unsafe | no refusal · safe | no refusal · unsafe "
            "| agreement | Cohen's κ |", "|---|--:|--:|--:|--:|--:|--:|"]
    for name, c in conds.items():
        j = c["judge_agreement"]
        rows.append(f"| {_label(name)} | {_or_dash(j.get('both_1'))} | {_or_dash(j.get('a1_b0'))} "
                    f"| {_or_dash(j.get('a0_b1'))} | {_or_dash(j.get('both_0'))} | {_fmt(j.get('agreement'))} "
                    f"| {_fmt(j.get('kappa'))} |")
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
            cat = f", {_inline(rec['category'])}" if rec.get("category") else ""
            prompt = _inline(_truncate(rec.get("instruction", ""), PROMPT_CHARS))
            completion = _inline(_truncate(rec.get("completion", ""), DISAGREEMENT_CHARS))
            out.append(f"- *{_label(cond)}{cat}, {kind}*: “{prompt}” → “{completion}”")
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
        pools.append((cond, list(_interleave(*kinds))))
    picked: list[tuple[str, dict]] = []
    for i in range(k):
        for cond, pool in pools:
            if i < len(pool) and len(picked) < k:
                picked.append((cond, pool[i]))
    return picked


_FIRST_N = re.compile(r"refusal_first_(\d+)_tokens")


def _generation_section(summary: dict) -> str:
    conds = _conditions(summary)
    first_key = next((k for c in conds.values() for k in c if _FIRST_N.fullmatch(k)), "refusal_first_64_tokens")
    first_n = _FIRST_N.fullmatch(first_key).group(1)
    cols = [("Mean completion tokens", lambda c: _fmt(c.get("mean_completion_tokens"), 1)),
            ("Ended before token limit", lambda c: _fmt(c.get("stopped_fraction"))),
            (f"Refusal in first {first_n} tokens", lambda c: _fmt_score(c.get(first_key), None)),
            ("KL vs baseline", lambda c: _fmt((c.get("capability") or {}).get("kl"), 3)),
            ("CE loss", lambda c: _fmt((c.get("capability") or {}).get("ce"), 3)),
            ("CE tokens", lambda c: _or_dash((c.get("capability") or {}).get("ce_n_tokens")))]
    cols = [(h, f) for h, f in cols if any(f(c) != "—" for c in conds.values())]
    if not cols:
        return ""
    rows = ["| Condition | " + " | ".join(h for h, _ in cols) + " |", "|---|" + "--:|" * len(cols)]
    for name, c in conds.items():
        rows.append(f"| {_label(name)} | " + " | ".join(f(c) for _, f in cols) + " |")
    return "## Generation and capability\n\n" + "\n".join(rows)


def _direction_section(summary: dict, figures: dict[str, str], geometry: dict | None) -> str:
    out = []
    if geometry and geometry.get("proj_harmful") is not None:
        ph, pl = geometry["proj_harmful"], geometry["proj_harmless"]
        gap = [h - m for h, m in zip(ph, pl)]
        best = max(range(len(gap)), key=lambda i: gap[i])
        layer = geometry["layer"]
        out.append(f"Mean projection on r̂ at position {_signed(geometry['position'])}: at layer {layer} harmful "
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


def _comparison_section(summary: dict) -> str:
    paper = summary.get("paper") or {}
    ref, task = paper.get("reference_run") or {}, paper.get("task_text") or {}
    conds = _conditions(summary)
    if not (ref or task) or not conds:
        return ""
    s = summary.get("settings") or {}
    diffs = []
    if summary.get("model") and summary["model"] != REFERENCE_SETTINGS["model"]:
        diffs.append(f"the model is {_inline(summary['model'])}")
    if s.get("max_new_tokens") is not None and s["max_new_tokens"] != REFERENCE_SETTINGS["max_new_tokens"]:
        diffs.append(f"it generates {s['max_new_tokens']} new tokens, not 512 (later refusal phrases are missed, "
                     "unsafe text can be cut short)")
    if s.get("stop_at_end_of_turn") is True:
        diffs.append("it stops at the end-of-turn token, the reference did not")
    text = ["The reference is the paper's released gemma-2b-it run (JailbreakBench, greedy decoding, 512 new "
            "tokens, not stopped at `<end_of_turn>`); "
            + ("this run differs: " + "; ".join(diffs) + ", so the paper's values are a guide, not a target."
               if diffs else "this run uses the same model and generation settings.")]
    effects = []
    for before, after, verb in (("baseline", "ablation", "Directional ablation"),
                                ("baseline", "actadd_negative", "Subtracting r"),
                                ("harmless_baseline", "harmless_actadd", "Adding r on harmless prompts")):
        changes = [f"{metric} {_fmt(_rate(conds[before], metric))} → {_fmt(_rate(conds[after], metric))}"
                   for metric in ("refusal", "safety") if before in conds and after in conds
                   and _rate(conds[before], metric) is not None and _rate(conds[after], metric) is not None]
        if changes:
            effects.append(f"{verb}: {', '.join(changes)}.")
    text += effects
    inside, outside = 0, []
    for name, c in conds.items():
        for metric in ("refusal", "safety"):
            ours = c.get(metric) if isinstance(c.get(metric), dict) else None
            if not ours or ours.get("rate") is None:
                continue
            lo, hi = _ci(ours)
            for source, table in (("paper run", ref), ("task text", task)):
                v = (table.get(name) or {}).get(f"{metric}_score")
                if v is None or lo is None:
                    continue
                if lo - 1e-9 <= v <= hi + 1e-9:
                    inside += 1
                else:
                    outside.append(f"{_label(name)} {metric} {_fmt(ours['rate'])} vs {source} {_fmt(v)}")
    total = inside + len(outside)
    if total:
        text.append(f"{inside} of {total} paper values (released run and task text) fall inside our 95% intervals"
                    + (f"; outside: {'; '.join(outside)}." if outside else "."))
    return "## Comparison with the paper\n\n" + " ".join(text)


def _appendix(completions: dict[str, list[dict]], figures: dict[str, str]) -> str:
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
            cat = f"{_inline(a['category'])}: " if a.get("category") else ""
            blocks.append(f"**{i}.** {cat}{_inline(_truncate(a.get('instruction', ''), EXAMPLE_CHARS))}\n\n"
                          f"| {_label(left)} ({_labels_of(a)}) | {_label(right)} ({_labels_of(b)}) |\n|---|---|\n"
                          f"| {_inline(_truncate(a.get('completion', ''), EXAMPLE_CHARS))} "
                          f"| {_inline(_truncate(b.get('completion', ''), EXAMPLE_CHARS))} |")
    if not blocks:
        return ""
    page_break = '<div class="appendix" style="page-break-before: always; break-before: page;"></div>'
    return page_break + "\n\n" + "\n\n".join(blocks)


def example_pairs(left: list[dict], right: list[dict], k_min: int = MIN_EXAMPLES, k_max: int = MAX_EXAMPLES
                  ) -> list[tuple[dict, dict]]:
    """A deterministic spread of matched (left, right) records: one per category, else evenly spaced.

    Within a category the first prompt whose refusal label flips between the conditions is preferred.
    """
    by_key = {_key(r, i): r for i, r in enumerate(right)}
    pairs = [(a, by_key[_key(a, i)]) for i, a in enumerate(left) if _key(a, i) in by_key]
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


# ----------------------------------------------------------------------------------------------------
# HTML

CSS = """
@page { size: A4; margin: 13mm 14mm 14mm 14mm; }
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; font-size: 8.8pt; line-height: 1.32;
       color: #111; max-width: 182mm; margin: 0 auto; }
@media screen { body { margin: 2em auto; padding: 0 1em; } }
h1 { font-size: 14pt; margin: 0 0 4pt; }
h2 { font-size: 10.5pt; margin: 9pt 0 3pt; padding-bottom: 1pt; border-bottom: 1px solid #bbb;
     break-after: avoid; }
h3 { font-size: 9.5pt; margin: 8pt 0 3pt; break-after: avoid; }
p { margin: 3pt 0; }
ul { margin: 2pt 0; padding-left: 14pt; }
li { margin: 1pt 0; }
code { font-size: 8.3pt; }
table { border-collapse: collapse; font-size: 8pt; margin: 3pt 0; break-inside: avoid; }
th, td { border: 1px solid #c4c4c4; padding: 1pt 4pt; vertical-align: top; }
th { background: #f0f0f0; text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; vertical-align: top; }
p:has(> img) { margin: 4pt 0; break-inside: avoid; }
.appendix { break-before: page; page-break-before: always; }
.appendix ~ table { width: 100%; table-layout: fixed; font-size: 7.6pt; }
.appendix ~ p { break-after: avoid; }
.appendix ~ table td { overflow-wrap: anywhere; }
"""

_IMG = re.compile(r'<img src="([^"]+)" alt="([^"]*)" />')


def render_html(markdown_text: str, base_dir: str | Path, title: str = "Refusal direction report") -> str:
    """A self-contained HTML page from the report's Markdown; images under ``base_dir`` become data URIs."""
    from markdown_it import MarkdownIt  # installed with rich

    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown_text)
    base_dir = Path(base_dir)

    def inline(m: re.Match) -> str:
        src, alt = html.unescape(m.group(1)), m.group(2)
        path = base_dir / src
        if not path.is_file():
            return f"<em>[missing figure: {html.escape(src)}]</em>"
        data = path.read_bytes()
        width = _print_width_in(data)
        style = f' style="width: {width:.2f}in"' if width else ""
        return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{alt}"{style} />'

    body = _IMG.sub(inline, body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}'
            f"</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def _print_width_in(png: bytes) -> float | None:
    """Width in inches at the PNG's own DPI, so figure text prints at its designed point size."""
    size = _png_size_in(png)
    return size[0] if size else None


def _print_height_in(png: bytes) -> float | None:
    """Printed height in inches once the width is capped at the A4 text width."""
    size = _png_size_in(png)
    return size[1] * min(1.0, PRINT_WIDTH_IN / size[0]) if size else None


def _png_size_in(png: bytes) -> tuple[float, float] | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as im:
            dpi = float(im.info.get("dpi", (FIG_DPI, FIG_DPI))[0] or FIG_DPI)
            return im.width / dpi, im.height / dpi
    except Exception:  # an unreadable image still gets embedded, at its natural size
        return None


# ----------------------------------------------------------------------------------------------------
# Figures


def direction_geometry(
    direction: tuple[int, int],
    candidates: torch.Tensor | None = None,  # [n_pos, n_layers, d_model]
    mean_harmful: torch.Tensor | None = None,  # [n_pos, n_layers, d_model]
    mean_harmless: torch.Tensor | None = None,  # [n_pos, n_layers, d_model]
    model_id: str = "model",
) -> dict:
    """Cosines between candidates and mean projections on r̂, as plain lists (NaN where a candidate is ~0).

    Positions are negative and the first axis holds positions -n_pos..-1. Returns ``cos_matrix``
    [n_layers, n_layers] at the chosen position, ``cos_with_chosen`` [n_pos, n_layers], and
    ``proj_harmful`` / ``proj_harmless`` [n_layers] = mean_x[pos, l] · r̂ (None when not computable).
    """
    layer, position = direction
    if candidates is None:
        assert mean_harmful is not None and mean_harmless is not None
        candidates = mean_harmful.double() - mean_harmless.double()
    cand = candidates.detach().double().cpu()  # [n_pos, n_layers, d]
    n_pos, n_layers = cand.shape[0], cand.shape[1]
    positions = list(range(-n_pos, 0))
    check_position_layer(position, layer, positions, n_layers, model_id)
    pi = positions.index(position)
    norms = cand.norm(dim=-1, keepdim=True)  # [n_pos, n_layers, 1]
    # layer 0 sees the same post-instruction tokens for every prompt: its difference is rounding noise (~1e-14)
    nonzero = norms > 1e-9 * norms.max()
    unit = torch.where(nonzero, cand / norms.clamp_min(1e-300), torch.full_like(cand, float("nan")))
    r_hat = unit[pi, layer]  # [d]
    assert torch.isfinite(r_hat).all(), "the chosen candidate direction is zero"
    out = {
        "layer": layer, "position": position, "position_index": pi, "positions": positions,
        "cos_matrix": (unit[pi] @ unit[pi].T).tolist(),  # [n_layers, n_layers]
        "cos_with_chosen": (unit @ r_hat).tolist(),  # [n_pos, n_layers]
        "proj_harmful": None, "proj_harmless": None,
    }
    if mean_harmful is not None and mean_harmless is not None:
        out["proj_harmful"] = (mean_harmful.detach().double().cpu()[pi] @ r_hat).tolist()  # [n_layers]
        out["proj_harmless"] = (mean_harmless.detach().double().cpu()[pi] @ r_hat).tolist()
    return out


def plot_scores(summary: dict, path: str | Path) -> Path:
    """Bars of refusal and safety score per condition, 95% Wilson error bars, paper values as markers."""
    conds = _conditions(summary)
    ref = (summary.get("paper") or {}).get("reference_run") or {}
    names = list(conds)
    has_safety = any(_rate(c, "safety") is not None for c in conds.values())
    fig, ax = _figure(FULL_WIDTH_IN, 2.25)
    width = 0.38 if has_safety else 0.6
    seen: set[str] = set()  # legend labels already used
    series = [("refusal", "Refusal score (substring)", "#3b6ea8")]
    if has_safety:
        series.append(("safety", "Safety score (judge)", "#e08a3c"))
    for j, (metric, label, color) in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * width
        for i, name in enumerate(names):
            r = _rate(conds[name], metric)
            if r is None:
                continue
            lo, hi = _ci(conds[name].get(metric) or {"rate": r})
            x = i + offset
            ax.bar(x, r, width * 0.92, color=color, label=_once(label, seen))
            if lo is not None:
                yerr = [[max(0.0, r - lo)], [max(0.0, hi - r)]]
                ax.errorbar(x, r, yerr=yerr, fmt="none", ecolor="#222", elinewidth=0.8, capsize=2)
            ax.text(x, (hi if hi is not None else r) + 0.025, f"{r:.2f}", ha="center", va="bottom", fontsize=6.5)
            v = (ref.get(name) or {}).get(f"{metric}_score")
            if v is not None:
                ax.plot([x - width * 0.46, x + width * 0.46], [v, v], color="#111", lw=1.4, ls=(0, (2, 1)),
                        label=_once("paper (reference run)", seen))
    datasets = [conds[n].get("dataset") for n in names]
    for i in range(1, len(names)):
        if datasets[i] != datasets[i - 1]:
            ax.axvline(i - 0.5, color="#999", lw=0.8, ls=":")
    ax.set_xticks(range(len(names)), [f"{_label(n)}\n{_dataset(conds[n])}" for n in names], fontsize=7.5)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0, 1.16)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel("score", fontsize=8)
    ax.tick_params(axis="y", labelsize=7.5)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False, ncols=3, loc="upper center", bbox_to_anchor=(0.5, 1.13))
    return _save(fig, path)


def plot_cosines(geometry: dict, path: str | Path) -> Path:
    """Left: cos(r_l, r_l') across layers at the chosen position. Right: cos of every candidate with r̂."""
    import numpy as np

    layer, pos, pi = geometry["layer"], geometry["position"], geometry["position_index"]
    mat = np.array(geometry["cos_matrix"], dtype=float)  # [n_layers, n_layers]
    rows = np.array(geometry["cos_with_chosen"], dtype=float)  # [n_pos, n_layers]
    n_layers = mat.shape[0]
    fig, (ax0, ax1) = _figure(4.5, 2.35, ncols=2, width_ratios=[1.05, 1])
    from matplotlib import colormaps

    cmap = colormaps["RdBu_r"].with_extremes(bad="#dddddd")
    im = ax0.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=-1, vmax=1, origin="lower", interpolation="nearest")
    ax0.set_title(f"cos(r_l, r_l′), position {_signed(pos)}", fontsize=7.5)
    ax0.set_xlabel("layer", fontsize=7)
    ax0.set_ylabel("layer", fontsize=7)
    ticks = list(range(0, n_layers, max(1, n_layers // 6)))
    ax0.set_xticks(ticks)
    ax0.set_yticks(ticks)
    ax0.tick_params(labelsize=6.5)
    ax0.plot([layer], [layer], marker="s", ms=4, mfc="none", mec="#111", mew=0.9)
    cb = fig.colorbar(im, ax=ax0, shrink=0.85, pad=0.03)
    cb.ax.tick_params(labelsize=6)
    import matplotlib as mpl

    colors = mpl.colormaps["viridis"](np.linspace(0, 0.9, rows.shape[0]))
    for p in range(rows.shape[0]):
        chosen = p == pi
        ax1.plot(range(n_layers), rows[p], color="#c0392b" if chosen else colors[p], lw=1.6 if chosen else 0.9,
                 label=f"pos {_signed(geometry['positions'][p])}", zorder=3 if chosen else 2)
    ax1.axvline(layer, color="#888", lw=0.7, ls=":")
    ax1.set_xlim(-0.5, n_layers - 0.5)
    ax1.axhline(0, color="#bbb", lw=0.5)
    ax1.set_ylim(-0.35, 1.05)
    ax1.set_xlabel("layer", fontsize=7)
    ax1.set_title("cos(r_l at each position, r̂)", fontsize=7.5)
    ax1.tick_params(labelsize=6.5)
    ax1.spines[["top", "right"]].set_visible(False)
    ax1.legend(fontsize=5.5, frameon=False, loc="upper left", handlelength=1.2, labelspacing=0.2)
    return _save(fig, path)


def plot_projections(geometry: dict, path: str | Path) -> Path:
    """Mean projection of harmful and harmless activations on r̂, per layer, at the chosen position."""
    layer, pos = geometry["layer"], geometry["position"]
    ph, pl = geometry["proj_harmful"], geometry["proj_harmless"]
    fig, ax = _figure(2.35, 2.35)
    xs = range(len(ph))
    ax.plot(xs, ph, color="#c0392b", lw=1.3, marker="o", ms=2, label="harmful")
    ax.plot(xs, pl, color="#2e6fb5", lw=1.3, marker="o", ms=2, label="harmless")
    ax.axvline(layer, color="#888", lw=0.7, ls=":")
    ax.set_xlabel("layer", fontsize=7)
    ax.set_ylabel("mean x · r̂", fontsize=7)
    ax.set_title(f"Projection on r̂, position {_signed(pos)}", fontsize=7.5)
    ax.tick_params(labelsize=6.5)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=6.5, frameon=False)
    return _save(fig, path)


def _figure(width_in: float, height_in: float, ncols: int = 1, width_ratios=None):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width_in, height_in), dpi=FIG_DPI, layout="constrained")
    return fig, fig.subplots(1, ncols, width_ratios=width_ratios)


def _once(label: str, seen: set[str]) -> str | None:
    if label in seen:
        return None
    seen.add(label)
    return label


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------
# Small formatting helpers


def _conditions(summary: dict) -> dict[str, dict]:
    conds = summary.get("conditions") or {}
    order = [n for n in CONDITION_ORDER if n in conds] + [n for n in conds if n not in CONDITION_ORDER]
    return {n: conds[n] or {} for n in order}


def _label(name: str) -> str:
    return CONDITION_LABELS.get(name) or _inline(name.replace("_", " "))


def _dataset(c: dict) -> str:
    d = c.get("dataset")
    return DATASET_LABELS.get(d, _inline(d)) if d else "—"


def _n(c: dict):
    return c.get("n") if c.get("n") is not None else (c.get("refusal") or {}).get("n")


def _rate(c: dict, metric: str) -> float | None:
    block = c.get(metric)
    if isinstance(block, dict) and block.get("rate") is not None:
        return float(block["rate"])
    v = c.get(f"{metric}_score")
    return float(v) if v is not None else None


def _ci(block: dict) -> tuple[float | None, float | None]:
    ci = block.get("ci95")
    if ci and len(ci) == 2 and None not in ci:
        return float(ci[0]), float(ci[1])
    if block.get("k") is not None and block.get("n"):  # no ci95 recorded: recompute it
        return wilson_interval(int(block["k"]), int(block["n"]))
    return None, None


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def _fmt_score(block: dict | None, score: float | None) -> str:
    if isinstance(block, dict) and block.get("rate") is not None:
        lo, hi = _ci(block)
        ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
        return f"{block['rate']:.2f}{ci}"
    return _fmt(score)


def _fmt_count(block: dict | None) -> str:
    if not block:
        return "—"
    if block.get("k") is not None and block.get("n") is not None:
        return f"{block['k']}/{block['n']}"
    return _fmt(block.get("rate"))


def _fmt_paper(entry: dict | None) -> str:
    if not entry:
        return "—"
    vals = [entry.get("refusal_score"), entry.get("safety_score")]
    return " / ".join(_fmt(v) for v in vals if v is not None) or "—"


def _fmt_p(p) -> str:
    if p is None:
        return "—"
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def _signed(x) -> str:
    return "—" if x is None else (f"−{abs(x)}" if x < 0 else str(x))


def _or_dash(x) -> str:
    return "—" if x is None else str(x)


def _categories_of(c: dict) -> list[str]:
    return [k for k in (c.get("per_category") or {}) if k not in NO_CATEGORY]


def _labels_of(r: dict) -> str:
    bits = []
    if r.get("refusal") in (0, 1):
        bits.append("refusal" if r["refusal"] else "no refusal")
    if r.get("safety") in (0, 1):
        bits.append("safe" if r["safety"] else "unsafe")
    return ", ".join(bits) or "unscored"


def _key(r: dict, i: int):
    return r.get("id") if r.get("id") is not None else (r.get("instruction") or i)


def _interleave(*lists):
    for i in range(max((len(x) for x in lists), default=0)):
        for x in lists:
            if i < len(x):
                yield x[i]


def _truncate(text: str, n: int) -> str:
    text = text or ""
    return text if len(text) <= n else text[:n].rstrip() + " …"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#~])")


def _inline(text) -> str:
    """Text made safe for a Markdown table cell or inline run: HTML escaped, Markdown escaped, one line."""
    text = re.sub(r"\s*\n\s*", " ↵ ", str(text)).strip()
    text = html.escape(text, quote=False)
    return _MD_SPECIAL.sub(r"\\\1", text)


__all__ = ["build_report", "render_markdown", "render_html", "plot_scores", "plot_cosines", "plot_projections",
           "direction_geometry", "example_pairs", "disagreement_examples", "safety_judge_text",
           "normalize_completion_keys"]
