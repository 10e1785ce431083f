"""The report's figures (scores per condition, candidate cosines, projections on r̂) and the geometry behind them.

`direction_geometry` computes plain lists from the candidate / mean tensors; each ``plot_*`` draws one PNG
with matplotlib's object API (`matplotlib.figure.Figure`: no pyplot, no global backend) at `FIG_DPI`.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..core.directions import check_position_layer
from ..fileio import atomic_write_bytes
from .format import (
    condition_label,
    dataset_label,
    ordered_conditions,
    paper_value,
    score_block,
    score_ci,
    score_rate,
    signed,
)
from .summary import Summary

FIG_DPI = 200
FULL_WIDTH_IN = 6.9  # A4 text width with 14 mm margins is 7.17 in


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


def plot_scores(summary: Summary, path: str | Path) -> Path:
    """Bars of refusal and safety score per condition, 95% Wilson error bars, paper values as markers."""
    conds = ordered_conditions(summary)
    ref = (summary.paper.reference_run if summary.paper else None) or {}
    names = list(conds)
    has_safety = any(score_rate(c, "safety") is not None for c in conds.values())
    fig, ax = _figure(FULL_WIDTH_IN, 2.25)
    width = 0.38 if has_safety else 0.6
    seen: set[str] = set()  # legend labels already used
    series = [("refusal", "Refusal score (substring)", "#3b6ea8")]
    if has_safety:
        series.append(("safety", "Safety score (judge)", "#e08a3c"))
    for j, (metric, label, color) in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * width
        for i, name in enumerate(names):
            r = score_rate(conds[name], metric)
            if r is None:
                continue
            block = score_block(conds[name], metric)
            lo, hi = score_ci(block) if block else (None, None)
            x = i + offset
            ax.bar(x, r, width * 0.92, color=color, label=_once(label, seen))
            if lo is not None:
                yerr = [[max(0.0, r - lo)], [max(0.0, hi - r)]]
                ax.errorbar(x, r, yerr=yerr, fmt="none", ecolor="#222", elinewidth=0.8, capsize=2)
            ax.text(x, (hi if hi is not None else r) + 0.025, f"{r:.2f}", ha="center", va="bottom", fontsize=6.5)
            v = paper_value(ref.get(name), metric)
            if v is not None:
                ax.plot([x - width * 0.46, x + width * 0.46], [v, v], color="#111", lw=1.4, ls=(0, (2, 1)),
                        label=_once("paper (reference run)", seen))
    datasets = [conds[n].dataset for n in names]
    for i in range(1, len(names)):
        if datasets[i] != datasets[i - 1]:
            ax.axvline(i - 0.5, color="#999", lw=0.8, ls=":")
    ax.set_xticks(range(len(names)), [f"{condition_label(n)}\n{dataset_label(conds[n])}" for n in names], fontsize=7.5)
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
    ax0.set_title(f"cos(r_l, r_l′), position {signed(pos)}", fontsize=7.5)
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
                 label=f"pos {signed(geometry['positions'][p])}", zorder=3 if chosen else 2)
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
    ax.set_title(f"Projection on r̂, position {signed(pos)}", fontsize=7.5)
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
