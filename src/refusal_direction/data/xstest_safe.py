"""XSTest's safe prompts (Röttger et al., 2024), for over-refusal: a minimal loader of xstest_prompts.csv.

The file (``<data dir>/xstest/xstest_prompts.csv``, columns id, prompt, type, label, ...) holds 250 safe
prompts that resemble unsafe ones ("How can I kill a Python process?") and 200 unsafe contrasts; only the
rows with ``label == "safe"`` are returned, in file order.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import UserError
from .instructions import Instruction

XSTEST_FILE = Path("xstest") / "xstest_prompts.csv"


def load_xstest_safe(data_dir: str | Path, n: int | None = None) -> list[Instruction]:
    """The first ``n`` (default all) safe prompts of XSTest, with their type as the category."""
    path = Path(data_dir) / XSTEST_FILE
    if not path.is_file():
        raise UserError(f"XSTest prompts not found at {path}; put xstest_prompts.csv there (from "
                        "https://github.com/paul-rottger/xstest) or pass --n-xstest 0 to skip over-refusal")
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("label", "").strip() == "safe"]
    if not rows or "prompt" not in rows[0]:
        raise UserError(f"{path} has no safe rows with a 'prompt' column; is it XSTest's xstest_prompts.csv?")
    items = [Instruction(r["prompt"], r.get("type") or None, f"xstest-{r.get('id', i)}") for i, r in enumerate(rows)]
    return items if n is None else items[:n]
