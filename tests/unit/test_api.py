"""The Python API under the commands: importable from the package root, typed results, the same checks as the CLI.
(End to end through the CLI, which calls it: tests/integration/test_pipeline.py.)"""

from __future__ import annotations

import json

import pytest

import refusal_direction
from refusal_direction.config import FIELDS, RunConfig
from refusal_direction.errors import UserErrors


@pytest.mark.parametrize("name", ["replicate", "ReplicateResult", "select", "export_run", "verify_export",
                                  "ExportResult", "VerifyExportResult", "Run", "RunLayout", "GenerationSettings"])
def test_the_api_is_at_the_package_root(name):
    assert name in refusal_direction.__all__ and getattr(refusal_direction, name) is not None


def test_replicate_checks_a_config_built_directly_before_writing(tmp_path):
    with pytest.raises(UserErrors, match="select='magic'"):
        refusal_direction.replicate(RunConfig(select="magic", decode_step="fused"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_select_returns_the_typed_result_with_the_config_thresholds(tmp_path):
    from refusal_direction.selection import SelectionResult

    rows = [{"position": p, "layer": layer, "bypass_score": -layer - p, "induce_score": 1.0, "kl_score": 0.01 * layer}
            for p in (-2, -1) for layer in range(5)]
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(rows))
    result = refusal_direction.select(path)
    assert isinstance(result, SelectionResult) and (result.position, result.layer) == (-1, 3)  # layer 4 pruned
    assert result.thresholds.kl_threshold == FIELDS["kl_threshold"].default
    strict = refusal_direction.select(path, kl_threshold=0.015)
    assert (strict.position, strict.layer) == (-1, 1)


def test_generation_settings_from_a_config_carry_backend_step_and_progress():
    from refusal_direction import GenerationSettings

    cfg = RunConfig(max_new_tokens=7, batch_size=3, stop_at_end_of_turn=True, generation_backend="hf")
    s = GenerationSettings.from_config(cfg, progress=True)
    assert s == GenerationSettings(7, 3, True, backend="hf", step=cfg.decode_step, progress=True)
    assert s.replace(max_new_tokens=2) == GenerationSettings(2, 3, True, "hf", cfg.decode_step, True)
    # the one stated difference: a library call's step is the reference one, a run's the config's (core/decoding.py)
    assert (GenerationSettings().step, RunConfig().decode_step) == ("hf", "own")


def test_the_run_layout_names_every_file_of_the_readme(tmp_path):
    from refusal_direction import RunLayout

    lay = RunLayout(tmp_path)
    rel = {str(p.relative_to(tmp_path)) for p in (
        lay.config, lay.environment, lay.samples, lay.xstest_samples, lay.candidates, lay.direction,
        lay.direction_meta, lay.selection, lay.completions("jailbreakbench", "baseline"), lay.capability,
        lay.safety_status, lay.summary, lay.report_md, lay.report_html, lay.figure("x"), lay.run_log, lay.timings,
        lay.manifest, lay.lock, lay.compare_method("dim"), lay.optimize_study, lay.optimize_export)}
    assert rel == {"config.json", "environment.json", "samples/samples.json", "samples/xstest.json",
                   "directions/candidates.safetensors", "direction.safetensors", "direction.json", "selection.json",
                   "completions/jailbreakbench__baseline.jsonl", "capability.json", "safety_status.json",
                   "summary.json", "report.md", "report.html", "figures/x.png", "run.log", "timings.json",
                   "run/manifest", "run/lock", "compare/methods/dim.json", "optimize/study.journal", "optimize/export"}
