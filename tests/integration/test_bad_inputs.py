"""Bad file content never shows a traceback: a message naming the file, what is wrong and the fix; exit 2.

Instructions, configs, chat templates, direction files and run-directory files (docs/BAD_INPUTS.md).
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from refusal_direction.cli import app
from refusal_direction.core.directions import Direction, load_direction, save_direction
from refusal_direction.errors import UserError
from tests.helpers.tiny import save_tiny_gemma

SMALL = ["--n-train", "4", "--n-val", "2", "--n-eval", "2", "--n-harmless-eval", "2", "--max-new-tokens", "2",
         "--batch-size", "4", "--device", "cpu", "--no-safety", "--conditions", "baseline,ablation",
         "--layer", "1", "--position", "-2"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def no_traceback(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output
    for n in needles:
        assert n in r.output, (n, r.output)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_gemma(tmp_path_factory.mktemp("m") / "tiny-gemma")


@pytest.fixture(scope="module")
def run_dir(model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("r") / "run"
    r = invoke("replicate", "--out", out, "--model", model_dir, "--data-dir", data_dir, *SMALL)
    assert r.exit_code == 0, r.output
    return out


def test_non_utf8_instruction_file(tmp_path, model_dir, data_dir):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'["caf\xe9"]')
    r = invoke("replicate", "--out", tmp_path / "run", "--model", model_dir, "--data-dir", data_dir,
               "--harmful-train", bad, *SMALL)
    no_traceback(r, "bad.json is not UTF-8", "save it as UTF-8")


def test_non_utf8_config_file(tmp_path, model_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(b"n_train = 3 # \xff\n")
    no_traceback(invoke("replicate", "--out", tmp_path / "run", "--model", model_dir, "--config", cfg),
                 "c.toml is not UTF-8")


def test_config_table_instead_of_value(tmp_path, model_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[n_train]\nvalue = 3\n")
    no_traceback(invoke("replicate", "--out", tmp_path / "run", "--model", model_dir, "--config", cfg),
                 "n_train=", "expected an integer")


def test_chat_template_syntax_error(tmp_path, model_dir):
    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}{{ m.content }\n")
    no_traceback(invoke("replicate", "--out", tmp_path / "run", "--model", model_dir, "--chat-template", t),
                 "t.jinja:", "Jinja syntax error")


@pytest.mark.parametrize("case,needle", [
    ("corrupt", "is not a readable safetensors file"),
    ("renamed", "is not a readable safetensors file"),
    ("wrong_key", "has no tensor named 'direction'"),
    ("two_d", "expected a floating-point [d_model] tensor"),
    ("nan", "non-finite value"),
    ("sidecar_list", "expected a JSON object"),
    ("sidecar_layer", "layer='ten' is not an integer"),
])
def test_bad_direction_files(tmp_path, case, needle):
    path = tmp_path / "d.safetensors"
    if case == "corrupt":
        path.write_bytes(b"\x00\x01garbage" * 10)
    elif case == "renamed":
        path.write_text('{"this": "is json"}')
    elif case == "wrong_key":
        save_file({"vector": torch.ones(8)}, str(path))
    elif case == "two_d":
        save_file({"direction": torch.ones(2, 8)}, str(path))
    elif case == "nan":
        save_file({"direction": torch.tensor([1.0, float("nan")], dtype=torch.float64)}, str(path))
    else:
        save_direction(Direction(torch.ones(8, dtype=torch.float64), 1, -2), path)
        if case == "sidecar_list":
            path.with_suffix(".json").write_text("[1, 2]")
        if case == "sidecar_layer":
            meta = json.loads(path.with_suffix(".json").read_text())
            path.with_suffix(".json").write_text(json.dumps({**meta, "layer": "ten"}))
    with pytest.raises(UserError, match=None) as info:
        load_direction(path)
    assert needle in str(info.value) and path.stem in str(info.value)


def test_direction_file_from_the_cli(tmp_path, model_dir, data_dir):
    path = tmp_path / "d.safetensors"
    save_file({"direction": torch.ones(2, 64)}, str(path))
    r = invoke("replicate", "--out", tmp_path / "run", "--model", model_dir, "--data-dir", data_dir,
               "--direction-file", path, *SMALL)
    no_traceback(r, "d.safetensors", "[d_model]")


def _copy_run(run_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    return out


@pytest.mark.parametrize("rel,content,needle", [
    ("config.json", "{oops", "run config"),
    ("config.json", "[1, 2]", "expected a JSON object, got list"),
    ("summary.json", "[]", "expected a JSON object, got list"),
    ("samples/samples.json", '{"sets": []}', "malformed samples"),
    ("completions/jailbreakbench__baseline.jsonl", "[1]\n[2]\n", "expected a JSON object, got list"),
    ("completions/jailbreakbench__baseline.jsonl", "{not json\n", "invalid JSON line"),
    ("selection.json", "not json", "invalid JSON"),
])
def test_damaged_run_files_for_report(run_dir, tmp_path, rel, content, needle):
    out = _copy_run(run_dir, tmp_path)
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_text(content)
    no_traceback(invoke("report", out), rel.split("/")[-1], needle)


def test_non_utf8_run_file(run_dir, tmp_path):
    out = _copy_run(run_dir, tmp_path)
    (out / "summary.json").write_bytes(b"\xff\xfe")
    no_traceback(invoke("report", out), "summary.json is not UTF-8")


@pytest.mark.parametrize("content,needle", [("not json", "invalid JSON"), ("{}", "holds no list")])
def test_bad_scores_file(tmp_path, content, needle):
    path = tmp_path / "s.json"
    path.write_text(content)
    no_traceback(invoke("select", "--from-scores", path), "s.json", needle)


def test_out_is_a_file(tmp_path, model_dir):
    (tmp_path / "f").write_text("x")
    no_traceback(invoke("replicate", "--out", tmp_path / "f", "--model", model_dir), "is a file")


def test_bad_gguf_weights_cache_switch_exits_before_loading(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("REFUSAL_DIRECTION_GGUF_WEIGHTS_CACHE", "maybe")
    r = invoke("replicate", "--out", tmp_path / "run", "--model", model_dir, *SMALL)
    no_traceback(r, "REFUSAL_DIRECTION_GGUF_WEIGHTS_CACHE='maybe'", "set it to 0")
    assert not (tmp_path / "run").exists()
