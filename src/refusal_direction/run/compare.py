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
from pathlib import Path

from ..core.batching import run_batched
from ..core.decoding import GenerationSettings
from ..core.interventions import Baseline
from ..data.instructions import resolve_data_dir
from ..data.xstest import load_xstest_prompts
from ..errors import UserError
from ..evaluation.capability import completion_nll, next_token_kl
from ..evaluation.refusal import is_refusal
from ..fileio import atomic_write_json, atomic_write_jsonl, read_jsonl
from .compare_methods import build_methods, parse_methods
from .direction import stage_direction
from .extract import stage_extract, stage_samples
from .rundir import Run
from .summary import display_name

log = logging.getLogger(__name__)


def compare_main(out: Path, model: str | None, methods: str | None, n_xstest: int, config: Path | None,
                 force: bool, setup_logging=None) -> str:
    """The ``compare`` command: config from ``config`` (TOML, any run key) and ``model``; the table as text."""
    from ..config import build_config
    from ..report.compare import table_markdown
    from .pipeline import start_run

    parse_methods(methods)  # a bad --methods fails before the model loads
    if n_xstest < 0:
        raise UserError(f"--n-xstest {n_xstest}: use 0 (skip) or more")
    if setup_logging is not None:
        setup_logging(out)
    cfg = build_config({**({"model": model} if model else {}), "safety": False}, config)
    result = stage_compare(start_run(out, cfg, force=force, progress=True), methods, n_xstest, force)
    return (f"{table_markdown(result['rows'])}\ndominate DiM (lower refusal and lower KL): "
            f"{', '.join(result['dominates_dim']) or 'none'}\nreport: {Path(out) / 'compare' / 'report.md'}")


def compare_dir(run: Run) -> Path:
    return run.out / "compare"


def method_path(run: Run, name: str) -> Path:
    return compare_dir(run) / "methods" / f"{name}.json"


def stage_compare(run: Run, methods: str | None = None, n_xstest: int = 100, force: bool = False) -> dict:
    """Run every method missing from ``compare/methods`` and write the table, plot and report; the table."""
    import json

    from ..report.compare import write_compare_outputs

    names = parse_methods(methods)
    samples = stage_samples(run)
    candidates = stage_extract(run, samples)
    direction = stage_direction(run, samples, candidates)
    compare_dir(run).mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if force or not method_path(run, n).is_file()]
    if todo:
        t0 = time.perf_counter()
        ivs, info = build_methods(run, samples, candidates, direction, todo)
        data_dir = resolve_data_dir(run.config.data_dir)
        xstest = load_xstest_prompts("xstest_safe", data_dir)[:n_xstest] if n_xstest else []
        _run_methods(run, samples, xstest, ivs, info)
        run.timing("compare_s", time.perf_counter() - t0)
    records = {n: json.loads(method_path(run, n).read_text()) for n in names}
    return write_compare_outputs(compare_dir(run), records, model=display_name(run.config.model),
                                 direction={"layer": direction.layer, "position": direction.position})


def _harmless_baseline(run: Run, harmless: list[str], settings: GenerationSettings) -> list[list[int]]:
    """Token ids of the baseline's own greedy completions of the harmless prompts (made once, then reused)."""
    from ..generation import generate_all

    path = compare_dir(run) / "harmless_baseline.jsonl"
    if not path.is_file():
        gens = generate_all(run.lm, harmless, [Baseline()], settings, progress=run.progress,
                            backend=run.config.generation_backend, step=run.config.decode_step)["baseline"]
        atomic_write_jsonl(path, [{"instruction": t, "completion": g.text, "token_ids": list(g.token_ids)}
                                  for t, g in zip(harmless, gens, strict=True)])
    return [r["token_ids"] for r in read_jsonl(path)]


def _run_methods(run: Run, samples, xstest, ivs: dict, info: dict) -> None:
    from ..generation import generate_all

    c, lm = run.config, run.lm
    settings = GenerationSettings(c.max_new_tokens, c.batch_size, c.stop_at_end_of_turn)
    harmless = [i.text for i in samples.harmless_eval]
    own = _harmless_baseline(run, harmless, settings)
    prompts = list(samples.eval) + list(xstest)
    t0 = time.perf_counter()
    gens = generate_all(lm, [i.text for i in prompts], list(ivs.values()), settings, progress=run.progress,
                        backend=c.generation_backend, step=c.decode_step)
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
        atomic_write_json(method_path(run, name), {
            "method": name, "parameters": info[name], "jailbreakbench": rows[:n_eval], "xstest": rows[n_eval:],
            "kl_per_prompt": kl, "ce_nll": [s for s, _ in nll], "ce_tokens": [n for _, n in nll]})
        log.info("compare: %s done", name)


__all__ = ["compare_main", "stage_compare", "compare_dir", "method_path"]
