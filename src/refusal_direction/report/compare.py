"""The compare table, its Pareto plot (refusal vs KL), examples and report section, from per-method records.

Columns (per method): JailbreakBench refusal rate and XSTest-safe over-refusal rate, each with a 95 % Wilson
interval; next-token KL(baseline ‖ method) and completion CE on the harmless prompts, each with a 95 %
bootstrap interval over prompts; exact McNemar p-values of the refusal verdicts against DiM (the same
prompts, paired). A method Pareto-dominates DiM when its refusal rate **and** its KL are both lower.
"""

from __future__ import annotations

import io
from pathlib import Path

from ..evaluation.bootstrap import bootstrap_ratio
from ..evaluation.stats import mcnemar, rate
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

REFERENCE = "dim"
EXAMPLE_CHARS = 240


def compare_table(records: dict[str, dict]) -> list[dict]:
    """One row per method (in ``records`` order): rates, intervals, paired tests against DiM."""
    ref = records.get(REFERENCE)
    rows = []
    for name, rec in records.items():
        jbb = [int(r["refusal"]) for r in rec["jailbreakbench"]]
        xs = [int(r["refusal"]) for r in rec["xstest"]]
        row = {"method": name, "refusal": rate(jbb), "over_refusal": rate(xs),
               "kl": bootstrap_ratio(rec["kl_per_prompt"]), "ce": bootstrap_ratio(rec["ce_nll"], rec["ce_tokens"]),
               "parameters": rec.get("parameters", {})}
        if ref is not None and name != REFERENCE:
            row["mcnemar_refusal_vs_dim"] = mcnemar([int(r["refusal"]) for r in ref["jailbreakbench"]], jbb)
            row["mcnemar_over_refusal_vs_dim"] = mcnemar([int(r["refusal"]) for r in ref["xstest"]], xs) \
                if xs else None
        rows.append(row)
    return rows


def dominates_reference(rows: list[dict]) -> list[str]:
    """Methods with lower refusal and lower KL than DiM."""
    ref = next((r for r in rows if r["method"] == REFERENCE), None)
    if ref is None or ref["refusal"]["rate"] is None or ref["kl"]["value"] is None:
        return []
    return [r["method"] for r in rows if r["method"] not in (REFERENCE, "baseline")
            and r["refusal"]["rate"] is not None and r["kl"]["value"] is not None
            and r["refusal"]["rate"] < ref["refusal"]["rate"] and r["kl"]["value"] < ref["kl"]["value"]]


def _ci(x: dict, key: str = "rate", digits: int = 2) -> str:
    v, (lo, hi) = x[key], x["ci95"]
    if v is None:
        return "–"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _p(test: dict | None) -> str:
    return "–" if not test else f"{test['p_value']:.3g} ({test['n01']}/{test['n10']})"


def table_markdown(rows: list[dict]) -> str:
    head = ("| method | JBB refusal [95% CI] | XSTest over-refusal [95% CI] | KL [95% CI] | CE [95% CI] | "
            "McNemar p vs DiM, JBB (n01/n10) | McNemar p vs DiM, XSTest |\n|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['method']} | {_ci(r['refusal'])} (n={r['refusal']['n']}) | "
             f"{_ci(r['over_refusal'])} (n={r['over_refusal']['n']}) | {_ci(r['kl'], 'value', 3)} | "
             f"{_ci(r['ce'], 'value', 3)} | {_p(r.get('mcnemar_refusal_vs_dim'))} | "
             f"{_p(r.get('mcnemar_over_refusal_vs_dim'))} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def pareto_png(rows: list[dict], title: str) -> bytes:
    """Refusal rate (Wilson 95 %) against KL (bootstrap 95 %), one point per method; PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in rows:
        y, kl = r["refusal"]["rate"], r["kl"]["value"]
        if y is None or kl is None:
            continue
        lo, hi = r["refusal"]["ci95"]
        klo, khi = r["kl"]["ci95"]
        ax.errorbar([kl], [y], yerr=[[y - lo], [hi - y]], xerr=[[max(kl - klo, 0)], [max(khi - kl, 0)]],
                    fmt="o", capsize=3, label=r["method"])
        ax.annotate(r["method"], (kl, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("next-token KL(baseline ‖ method) on harmless prompts (nats)")
    ax.set_ylabel("JailbreakBench refusal rate")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def examples_markdown(records: dict[str, dict], n: int = 2) -> str:
    out = ["# Examples per method (first prompts; completions truncated)\n"]
    for name, rec in records.items():
        out.append(f"## {name}\n")
        for dataset in ("jailbreakbench", "xstest"):
            for r in rec[dataset][:n]:
                text = " ".join(r["completion"].split())
                text = text[:EXAMPLE_CHARS] + ("…" if len(text) > EXAMPLE_CHARS else "")
                out.append(f"- **{dataset}** ({'refusal' if r['refusal'] else 'no refusal'}) "
                           f"_{r['instruction'][:100]}_ → {text}")
        out.append("")
    return "\n".join(out) + "\n"


def compare_section(rows: list[dict], model: str, direction: dict) -> str:
    """The report section: table, Pareto verdict, plot and examples links."""
    winners = dominates_reference(rows)
    verdict = (f"Pareto-dominate DiM (lower refusal and lower KL): {', '.join(winners)}." if winners
               else "No method Pareto-dominates DiM (lower refusal and lower KL) here.")
    return (f"## Methods compared: {model}\n\nDirection: layer {direction['layer']}, position "
            f"{direction['position']}. Same prompts and the same refusal judge (substring match) for every row; "
            "KL and CE on the harmless evaluation prompts (the baseline's own greedy completions for CE). "
            "Refusal intervals: Wilson 95 %; KL/CE: bootstrap 95 % over prompts; McNemar: exact, paired "
            f"against DiM.\n\n{table_markdown(rows)}\n{verdict}\n\n![refusal vs KL](pareto.png)\n\n"
            "Examples: [examples.md](examples.md).\n")


def write_compare_outputs(out: Path, records: dict[str, dict], model: str, direction: dict) -> dict:
    """table.json, table.md, pareto.png, examples.md and report.md under ``out``; returns table.json's content."""
    rows = compare_table(records)
    result = {"schema_version": 1, "model": model, "direction": direction, "rows": rows,
              "dominates_dim": dominates_reference(rows)}
    atomic_write_json(out / "table.json", result)
    atomic_write_text(out / "table.md", table_markdown(rows))
    atomic_write_bytes(out / "pareto.png", pareto_png(rows, f"{model}: refusal vs KL per method"))
    atomic_write_text(out / "examples.md", examples_markdown(records))
    atomic_write_text(out / "report.md", compare_section(rows, model, direction))
    return result


__all__ = ["compare_table", "compare_section", "dominates_reference", "pareto_png", "table_markdown",
           "write_compare_outputs"]
