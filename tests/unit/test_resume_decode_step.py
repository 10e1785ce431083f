"""A run's completions come from one generation backend and one decode step: a resume that would mix them stops."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from refusal_direction.errors import UserError
from refusal_direction.run.generate import check_backend
from refusal_direction.run.layout import RunLayout


def _run(tmp_path, env: dict | None, done: bool):
    (tmp_path / "completions").mkdir(exist_ok=True)
    if env is not None:
        (tmp_path / "environment.json").write_text(json.dumps(env))
    if done:
        (tmp_path / "completions" / "baseline.jsonl").write_text("{}\n")
    return SimpleNamespace(out=tmp_path, layout=RunLayout(tmp_path), config=SimpleNamespace(conditions=("baseline",)),
                           completions_path=lambda cond: tmp_path / "completions" / f"{cond}.jsonl")


def _env(tmp_path) -> dict:
    return json.loads((tmp_path / "environment.json").read_text())


def test_a_new_run_records_backend_and_step(tmp_path):
    run = _run(tmp_path, {"device": "cuda:0"}, done=False)
    check_backend(run, "fast", False, "own")
    assert _env(tmp_path) == {"device": "cuda:0", "generation_backend": "fast", "decode_step": "own"}
    check_backend(run, "hf", False, "own")  # HF generate has no decode step
    assert _env(tmp_path)["decode_step"] is None


def test_a_fast_run_without_a_recorded_step_resumes_on_neither_step(tmp_path):
    run = _run(tmp_path, {"generation_backend": "fast"}, done=True)  # environment.json has no decode_step
    for step in ("own", "hf"):
        with pytest.raises(UserError, match="does not record the decode step.*--force"):
            check_backend(run, "fast", False, step)
    check_backend(run, "fast", True, "hf")  # --force regenerates: the step is recorded
    assert _env(tmp_path)["decode_step"] == "hf"


def test_a_step_switch_stops_unless_forced_and_not_before_any_completion(tmp_path):
    run = _run(tmp_path, {"generation_backend": "fast", "decode_step": "own"}, done=True)
    with pytest.raises(UserError, match="'own' decode step; resuming on 'hf'"):
        check_backend(run, "fast", False, "hf")
    check_backend(run, "fast", True, "hf")  # --force regenerates: the new step is recorded
    assert _env(tmp_path)["decode_step"] == "hf"
    (tmp_path / "x").mkdir()
    fresh = _run(tmp_path / "x", {"generation_backend": "fast", "decode_step": "own"}, done=False)
    check_backend(fresh, "fast", False, "hf")  # nothing generated yet: nothing to mix
    assert _env(tmp_path / "x")["decode_step"] == "hf"


def test_summary_settings_need_every_key():
    from refusal_direction.report.summary import Settings, _Json

    full = Settings(max_new_tokens=512, stop_at_end_of_turn=False, dtype="bfloat16", device="cuda:0", n_train=128,
                    n_eval=100, safety_model=None, safety_mode="logprob", safety_short_is_safe=False,
                    refusal_matching="substring", generation_backend="fast", decode_step="own").to_json()
    assert Settings.from_json(_Json(full, "summary.settings", "summary.json")).decode_step == "own"
    for key in ("decode_step", "dtype"):  # with a default or without one: the writer always writes it
        partial = {k: v for k, v in full.items() if k != key}
        with pytest.raises(UserError, match=f"summary.settings has no '{key}'"):
            Settings.from_json(_Json(partial, "summary.settings", "summary.json"))
