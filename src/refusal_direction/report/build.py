"""Report entry point: `build_report` writes report.md, report.html and figures/*.png from a run's saved values.

It is the only report function that writes files. No model is needed: the typed `Summary`, the completion
records and, optionally, selection.json and the candidate / mean tensors are enough. Missing optional pieces
(no safety judge, no capability numbers, no tensors) drop their section or show "—"; they never fail the report.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import atomic_write_text
from .figures import direction_geometry, plot_cosines, plot_projections, plot_scores
from .format import normalize_completion_keys, ordered_conditions
from .html import print_height_in, render_html
from .markdown import render_markdown
from .summary import Summary

log = logging.getLogger(__name__)

MAX_MAIN_FIGURE_HEIGHT_IN = 3.3  # taller selection heatmaps go to the appendix (the main part stays <= 2 pages)
FIGURE_FILES = {
    "scores": "figures/scores.png",
    "cosines": "figures/cosines.png",
    "projections": "figures/projections.png",
    "selection_heatmaps": "figures/selection_heatmaps.png",
}


def build_report(
    summary: Summary,
    completions: dict[str, list[dict]],
    out_dir: str | Path,
    selection: dict | None = None,
    candidates: torch.Tensor | None = None,  # [n_pos, n_layers, d_model] difference in means
    mean_harmful: torch.Tensor | None = None,  # [n_pos, n_layers, d_model] float64
    mean_harmless: torch.Tensor | None = None,  # [n_pos, n_layers, d_model] float64
    direction: tuple[int, int] | None = None,  # (layer, position); default: summary.direction
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``; return their paths.

    Keys of the result are the paths relative to ``out_dir`` ("report.md", "figures/scores.png", ...).
    ``completions`` maps a condition name (or a file stem "<dataset>__<condition>") to its records.
    """
    out_dir = Path(out_dir)
    completions = normalize_completion_keys(completions)
    d = summary.direction
    if direction is None and d is not None and d.layer is not None and d.position is not None:
        direction = (int(d.layer), int(d.position))
    written: dict[str, Path] = {}
    figures: dict[str, str] = {}
    if ordered_conditions(summary):
        written[FIGURE_FILES["scores"]] = plot_scores(summary, out_dir / FIGURE_FILES["scores"])
        figures["scores"] = FIGURE_FILES["scores"]
    geometry = _geometry(summary, direction, candidates, mean_harmful, mean_harmless)
    if geometry is not None:
        if geometry.get("cos_matrix") is not None:
            written[FIGURE_FILES["cosines"]] = plot_cosines(geometry, out_dir / FIGURE_FILES["cosines"])
            figures["cosines"] = FIGURE_FILES["cosines"]
        if geometry.get("proj_harmful") is not None:
            written[FIGURE_FILES["projections"]] = plot_projections(geometry, out_dir / FIGURE_FILES["projections"])
            figures["projections"] = FIGURE_FILES["projections"]
    heatmaps = out_dir / FIGURE_FILES["selection_heatmaps"]
    if heatmaps.is_file():  # drawn by the selection stage; too tall for the main part -> appendix
        height = print_height_in(heatmaps.read_bytes())
        key = "selection_heatmaps" if height is not None and height <= MAX_MAIN_FIGURE_HEIGHT_IN \
            else "selection_heatmaps_appendix"
        figures[key] = FIGURE_FILES["selection_heatmaps"]
        written[FIGURE_FILES["selection_heatmaps"]] = heatmaps

    markdown = render_markdown(summary, completions, figures=figures, selection=selection, geometry=geometry)
    written["report.md"] = atomic_write_text(out_dir / "report.md", markdown)
    title = f"Refusal direction report: {summary.model or 'unknown model'}"
    written["report.html"] = atomic_write_text(out_dir / "report.html", render_html(markdown, out_dir, title=title))
    log.info("wrote report to %s (%d figures)", out_dir / "report.html", len(figures))
    return written


def _geometry(summary: Summary, direction, candidates, mean_harmful, mean_harmless) -> dict | None:
    """`direction_geometry` when the tensors allow it; None (with a warning) for a stale candidates file."""
    if direction is None or (candidates is None and (mean_harmful is None or mean_harmless is None)):
        return None
    try:
        return direction_geometry(direction, candidates, mean_harmful, mean_harmless,
                                  model_id=summary.model or "model")
    except UserError as exc:  # e.g. a stale candidates file: report without the direction figures
        log.warning("skipping direction figures: %s", exc)
        return None
