"""Rows of the fast path kept as its batches finish, so that a killed run resumes after the last finished batch.

The fast path decodes every evaluation set of a run in one batch, split only where memory asks for it
(`fast_generation.prompts_per_chunk`); the completion files are written when all of it is done. For a large model
that is minutes of work per batch; `PartialResults` keeps each finished batch's rows in a JSONL file, one line per
row (a prompt under one condition): its key, the new token ids and whether a stop token ended them. A resumed run
decodes only the units (a prompt and the conditions it is decoded under) with a row missing.

The key digests everything that decides the tokens: the prompt's ids, the condition's name, type and tensors
(`intervention_digest`), the new-token budget, the stop ids, forced or not, the model's id and dtype and the decode
step. Lines of other keys are ignored (a changed direction or budget starts afresh); damaged lines and a torn last
line (a kill while writing) are dropped when the file is read. The file is recorded in the run's manifest. In
bfloat16 a resumed unit may be batched with other rows than in an uninterrupted run, which can move a token where
two logits tie within rounding (as any change of batch shape can).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from ..fileio import atomic_write_bytes, record_write

log = logging.getLogger(__name__)

UnitResult = dict[str, tuple[list[int], bool]]  # condition digest -> (new ids, stopped)


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu", torch.float64).contiguous()
    return hashlib.sha256(repr(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()[:16]


def _value_digest(value) -> str:
    """Tensors by their values, containers element by element (a repr would truncate tensors), the rest by repr."""
    if isinstance(value, torch.Tensor):
        return _tensor_digest(value)
    if isinstance(value, (list, tuple)):
        return type(value).__name__ + "(" + ",".join(_value_digest(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{_value_digest(v)}" for k, v in sorted(value.items(), key=repr)) + "}"
    return repr(value)


def intervention_digest(intervention) -> str:
    """A short digest of an intervention's type, name and fields (tensors by their float64 values)."""
    parts = [type(intervention).__module__, type(intervention).__qualname__]
    fields = dataclasses.fields(intervention) if dataclasses.is_dataclass(intervention) else ()
    for f in fields:
        parts.append(f"{f.name}={_value_digest(getattr(intervention, f.name))}")
    if not fields:
        parts.append(repr(intervention))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def unit_key(model: str, prompt: Sequence[int], conditions: Sequence[str], max_new_tokens: int,
             stop: Sequence[int], force_tokens: bool) -> str:
    """The key of one unit: ``model`` (id and dtype), its prompt ids and condition digests, the decode settings."""
    text = json.dumps([model, list(prompt), list(conditions), max_new_tokens, sorted(set(stop)), force_tokens])
    return hashlib.sha256(text.encode()).hexdigest()


class PartialResults:
    """A JSONL file of finished units (see the module doc): `get` a unit by its key, `put` a batch's units."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, UnitResult] = {}
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        good = []
        for n, line in enumerate(lines):
            try:
                rec = json.loads(line)
                self.rows[rec["key"]] = {c: (list(v[0]), bool(v[1])) for c, v in rec["conditions"].items()}
                good.append(line)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                if n != len(lines) - 1:
                    log.warning("%s: line %d is damaged; its unit will be decoded again", self.path, n + 1)
        if len(good) < len(lines):  # drop damaged and torn lines, so that they are reported once
            atomic_write_bytes(self.path, "".join(x + "\n" for x in good).encode())
        if self.rows:
            log.info("%s: %d finished units from an earlier run", self.path, len(self.rows))

    def get(self, key: str) -> UnitResult | None:
        return self.rows.get(key)

    def put(self, units: Sequence[tuple[str, UnitResult]]) -> None:
        """Append ``units`` (key, result) and make them durable before returning."""
        if not units:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"key": key, "conditions": {c: [ids, stopped] for c, (ids, stopped) in res.items()}})
                       + "\n" for key, res in units)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        record_write(self.path)  # a run's own file: `--force` may delete it
        self.rows.update(units)

    def remove(self) -> None:
        """Delete the file (its units are in the completion files now)."""
        self.path.unlink(missing_ok=True)
        self.rows.clear()


__all__ = ["PartialResults", "UnitResult", "intervention_digest", "unit_key"]
