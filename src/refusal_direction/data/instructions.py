"""Data stage: instruction sets, the paper's seeded samples, and the pinned download of the data.

A data directory is laid out like the project's shared `datasets/` folder::

    refusal_direction/splits/{harmful,harmless}_{train,val}.json, harmless_test.json
    refusal_direction/processed/*.json
    jailbreakbench/behaviors.csv

It comes from ``--data-dir``, else ``$REFUSAL_DIRECTION_DATA``, else a user cache filled from pinned
URLs with SHA-256 checks. Sampling follows the paper's code exactly: one ``random.Random(42)`` stream
drawing harmful_train, harmless_train, harmful_val, harmless_val, then harmless_test, in that order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write_bytes, default_cache_dir, read_json, read_text

log = logging.getLogger(__name__)

_REFDIR = "https://raw.githubusercontent.com/andyrdt/refusal_direction/9d852fae1a9121c78b29142de733cb1340770cc3/dataset"
_JBB = ("https://raw.githubusercontent.com/JailbreakBench/jailbreakbench/28aa816c03c30d0d6c69befa19089dae6ec29e88/"
        "src/jailbreakbench/data/behaviors.csv")


@dataclass(frozen=True)
class DataFile:
    path: str  # relative to the data directory
    url: str
    sha256: str


MANIFEST: dict[str, DataFile] = {f.path: f for f in [
    DataFile("refusal_direction/splits/harmful_train.json", f"{_REFDIR}/splits/harmful_train.json",
             "8f5c0eac0efd2a7f99084bbe8d0de2c465e31b1997184783c917969d9de9ece1"),
    DataFile("refusal_direction/splits/harmful_val.json", f"{_REFDIR}/splits/harmful_val.json",
             "305f1d1e6dfa6c50a32d24a18ef815f42b5441eb83e6d7767d242107162fd9f4"),
    DataFile("refusal_direction/splits/harmless_train.json", f"{_REFDIR}/splits/harmless_train.json",
             "86623b1f8a25aa35df153fc97a556dbcebb6a7c881538ae43ee479ca17f2e002"),
    DataFile("refusal_direction/splits/harmless_val.json", f"{_REFDIR}/splits/harmless_val.json",
             "772010758e7d771ef4c7e5e4acdfd7598dcece1a6f383f20d382f640913a2a4d"),
    DataFile("refusal_direction/splits/harmless_test.json", f"{_REFDIR}/splits/harmless_test.json",
             "1b5930ce5e855ada758b3116ce7c4aaea9b9d05f8cdd77b385511d4c84173b19"),
    DataFile("jailbreakbench/behaviors.csv", _JBB,
             "45e9a8923b28f547bb372fbaa9af7df8b38c818a80ae50c3bab97704197ff516"),
]}

# Named sets: name -> relative path in the data directory.
NAMED_SETS: dict[str, str] = {
    "harmful_train": "refusal_direction/splits/harmful_train.json",
    "harmless_train": "refusal_direction/splits/harmless_train.json",
    "harmful_val": "refusal_direction/splits/harmful_val.json",
    "harmless_val": "refusal_direction/splits/harmless_val.json",
    "harmless_test": "refusal_direction/splits/harmless_test.json",
    "jailbreakbench": "jailbreakbench/behaviors.csv",
    "xstest_safe": "xstest/xstest_prompts.csv",  # XSTest's 250 safe prompts (over-refusal), see data.xstest
    "xstest_unsafe": "xstest/xstest_prompts.csv",  # its 200 unsafe contrast prompts
}
# XSTest's prompt file (paul-rottger/exaggerated-safety, CC BY 4.0): the ``label`` column picks the set. Downloaded
# into the cache on first use when no data directory is given (not part of MANIFEST).
XSTEST_PROMPTS = DataFile(
    "xstest/xstest_prompts.csv",
    "https://raw.githubusercontent.com/paul-rottger/exaggerated-safety/d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d/"
    "xstest_prompts.csv", "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a")
XSTEST_LABELS = {"xstest_safe": "safe", "xstest_unsafe": "unsafe"}


@dataclass(frozen=True)
class Instruction:
    text: str
    category: str | None = None
    id: str = ""

    def record(self) -> dict:
        return {"id": self.id, "instruction": self.text, "category": self.category}


# --------------------------------------------------------------------------------------------------
# Data directory


def resolve_data_dir(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The data directory: explicit, else $REFUSAL_DIRECTION_DATA, else the pinned download cache."""
    explicit = data_dir or os.environ.get("REFUSAL_DIRECTION_DATA")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            origin = "--data-dir" if data_dir else "$REFUSAL_DIRECTION_DATA"
            raise UserError(f"data directory {str(path)!r} (from {origin}) does not exist; point it at a folder laid "
                            "out like datasets/ (refusal_direction/splits/*.json, jailbreakbench/behaviors.csv)")
        return path
    cache = default_cache_dir() / "datasets"
    if download:
        ensure_downloaded(cache)
    return cache


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_downloaded(cache: Path, files: dict[str, DataFile] = MANIFEST, fetch=None) -> Path:
    """Download every manifest file missing (or corrupt) in ``cache``; verify SHA-256."""
    fetch = fetch or _fetch_url
    for rel, item in files.items():
        target = cache / rel
        if target.is_file() and sha256_file(target) == item.sha256:
            continue
        log.info("downloading %s", item.url)
        try:
            data = fetch(item.url)
        except OSError as exc:
            raise UserError(
                f"could not download {item.url} ({exc}). No data directory was given and the cache {cache} is "
                "incomplete. Pass --data-dir DIR (or set REFUSAL_DIRECTION_DATA) pointing at a local copy laid out "
                "like datasets/ (refusal_direction/splits/*.json, jailbreakbench/behaviors.csv)") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != item.sha256:
            raise UserError(f"checksum mismatch for {item.url}: expected sha256 {item.sha256}, got {digest}; the "
                            "upstream file changed or the download was corrupted. Use --data-dir with a verified copy")
        atomic_write_bytes(target, data)
    return cache


def _fetch_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 (pinned https URLs)
        return r.read()


# --------------------------------------------------------------------------------------------------
# Reading instruction files


def load_instructions(spec: str, data_dir: Path | None = None) -> list[Instruction]:
    """A named set (see NAMED_SETS) or a file: JSON (strings or records), JSONL, or CSV."""
    if spec in NAMED_SETS:
        if data_dir is None:
            raise UserError(f"named set {spec!r} needs a data directory (--data-dir)")
        path = data_dir / NAMED_SETS[spec]
        if spec in XSTEST_LABELS:
            return read_xstest_prompts(path, spec, data_dir)
        if not path.is_file():
            raise UserError(f"{spec!r}: file {path} is missing from the data directory {data_dir}")
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"instruction set {spec!r} is neither a named set ({', '.join(NAMED_SETS)}) nor an "
                            "existing file")
    items = _read_once(path)
    prefix = spec if spec in NAMED_SETS else path.stem
    return [Instruction(i.text, i.category, f"{prefix}-{n}") for n, i in enumerate(items)]


_READ: dict[tuple, tuple[Instruction, ...]] = {}  # (path, size, mtime) -> its parsed items, per process


def _read_once(path: Path) -> tuple[Instruction, ...]:
    """`read_instruction_file`, parsed once per process while the file is unchanged (preflight and the samples
    stage read the same sets)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _READ:
        _READ[key] = tuple(read_instruction_file(path))
    return _READ[key]


def read_xstest_prompts(path: Path, spec: str, data_dir: Path) -> list[Instruction]:
    """XSTest's ``safe`` or ``unsafe`` prompts (category = prompt type, id = ``<spec>-<XSTest id>``).

    When ``data_dir`` is the download cache, a missing prompt file is fetched (pinned, SHA-256 checked).
    """
    if not path.is_file() and Path(data_dir) == default_cache_dir() / "datasets":
        ensure_downloaded(Path(data_dir), {XSTEST_PROMPTS.path: XSTEST_PROMPTS})
    if not path.is_file():
        raise UserError(f"XSTest file {path} is missing; point --data-dir (or REFUSAL_DIRECTION_DATA) at a folder "
                        "with xstest/, or call data.xstest.ensure_xstest(DIR) to download the pinned files")
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
    lacking = {"id", "prompt", "type", "label"} - set(reader.fieldnames or [])
    if lacking:
        raise UserError(f"{path}: missing column(s) {sorted(lacking)} (found {reader.fieldnames}); expected "
                        "XSTest's xstest_prompts.csv")
    want = XSTEST_LABELS[spec]
    return [Instruction(r["prompt"].strip(), r["type"], f"{spec}-{r['id']}") for r in reader if r["label"] == want]


def read_instruction_file(path: Path) -> list[Instruction]:
    text = read_text(path, "instruction file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv(path, text)
    elif suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: invalid JSON line ({exc.msg})") from exc
    else:
        data = read_json(path, "instruction file", expect=list, fix="use a JSON list of strings or of records")
        rows = [(n + 1, x) for n, x in enumerate(data)]
    out = [_to_instruction(path, where, row) for where, row in rows]
    if not out:
        raise UserError(f"{path}: contains no instructions")
    return out


def _read_csv(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = {f.lower(): f for f in (reader.fieldnames or [])}
    if "instruction" not in fields and "goal" not in fields:
        raise UserError(f"{path}: CSV needs an 'instruction' or 'Goal' column (found {reader.fieldnames})")
    try:
        return [(n + 2, row) for n, row in enumerate(reader)]
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc


def _to_instruction(path: Path, where: int, row) -> Instruction:
    if isinstance(row, str):
        text, category = row, None
    elif isinstance(row, dict):
        keys = {k.lower(): k for k in row if isinstance(k, str)}
        key = keys.get("instruction") or keys.get("goal")
        if key is None:
            raise UserError(f"{path}: record {where} has no 'instruction' or 'goal' field (keys: {sorted(row)})")
        text = row[key]
        cat_key = keys.get("category")
        category = row[cat_key] if cat_key and row[cat_key] not in ("", None) else None
    else:
        raise UserError(f"{path}: record {where} is a {type(row).__name__}; expected a string or a record")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{path}: record {where} has an empty or non-string instruction ({text!r})")
    return Instruction(text.strip(), category)


# --------------------------------------------------------------------------------------------------
# The paper's samples


@dataclass(frozen=True)
class Samples:
    harmful_train: list[Instruction]
    harmless_train: list[Instruction]
    harmful_val: list[Instruction]
    harmless_val: list[Instruction]
    eval: list[Instruction]  # the harmful evaluation set (JailbreakBench)
    harmless_eval: list[Instruction]  # harmless test instructions (for activation addition)
    dropped_duplicates: list[str]

    def as_dict(self) -> dict[str, list[dict]]:
        return {k: [i.record() for i in getattr(self, k)] for k in
                ("harmful_train", "harmless_train", "harmful_val", "harmless_val", "eval", "harmless_eval")}


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _take(rng: random.Random, pool: list[Instruction], n: int, what: str) -> list[Instruction]:
    if n > len(pool):
        raise UserError(f"{what}: {n} instructions requested but the set has only {len(pool)}; "
                        f"lower the count or use a larger set")
    return rng.sample(pool, n)


def sample_sets(
    data_dir: Path | None,
    harmful_train: str = "harmful_train",
    harmless_train: str = "harmless_train",
    eval_set: str = "jailbreakbench",
    n_train: int = 128,
    n_val: int = 32,
    n_eval: int | None = 100,
    n_harmless_eval: int = 100,
    harmful_val: str = "harmful_val",
    harmless_val: str = "harmless_val",
    harmless_eval: str = "harmless_test",
    seed: int = 42,
    drop_duplicates: bool = True,
) -> Samples:
    """Draw the run's samples in the paper's order from one seeded stream.

    Train items that duplicate an evaluation item (case/whitespace-insensitive) are dropped by
    default and replaced by further draws from the same pool, so the counts stay as requested.
    """
    rng = random.Random(seed)
    evaluation = load_instructions(eval_set, data_dir)
    if n_eval is not None:
        if n_eval > len(evaluation):
            raise UserError(f"n_eval={n_eval} but the evaluation set {eval_set!r} has only {len(evaluation)} items")
        evaluation = evaluation[:n_eval]
    eval_keys = {normalize(i.text) for i in evaluation}

    def draw(spec: str, n: int) -> tuple[list[Instruction], list[str]]:
        pool = load_instructions(spec, data_dir)
        chosen = _take(rng, pool, n, spec)
        dupes = [i.text for i in chosen if normalize(i.text) in eval_keys]
        if dupes:
            log.warning("%s: %d sampled item(s) duplicate an evaluation item%s: %s", spec, len(dupes),
                        " (dropped and replaced)" if drop_duplicates else "", dupes)
        if dupes and drop_duplicates:
            kept = [i for i in chosen if normalize(i.text) not in eval_keys]
            used = {id(i) for i in chosen}
            rest = [i for i in pool if id(i) not in used and normalize(i.text) not in eval_keys]
            extra = random.Random(seed + 1).sample(rest, min(len(dupes), len(rest)))
            chosen = kept + extra
        return chosen, dupes

    h_train, d1 = draw(harmful_train, n_train)
    hl_train, d2 = draw(harmless_train, n_train)
    h_val, d3 = draw(harmful_val, n_val)
    hl_val, d4 = draw(harmless_val, n_val)
    hl_eval = _take(rng, load_instructions(harmless_eval, data_dir), n_harmless_eval, harmless_eval)
    return Samples(h_train, hl_train, h_val, hl_val, evaluation, hl_eval, d1 + d2 + d3 + d4)


def hash_instructions(items: list[Instruction]) -> str:
    """SHA-256 of the instruction texts in order (identifies the exact sample in provenance)."""
    h = hashlib.sha256()
    for i in items:
        h.update(i.text.encode("utf-8") + b"\x00")
    return h.hexdigest()[:16]
