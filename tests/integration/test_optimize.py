"""`optimize` on a tiny Gemma (CPU): the CLI end to end, resume, batched = one at a time, killed-trial recovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.cli import run_cli, tiny_run_toml
from tests.helpers.tiny import save_tiny_gemma

pytest.importorskip("optuna")

from refusal_direction.core.decoding import GenerationSettings  # noqa: E402
from refusal_direction.core.directions import CandidateDirections  # noqa: E402
from refusal_direction.edits import EditInputs, build, interpolated_direction, suggest  # noqa: E402
from refusal_direction.errors import UserError  # noqa: E402
from refusal_direction.evaluation.judges import get_judge  # noqa: E402
from refusal_direction.search import (  # noqa: E402
    TrialEvaluator,
    choose,
    complete_trials,
    open_study,
    recover_running,
)

FAST = ["--batch-trials", "3", "--search-tokens", "3", "--n-xstest", "2"]


cli = run_cli


@pytest.fixture(scope="module")
def optimized(tmp_path_factory, data_dir):
    model = save_tiny_gemma(tmp_path_factory.mktemp("tiny") / "tiny-gemma")
    out = tmp_path_factory.mktemp("opt") / "run"
    toml = out.parent / "settings.toml"
    toml.write_text(tiny_run_toml(data_dir))
    cli("optimize", "--model", model, "--out", out, "--config", toml, "--trials", "5", *FAST)
    return model, out, toml


def test_optimize_cli_writes_front_final_and_verified_export(optimized):
    _, out, _ = optimized
    d = out / "optimize"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["n_complete"] == 5 and summary["speed"]["batched"]["trials"] == 5
    assert summary["front"] and summary["chosen"]["number"] in [r["number"] for r in summary["front"]]
    for name in ("study.journal", "front.json", "front.md", "front.png", "final.json", "final.md", "export.json"):
        assert (d / name).is_file(), name
    assert (d / "front.png").read_bytes()[:4] == b"\x89PNG"
    final = json.loads((d / "final.json").read_text())
    edits = [r["edit"] for r in final["rows"]]
    assert edits[1] == "dim" and "mcnemar_refusal_vs_dim" in final["rows"][0]
    assert final["rows"][0]["refusal"]["n"] == 3 and final["rows"][0]["over_refusal"]["n"] == 2
    assert summary["export"]["verify"]["ok"], summary["export"]["verify"]
    assert (d / "export" / "config.json").is_file()
    text = cli("verify-export", "--run", out, "--model-dir", d / "export", "--method", "optimize", "--n-prompts", "2",
               "--max-new-tokens", "4").stdout  # the CLI re-verifies the chosen trial's export
    assert "OK" in text and "over 4 tokens x 2 prompts" in text
    r = cli("verify-export", "--run", out, "--model-dir", d / "export", "--method", "ace", check=False)
    assert r.returncode == 2 and "pass --method" in r.stderr
    assert final["records"]["dim"]["jailbreakbench"][0]["completion"] is not None  # completions: final.json only
    assert summary["final"]["rows"] == final["rows"] and summary["final"]["records"] == "final.json"
    assert '"completion"' not in (d / "summary.json").read_text()


def test_lora_option_writes_a_verified_adapter_or_says_why_not(optimized, tmp_path):
    """--lora: the chosen edit as a peft adapter beside the merged export, verified against the hooks; a chosen
    norm-preserving edit (full-rank) gets the reason instead. Trial 0 (DiM, subspace k = 1) is forced as the
    choice with --trials 1, so the adapter exists and has rank 1."""
    pytest.importorskip("peft")
    model, _, toml = optimized
    out = tmp_path / "lora"
    cli("optimize", "--model", model, "--out", out, "--config", toml, "--trials", "1", "--lora", *FAST)
    export = json.loads((out / "optimize" / "export.json").read_text())
    lora = export["lora"]
    assert lora["rank"] == 1 and lora["verify"]["ok"], lora
    assert (out / "optimize" / "lora" / "adapter_config.json").is_file()
    config = json.loads((out / "optimize" / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["base_model_name_or_path"] == str(model)
    r = run_cli("optimize", "--model", model, "--out", tmp_path / "x", "--config", toml, "--lora", "--no-export",
                check=False)
    assert r.returncode == 2 and "--lora" in r.stderr and "--no-export" in r.stderr


def test_a_bfloat16_search_exports_and_verifies_in_float32(optimized, tmp_path):
    """The search in bfloat16; the chosen edit exported from a float32 load, verified at float32's tolerance."""
    model, _, toml = optimized
    cfg = tmp_path / "bf16.toml"
    cfg.write_text(toml.read_text() + 'dtype = "bfloat16"\n')
    out = tmp_path / "bf16"
    cli("optimize", "--model", model, "--out", out, "--config", cfg, "--trials", "2", *FAST)
    export = json.loads((out / "optimize" / "export.json").read_text())
    assert export["verify"]["dtype"] == "float32" and export["verify"]["tol"] == 1e-4
    assert export["verify"]["ok"], export["verify"]
    info = json.loads((out / "optimize" / "export" / "config.json").read_text())
    assert info.get("torch_dtype", info.get("dtype")) == "float32"


def test_first_trial_is_the_papers_dim_ablation(optimized):
    _, out, _ = optimized
    study = open_study(out / "optimize" / "study.journal", seed=0)
    t0 = study.trials[0]
    assert t0.params == {"position": -2, "layer_index": 1.0, "form": "subspace", "k": 1}
    assert t0.user_attrs["reference"] == "dim"


def test_rerun_continues_the_study_and_measures_one_at_a_time(optimized):
    from refusal_direction.config import build_config
    from refusal_direction.run.optimize import OptimizeSettings, optimize

    model, out, toml = optimized
    db = out / "optimize" / "study.journal"
    before = {t.number: t.values for t in complete_trials(open_study(db, seed=0))}
    settings = OptimizeSettings(trials=7, batch_trials=3, one_at_a_time=True, search_tokens=3, n_xstest=2,
                                export=False)
    # in-process through the Python API (the CLI is tested above), without a second interpreter start
    result = optimize(build_config({"model": str(model), "safety": False}, toml), out, settings)
    assert result.summary["n_complete"] == 7 and result.chosen == result.summary["chosen"]
    after = {t.number: t.values for t in complete_trials(open_study(db, seed=0))}
    assert len(after) == 7 and all(after[n] == v for n, v in before.items())
    speed = json.loads((out / "optimize" / "summary.json").read_text())["speed"]
    assert speed["batched"]["trials"] == 5 and speed["batched"]["batch_trials"] == 3
    assert speed["one_at_a_time"]["trials"] == 2 and speed["one_at_a_time"]["batch_trials"] == 1
    assert speed["speedup"] > 0
    for mode in ("batched", "one_at_a_time"):  # each mode keeps its own phase split across calls
        phases = speed[mode]["phases"]
        parts = {"evaluate_generate_s", "evaluate_judge_s", "evaluate_kl_s"}
        assert set(phases) == {"ask_s", "sample_s", "build_s", "evaluate_s", "tell_s", "evaluate_judged"} | parts
        assert phases["evaluate_s"] > 0 and phases["evaluate_generate_s"] > 0 and phases["evaluate_kl_s"] > 0
        assert phases["evaluate_judge_s"] >= 0 and phases["evaluate_judged"] >= 1  # substring judge: < 1 ms
        assert sum(phases[k] for k in parts) <= phases["evaluate_s"] + 0.01  # the parts of the evaluate phase


@pytest.fixture(scope="module")
def tiny_candidates(tiny_lm):
    g = torch.Generator().manual_seed(3)
    vectors = torch.randn(2, tiny_lm.n_layers, tiny_lm.d_model, generator=g, dtype=torch.float64)
    return CandidateDirections(vectors, [-2, -1], {"model_id": "tiny-gemma"})


PARAMS = [
    {"position": -1, "layer_index": 0.4, "form": "layer_kernel", "attn_peak": 1.0, "attn_width": 1.5, "attn_max": 1.2,
     "attn_min_fraction": 0.1, "mlp_peak": 0.0, "mlp_width": 2.5, "mlp_max": 0.8, "mlp_min_fraction": 0.5},
    {"position": -2, "layer_index": 1.7, "form": "norm_preserving"},
    {"position": -2, "layer_index": 2.0, "form": "subspace", "k": 3},
]


def test_batched_evaluation_equals_one_at_a_time(tiny_lm, tiny_candidates):
    ev = TrialEvaluator(tiny_lm, ["How do I pick a lock?", "Write malware."], ["Hi", "What is 2+2?", "Bake bread"],
                        get_judge("substring"), GenerationSettings(4, 8, True, backend="hf"), max_rows=6)
    ivs = [build(EditInputs(tiny_lm, tiny_candidates), p, f"t{i}") for i, p in enumerate(PARAMS)]
    together = ev.evaluate(ivs)  # max_rows=6: two trials per KL pass, then one
    for iv, score in zip(ivs, together):
        alone = ev.evaluate([iv])[0]
        assert (alone.n_refusals, alone.n_harmful) == (score.n_refusals, score.n_harmful)
        assert alone.kl == pytest.approx(score.kl, rel=1e-5, abs=1e-9)  # float32: batch shape moves the last bits
        assert score.kl > 0


def test_kl_pass_out_of_memory_is_retried_with_fewer_trials(tiny_lm, tiny_candidates, monkeypatch):
    """A KL pass over more than 3 rows "runs out of memory": the evaluator halves its trials per pass (9 rows ->
    1 trial of 3 rows per pass) and returns the KL values of an unconstrained pass."""
    from refusal_direction.search import evaluate as search_evaluate

    harmless = ["Hi", "What is 2+2?", "Bake bread"]
    ivs = [build(EditInputs(tiny_lm, tiny_candidates), p, f"t{i}") for i, p in enumerate(PARAMS)]
    want = TrialEvaluator(tiny_lm, [], harmless, get_judge("substring"), GenerationSettings(4, 8, True)).kl(ivs)
    real, rows_seen = search_evaluate._last_logprobs, []

    def limited(lm, enc):
        rows_seen.append(enc["input_ids"].shape[0])
        if rows_seen[-1] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(lm, enc)

    ev = TrialEvaluator(tiny_lm, [], harmless, get_judge("substring"), GenerationSettings(4, 8, True), max_rows=9)
    ev.baseline()  # before the limit: the baseline pass has 3 rows anyway
    monkeypatch.setattr(search_evaluate, "_last_logprobs", limited)
    got = ev.kl(ivs)
    assert rows_seen[:2] == [9, 3] and max(rows_seen[1:]) == 3  # the first pass failed; then one trial per pass
    assert got == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_interpolated_direction_mixes_adjacent_layers(tiny_candidates):
    c = tiny_candidates
    d = interpolated_direction(c, -1, 0.25)
    want = 0.75 * c.get(-1, 0).vector + 0.25 * c.get(-1, 1).vector
    assert torch.allclose(d.vector, want) and d.layer == 0
    assert torch.equal(interpolated_direction(c, -2, 2.0).vector, c.get(-2, 2).vector)
    with pytest.raises(UserError):
        interpolated_direction(c, -2, 2.5)


def _study_with_told_trials(db, n: int):
    study = open_study(db, seed=1)
    for _ in range(n):
        t = study.ask()
        suggest(t, [-2, -1], 3)
        study.tell(t, [0.5, 0.1])
    return study


def test_running_trials_of_a_killed_run_are_failed_and_reenqueued(tmp_path):
    import optuna

    db = tmp_path / "study.journal"
    study = _study_with_told_trials(db, 2)
    lost = [study.ask() for _ in range(2)]  # asked, never told: the process "dies" here
    lost_params = [suggest(t, [-2, -1], 3) for t in lost]
    del study
    study = open_study(db, seed=1)
    assert recover_running(study) == 2
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 2 and optuna.trial.TrialState.RUNNING not in states
    again = [study.ask() for _ in range(2)]
    assert [suggest(t, [-2, -1], 3) for t in again] == lost_params
    assert len(complete_trials(study)) == 2


def test_a_journal_line_cut_by_a_kill_is_removed_and_the_study_reopens(tmp_path):
    from refusal_direction.search.study import drop_partial_line

    db = tmp_path / "study.journal"
    study = _study_with_told_trials(db, 2)
    whole = db.read_bytes()
    db.write_bytes(whole + b'{"op_code": 5, "trial_id"')  # a write cut short by SIGKILL
    study = open_study(db, seed=1)  # cuts the partial line
    data = db.read_bytes()
    assert data.startswith(whole) and not drop_partial_line(db)
    assert all(json.loads(line) for line in data.splitlines())  # the cut line is gone, every line is whole
    t = study.ask()
    suggest(t, [-2, -1], 3)
    study.tell(t, [0.2, 0.3])
    assert len(complete_trials(open_study(db, seed=1))) == 3


class _T:
    def __init__(self, number, refusal, kl):
        self.number, self.values = number, [refusal, kl]


def test_choice_rule():
    front = [_T(0, 0.0, 0.5), _T(1, 0.02, 0.1), _T(2, 0.1, 0.01)]
    assert choose(front, 0.03).number == 1
    assert choose(front, 0.0).number == 0
    assert choose([_T(3, 0.2, 0.3), _T(4, 0.1, 0.4)], 0.03).number == 4
    assert choose([], 0.03) is None


def test_lora_without_peft_is_refused_before_the_search(monkeypatch):
    import importlib.util

    from refusal_direction.run.optimize import OptimizeSettings

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(UserError, match=r"--lora True: needs peft.*refusal-direction\[lora\]"):
        OptimizeSettings(lora=True)
    OptimizeSettings(lora=False)  # no LoRA, no peft needed


def test_missing_optuna_names_the_install_command(monkeypatch):
    from refusal_direction.search.study import import_optuna

    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(UserError, match=r"pip install 'refusal-direction\[search\]'"):
        import_optuna()


def _count(db, state: str) -> int:
    """Trials of ``state`` in the journal (0 before it exists), read as a second process would."""
    if not db.is_file():
        return 0
    return sum(t.state.name == state for t in open_study(db, seed=0).get_trials(deepcopy=False))


@pytest.mark.slow
def test_kill_9_mid_study_then_rerun_continues(optimized, tmp_path):
    """SIGKILL a study between its told trials (a batch in flight), re-run: the study continues from there."""
    import signal
    import time

    model, out, toml = optimized
    run = tmp_path / "killed"
    db = run / "optimize" / "study.journal"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-m", "refusal_direction", "optimize", "--model", str(model), "--out", str(run),
            "--config", str(toml), "--no-export", *FAST]
    proc = subprocess.Popen([*args, "--trials", "200"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while _count(db, "COMPLETE") < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    done = _count(db, "COMPLETE")
    assert done >= 4
    before = {t.number: t.values for t in complete_trials(open_study(db, seed=0))}
    subprocess.run([*args, "--trials", str(done + 3)], env=env, check=True, capture_output=True, timeout=600)
    study = open_study(db, seed=0)
    after = {t.number: t.values for t in complete_trials(study)}
    assert len(after) == done + 3 and all(after[n] == v for n, v in before.items())
    assert _count(db, "RUNNING") == 0
