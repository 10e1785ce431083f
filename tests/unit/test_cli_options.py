"""The CLI's config options are generated from `RunConfig`'s fields: the defaults shown and used are the config's,
a flag left out leaves the TOML file in charge, and every flag the commands had is still there."""

from __future__ import annotations

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from refusal_direction.cli import app
from refusal_direction.cli.common import RUNS_OWN
from refusal_direction.cli.options import flag, shown_default
from refusal_direction.config import DEMO_SETTINGS, FIELDS, RunConfig

COMMANDS = get_command(app).commands

# The flags each command had before its options were generated (none may go).
BEFORE = {
    "replicate": "--out --model --data-dir --harmful-train --harmless-train --eval --n-train --n-val --n-eval "
                 "--n-harmless-eval --max-new-tokens --batch-size --layer --position --select --select-rule "
                 "--conditions --stop-at-end-of-turn --no-stop-at-end-of-turn --device --device-map --max-memory "
                 "--dtype --safety-model --no-safety --require-safety --chat-template --direction-file --xstest "
                 "--no-xstest --n-xstest --judge --config --force --json --verbose -v",
    "demo": "--out --data-dir --n-eval --max-new-tokens --config --force --json --verbose -v",
    "extract": "--force -v",
    "generate": "--force -v --batch-size --device --device-map --max-memory",
    "score": "--json --force --no-safety --safety-model --require-safety --judge --judge-model --judge-device",
    "export": "--run --out --force --device --streaming --method",
    "verify-export": "--run --model-dir --n-prompts --max-new-tokens --tol --device --json --method",
    "select": "--from-scores --n-layers --kl-threshold --induce-threshold --prune-layer-fraction --json",
    "compare": "--out --model --methods --config --n-xstest --force",
    "optimize": "--out --model --config --trials --batch-trials --seed --one-at-a-time --target --search-tokens "
                "--n-xstest --export --no-export --lora --force",
}
# The default each command shows for its generated options where it is not the config's own.
SHOWN = {"demo": lambda name: shown_default(DEMO_SETTINGS.get(name, FIELDS[name].default)),
         "generate": lambda name: RUNS_OWN, "export": lambda name: RUNS_OWN, "verify-export": lambda name: RUNS_OWN,
         "select": lambda name: f"stored, else {FIELDS[name].default}"}


def flags(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def generated(command) -> list:
    """The options made from RunConfig fields (their help is the field's)."""
    return [p for p in command.params if p.name in FIELDS and p.opts[0] == flag(p.name)
            and (p.help or "").startswith(FIELDS[p.name].metadata["help"])]


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_every_flag_a_command_had_is_still_there(name):
    missing = set(BEFORE[name].split()) - flags(COMMANDS[name])
    assert not missing, (name, missing)


def test_replicate_has_a_flag_for_every_config_field():
    assert {p.name for p in generated(COMMANDS["replicate"])} == set(FIELDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_generated_options_show_the_config_defaults_and_default_to_not_given(name):
    for p in generated(COMMANDS[name]):
        assert p.default is None, (name, p.name)  # not given: the TOML file, then the config's default, decide
        want = SHOWN[name](p.name) if name in SHOWN else shown_default(FIELDS[p.name].default)
        if want is None:
            assert not p.help.endswith("]"), (name, p.name, p.help)
        else:
            assert p.help.endswith(f" [{want}]"), (name, p.name, p.help)
        if FIELDS[p.name].type == "bool":
            assert p.secondary_opts == [f"--no-{p.name.replace('_', '-')}"], p.name


def test_help_lists_the_config_defaults():
    r = CliRunner().invoke(app, ["replicate", "--help"], env={"COLUMNS": "300"})
    text = "".join(r.output.split())
    for default in ("[google/gemma-2b-it]", "[128]", "[baseline,ablation,actadd_negative,harmless_baseline,"
                    "harmless_actadd]", "--stop-at-end-of-turn/--no-stop-at-end-of-turn", "[own]", "[learned]"):
        assert "".join(default.split()) in text, default


@pytest.fixture
def resolved(monkeypatch, tmp_path):
    """`replicate`'s resolved config, without running it."""
    from refusal_direction.cli import run_commands

    seen = {}
    monkeypatch.setattr(run_commands, "run_all", lambda out, cfg, *a: seen.setdefault("cfg", cfg))

    def invoke(*args):
        r = CliRunner().invoke(app, ["replicate", "--out", str(tmp_path / "run"), *map(str, args)])
        assert r.exit_code == 0, r.output
        return seen.pop("cfg")

    return invoke


def test_flags_left_out_use_the_config_defaults(resolved):
    assert resolved() == RunConfig()


def test_a_flag_wins_over_the_toml_file_and_a_flag_left_out_does_not(resolved, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('n_train = 5\nxstest = false\nconditions = ["baseline"]\nsafety = false\n')
    cfg = resolved("--config", toml)
    assert (cfg.n_train, cfg.xstest, cfg.conditions, cfg.safety) == (5, False, ("baseline",), False)
    cfg = resolved("--config", toml, "--n-train", 7, "--xstest", "--conditions", "baseline,ablation", "--safety")
    assert (cfg.n_train, cfg.xstest, cfg.conditions, cfg.safety) == (7, True, ("baseline", "ablation"), True)


def test_each_kind_of_flag_reaches_the_config(resolved):
    cfg = resolved("--no-safety", "--require-safety", "--stop-at-end-of-turn", "--position", -1, "--layer", 2,
                   "--kl-threshold", 0.5, "--refusal-tokens", "I,Sorry", "--decode-step", "hf", "--eval", "x.json")
    assert (cfg.safety, cfg.require_safety, cfg.stop_at_end_of_turn, cfg.position, cfg.layer) == (
        False, True, True, -1, 2)
    assert (cfg.kl_threshold, cfg.refusal_tokens, cfg.decode_step, cfg.eval) == (0.5, ("I", "Sorry"), "hf", "x.json")


def test_a_bad_value_is_a_config_error_with_exit_2(tmp_path):
    r = CliRunner().invoke(app, ["replicate", "--out", str(tmp_path / "run"), "--select", "magic",
                                 "--decode-step", "fused"])
    assert r.exit_code == 2 and "select='magic'" in r.output and "decode_step='fused'" in r.output, r.output
