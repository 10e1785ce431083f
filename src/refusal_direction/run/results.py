"""The typed results of the Python API under the commands (`pipeline.replicate`, `export.export_run`,
`export.verify_export`; `reselect.select` returns `selection.SelectionResult`): frozen values the CLI only
formats."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import RunConfig
from ..report.summary import Summary
from .layout import RunLayout


@dataclass(frozen=True)
class ReplicateResult:
    """A finished replication: the run directory, its config and its typed summary (summary.json)."""

    out: Path
    config: RunConfig
    summary: Summary

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.out)


@dataclass(frozen=True)
class ExportResult:
    """An exported model directory: where, which edit (``dim`` or a method's), whether shard by shard."""

    out: Path
    method: str
    streaming: bool


@dataclass(frozen=True)
class VerifyExportResult:
    """Hooked original vs exported model. ``record``: the check's JSON record (``max_abs_logit_diff``,
    ``agreement``, ``ok``, and where measured ``n_identical``, ``max_abs_projection``, ``method``)."""

    model_dir: Path
    method: str
    tol: float
    n_prompts: int
    max_new_tokens: int
    record: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.record["ok"])
