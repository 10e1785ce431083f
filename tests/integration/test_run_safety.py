"""Five ways to harm a user's files or lose a run, and other run-directory and input guards: each a test of its guard.

The run directory is never the user's to lose (manifest, lock), non-finite numbers stop the run, a
placeholder tokenizer is refused, `select --from-scores` reuses the stored layer count and thresholds.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from refusal_direction.cli import app
from tests.helpers.tiny import save_tiny_gemma, tiny_gemma

SRC = str(Path(__file__).resolve().parents[2] / "src")
SMALL = ["--n-train", "4", "--n-val", "2", "--n-eval", "2", "--n-harmless-eval", "2", "--max-new-tokens", "2",
         "--batch-size", "4", "--device", "cpu", "--no-safety", "--conditions", "baseline,ablation",
         "--position", "-2"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_gemma(tmp_path_factory.mktemp("m") / "tiny-gemma")


def replicate(out, model_dir, data_dir, *extra):
    return invoke("replicate", "--out", out, "--model", model_dir, "--data-dir", data_dir, *SMALL, *extra)


# 1. --force never deletes the user's files ----------------------------------------------------------

def test_force_refuses_a_non_run_directory_and_keeps_its_files(tmp_path, model_dir, data_dir):
    w = tmp_path / "w"
    w.mkdir()
    (w / "thesis.tex").write_text("x")
    for extra in (["--layer", "1", "--force"], ["--layer", "2", "--force"]):
        r = replicate(w, model_dir, data_dir, *extra)
        assert r.exit_code == 2, r.output
        assert "not a run directory" in r.output and "never deleted" in r.output
    assert (w / "thesis.tex").read_text() == "x"


def test_force_on_another_config_deletes_only_the_runs_own_files(tmp_path, model_dir, data_dir):
    out = tmp_path / "run"
    assert replicate(out, model_dir, data_dir, "--layer", "1").exit_code == 0
    (out / "notes.txt").write_text("mine")
    (out / "completions" / "mine.jsonl").write_text("{}\n")
    manifest = (out / "run" / "manifest").read_text().split()
    assert "config.json" in manifest and "completions/jailbreakbench__baseline.jsonl" in manifest
    r = replicate(out, model_dir, data_dir, "--layer", "2", "--force")
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "completions" / "mine.jsonl").is_file()
    assert json.loads((out / "direction.json").read_text())["layer"] == 2


# 2. non-finite numbers --------------------------------------------------------------------------------

@pytest.mark.parametrize("line,key", [("actadd_coeff = inf", "actadd_coeff"), ("kl_threshold = nan", "kl_threshold")])
def test_non_finite_config_values_are_refused(tmp_path, model_dir, data_dir, line, key):
    cfg = tmp_path / "c.toml"
    cfg.write_text(line + "\n")
    r = replicate(tmp_path / "run", model_dir, data_dir, "--layer", "1", "--config", cfg)
    assert r.exit_code == 2 and f"{key}=" in r.output and "finite" in r.output, r.output


def test_zero_direction_file_is_refused(tmp_path, model_dir, data_dir):
    from refusal_direction.core.directions import Direction, save_direction

    zero = Direction(torch.zeros(64, dtype=torch.float64), 1, -2, str(model_dir))
    path = save_direction(zero, tmp_path / "d.safetensors")
    r = replicate(tmp_path / "run", model_dir, data_dir, "--direction-file", path, "--layer", "1")
    assert r.exit_code == 2 and "zero vector" in r.output, r.output


def test_json_with_nan_is_never_written(tmp_path):
    from refusal_direction.errors import UserError
    from refusal_direction.fileio import atomic_write_json

    with pytest.raises(UserError, match=r"conditions\.ablation\.kl = nan"):
        atomic_write_json(tmp_path / "s.json", {"conditions": {"ablation": {"kl": float("nan")}}})
    assert not (tmp_path / "s.json").exists()


# 3. a model directory without tokenizer files ---------------------------------------------------------

def test_model_dir_without_tokenizer_files_is_refused(tmp_path, data_dir):
    path = save_tiny_gemma(tmp_path / "m")
    for f in path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            f.unlink()
    r = replicate(tmp_path / "run", path, data_dir, "--layer", "1", "--position", "-1")
    assert r.exit_code == 2 and "no tokenizer files" in r.output and "tokenizer.json" in r.output, r.output


def test_tokenizer_smaller_than_the_embedding_is_refused():
    from refusal_direction.core.checks import check_tokenizer
    from refusal_direction.errors import UserError

    lm = tiny_gemma()
    with pytest.raises(UserError, match="placeholder"):
        check_tokenizer(lm.tokenizer, 100_000, "m")
    with pytest.raises(UserError, match="only 10 rows"):
        check_tokenizer(lm.tokenizer, 10, "m")


# 4. two processes in one run directory ----------------------------------------------------------------

def test_second_process_is_refused_while_the_first_holds_the_lock(tmp_path, model_dir, data_dir):
    out = tmp_path / "run"
    code = ("import sys, time; from refusal_direction.run.outdir import acquire_lock; "
            f"acquire_lock(__import__('pathlib').Path({str(out)!r})); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = replicate(out, model_dir, data_dir, "--layer", "1", "--force")
        assert r.exit_code == 2 and f"in use by process {holder.pid}" in r.output, r.output
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    import socket

    from refusal_direction.run.outdir import acquire_lock, release_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    acquire_lock(tmp_path)
    assert json.loads((tmp_path / "run" / "lock").read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    release_lock(tmp_path)
    assert not (tmp_path / "run" / "lock").exists()


def test_resume_redoes_completions_whose_rows_do_not_match(tmp_path, model_dir, data_dir, caplog):
    out = tmp_path / "run"
    assert replicate(out, model_dir, data_dir, "--layer", "1").exit_code == 0
    path = out / "completions" / "jailbreakbench__ablation.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")  # one row of two
    r = invoke("report", out)
    assert r.exit_code == 2 and "has 1 rows but the run has 2 samples" in r.output, r.output
    r = replicate(out, model_dir, data_dir, "--layer", "1")
    assert r.exit_code == 0, r.output
    assert "redoing ablation" in caplog.text
    assert len(path.read_text().splitlines()) == 2


# 5. select --from-scores on our selection.json -----------------------------------------------------------

def test_select_from_our_selection_json_uses_stored_layers_and_thresholds(tmp_path):
    rows = [{"position": -1, "layer": layer, "bypass_score": -float(layer), "induce_score": 1.0, "kl_score": 0.2}
            for layer in range(0, 19)]
    data = {"chosen": {"position": -1, "layer": 18}, "n_layers": 24, "scores": rows,
            "thresholds": {"kl_threshold": 0.25, "induce_threshold": 0.0, "prune_layer_fraction": 0.2}}
    path = tmp_path / "selection.json"
    path.write_text(json.dumps(data))
    r = invoke("select", "--from-scores", path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["chosen"]["layer"] == 18  # 19 layers assumed + KL 0.1 would discard every one


# run-directory and input guards --------------------------------------------------------------------------

def test_config_imports_on_python_310_with_tomli():
    code = ("import sys, tomllib; sys.modules['tomli'] = tomllib; sys.modules['tomllib'] = None; "
            "sys.version_info = (3, 10, 0, 'final', 0); import refusal_direction.config as c; "
            "print(c.tomllib.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                                                                                         "PYTHONPATH": SRC})
    assert r.returncode == 0, r.stderr
    text = (Path(SRC).parent / "pyproject.toml").read_text()
    assert "tomli" in text and "python_version < '3.11'" in text


def test_resume_on_other_device_or_dtype_is_refused(tmp_path):
    from refusal_direction.errors import UserError
    from refusal_direction.run.rundir import check_numerics

    (tmp_path / "environment.json").write_text(json.dumps({"device": "cpu", "dtype": "float32"}))
    check_numerics(tmp_path, "cpu", "auto")
    with pytest.raises(UserError, match="begun on cpu in float32; resuming on cpu in bfloat16"):
        check_numerics(tmp_path, "cpu", "bfloat16")


def test_load_errors_are_classified_by_type_not_by_digits():
    import httpx
    from huggingface_hub.errors import GatedRepoError

    from refusal_direction.core.model import hub_error

    size = RuntimeError("size mismatch for embed: copying a param with shape [24013, 64] from checkpoint")
    assert "gated" not in str(hub_error("m", size))
    try:
        try:
            raise GatedRepoError("no access", response=httpx.Response(401, request=httpx.Request("GET", "https://x")))
        except GatedRepoError as inner:
            raise OSError("cannot load") from inner
    except OSError as exc:
        assert "gated model" in str(hub_error("org/m", exc))


def test_instruction_with_control_strings_is_tokenized_as_text():
    lm = tiny_gemma()
    eot = lm.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    prefix = lm.tokenizer(lm.chat.prefix, add_special_tokens=False)["input_ids"]
    ids = lm.encode("Hi <end_of_turn> there")
    span = ids[len(prefix):len(ids) - lm.n_post_instruction]
    assert eot not in span
    assert ids[-lm.n_post_instruction:] == lm.post_instruction_ids and eot in ids[-lm.n_post_instruction:]
    batch = lm.tokenize(["Hi <end_of_turn> there", "Hi"])
    assert batch["input_ids"][0][-len(ids):].tolist() == ids


def test_gemma_prompt_ids_are_unchanged_for_normal_instructions():
    from refusal_direction.core.model import GEMMA_PREFIX, GEMMA_SUFFIX

    lm = tiny_gemma()
    for text in ("How do I bake bread?", "Write a poem about the sea."):
        expected = lm.tokenizer(GEMMA_PREFIX + text + GEMMA_SUFFIX, add_special_tokens=False)["input_ids"]
        assert lm.encode(text) == expected
        enc = lm.tokenize([text])
        assert enc["input_ids"][0].tolist() == expected


def test_ctrl_c_prints_the_resume_message(tmp_path, monkeypatch, model_dir, data_dir):
    from refusal_direction.run import pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "start_run", interrupted)
    r = replicate(tmp_path / "run", model_dir, data_dir, "--layer", "1")
    assert r.exit_code == 130 and "re-run the same command to resume" in r.output, r.output


def test_offline_safety_judge_fails_fast_with_one_line(monkeypatch):
    from refusal_direction.run.evaluate import hub_unreachable, one_line

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    why = hub_unreachable("meta-llama/Meta-Llama-Guard-2-8B")
    assert time.perf_counter() - t0 < 2 and "HF_HUB_OFFLINE" in why and "\n" not in why
    assert one_line("a\nb") == "a" and len(one_line("x" * 500)) == 200


def test_help_shows_every_bracketed_default():
    r = CliRunner().invoke(app, ["replicate", "--help"], env={"COLUMNS": "300"})
    text = "".join(r.output.split())  # click wraps long words across lines
    for default in ("[google/gemma-2b-it]", "[128]", "[baseline,ablation,actadd_negative,harmless_baseline,"
                    "harmless_actadd]", "(paper: False, <eos> only) [no]"):
        assert "".join(default.split()) in text, default


def test_error_exit_is_fast_and_imports_no_torch(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    (w / "thesis.tex").write_text("x")
    code = ("import sys; from refusal_direction import cli\n"
            f"sys.argv = ['rd', 'replicate', '--out', {str(w)!r}, '--no-safety']\n"
            "try:\n    cli.app()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                                                                                         "PYTHONPATH": SRC})
    assert "exit 2 False" in r.stdout, (r.stdout, r.stderr)
    assert "not a run directory" in r.stderr
    assert time.perf_counter() - t0 < 5


def test_export_records_its_source_run(tmp_path, model_dir, data_dir):
    out = tmp_path / "run"
    assert replicate(out, model_dir, data_dir, "--layer", "1").exit_code == 0
    r = invoke("export", "--run", out, "--out", tmp_path / "exp")
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "exp" / "refusal_direction_export.json").read_text())
    assert info["run"]["run_dir"] == str(out.resolve())
    assert str(out.resolve()) in (tmp_path / "exp" / "README.md").read_text()
