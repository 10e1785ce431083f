"""The optimize outputs: the Pareto front as a table and a plot, and the final evaluation's table.

Front rows are plain dicts ``{"number", "refusal", "kl", "n_refusals", "n_harmful", "params"}`` (validation
prompts, the search's own objectives); final rows come from `run.optimize` (held-out prompts, intervals).
"""

from __future__ import annotations

import io


def front_markdown(front: list[dict], chosen: int | None) -> str:
    head = "| trial | refusal (val) | KL (val) | form | position | layer index | other parameters |\n" \
           "|---|---|---|---|---|---|---|\n"
    lines = []
    for r in front:
        p = dict(r["params"])
        form, pos, li = p.pop("form"), p.pop("position"), p.pop("layer_index")
        other = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(p.items()))
        mark = " (chosen)" if r["number"] == chosen else ""
        lines.append(f"| {r['number']}{mark} | {r['refusal']:.3f} ({r['n_refusals']}/{r['n_harmful']}) | "
                     f"{r['kl']:.4f} | {form} | {pos} | {li:.2f} | {other or '–'} |")
    return head + "\n".join(lines) + "\n"


def front_png(trials: list[dict], front: list[dict], chosen: int | None, title: str) -> bytes:
    """Every complete trial (grey), the front (a step line) and the chosen trial; PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter([t["kl"] for t in trials], [t["refusal"] for t in trials], s=10, color="0.7", label="trials")
    if front:
        ax.step([t["kl"] for t in front], [t["refusal"] for t in front], where="post", color="C0", marker="o",
                ms=4, label="Pareto front")
    pick = next((t for t in front if t["number"] == chosen), None)
    if pick is not None:
        ax.scatter([pick["kl"]], [pick["refusal"]], s=80, facecolors="none", edgecolors="C3", linewidths=2,
                   label=f"chosen (trial {chosen})")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("next-token KL(baseline ‖ trial), harmless validation prompts (nats)")
    ax.set_ylabel("refusal rate, harmful validation prompts")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _ci(x: dict, key: str, digits: int) -> str:
    v, (lo, hi) = x[key], x["ci95"]
    return "–" if v is None else f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def final_markdown(rows: list[dict], judge: str) -> str:
    """Held-out evaluation: the chosen edit beside the paper's DiM ablation."""
    head = (f"| edit | JBB refusal, {judge} [95% CI] | JBB refusal, substring | XSTest-safe over-refusal, {judge} | "
            "KL [95% CI] | McNemar p vs DiM, JBB (n01/n10) |\n|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        test = r.get("mcnemar_refusal_vs_dim")
        p = "–" if not test else f"{test['p_value']:.3g} ({test['n01']}/{test['n10']})"
        lines.append(f"| {r['edit']} | {_ci(r['refusal'], 'rate', 2)} (n={r['refusal']['n']}) | "
                     f"{_ci(r['refusal_substring'], 'rate', 2)} | {_ci(r['over_refusal'], 'rate', 2)} "
                     f"(n={r['over_refusal']['n']}) | {_ci(r['kl'], 'value', 3)} | {p} |")
    return head + "\n".join(lines) + "\n"


__all__ = ["front_markdown", "front_png", "final_markdown"]
