"""The files around an exported model's weights: the staged output directory, the provenance JSON and the README.

One for every export: the in-memory one of any edit (`save.export_edit`) and the streaming one of the DiM edit
(`stream.export_streaming`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch

from ..core.directions import Direction
from ..edits import Edit
from ..edits.weights import EditedWeights
from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_text

EXPORT_INFO = "refusal_direction_export.json"
log = logging.getLogger(__name__)


@contextlib.contextmanager
def staged_export(out_dir: Path) -> Iterator[Path]:
    """A fresh ``out_dir.tmp-*`` to write the export into, renamed to ``out_dir`` on success, removed on error."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_card(directory: Path, info: dict) -> None:
    """The README and the provenance JSON of an export, written last: the JSON lists every file of the export
    (``files``), so a later ``--force`` replaces those and keeps anything else a user put there."""
    atomic_write_text(directory / "README.md", _readme(info))
    files = sorted({p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} | {EXPORT_INFO})
    atomic_write_json(directory / EXPORT_INFO, {**info, "files": files})


def user_files(out_dir: Path) -> list[Path]:
    """The files of a previous export in ``out_dir`` that the export did not write (its ``files`` list)."""
    written = set(json.loads((out_dir / EXPORT_INFO).read_text()).get("files") or ())
    return [p for p in sorted(out_dir.rglob("*")) if p.is_file() and p.relative_to(out_dir).as_posix() not in written]


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory; choose a new directory name")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / EXPORT_INFO).is_file():
            raise UserError(f"--out {out_dir} is not empty and is not a previous export; choose a new or empty "
                            "directory (it is never overwritten, even with --force)")
        if not force:
            raise UserError(f"--out {out_dir} already holds an export; pass --force to replace it or choose a "
                            "new directory")
        if "files" not in _previous_info(out_dir):
            raise UserError(f"--out {out_dir} holds an export that does not list its own files, so --force cannot tell "
                            "them from yours; move what you keep there and remove it, or choose a new directory")


def _previous_info(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / EXPORT_INFO).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{out_dir / EXPORT_INFO} cannot be read ({exc}); --force cannot tell the export's files "
                        "from yours: move what you keep and remove the directory, or choose a new one") from None


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """``tmp`` becomes ``out_dir``; a previous export there is replaced, the user's files in it move over."""
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            _keep_user_files(out_dir, tmp)
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _keep_user_files(old: Path, new: Path) -> None:
    """Move the files of the export ``old`` that it did not write into ``new`` at the same place (a name the new
    export uses itself gets ``.kept``)."""
    for p in user_files(old):
        rel = p.relative_to(old)
        target = new / rel
        if target.exists():
            target = target.with_name(target.name + ".kept")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
        log.info("export: kept %s (not written by the previous export)", rel)


def provenance(model_id: str, revision: str | None, source_format: str, saved_dtype: str, edit: Edit,
               edited: EditedWeights, run_info: dict, direction: Direction | None = None) -> dict:
    """The export's provenance record (written as EXPORT_INFO and summarized in the README): the method, its
    parameters (``edit.describe()``), the direction it was made from when there is one, what was changed."""
    from .. import __version__

    info = {
        "tool": "refusal-direction",
        "tool_version": __version__,
        "purpose": "safety research and evaluation only; not for deployment or upload",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_model": model_id,
        "source_revision": revision,
        "source_format": source_format,
        "saved_dtype": saved_dtype,
        "method": edit.method,
        "name": edit.name,
        "edit": edit.describe(),
    }
    if direction is not None:
        vec = direction.vector.double().cpu().contiguous()
        info["direction"] = {"layer": direction.layer, "position": direction.position, "norm": float(vec.norm()),
                             "d_model": int(vec.shape[-1]), "model_id": direction.model_id,
                             "sha256_float64": direction_digest(direction)}
    return info | {"untied_lm_head": edited.untied, "edited_parameters": list(edited.names), "run": run_info,
                   "what_changed": _what_changed(edit)}


def _what_changed(edit: Edit) -> str:
    """The edit's method as its own file documents it (the module docstring's first paragraph)."""
    doc = sys.modules[type(edit).__module__].__doc__ or type(edit).__doc__ or edit.method
    return " ".join(doc.strip().split("\n\n")[0].split())


def direction_digest(direction: Direction | torch.Tensor) -> str:
    """sha256 of the direction's float64 bytes (recorded in the export, to match it to a run later)."""
    vector = direction.vector if isinstance(direction, Direction) else direction
    return hashlib.sha256(vector.double().cpu().contiguous().numpy().tobytes()).hexdigest()


def _direction_rows(info: dict) -> str:
    d = info.get("direction")
    if not d:
        return ""
    return (f"| direction layer (block input) | {d['layer']} |\n"
            f"| direction position | {d['position']} (counted from the end of the prompt) |\n"
            f"| direction norm ‖r‖ | {d['norm']:.6g} |\n"
            f"| direction sha256 (float64 bytes) | `{d['sha256_float64']}` |\n")


def _readme(info: dict) -> str:
    run_dir = info["run"].get("run_dir", "(not recorded)")
    gguf_note = ("\nThe source was a GGUF file; this export is a standard transformers safetensors directory with "
                 f"dequantized `{info['saved_dtype']}` weights, not a GGUF file.\n"
                 if info["source_format"].startswith("gguf") else "")
    untie_note = ("The source model ties `lm_head` to the token embedding; here `lm_head` is a separate, unedited "
                  "copy and `tie_word_embeddings` is false, so that the edit matches the hook-based edit.\n"
                  if info["untied_lm_head"] else "")
    return f"""# {info['source_model']}, method `{info['method']}` baked into the weights (research artifact)

**For safety research and evaluation only. Not for deployment, not for upload to any model hub.**
This model was made by `refusal-direction` {info['tool_version']}, a tool replicating and extending Arditi et al.
(2024), "Refusal in Language Models Is Mediated by a Single Direction". Its refusal behaviour has been removed
on purpose so that this effect can be studied; it will comply with harmful requests. Keep it private.

## What was changed

{info['what_changed']}

Only the parameters listed under `edited_parameters` in `{EXPORT_INFO}` were changed, each the weight form of
the edit, which is equivalent to running the source model with the edit's hooks.

{untie_note}{gguf_note}
| | |
|---|---|
| source model | `{info['source_model']}` (revision: {info['source_revision'] or 'not recorded'}) |
| method | `{info['method']}` (`{info['name']}`; parameters in `{EXPORT_INFO}`, key `edit`) |
{_direction_rows(info)}| source run directory | `{run_dir}` |
| weights dtype | {info['saved_dtype']} |
| created (UTC) | {info['created_utc']} |

Machine-readable provenance: `{EXPORT_INFO}`.

## Loading

Plain transformers, no code from refusal-direction needed:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")
```

Check the export against the hooks with `refusal-direction verify-export --run RUN --model-dir DIR`
(`--method {info['method']}` for a method other than `dim`).
"""
