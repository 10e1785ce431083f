"""Atomic file writes and checked reads: every file on disk is complete or absent, and valid JSON.

Writes go to a temporary file in the same directory, are flushed and fsync'ed, then moved into place
with `os.replace` (atomic on POSIX). A process killed mid-write leaves at most a `.tmp-*` file, which
readers never trust. JSON is written with ``allow_nan=False``: a NaN or infinity anywhere raises a
`UserError` naming the file and the key, instead of writing ``NaN`` (which is not JSON).

A run directory registers itself with `track_writes`; every file written under it is then appended to
its manifest (``run/manifest``), the list of files the package may later delete (``--force``).
Reads of JSON/JSONL files raise a `UserError` naming the file, what is wrong and the fix.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)

MANIFEST = Path("run") / "manifest"  # relative to a run directory: one relative path per line
_TRACKED: set[Path] = set()  # run directories whose writes are recorded in their manifest


def track_writes(run_dir: str | os.PathLike) -> None:
    """Record every later write under ``run_dir`` in its manifest."""
    _TRACKED.add(Path(run_dir).resolve())


def untrack_writes(run_dir: str | os.PathLike) -> None:
    _TRACKED.discard(Path(run_dir).resolve())


def record_in_manifest(run_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Append ``path`` (a file under ``run_dir``) to the run's manifest, once."""
    run_dir = Path(run_dir).resolve()
    rel = Path(path).resolve().relative_to(run_dir).as_posix()
    if rel == MANIFEST.as_posix():
        return
    manifest = run_dir / MANIFEST
    if rel in manifest_entries(run_dir):
        return
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "a", encoding="utf-8") as f:
        f.write(rel + "\n")


def manifest_entries(run_dir: str | os.PathLike) -> set[str]:
    """The relative paths the package wrote in ``run_dir`` (empty if it has no manifest). A line that names a path
    outside ``run_dir`` (absolute, with ``..``, or through a link that leads out) is not one the package wrote
    there — a damaged or edited manifest — and is left out, so `--force` can never delete it."""
    manifest = Path(run_dir) / MANIFEST
    if not manifest.is_file():
        return set()
    text = manifest.read_bytes().decode("utf-8", errors="replace")
    root = Path(run_dir).resolve()
    return {rel for rel in (line.strip() for line in text.splitlines()) if rel and _inside(root, rel)}


def _inside(root: Path, rel: str) -> bool:
    """``rel`` is a relative path that stays inside the directory ``root`` (resolved, links followed)."""
    path = Path(rel)
    if path.is_absolute() or ".." in path.parts:
        return False
    try:
        return (root / path).resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop
        return False


def record_write(path: str | os.PathLike) -> None:
    """Record a file written without this module's writers (e.g. appended to) in its run's manifest, if tracked."""
    _record(Path(path))


def _record(path: Path) -> None:
    if not _TRACKED:
        return
    resolved = path.resolve()
    for run_dir in _TRACKED:
        if resolved.is_relative_to(run_dir):
            record_in_manifest(run_dir, resolved)
            return


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _record(path)  # listed before it exists: a crash never leaves a file of ours unlisted
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def non_finite_key(obj: Any, where: str = "") -> str | None:
    """The key path (``a.b[3]``) of the first NaN or infinity in ``obj``, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "(top level)")
    if isinstance(obj, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for key, value in items:
        found = non_finite_key(value, key)
        if found is not None:
            return found
    return None


def _dumps(path: Path, obj: Any, **kw) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, **kw)
    except ValueError as exc:
        key = non_finite_key(obj)
        if key is None:
            raise
        raise UserError(f"{path}: refusing to write {key} = {_find(obj, key)!r}: a non-finite number reached the "
                        "results (an infinite or NaN config value, a zero direction, or float16 overflow). Check "
                        "the config values, or re-run with --dtype float32") from exc


def _find(obj: Any, key: str) -> Any:
    import re

    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        obj = obj[int(part[1:-1])] if part.startswith("[") else obj[part if isinstance(obj, dict) else int(part)]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, _dumps(Path(path), obj, indent=2) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    lines = "".join(_dumps(Path(path), r) + "\n" for r in records)
    return atomic_write_text(path, lines)


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file; a `UserError` naming the file for non-UTF-8 or unreadable content."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") \
            from exc
    except IsADirectoryError as exc:
        raise UserError(f"{what} {path} is a directory; pass a file") from exc
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror}); check the path and its permissions") \
            from exc


def read_json(path: str | os.PathLike, what: str = "file", expect: type | None = dict,
              fix: str = "delete it to recompute, or restore it") -> Any:
    """A JSON file whose top level is ``expect`` (dict by default); `UserError` otherwise."""
    path = Path(path)
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path}:{exc.lineno}: invalid JSON ({exc.msg}); {fix}") from exc
    if expect is not None and not isinstance(data, expect):
        raise UserError(f"{what} {path}: expected a JSON {'object' if expect is dict else expect.__name__}, got "
                        f"{type(data).__name__}; {fix}")
    return data


def read_jsonl(path: str | os.PathLike, what: str = "file", fix: str = "delete it to recompute") -> list[dict]:
    """A JSONL file of objects; `UserError` naming the file and line otherwise."""
    path = Path(path)
    out = []
    for lineno, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{what} {path}:{lineno}: invalid JSON line ({exc.msg}); {fix}") from exc
        if not isinstance(row, dict):
            raise UserError(f"{what} {path}:{lineno}: expected a JSON object, got {type(row).__name__}; {fix}")
        out.append(row)
    return out


def default_cache_dir() -> Path:
    """The cache root: ``$REFUSAL_DIRECTION_CACHE`` if set (``~`` expanded), else ``~/.cache/refusal_direction``."""
    env = os.environ.get("REFUSAL_DIRECTION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refusal_direction"
