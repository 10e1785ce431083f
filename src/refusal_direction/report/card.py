"""The report card rendered: one Markdown/HTML page of tables and two Pareto plots, from a typed `Card`.

`card_markdown` writes the title, the shared settings, a content note and the main table (one row per model: refusal
on JailbreakBench under each judge, XSTest over-refusal and unsafe compliance, first- and multi-token KL, CE,
HumanEval pass@1, McNemar against BASE), then the substance of compliant answers, HumanEval outcomes, where the
judges disagree, the paired tests between rows and the timings. Missing measures read "–". `pareto_png` plots the
learned judge's refusal rate against first-token KL or HumanEval pass@1 with the non-dominated rows joined by a
step line (`pareto_front`). `write_card_outputs` writes all of it next to card.json. Nothing here quotes a
completion: the run directory holds them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from .card_schema import Card, CardRow
from .figures import FIG_DPI
from .format import inline
from .html import render_html

DASH = "–"
HEADLINE = "learned"  # the judge of the headline columns and of the Pareto plots' y axis
CONTENT_NOTE = ("Content note: the card quotes no completions; the run directory holds them. Edited models are for "
                "safety research and evaluation only, never deployment.")
FIGURES = {"first_token_kl": "pareto_kl.png", "humaneval": "pareto_humaneval.png"}  # x axis -> file name
X_AXES = {  # x axis -> (axis label, short name, lower is better)
    "first_token_kl": ("first-token KL(base ‖ model) on harmless prompts (nats)", "first-token KL", True),
    "humaneval": ("HumanEval pass@1", "HumanEval pass@1", False)}
SUBSTANCE_FLAGS = (("empty", "empty"), ("degenerate", "degenerate"), ("script_switch", "script switch"),
                   ("cut_mid_sentence", "cut mid-sentence"))
COLUMNS_NOTE = ("Refusal: JailbreakBench, refusal = 1, under the learned judge (Wilson 95 % interval) and the "
                "substring and rules judges beside it; XSTest columns: the learned judge. KL: KL(base ‖ model) on "
                "harmless prompts, bootstrap 95 % interval over prompts; CE: the model's NLL per token of BASE's "
                "answers. McNemar: exact, paired against BASE on the same prompts, p (n01/n10).")


# --- numbers ---------------------------------------------------------------------------------------------------


def _num(x, digits: int) -> str:
    return DASH if x is None else f"{x:.{digits}f}"


def _interval(value, ci, digits: int) -> str:
    """``value [lo, hi]``; the interval left out where it is missing."""
    if value is None:
        return DASH
    bounds = list(ci or ())
    if len(bounds) != 2 or None in bounds:
        return _num(value, digits)
    return f"{value:.{digits}f} [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def _rate(block: dict | None, with_ci: bool = True) -> str:
    """A `stats.rate` dict, 2 decimals."""
    if not block:
        return DASH
    return _interval(block.get("rate"), block.get("ci95") if with_ci else None, 2)


def _judged(blocks: dict | None, judge: str = HEADLINE, with_ci: bool = True) -> str:
    """One judge's rate out of a judge -> rate dict."""
    return _rate((blocks or {}).get(judge), with_ci)


def _estimate(damage: dict | None, key: str, digits: int = 3) -> str:
    """An `evaluation.damage.Estimate` of the damage block, 3 decimals."""
    est = (damage or {}).get(key)
    return DASH if not est else _interval(est.get("value"), est.get("ci95"), digits)


def _p(p) -> str:
    return DASH if p is None else f"{p:.2g}"


def _test(test: dict | None) -> str:
    return DASH if not test else f"{_p(test.get('p_value'))} ({test.get('n01')}/{test.get('n10')})"


def _share(block: dict | None) -> str:
    """A share with its counts: ``0.10 (2/20)``."""
    if not block or block.get("rate") is None:
        return DASH
    return f"{block['rate']:.2f} ({block['k']}/{block['n']})"


def _seconds(x) -> str:
    if not isinstance(x, (int, float)):
        return DASH
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _value(v) -> str:
    """A settings value on one line: dicts as ``k=v``, lists joined."""
    if isinstance(v, dict):
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items()) or DASH
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) or DASH
    return DASH if v is None else str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


# --- sections --------------------------------------------------------------------------------------------------


def _refusal_test(row: CardRow) -> dict | None:
    """The row's McNemar against BASE on refusal ("refusal", else the first measure named refusal*)."""
    tests = row.paired_vs_base or {}
    if "refusal" in tests:
        return tests["refusal"]
    return next((t for k, t in tests.items() if k.startswith("refusal")), None)


MAIN_COLUMNS = (
    ("JBB refusal (learned) [95 % CI]", lambda r: _judged(r.refusal)),
    ("substring", lambda r: _judged(r.refusal, "substring", with_ci=False)),
    ("rules", lambda r: _judged(r.refusal, "rules", with_ci=False)),
    ("XSTest over-refusal [CI]", lambda r: _judged(r.over_refusal)),
    ("XSTest-unsafe compliance", lambda r: _judged(r.unsafe_compliance, with_ci=False)),
    ("first-token KL [CI]", lambda r: _estimate(r.damage, "first_token_kl")),
    ("multi-token KL [CI]", lambda r: _estimate(r.damage, "multi_token_kl")),
    ("CE", lambda r: _num(((r.damage or {}).get("ce") or {}).get("value"), 3)),
    ("HumanEval pass@1 [CI]", lambda r: _rate((r.humaneval or {}).get("pass_at_1"))),
    ("McNemar p vs base (refusal)", lambda r: _test(_refusal_test(r))),
)


def main_table(card: Card) -> str:
    """One line per row; a failed row says why in its first measure's cell."""
    lines = []
    for r in card.rows:
        head = [inline(r.name), inline(r.kind)]
        if r.status != "ok":
            reason = f"failed: {inline(r.reason or 'no reason recorded')}"
            lines.append(head + [reason] + [""] * (len(MAIN_COLUMNS) - 1))
        else:
            lines.append(head + [cell(r) for _, cell in MAIN_COLUMNS])
    return _table(["model", "kind"] + [h for h, _ in MAIN_COLUMNS], lines)


def _ok(card: Card) -> list[CardRow]:
    return [r for r in card.rows if r.status == "ok"]


def substance_section(card: Card) -> str:
    if not any(r.substance for r in _ok(card)):
        return ""
    rows = []
    for r in _ok(card):
        s = r.substance or {}
        rates = s.get("rates") or {}
        shares = [_share(rates.get(f)) for f, _ in SUBSTANCE_FLAGS] + [_share(s.get("any_flag"))]
        rows.append([inline(r.name), str(s.get("n_compliant", DASH))] + shares)
    header = ["model", "compliant answers"] + [label for _, label in SUBSTANCE_FLAGS] + ["any"]
    return ("## Substance of compliant answers\n\nShares among the JailbreakBench answers that no judge calls a "
            "refusal (count/n).\n\n" + _table(header, rows))


def humaneval_section(card: Card) -> str:
    scored = [r for r in _ok(card) if r.humaneval]
    if not scored:
        return ""
    statuses: list[str] = []
    for r in scored:
        statuses += [s for s in (r.humaneval.get("statuses") or {}) if s not in statuses]
    rows = [[inline(r.name), _rate(r.humaneval.get("pass_at_1"))]
            + [str((r.humaneval.get("statuses") or {}).get(s, 0)) for s in statuses] for r in scored]
    return "## HumanEval outcomes\n\n" + _table(["model", "pass@1 [95 % CI]"] + [inline(s) for s in statuses], rows)


def _pair(key: str) -> tuple[str, str]:
    a, _, b = key.partition("_vs_")
    return a, b or "?"


def disagreement_section(card: Card) -> str:
    pairs: list[str] = []
    for r in _ok(card):
        pairs += [k for k in (r.judge_disagreement or {}) if k not in pairs]
    if not pairs:
        return ""
    header = ["model", "n"]
    for key in pairs:
        a, b = _pair(key)
        header += [f"{inline(a)} yes / {inline(b)} no", f"{inline(a)} no / {inline(b)} yes"]
    rows = []
    for r in _ok(card):
        tables = r.judge_disagreement or {}
        n = next((t.get("n") for t in tables.values() if t), None)
        cells = [inline(r.name), DASH if n is None else str(n)]
        for key in pairs:
            t = tables.get(key) or {}
            cells += [str(t.get("a1_b0", DASH)), str(t.get("a0_b1", DASH))]
        rows.append(cells)
    return ("## Judges disagree\n\nJailbreakBench answers one judge calls a refusal (yes) and the other does "
            "not.\n\n" + _table(header, rows))


def _pairwise_matrix(tests: dict, names: list[str]) -> str:
    for key in tests:
        names += [n for n in key.split("|", 1) if n not in names]

    def cell(a: str, b: str) -> str:
        if a == b:
            return "·"
        t = tests.get(f"{a}|{b}") or tests.get(f"{b}|{a}")
        return _p(t.get("p_value")) if t else DASH

    return _table([""] + [inline(n) for n in names], [[inline(a)] + [cell(a, b) for b in names] for a in names])


def pairwise_section(card: Card) -> str:
    if not any(card.pairwise.values()):
        return ""
    measures = sorted(card.pairwise, key=lambda m: (not m.startswith("refusal"), m))
    parts = ["## Paired tests between rows\n\nExact McNemar p-values between any two rows on the same prompts."]
    for m in measures:
        if card.pairwise[m]:
            parts.append(f"**{inline(m)}**\n\n" + _pairwise_matrix(card.pairwise[m], [r.name for r in _ok(card)]))
    return "\n\n".join(parts) + "\n"


def timings_section(card: Card) -> str:
    keys: list[str] = []
    for r in card.rows:
        keys += [k for k in r.seconds if k not in keys]
    rows = [[inline(r.name)] + [_seconds(r.seconds.get(k)) for k in keys]
            + [_seconds(sum(v for v in r.seconds.values() if isinstance(v, (int, float))))] for r in card.rows]
    out = "## Timings\n\nWall seconds per row.\n\n" + _table(["model"] + [inline(k) for k in keys] + ["row"], rows)
    extra = [f"{inline(k)}: {_timing(v)}" for k, v in card.timings.items()]
    return out + ("\nRun: " + "; ".join(extra) + ".\n" if extra else "")


def _timing(v) -> str:
    """Seconds (``12.5 s``), or a dict of them (``base 12.5 s, edit 30 s``)."""
    if isinstance(v, dict):
        return ", ".join(f"{inline(k)} {_timing(x)}" for k, x in v.items()) or DASH
    return f"{_seconds(v)} s" if isinstance(v, (int, float)) else inline(_value(v))


def _header(card: Card) -> str:
    settings = "\n".join(f"- **{inline(k)}**: {inline(_value(v))}" for k, v in card.settings.items())
    tool = " ".join(inline(_value(v)) for v in card.tool.values() if v)
    made = f"\n\nMade by {tool}." if tool else ""
    return f"# Report card: {inline(card.base)}\n\n{settings}{made}\n\n{CONTENT_NOTE}\n"


def card_markdown(card: Card, figures: dict[str, str] | None = None) -> str:
    """The card as Markdown; ``figures`` (x axis -> PNG file name, e.g. `FIGURES`) adds the Pareto plots."""
    plots = "\n\n".join(f"![refusal vs {X_AXES[x][1]}]({name})" for x, name in (figures or {}).items())
    parts = [_header(card), "## Models\n\n" + COLUMNS_NOTE + "\n\n" + main_table(card), plots,
             substance_section(card), humaneval_section(card), disagreement_section(card), pairwise_section(card),
             timings_section(card)]
    return "\n\n".join(p.strip() for p in parts if p and p.strip()) + "\n"


def card_html(card: Card, base_dir: str | Path | None = None) -> str:
    """The card as one self-contained HTML page; with ``base_dir`` (holding `FIGURES`) the plots are inlined."""
    md = card_markdown(card, FIGURES if base_dir is not None else None)
    return render_html(md, base_dir if base_dir is not None else ".", title=f"Report card: {card.base}")


# --- Pareto plots ----------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[Sequence[float]], minimize: Sequence[bool] = (True, True)) -> list[int]:
    """Indices (in order) of the points no other point dominates: at least as good in every coordinate and better
    in one. Equal points do not dominate each other, so ties stay on the front."""
    signs = [1.0 if m else -1.0 for m in minimize]
    keyed = []
    for i, p in enumerate(points):
        if len(p) != len(signs):
            raise ValueError(f"point {i} has {len(p)} coordinates but minimize has {len(signs)}")
        keyed.append(tuple(s * float(v) for s, v in zip(signs, p)))

    def dominates(a: tuple, b: tuple) -> bool:
        return a != b and all(x <= y for x, y in zip(a, b))

    return [i for i, p in enumerate(keyed) if not any(dominates(q, p) for q in keyed)]


def _x_measure(row: CardRow, x: str) -> tuple[float | None, list | None]:
    if x == "first_token_kl":
        est = (row.damage or {}).get("first_token_kl") or {}
        return est.get("value"), est.get("ci95")
    block = (row.humaneval or {}).get("pass_at_1") or {}
    return block.get("rate"), block.get("ci95")


def _points(card: Card, x: str) -> list[tuple[str, float, list | None, float, list | None]]:
    """(name, x, x interval, refusal, refusal interval) of every ok row that has both measures."""
    out = []
    for r in _ok(card):
        xv, xci = _x_measure(r, x)
        y = (r.refusal or {}).get(HEADLINE) or {}
        if xv is not None and y.get("rate") is not None:
            out.append((r.name, float(xv), xci, float(y["rate"]), y.get("ci95")))
    return out


def _err(v: float, ci) -> list | None:
    bounds = list(ci or ())
    if len(bounds) != 2 or None in bounds:
        return None
    return [[max(v - bounds[0], 0.0)], [max(bounds[1] - v, 0.0)]]


def _plain(text: str) -> str:
    return str(text).replace("$", r"\$")  # no mathtext in names


def pareto_png(card: Card, x: str = "first_token_kl") -> bytes:
    """Refusal (learned judge) against first-token KL or HumanEval pass@1, one labelled point per ok row with its
    95 % intervals, the Pareto front as a step line; PNG bytes. With no point the title says so."""
    if x not in X_AXES:
        raise ValueError(f"x={x!r}: choose one of {', '.join(X_AXES)}")
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    label, short, lower_better = X_AXES[x]
    fig = Figure(figsize=(5.5, 3.8), dpi=FIG_DPI, layout="constrained")
    ax = fig.subplots()
    points = _points(card, x)
    for name, xv, xci, yv, yci in points:
        ax.errorbar([xv], [yv], xerr=_err(xv, xci), yerr=_err(yv, yci), fmt="o", ms=4, capsize=2, elinewidth=0.8)
        ax.annotate(_plain(name), (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = sorted(pareto_front([(p[1], p[3]) for p in points], (lower_better, True)), key=lambda i: points[i][1])
    if front:
        ax.step([points[i][1] for i in front], [points[i][3] for i in front], where="post" if lower_better else "pre",
                color="#c0392b", lw=1.0, ls="--", marker="o", ms=9, mfc="none", label="Pareto front")
        ax.legend(fontsize=7, frameon=False)
    better = "lower" if lower_better else "higher"
    title = (f"{_plain(card.base)}: refusal vs {short} (lower refusal, {better} {short} is better)" if points
             else f"{_plain(card.base)}: no row has both a learned refusal rate and {short}; nothing to plot")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(label, fontsize=8)
    ax.set_ylabel("JailbreakBench refusal rate (learned judge)", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, metadata={"Software": None})
    return buf.getvalue()


# --- files -----------------------------------------------------------------------------------------------------


def write_card_outputs(directory: str | Path, card: Card) -> dict[str, Path]:
    """card.json, card.md, card.html (plots inlined), pareto_kl.png and pareto_humaneval.png under ``directory``,
    each written atomically; returns file name -> path."""
    directory = Path(directory)
    paths = {"card.json": atomic_write_json(directory / "card.json", card.to_json())}
    for x, name in FIGURES.items():
        paths[name] = atomic_write_bytes(directory / name, pareto_png(card, x))
    paths["card.md"] = atomic_write_text(directory / "card.md", card_markdown(card, FIGURES))
    paths["card.html"] = atomic_write_text(directory / "card.html", card_html(card, directory))
    return paths


__all__ = ["CONTENT_NOTE", "FIGURES", "card_html", "card_markdown", "main_table", "pareto_front", "pareto_png",
           "write_card_outputs"]
