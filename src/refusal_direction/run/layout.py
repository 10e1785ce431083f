"""The run directory's layout, named once (README, "Run directory"): every file and folder of a run.

`RunLayout` is a path value with no behaviour; `Run.layout` is the run's, and the output-directory checks of
`outdir` (which run before any heavy import) use it on a bare path. Nothing else joins paths under a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..fileio import MANIFEST

RUN_LOG = "run.log"
LOCK = Path("run") / "lock"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory ``root``."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # the run's record of itself
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def run_log(self) -> Path:
        return self.root / RUN_LOG

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    # samples, extraction, direction
    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def samples(self) -> Path:
        return self.samples_dir / "samples.json"

    @property
    def xstest_samples(self) -> Path:
        return self.samples_dir / "xstest.json"

    @property
    def directions_dir(self) -> Path:
        return self.root / "directions"

    def directions_file(self, name: str) -> Path:
        """``candidates``, ``mean_harmful`` or ``mean_harmless`` (.safetensors, with a .json sidecar)."""
        return self.directions_dir / f"{name}.safetensors"

    @property
    def candidates(self) -> Path:
        return self.directions_file("candidates")

    @property
    def direction(self) -> Path:
        return self.root / "direction.safetensors"

    @property
    def direction_meta(self) -> Path:
        return self.direction.with_suffix(".json")

    @property
    def selection(self) -> Path:
        return self.root / "selection.json"

    # generation and scores
    @property
    def completions_dir(self) -> Path:
        return self.root / "completions"

    def completions(self, dataset: str, intervention: str) -> Path:
        return self.completions_dir / f"{dataset}__{intervention}.jsonl"

    @property
    def generate_partial(self) -> Path:
        """The fast path's finished batches while the generate stage runs (`accel.partial`)."""
        return self.root / "generate_partial.jsonl"

    @property
    def safety_status(self) -> Path:
        return self.root / "safety_status.json"

    @property
    def capability(self) -> Path:
        return self.root / "capability.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    # the report
    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    def figure(self, name: str) -> Path:
        return self.figures_dir / f"{name}.png"

    # compare (run.compare)
    @property
    def compare_dir(self) -> Path:
        return self.root / "compare"

    def compare_method(self, method: str) -> Path:
        return self.compare_dir / "methods" / f"{method}.json"

    @property
    def compare_harmless_baseline(self) -> Path:
        return self.compare_dir / "harmless_baseline.jsonl"

    @property
    def compare_cosmic(self) -> Path:
        return self.compare_dir / "cosmic.json"

    @property
    def compare_report(self) -> Path:
        return self.compare_dir / "report.md"

    # optimize (run.optimize)
    @property
    def optimize_dir(self) -> Path:
        return self.root / "optimize"

    @property
    def optimize_study(self) -> Path:
        return self.optimize_dir / "study.journal"

    @property
    def optimize_summary(self) -> Path:
        return self.optimize_dir / "summary.json"

    def optimize_front(self, suffix: str = "json") -> Path:
        """The Pareto front: ``json``, ``md`` or ``png``."""
        return self.optimize_dir / f"front.{suffix}"

    def optimize_final(self, suffix: str = "json") -> Path:
        """The final evaluation of the chosen edit beside DiM: ``json`` or ``md``."""
        return self.optimize_dir / f"final.{suffix}"

    @property
    def optimize_export(self) -> Path:
        return self.optimize_dir / "export"

    @property
    def optimize_export_record(self) -> Path:
        return self.optimize_dir / "export.json"

    @property
    def optimize_lora(self) -> Path:
        return self.optimize_dir / "lora"
