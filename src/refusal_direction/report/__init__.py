"""Report stage: a short Markdown + self-contained HTML report of one run, rebuilt from saved files.

`build_report` (build) takes what a run saved — the typed `Summary` (summary), the completion records,
optionally selection.json and the candidate / mean tensors — and writes ``report.md``, ``report.html`` and
``figures/*.png``; no model is needed. The pieces are pure and separate: `render_markdown` (markdown,
examples), `render_html` (html: Markdown to HTML with the PNGs inlined), one ``plot_*`` per figure
(figures) and the formatters they share (format). The main part is meant to fit two printed A4 pages;
example completions go to an appendix after a page break, truncated, because they may contain harmful text.
`summarize` (summarize) builds the `Summary` the pipeline writes to summary.json.
"""

from .build import FIGURE_FILES, build_report
from .examples import EXAMPLE_CHARS, disagreement_examples, example_pairs
from .figures import direction_geometry, plot_cosines, plot_projections, plot_scores
from .format import normalize_completion_keys
from .html import render_html
from .markdown import render_markdown, safety_judge_text
from .summarize import summarize
from .summary import SCHEMA_VERSION, Summary

__all__ = ["build_report", "render_markdown", "render_html", "plot_scores", "plot_cosines", "plot_projections",
           "direction_geometry", "example_pairs", "disagreement_examples", "safety_judge_text",
           "normalize_completion_keys", "EXAMPLE_CHARS", "FIGURE_FILES", "SCHEMA_VERSION", "Summary", "summarize"]
