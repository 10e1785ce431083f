"""The package's shape, checked: one-way imports between its layers, no cycles, short files and functions.

Layers, lowest first (a module imports only from lower layers or its own package):

    errors -> fileio -> config  ->  data, core  ->  edits  ->  accel  ->  generation  ->  evaluation  ->  selection
    ->  export  ->  report  ->  run  ->  bench  ->  cli  ->  __main__

(data and core are peers: neither imports the other.)

Every import counts, including the ones inside functions (they are dependencies too, only later).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "refusal_direction"  # tests/unit/ -> repository root
LAYERS = [("errors",), ("fileio",), ("config",), ("data", "core"), ("edits",), ("accel",), ("generation",),
          ("evaluation",), ("selection",), ("export",), ("search",), ("report",), ("run",), ("bench",), ("cli",),
          ("__main__",)]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}
MAX_LINES = 400
MIN_FILES = 30  # fewer: the checker is looking at the wrong folder
MAX_STATEMENTS = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["refusal_direction", *parts])


def imported_modules(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, as dotted names (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("refusal_direction"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("refusal_direction"):
                target = node.module
            else:
                continue
            # `from pkg import submodule` imports the submodule; `from pkg import name` the package itself
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                out.add(candidate if _exists(candidate) else target)
    return out


def _exists(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def unit_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root (`__version__`)


def source_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert (PACKAGE / "__init__.py").is_file() and len(files) >= MIN_FILES, f"the package is not at {PACKAGE}"
    return files


def test_the_package_is_where_the_checks_look():
    """Every check below walks source_files(); an empty list (a moved package) would pass them all."""
    assert (PACKAGE / "__init__.py").is_file(), PACKAGE
    assert len(source_files()) >= 30, source_files()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in source_files()}


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in source_files()} - {None}
    assert units <= set(RANK), f"add {sorted(units - set(RANK))} to LAYERS (and to the README's Layout)"


def test_imports_only_go_down():
    upward = []
    for path in source_files():
        src = module_name(path)
        src_unit = unit_of(src)
        if src_unit is None:
            continue  # the root __init__ is the lazy public API over everything
        for target in imported_modules(path):
            t_unit = unit_of(target)
            if t_unit is None or t_unit == src_unit:
                continue
            if RANK[t_unit] >= RANK[src_unit]:
                upward.append(f"{src} imports {target} ({src_unit} is layer {RANK[src_unit]}, "
                              f"{t_unit} layer {RANK[t_unit]})")
    assert not upward, "\n".join(upward)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    edges = graph()
    # a package's __init__ re-exporting its own modules is not a cycle of the code: drop package -> own child
    for name, targets in edges.items():
        edges[name] = {t for t in targets if not t.startswith(name + ".")}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_checker_sees_upward_and_lazy_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "refusal_direction"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "run").mkdir()
    (pkg / "run" / "__init__.py").write_text("")
    (pkg / "run" / "pipeline.py").write_text("")
    (pkg / "core" / "model.py").write_text("def f():\n    from ..run import pipeline\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "MIN_FILES", 1)
    assert imported_modules(pkg / "core" / "model.py") == {"refusal_direction.run.pipeline"}
    with pytest.raises(AssertionError, match="core.model imports refusal_direction.run"):
        test_imports_only_go_down()


def test_no_source_file_is_longer_than_the_limit():
    long = {str(p.relative_to(PACKAGE)): n for p in source_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def statements(fn: ast.AST) -> int:
    """Statements in a function's body, nested functions and classes not counted (they are checked alone)."""
    count = 0
    todo = list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.stmt):
            count += 1
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return count


def test_no_function_has_more_statements_than_the_limit():
    long = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (n := statements(node)) > MAX_STATEMENTS:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n} statements)")
    assert not long, f"functions over {MAX_STATEMENTS} statements:\n" + "\n".join(long)


def test_statement_count():
    fn = ast.parse("def f(x):\n    if x:\n        y = 1\n        return y\n    def g():\n        a = 1\n        b = 2\n"
                   "    return 0\n").body[0]
    assert statements(fn) == 5  # if, y =, return y, def g, return 0 (g's body is g's)


# --- the edits' home: one class per method, dispatched by its own forms, never by its type ----------------------

# the edit forms' names distinctive enough to mean an edit (``hooks``/``describe`` are also accelerate's, rich's, ...)
EDIT_FORM_METHODS = {"projection", "stack", "row_form", "weights_", "from_run", "from_params", "register_hooks",
                     "projection_form", "stack_hooks"}


def edit_class_names() -> set[str]:
    from refusal_direction.edits import registry

    names = set()
    for cls in registry().values():
        names.update(c.__name__ for c in cls.__mro__ if c.__module__.startswith("refusal_direction.edits.methods"))
    return names


def edit_dispatch(path: Path, classes: set[str]) -> list[str]:
    """``isinstance``/``issubclass``/``type(x) is`` on an edit class, and ``hasattr``/``getattr`` on an edit form, in
    ``path`` (file:line and the code)."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        names: set[str] = set()
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("isinstance", "issubclass") and len(node.args) == 2:
                names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "") for n in ast.walk(node.args[1])}
                names &= classes
            elif (node.func.id in ("hasattr", "getattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant)):
                names = {node.args[1].value} & EDIT_FORM_METHODS
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot, ast.Eq)) for op in node.ops):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Call) and isinstance(s.func, ast.Name) and s.func.id == "type" for s in sides):
                names = {s.id for s in sides if isinstance(s, ast.Name)} & classes
        if names:
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_edit_class_dispatch_outside_edits():
    classes = edit_class_names()
    assert {"DirectionalAblation", "SubspaceAblation", "Baseline"} <= classes, classes
    found = [hit for p in source_files() if "edits" not in p.relative_to(PACKAGE).parts
             for hit in edit_dispatch(p, classes)]
    assert not found, "dispatch on edit classes outside edits/ (give the edit a form instead):\n" + "\n".join(found)


def test_the_dispatch_checker_sees_planted_dispatch(tmp_path, monkeypatch):
    pkg = tmp_path / "refusal_direction"
    pkg.mkdir()
    bad = pkg / "bad.py"
    bad.write_text("def f(iv):\n    if isinstance(iv, (SubspaceAblation, int)):\n        return 1\n"
                   "    if type(iv) is DirectionalAblation:\n        return 2\n"
                   "    return hasattr(iv, 'projection_form') or isinstance(iv, Edit)\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    hits = edit_dispatch(bad, {"SubspaceAblation", "DirectionalAblation"})
    assert [h.split()[0] for h in hits] == ["bad.py:2", "bad.py:4", "bad.py:6"], hits


def test_every_registered_edit_has_each_form_or_a_reason():
    from refusal_direction.edits import FORMS, has_form, registry

    missing = [f"{name}: {form}" for name, cls in registry().items() for form in FORMS
               if not has_form(cls, form) and not cls.reasons.get(form)]
    assert not missing, "forms neither implemented nor given a reason in `reasons`:\n" + "\n".join(missing)
    stated = [f"{name}: {form}" for name, cls in registry().items() for form in cls.reasons
              if form not in FORMS or (has_form(cls, form) and form != "lora")]
    assert not stated, "a reason for a form the edit has, or for no known form:\n" + "\n".join(stated)


def test_has_form_tells_implemented_from_inherited():
    from refusal_direction.edits import AffineAddition, DirectionalAblation, NormPreservingAblation, has_form

    assert has_form(DirectionalAblation, "weights") and has_form(DirectionalAblation, "stacked")
    assert not has_form(AffineAddition, "weights") and not has_form(AffineAddition, "stacked")
    assert has_form(NormPreservingAblation, "stacked") and not has_form(NormPreservingAblation, "lora")


def test_the_accel_boundary_holds():
    """Outside `accel`, code imports the package (`refusal_direction.accel`), never one of its modules."""
    crossing = [f"{module_name(p)} imports {t}" for p in source_files() if unit_of(module_name(p)) != "accel"
                for t in imported_modules(p) if t.startswith("refusal_direction.accel.")]
    assert not crossing, "\n".join(crossing)
