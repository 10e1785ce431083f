"""The report as one self-contained HTML page: A4 print layout, figures inlined as base64 PNGs at print size.

`render_html` turns the report's Markdown into HTML (markdown-it, installed with rich) and replaces each
image reference with a data URI sized to its own DPI, so figure text prints at its designed point size.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from .figures import FIG_DPI

PRINT_WIDTH_IN = 7.17  # A4 text width with 14 mm margins

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
        width = print_width_in(data)
        style = f' style="width: {width:.2f}in"' if width else ""
        return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" alt="{alt}"{style} />'

    body = _IMG.sub(inline, body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}'
            f"</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def print_width_in(png: bytes) -> float | None:
    """Width in inches at the PNG's own DPI, so figure text prints at its designed point size."""
    size = png_size_in(png)
    return size[0] if size else None


def print_height_in(png: bytes) -> float | None:
    """Printed height in inches once the width is capped at the A4 text width."""
    size = png_size_in(png)
    return size[1] * min(1.0, PRINT_WIDTH_IN / size[0]) if size else None


def png_size_in(png: bytes) -> tuple[float, float] | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as im:
            dpi = float(im.info.get("dpi", (FIG_DPI, FIG_DPI))[0] or FIG_DPI)
            return im.width / dpi, im.height / dpi
    except Exception:  # an unreadable image still gets embedded, at its natural size
        return None
