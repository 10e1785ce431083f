"""The selection figure: three position × layer heatmaps of the candidate scores (bypass, induce, KL).

Drawn with matplotlib's object API (`Figure` + the Agg canvas), so drawing it changes no global state:
neither the backend nor pyplot's list of open figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..selection import CandidateScore, SelectionThresholds, discard_reasons


def plot_selection_heatmaps(
    scores: Sequence[CandidateScore],
    n_layers: int,
    positions: Sequence[int],
    path_png: str | Path,
    chosen: tuple[int, int] | None = None,
    thresholds: SelectionThresholds = SelectionThresholds(),
) -> Path:
    """Three position × layer heatmaps (bypass, induce, KL) written to ``path_png``; ``chosen`` =
    (position, layer) is starred, candidates that pass the filters are dotted. Returns the path."""
    import numpy as np
    from matplotlib import colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    positions = list(positions)
    grids = _grids(scores, n_layers, positions)
    panels = [
        ("bypass", "bypass score: refusal metric on harmful, direction ablated (lower = better)", "viridis", None),
        ("induce", f"induce score: refusal metric on harmless, direction added (kept if >= "
                   f"{thresholds.induce_threshold})", "viridis", None),
        ("kl", f"KL(baseline || ablated) on harmless, last position (kept if <= {thresholds.kl_threshold})",
         "magma", "symlog"),
    ]
    fig = Figure(figsize=(max(6.0, 0.45 * n_layers + 2), 3 * (0.9 + 0.3 * len(positions))), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1)
    first_pruned = thresholds.max_layer(n_layers)
    for ax, (name, title, cmap, scale) in zip(axes, panels):
        grid = grids[name].numpy()
        norm = None
        if scale == "symlog":
            finite = grid[np.isfinite(grid)]
            vmax = float(finite.max()) if finite.size else 1.0
            norm = colors.SymLogNorm(linthresh=1e-2, vmin=0.0, vmax=max(vmax, 1e-2))
        im = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(len(positions)), [str(p) for p in positions])
        ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
        ax.set_ylabel("position")
        if first_pruned < n_layers:
            ax.axvline(first_pruned - 0.5, color="white", linestyle="--", linewidth=1)
        if name == "bypass":
            kept = [s for s in scores if s.position in positions and not discard_reasons(s, n_layers, thresholds)]
            ax.plot([s.layer for s in kept], [positions.index(s.position) for s in kept], linestyle="none",
                    marker="o", markersize=3, color="white")
        if chosen is not None and chosen[0] in positions:
            ax.plot(chosen[1], positions.index(chosen[0]), marker="*", color="red", markersize=14,
                    markeredgecolor="white")
    axes[-1].set_xlabel("layer (dashed line: first pruned layer; dots: passed the filters; star: chosen)")
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png, dpi=120)
    return path_png


def _grids(scores: Sequence[CandidateScore], n_layers: int, positions: list[int]) -> dict[str, torch.Tensor]:
    """Per score name, a [n_positions, n_layers] float64 grid (NaN where a candidate was not scored)."""
    grids = {name: torch.full((len(positions), n_layers), float("nan"), dtype=torch.float64)
             for name in ("bypass", "induce", "kl")}
    for s in scores:
        if s.position in positions and 0 <= s.layer < n_layers:
            for name in grids:
                grids[name][positions.index(s.position), s.layer] = getattr(s, name)
    return grids
