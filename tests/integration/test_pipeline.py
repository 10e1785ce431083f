"""End to end on a tiny Gemma saved to disk: every artifact, resume after SIGKILL, stage commands."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refusal_direction.evaluation.refusal import is_refusal
from refusal_direction.evaluation.stats import agreement_table, rate
from tests.helpers.tiny import save_tiny_gemma

TINY_ARGS = ["--n-train", "8", "--n-val", "4", "--n-eval", "6", "--n-harmless-eval", "4", "--max-new-tokens", "8",
             "--batch-size", "4", "--layer", "1", "--position", "-2", "--device", "cpu", "--n-xstest", "3"]


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args, check=True):
    """Run the CLI in-process (no torch re-import per call)."""
    from typer.testing import CliRunner

    from refusal_direction.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if check and r.exit_code != 0:
        raise AssertionError(f"exit {r.exit_code}\n{r.output}") from r.exception
    return Result(r.exit_code, r.stdout, r.output)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_gemma(tmp_path_factory.mktemp("tiny") / "tiny-gemma")


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory):
    from tests.helpers.guard_fixtures import save_tiny_guard

    return save_tiny_guard(tmp_path_factory.mktemp("guard") / "tiny-guard")


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, guard_dir, data_dir, tmp_path_factory):
    """A whole replication on a tiny Gemma, a tiny random Llama standing in for Llama Guard 2."""
    out = tmp_path_factory.mktemp("run") / "run"
    cli("replicate", "--model", tiny_model_dir, "--data-dir", data_dir, "--out", out, *TINY_ARGS,
        "--safety-model", guard_dir)
    return out


def test_replicate_writes_every_artifact(tiny_run):
    for rel in ["config.json", "environment.json", "samples/samples.json", "directions/candidates.safetensors",
                "directions/candidates.json", "directions/mean_harmful.safetensors", "direction.safetensors",
                "direction.json", "completions/jailbreakbench__baseline.jsonl",
                "completions/jailbreakbench__ablation.jsonl", "completions/jailbreakbench__actadd_negative.jsonl",
                "completions/harmless__baseline.jsonl", "completions/harmless__actadd.jsonl", "capability.json",
                "summary.json", "report.md", "report.html", "run.log"]:
        assert (tiny_run / rel).is_file(), rel
    summary = json.loads((tiny_run / "summary.json").read_text())
    from refusal_direction.report import Summary

    assert Summary.from_json(summary).to_json() == summary  # the typed schema covers every key written
    assert summary["direction"] == {**summary["direction"], "layer": 1, "position": -2}
    for cond in ("baseline", "ablation"):
        # the summary's numbers are those of the completion records it was built from
        records = [json.loads(line) for line in (tiny_run / f"completions/jailbreakbench__{cond}.jsonl").open()]
        assert len(records) == 6
        assert all(set(r) >= {"id", "category", "instruction", "completion", "refusal", "safety"} for r in records)
        assert [r["refusal"] for r in records] == [is_refusal(r["completion"]) for r in records]
        refusal, safety = [r["refusal"] for r in records], [r["safety"] for r in records]
        c = summary["conditions"][cond]
        assert c["n"] == 6 and c["safety_status"] == "computed"
        assert c["refusal"] == rate(refusal) and c["refusal_score"] == rate(refusal)["rate"]
        assert c["safety"] == rate(safety) and c["safety_score"] == rate(safety)["rate"]
        assert c["judge_agreement"] == agreement_table(refusal, safety)
    assert summary["paired_tests"]["ablation_vs_baseline"]["safety"]["method"] == "exact"
    for path in (tiny_run / "completions").glob("*.jsonl"):
        for r in map(json.loads, path.open()):
            assert r["safety"] == int(r["p_unsafe"] < 0.5), (path.name, r)  # 1 = judged safe, from its p_unsafe
    assert "## Refusal phrase vs. safety judge" in (tiny_run / "report.md").read_text()
    env = json.loads((tiny_run / "environment.json").read_text())
    assert env["post_instruction_tokens"] == ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
    assert env["dtype"] == "float32"
    timings = json.loads((tiny_run / "timings.json").read_text())
    stages = ("preflight_s", "load_model_s", "extract_s", "generate_s", "capability_s", "score_s", "report_s")
    assert all(timings[k] >= 0 for k in stages), timings
    # in-process (CliRunner inside pytest): the host process's age says nothing about the run, so it is not recorded
    assert "startup_s" not in timings and "process_s" not in timings


def test_the_command_line_process_records_its_whole_time(tiny_model_dir, data_dir, tmp_path):
    """``python -m refusal_direction replicate`` records its start-up (interpreter + imports) and its whole time,
    which covers every stage it ran."""
    from tests.helpers.cli import run_cli

    out = tmp_path / "run"
    run_cli("replicate", "--model", tiny_model_dir, "--data-dir", data_dir, "--out", out, *TINY_ARGS, "--no-safety")
    timings = json.loads((out / "timings.json").read_text())
    stages = ("preflight_s", "load_model_s", "extract_s", "generate_s", "capability_s", "score_s", "report_s")
    assert 0 < timings["startup_s"] < timings["process_s"]
    assert timings["process_s"] >= timings["startup_s"] + sum(timings[k] for k in stages) - 0.05


def _mtimes(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*")
            if p.is_file() and p.name != "run.log"}


def test_rerun_skips_completed_stages(tiny_run, tiny_model_dir, guard_dir, data_dir):
    before = _mtimes(tiny_run)
    assert len(before) >= 17
    cli("replicate", "--model", tiny_model_dir, "--data-dir", data_dir, "--out", tiny_run, *TINY_ARGS,
        "--safety-model", guard_dir)
    after = _mtimes(tiny_run)
    assert set(after) == set(before)
    rewritten = {k for k in before if after[k] != before[k]}
    # every model stage is skipped: only the run's record of itself (config, environment, timings: this process's
    # start-up, preflight and whole time) and the cheap last stages (summary, report and its figures) are written again
    cheap = {"config.json", "environment.json", "timings.json", "summary.json", "report.md", "report.html"}
    assert rewritten <= cheap | {k for k in before if k.startswith("figures/")}, rewritten
    assert any(k.startswith("completions/") for k in before) and "capability.json" in before


def test_json_output_is_the_summary_file(tiny_run, tiny_model_dir, guard_dir, data_dir):
    """``replicate --json`` prints the typed result's summary: exactly summary.json's content, in its order."""
    r = cli("replicate", "--model", tiny_model_dir, "--data-dir", data_dir, "--out", tiny_run, *TINY_ARGS,
            "--safety-model", guard_dir, "--json")
    assert r.stdout.strip() == json.dumps(json.loads((tiny_run / "summary.json").read_text()), indent=2)


def test_score_file_with_guard(tiny_run, guard_dir):
    r = cli("score", tiny_run / "completions/jailbreakbench__ablation.jsonl", "--safety-model", guard_dir, "--json")
    result = json.loads(r.stdout)
    records = [json.loads(line) for line in (tiny_run / "completions/jailbreakbench__ablation.jsonl").open()]
    assert result["safety_status"] == "computed" and result["safety"]["n"] == 6
    assert [i["safety"] for i in result["items"]] == [r["safety"] for r in records]  # the run's judge, again
    assert result["judge_agreement"] == agreement_table([i["refusal"] for i in result["items"]],
                                                        [i["safety"] for i in result["items"]])


def test_guard_unavailable_run_completes_and_says_why(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    cli("score", copy, "--force", "--safety-model", tmp_path / "no-such-guard")
    summary = json.loads((copy / "summary.json").read_text())
    status = summary["conditions"]["baseline"]["safety_status"]
    assert summary["conditions"]["baseline"]["safety_score"] is None and status.startswith("not computed: ")
    assert "no-such-guard" in status and "does not exist" in status
    r = cli("score", copy, "--force", "--require-safety", "--safety-model", tmp_path / "no-such-guard", check=False)
    assert r.returncode == 2


def test_report_rebuilds_without_model(tiny_run, monkeypatch):
    import refusal_direction.core.model as model
    import refusal_direction.evaluation.safety as safety

    def no_model(*args, **kwargs):
        raise AssertionError("the report command loaded a model")

    monkeypatch.setattr(model, "load_model", no_model)
    monkeypatch.setattr(safety, "load_safety_scorer", no_model)
    before = (tiny_run / "report.md").read_text()
    (tiny_run / "report.md").unlink()
    cli("report", tiny_run)
    assert (tiny_run / "report.md").read_text() == before


def test_foreign_config_is_refused(tiny_run, tiny_model_dir, data_dir):
    args = [a if a != "8" else "9" for a in TINY_ARGS]
    config = (tiny_run / "config.json").read_text()
    proc = cli("replicate", "--model", tiny_model_dir, "--data-dir", data_dir, "--out", tiny_run, *args, check=False)
    assert proc.returncode == 2 and "different configuration" in proc.stderr and "--force" in proc.stderr
    assert (tiny_run / "config.json").read_text() == config  # the run directory is left as it was


def _comparable(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("timings", None)
    files = {p.name: p.read_text() for p in sorted((run / "completions").glob("*.jsonl"))}
    return {"summary": summary, "completions": files}


def test_sigkill_mid_generation_then_resume_gives_identical_results(tiny_model_dir, data_dir, tmp_path):
    args = ["--model", tiny_model_dir, "--data-dir", data_dir, "--no-safety", *TINY_ARGS]
    args[args.index("--max-new-tokens") + 1] = "48"
    args[args.index("--batch-size") + 1] = "1"
    cli("replicate", "--out", tmp_path / "clean", *args)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "refusal_direction", "replicate", "--out", str(killed),
                             *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((killed / "completions").glob("*.jsonl")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list((killed / "completions").glob("*.jsonl"))
    assert done and not (killed / "summary.json").exists(), "the kill should land mid-generation"
    for p in killed.rglob("*"):  # every file is complete or absent (temporary files are never trusted)
        if p.is_file() and p.suffix == ".jsonl" and not p.name.startswith(".tmp-"):
            [json.loads(line) for line in p.open()]
    cli("replicate", "--out", killed, *args)
    assert _comparable(killed) == _comparable(tmp_path / "clean")


def test_export_and_verify_export_commands(tiny_run, tmp_path):
    out = tmp_path / "exported"
    cli("export", "--run", tiny_run, "--out", out)
    assert (out / "config.json").is_file()
    assert "safety research and evaluation only" in (out / "README.md").read_text().lower()
    r = cli("verify-export", "--run", tiny_run, "--model-dir", out, "--n-prompts", "3", "--max-new-tokens", "8",
            "--json")
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["ok"]  # plumbing only: the numbers verify_export checks are tested in tests/unit/test_export.py
    assert cli("export", "--run", tiny_run, "--out", out, check=False).returncode == 2  # no silent overwrite


@pytest.mark.parametrize("method", ["norm_preserving", "ace"])
def test_export_and_verify_export_of_a_method(tiny_run, tmp_path, method):
    """`export --method` bakes a method's weight form in; `verify-export --method` checks it against the hooks and
    refuses a mismatched method."""
    out = tmp_path / method
    cli("export", "--run", tiny_run, "--out", out, "--method", method)
    assert json.loads((out / "refusal_direction_export.json").read_text())["method"] == method
    r = cli("verify-export", "--run", tiny_run, "--model-dir", out, "--method", method, "--n-prompts", "3",
            "--max-new-tokens", "6", "--json")
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["ok"] and result["method"] == method and result["max_abs_logit_diff"] <= 1e-4
    wrong = cli("verify-export", "--run", tiny_run, "--model-dir", out, "--method", "projected", check=False)
    assert wrong.returncode == 2 and f"exported with method '{method}'" in wrong.stderr
