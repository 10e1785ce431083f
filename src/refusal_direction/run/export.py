"""`export_run` and `verify_export`: the Python API under the commands ``export`` and ``verify-export`` (the CLI
only prints). (Not ``export``: at the package root that name is the `export` package.)

`export_run` writes an HF model directory with a run's direction (or a method's edit) in the weights, for safety
research and evaluation only; `verify_export` compares the hooked original with such a directory.
"""

from __future__ import annotations

from pathlib import Path

from ..config import VERIFY_NEW_TOKENS, VERIFY_PROMPTS
from ..errors import UserError
from .extract import stage_extract, stage_samples
from .results import ExportResult, VerifyExportResult
from .rundir import open_run


def export_run(run_dir: str | Path, out: str | Path, *, force: bool = False, device: str | None = None,
               streaming: bool = False, method: str = "dim") -> ExportResult:
    """Export ``run_dir``'s edit to the new model directory ``out`` (``force``: replace a previous export there).
    ``streaming``: edit the safetensors shards one at a time (automatic with a run's device_map; DiM only);
    ``method``: a registered method's weight form instead of DiM's; ``device``: instead of the run's."""
    from ..export import export_model, export_streaming

    run_dir, out = Path(run_dir), Path(out)
    run = open_run(run_dir, {"device": device} if device is not None else {})
    direction, info = run.saved_direction(), {"run_dir": str(run_dir.resolve())}
    streaming = streaming or bool(run.config.device_map)
    if method != "dim":
        from ..export import export_edit
        from .compare_methods import method_edit

        if streaming:
            raise UserError(f"--method {method} edits the model in memory; --streaming supports the DiM edit only")
        export_edit(run.lm, method_edit(run, method), out, {**info, "method": method}, force=force)
    elif streaming:
        export_streaming(run.config.model, direction, out, info, force=force, revision=run.config.revision)
    else:
        export_model(run.lm, direction, out, info, force=force)
    return ExportResult(out, method, streaming)


def verify_export(run_dir: str | Path, model_dir: str | Path, *, n_prompts: int = VERIFY_PROMPTS,
                  max_new_tokens: int = VERIFY_NEW_TOKENS, tol: float | None = None, device: str | None = None,
                  method: str = "dim") -> VerifyExportResult:
    """The hooked original of ``run_dir`` vs the exported ``model_dir`` on ``n_prompts`` evaluation prompts:
    max |dlogit| (``tol``: allowed, default by dtype), greedy agreement over ``max_new_tokens``, residual
    projection. ``method``: the one the export was made with, or ``optimize`` (RUN/optimize/export)."""
    from ..export import check_same_direction, default_tol, load_exported
    from ..export import verify_export as verify

    run_dir, model_dir = Path(run_dir), Path(model_dir)
    run = open_run(run_dir, {"device": device} if device is not None else {})
    direction = run.saved_direction()
    samples = stage_samples(run)
    lm = run.lm
    exported = load_exported(model_dir, device=lm.device, dtype=lm.dtype)
    tol = tol if tol is not None else default_tol(lm.dtype)
    prompts = [i.text for i in samples.eval[:n_prompts]]
    if method == "optimize":
        record = _verify_optimize(run, samples, model_dir, exported, prompts, max_new_tokens, tol)
    elif method != "dim":
        record = _verify_method(run, model_dir, method, exported, prompts, max_new_tokens, tol)
    else:
        check_same_direction(model_dir, direction, run_dir)
        record = verify(lm, exported, direction, prompts, max_new_tokens=max_new_tokens, tol=tol)
    return VerifyExportResult(model_dir, method, tol, len(prompts), max_new_tokens, record)


def _verify_method(run, model_dir: Path, method: str, exported, prompts, max_new_tokens: int, tol: float) -> dict:
    """`verify-export --method`: the export must say it holds ``method``; then hooks vs weights."""
    from ..export import read_export_info, verify_method_export
    from .compare_methods import method_edit

    made_with = read_export_info(model_dir).get("method")
    if made_with != method:
        raise UserError(f"{model_dir} was exported with method {made_with!r}, not {method!r}; "
                        f"pass --method {made_with}")
    return verify_method_export(run.lm, exported, method_edit(run, method), prompts, max_new_tokens, tol)


def _verify_optimize(run, samples, model_dir: Path, exported, prompts, max_new_tokens: int, tol: float) -> dict:
    """`verify-export --method optimize`: the trial recorded in the export, rebuilt from the run's candidates."""
    from ..edits import build
    from ..export import read_export_info, verify_method_export
    from .compare_methods import edit_inputs

    trial = read_export_info(model_dir).get("run", {}).get("optimize_trial")
    if not trial or "params" not in trial:
        raise UserError(f"{model_dir} records no optimize trial (no run.optimize_trial in its provenance JSON); it was "
                        "not written by `refusal-direction optimize`: pass the --method it was exported with")
    candidates = stage_extract(run, samples)
    iv = build(edit_inputs(run, samples, candidates, run.saved_direction()), trial["params"],
               f"trial{trial['number']}")
    return verify_method_export(run.lm, exported, iv, prompts, max_new_tokens, tol)
