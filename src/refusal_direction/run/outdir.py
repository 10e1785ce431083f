"""The output directory before any heavy import: is it ours, may it be reused or cleared, who holds it.

- A run directory has ``config.json`` and ``run/manifest`` (every file the package wrote there).
  ``--force`` deletes only the manifest's files; anything else in the directory is kept and named in the log.
- A directory that is not a run and holds anything but ``run.log`` is refused, ``--force`` or not.
- ``run/lock`` holds the pid and host of the process using the directory; a second process is refused,
  and a lock left by a dead process on this host is taken over (with a message).

Only the standard library and `config` are imported here, so these checks answer in well under a second.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
from pathlib import Path

from ..config import RunConfig
from ..errors import UserError
from ..fileio import MANIFEST, manifest_entries, read_json, track_writes
from .layout import LOCK, RUN_LOG, RunLayout

log = logging.getLogger(__name__)


def read_saved_config(out: Path) -> dict:
    """``out``/config.json as a dict with a ``config`` object; `UserError` for a damaged file."""
    path = RunLayout(out).config
    saved = read_json(path, "run config", fix="restore it, or start a new run with another --out")
    if not isinstance(saved.get("config"), dict):
        raise UserError(f"run config {path}: has no 'config' object; restore it, or start a new run "
                        "with another --out")
    return saved


def config_mismatch(out: Path, config: RunConfig) -> str | None:
    """Why ``out`` cannot hold a run of ``config`` (it belongs to another configuration), or None."""
    if not RunLayout(out).config.is_file():
        return None
    saved = read_saved_config(Path(out))
    if saved.get("fingerprint") == config.fingerprint():
        return None
    old = saved["config"]
    diff = sorted(k for k, v in config.to_dict().items() if old.get(k) != v)
    return (f"output directory {out} belongs to a run with a different configuration (differs in: "
            f"{', '.join(diff) or 'version'}); use another --out, or --force to discard its results")


def foreign_files(out: Path) -> list[str]:
    """Files in ``out`` the package did not write (relative paths, sorted)."""
    ours = owned_files(out)
    found = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel not in ours and rel != RUN_LOG and not p.name.startswith(".tmp-"):
            found.append(rel)
    return found


def owned_files(out: Path) -> set[str]:
    """The files of ``out`` that the package wrote: its manifest's entries, the manifest and the lock."""
    return manifest_entries(out) | {MANIFEST.as_posix(), LOCK.as_posix()}


def check_out_dir(out: Path, config: RunConfig, force: bool) -> None:
    """Refuse an ``out`` that is a file, a foreign directory, or (without ``force``) another config's run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is a file; pass a directory path")
    if not out.is_dir():
        return
    if RunLayout(out).config.is_file():
        mismatch = config_mismatch(out, config)
        if mismatch is not None and not force:
            raise UserError(mismatch)
        return
    ours = {"lock", "manifest"}
    others = [p.name for p in sorted(out.iterdir()) if p.name != RUN_LOG
              and not (p.name == LOCK.parts[0] and p.is_dir() and {q.name for q in p.iterdir()} <= ours)]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise UserError(f"output directory {out} exists and is not a run directory (it holds {shown}); its files "
                        "are never deleted, even with --force. Use a new or empty --out")


def clear_outputs(out: Path) -> None:
    """Delete the files the package wrote in ``out`` (run.log and the lock kept); keep everything else."""
    ours = owned_files(out) - {LOCK.as_posix()}
    parents: set[Path] = set()
    for rel in sorted(ours):
        p = out / rel
        if p.is_file() or p.is_symlink():
            p.unlink()
            parents.update(q for q in p.parents if q != out and q.is_relative_to(out))
    for d in sorted(parents, key=lambda p: -len(p.parts)):  # only folders that held our files, once empty
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    kept = foreign_files(out)
    if kept:
        log.warning("--force kept %d file(s) in %s that the package did not write: %s", len(kept), out,
                    ", ".join(kept[:10]))


# --------------------------------------------------------------------------------------------------
# The lock

_HELD: dict[Path, int] = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(out: Path) -> None:
    """Take ``out``/run/lock for this process (re-entrant); `UserError` if a live process holds it."""
    out = Path(out).resolve()
    if out in _HELD:
        _HELD[out] += 1
        return
    path = RunLayout(out).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _check_holder(out, path, me)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _HELD[out] = 1
        track_writes(out)
        return
    raise UserError(f"could not take the lock {path}; another process keeps re-creating it. Wait for it to finish")


def _check_holder(out: Path, path: Path, me: dict) -> None:
    """Remove a stale lock (dead pid on this host, or unreadable); raise if a live process holds it."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        pid, host = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("removing an unreadable lock %s", path)
        path.unlink(missing_ok=True)
        return
    if host == me["host"] and pid == me["pid"]:
        path.unlink(missing_ok=True)
        return
    if host == me["host"] and not _alive(pid):
        log.warning("taking over the stale lock %s of process %d, which is no longer running", path, pid)
        path.unlink(missing_ok=True)
        return
    where = "on this machine" if host == me["host"] else f"on host {host}"
    raise UserError(f"run directory {out} is in use by process {pid} {where} (lock {path}); wait for it to finish "
                    "or use another --out. If that process is gone, delete the lock file")


def release_lock(out: Path) -> None:
    out = Path(out).resolve()
    if out not in _HELD:
        return
    _HELD[out] -= 1
    if _HELD[out] > 0:
        return
    del _HELD[out]
    lock = RunLayout(out).lock
    lock.unlink(missing_ok=True)
    try:
        lock.parent.rmdir()  # only if empty: a run that wrote nothing leaves only run.log
    except OSError:
        pass


def release_all_locks() -> None:
    from ..fileio import untrack_writes

    for out in list(_HELD):
        _HELD[out] = 1
        release_lock(out)
        untrack_writes(out)


atexit.register(release_all_locks)
