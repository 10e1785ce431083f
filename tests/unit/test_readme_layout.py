"""The README's "Layout" tree lists every source file of the package under its own folder, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "refusal_direction"


def layout_block(readme: str) -> list[str]:
    section = readme.split("\n## Layout\n", 1)[1]
    return [line for line in section.split("```", 2)[1].splitlines() if line.strip()]


def listed_files(lines: list[str]) -> dict[str, set[str]]:
    """{folder relative to the package ("" for its root): names listed there (files, and sub-folders as 'x/')}."""
    listed: dict[str, set[str]] = {}
    folder = ""
    for line in lines[1:]:  # the first line names the package itself
        m = re.match(r"^  (\w+)/\s", line)
        if m:
            folder = m.group(1)
        elif re.match(r"^  \w+\.py", line):
            folder = ""
        names = set(re.findall(r"\b(\w+\.py)\b", line)) | set(re.findall(r"\b(\w+/)(?=\s|$)", line))
        listed.setdefault(folder, set()).update(n for n in names if n != f"{folder}/")
    return listed


def actual_files() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        name = rel.parts[1] + "/" if len(rel.parts) > 2 else rel.name  # a sub-folder is listed by its name
        if folder and name == "__init__.py":
            continue  # a folder's __init__ goes without saying (it may still be listed, when it holds code)
        out.setdefault(folder, set()).add(name)
    return out


def test_readme_layout_lists_every_source_file():
    listed = listed_files(layout_block((ROOT / "README.md").read_text()))
    actual = actual_files()
    assert len(actual) >= 10, f"the package is not at {PACKAGE}"
    missing = {f: sorted(n - listed.get(f, set())) for f, n in actual.items() if n - listed.get(f, set())}
    exists = {f: actual.get(f, set()) | {"__init__.py"} for f in listed if (PACKAGE / f).is_dir()}
    extra = {f: sorted(n - exists.get(f, set())) for f, n in listed.items() if n - exists.get(f, set())}
    assert not missing, f"add to the README's Layout: {missing}"
    assert not extra, f"the README's Layout names files that do not exist: {extra}"


def test_the_parser_sees_a_missing_file():
    lines = ["src/refusal_direction/", "  core/  model.py   loading", "              padding.py", "  cli.py  the CLI"]
    assert listed_files(lines) == {"core": {"model.py", "padding.py"}, "": {"cli.py"}}
