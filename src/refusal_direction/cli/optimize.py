"""The ``optimize`` command: an Optuna search for the least damaging edit that removes refusal (`run.optimize`);
its options are generated from `run.optimize_settings.OptimizeSettings`' fields."""

from __future__ import annotations

from pathlib import Path

from ..run.optimize_settings import OPTIMIZE_FIELDS
from .common import CONFIG, OUT, app, setup_logging, user_errors
from .options import config_options


@app.command()
@user_errors
@config_options("model")
@config_options(*(n for n in OPTIMIZE_FIELDS if n != "max_kl_rows"), fields=OPTIMIZE_FIELDS, parameter="search")
def optimize(out: Path = OUT, overrides: dict | None = None, config: Path | None = CONFIG, search: dict | None = None,
             force: bool = False) -> None:
    """Search direction, layer kernels, norm preservation and subspace size for low refusal at low KL (OUT/optimize)."""
    from ..config import build_config
    from ..run.optimize import OptimizeSettings
    from ..run.optimize import optimize as run_optimize

    settings = OptimizeSettings(**search)  # bad values fail before the model loads
    setup_logging(out)
    cfg = build_config({**overrides, "safety": False}, config)
    print(summary_text(run_optimize(cfg, out, settings, force=force, progress=True).summary, out))


def summary_text(summary: dict, out: Path) -> str:
    """The search's outcome in a few lines: counts, speed, the choice, the final rows, the export."""
    c = summary["chosen"]
    lines = [f"trials complete: {summary['n_complete']} (failed/retried: {summary['n_failed']}); "
             f"front: {len(summary['front'])} trials",
             f"speed: {summary['speed']}",
             f"chosen: trial {c['number']} ({c['params']['form']}), validation refusal {c['refusal']:.3f}, "
             f"KL {c['kl']:.4f}" if c else "chosen: none"]
    if summary.get("final"):
        for r in summary["final"]["rows"]:
            lines.append(f"  {r['edit']}: JBB refusal {r['refusal']['rate']:.3f}, KL {r['kl']['value']:.4f}")
    if summary.get("export"):
        lines.append(f"export: {summary['export']['dir']} (verified: {summary['export']['verify']['ok']})")
        lora = summary["export"].get("lora")
        if lora:
            lines.append(f"LoRA adapter: {lora['dir']} (rank {lora['rank']}, verified: {lora['verify']['ok']})"
                         if "dir" in lora else f"LoRA adapter: not written ({lora['skipped']})")
    lines.append(f"outputs: {Path(out) / 'optimize'}")
    return "\n".join(lines)
