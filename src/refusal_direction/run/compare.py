"""Stage compare: every method on one model with the same prompts, judge and statistics.

In the run directory (samples, extraction and the direction are the run's own, made or reused as in
`replicate`)::

    compare/harmless_baseline.jsonl   the baseline's greedy completions of the harmless prompts (for CE)
    compare/methods/<method>.json     per method: its parameters, JailbreakBench and XSTest-safe completions
                                      with refusal verdicts, per-prompt next-token KL, per-prompt CE sums
    compare/cosmic.json               COSMIC's scores and choice
    compare/table.json, table.md      the table (report.compare); pareto.png; examples.md; report.md

A method whose file exists is skipped (resume); the missing ones share one `generate_all` call, so on CUDA
all their rows decode in one batch. The refusal judge is the paper's substring match (`is_refusal`), the same
for every row; KL and CE are measured on the run's harmless evaluation prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import RunConfig
from ..core.batching import run_batched
from ..data.instructions import resolve_data_dir
from ..data.xstest import first_prompts
from ..edits import Baseline
from ..errors import UserError
from ..evaluation.capability import completion_nll, next_token_kl
from ..evaluation.refusal import is_refusal
from ..fileio import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from .compare_methods import build_methods, edit_inputs, parse_methods
from .direction import stage_direction
from .extract import stage_extract, stage_samples
from .layout import RunLayout
from .outdir import release_lock
from .rundir import Run
from .summary import display_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareResult:
    """`compare`'s table (compare/table.json: ``rows`` with intervals and paired tests, ``dominates_dim``) and where
    its files are."""

    out: Path
    table: Mapping[str, Any]

    @property
    def rows(self) -> list[dict]:
        return list(self.table["rows"])

    @property
    def dominates_dim(self) -> list[str]:
        return list(self.table["dominates_dim"])

    @property
    def report(self) -> Path:
        return RunLayout(self.out).compare_report


def compare(config: RunConfig, out: str | Path, *, methods: str | None = None, n_xstest: int | None = None,
            force: bool = False, progress: bool = False) -> CompareResult:
    """Every method of ``methods`` (default: every registered `compare` row) on ``config``'s model in the run
    directory ``out``, on the same prompts, judge and statistics; a re-run resumes (methods already done are read
    back). ``n_xstest``: the first N of XSTest's safe prompts, None all, 0 none."""
    from .pipeline import start_run

    parse_methods(methods)  # a bad --methods fails before the model loads
    if n_xstest is not None and n_xstest < 0:
        raise UserError(f"--n-xstest {n_xstest}: use 0 (skip) or more")
    run = start_run(out, config, force=force, progress=progress)
    try:
        return CompareResult(run.out, stage_compare(run, methods, n_xstest, force))
    finally:
        release_lock(run.out)


def stage_compare(run: Run, methods: str | None = None, n_xstest: int | None = None, force: bool = False) -> dict:
    """Run every method missing from ``compare/methods`` and write the table, plot and report; the table."""
    from ..report.compare import write_compare_outputs

    names = parse_methods(methods)
    samples = stage_samples(run)
    candidates = stage_extract(run, samples)
    direction = stage_direction(run, samples, candidates)
    layout = run.layout
    layout.compare_dir.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if force or not layout.compare_method(n).is_file()]
    if todo:
        t0 = time.perf_counter()
        ivs, info = build_methods(edit_inputs(run, samples, candidates, direction), todo)
        xstest = first_prompts("xstest_safe", resolve_data_dir(run.config.data_dir), n_xstest)
        _run_methods(run, samples, xstest, ivs, info)
        run.timing("compare_s", time.perf_counter() - t0)
    records = {n: read_json(layout.compare_method(n), "run file") for n in names}
    return write_compare_outputs(layout.compare_dir, records, model=display_name(run.config.model),
                                 direction={"layer": direction.layer, "position": direction.position})


def _harmless_baseline(run: Run, harmless: list[str]) -> list[list[int]]:
    """Token ids of the baseline's own greedy completions of the harmless prompts (made once, then reused)."""
    from ..generation import generate_all

    path = run.layout.compare_harmless_baseline
    if not path.is_file():
        gens = generate_all(run.lm, harmless, [Baseline()], run.generation)["baseline"]
        atomic_write_jsonl(path, [{"instruction": t, "completion": g.text, "token_ids": list(g.token_ids)}
                                  for t, g in zip(harmless, gens, strict=True)])
    return [r["token_ids"] for r in read_jsonl(path)]


def _run_methods(run: Run, samples, xstest, ivs: dict, info: dict) -> None:
    from ..generation import generate_all

    c, lm = run.config, run.lm
    harmless = [i.text for i in samples.harmless_eval]
    own = _harmless_baseline(run, harmless)
    prompts = list(samples.eval) + list(xstest)
    t0 = time.perf_counter()
    gens = generate_all(lm, [i.text for i in prompts], list(ivs.values()), run.generation)
    run.timing("compare_generate_s", time.perf_counter() - t0)
    n_eval = len(samples.eval)
    baseline: dict = {}  # each KL batch's baseline distribution, computed once for every method
    for name, iv in ivs.items():
        rows = [{"id": item.id, "category": item.category, "instruction": item.text, "completion": g.text,
                 "refusal": is_refusal(g.text), "n_tokens": len(g.token_ids)}
                for item, g in zip(prompts, gens[name], strict=True)]
        kl = next_token_kl(lm, harmless, iv, batch_size=c.batch_size, baseline=baseline)["per_prompt"]
        pairs = list(zip(harmless, own))
        nll = run_batched(lambda b, iv=iv: completion_nll(lm, [p[0] for p in b], [p[1] for p in b], iv),
                          pairs, c.batch_size, desc=f"ce [{name}]")
        atomic_write_json(run.layout.compare_method(name), {
            "method": name, "parameters": info[name], "jailbreakbench": rows[:n_eval], "xstest": rows[n_eval:],
            "kl_per_prompt": kl, "ce_nll": [s for s, _ in nll], "ce_tokens": [n for _, n in nll]})
        log.info("compare: %s done", name)


__all__ = ["CompareResult", "compare", "stage_compare"]
