"""Bad values of the optimize, compare, selection-rule and device-map options are refused before loading."""

from __future__ import annotations

import pytest

from refusal_direction.config import RunConfig
from refusal_direction.errors import UserError
from refusal_direction.run.compare import compare
from refusal_direction.run.optimize import OptimizeSettings


@pytest.mark.parametrize("kw, needle", [({"trials": -5}, "--trials -5"), ({"batch_trials": 0}, "--batch-trials 0"),
                                        ({"target": 7.0}, "--target 7.0: a refusal rate"),
                                        ({"n_xstest": -1}, "--n-xstest -1")])
def test_optimize_settings_refuse_bad_values(kw, needle):
    with pytest.raises(UserError, match=needle):
        OptimizeSettings(**kw)
    OptimizeSettings()  # the defaults are valid


@pytest.mark.parametrize("methods, n_xstest, needle", [("dim,nope", 250, "unknown method\\(s\\) nope"),
                                                       (None, -1, "--n-xstest -1")])
def test_compare_refuses_bad_options_before_loading(tmp_path, methods, n_xstest, needle):
    with pytest.raises(UserError, match=needle):  # the model does not exist: only the option check can answer
        compare(RunConfig(model=str(tmp_path / "no-such-model")), tmp_path / "run", methods=methods, n_xstest=n_xstest)


@pytest.mark.parametrize("key, value, needle", [("select_rule", "nope", "select_rule='nope': use generation or paper"),
                                               ("device_map", "nope", "device_map='nope': use auto"),
                                               ("select_train_prompts", -1, "select_train_prompts=-1 must be 0"),
                                               ("select_train_prompts", "many", "expected an integer"),
                                               ("decode_step", "fused", "decode_step='fused': use hf or own")])
def test_new_config_values_are_checked(key, value, needle):
    from refusal_direction.config import build_config
    from refusal_direction.errors import UserErrors

    with pytest.raises(UserErrors, match=needle):
        build_config({key: value})


def test_a_bad_gguf_weights_cache_switch_is_refused(monkeypatch):
    from refusal_direction.core.gguf_cache import WEIGHTS_ENV, weights_cache_setting

    for value, want in (("0", "off"), ("off", "off"), ("1", "on"), ("", "default")):
        monkeypatch.setenv(WEIGHTS_ENV, value)
        assert weights_cache_setting() == want
    monkeypatch.setenv(WEIGHTS_ENV, "maybe")
    with pytest.raises(UserError, match=r"'maybe' is not a switch: set it to 0 .* 1 .* or unset it"):
        weights_cache_setting()


def test_a_damaged_study_journal_is_a_user_error(tmp_path):
    pytest.importorskip("optuna")
    from refusal_direction.edits import suggest
    from refusal_direction.search import open_study

    db = tmp_path / "study.journal"
    study = open_study(db, seed=0)
    t = study.ask()
    suggest(t, [-1], 3)
    study.tell(t, [0.5, 0.1])
    lines = db.read_text().splitlines(keepends=True)
    db.write_text("".join(lines[:2] + ["not a journal record\n"] + lines[2:]))
    with pytest.raises(UserError, match="study.journal is damaged .* move it away"):
        open_study(db, seed=0)
