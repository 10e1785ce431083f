"""Bad input: every problem reported up front with its fix, exit code 2, nothing written but the log."""


import pytest
import torch
from typer.testing import CliRunner

from refusal_direction.cli import app
from refusal_direction.core.directions import Direction, save_direction
from tests.helpers.tiny import save_tiny_gemma, tiny_gemma_tokenizer

BASE = ["--n-train", "4", "--n-val", "2", "--n-eval", "2", "--n-harmless-eval", "2", "--max-new-tokens", "2",
        "--device", "cpu", "--no-safety"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_gemma(tmp_path_factory.mktemp("m") / "tiny-gemma")


@pytest.fixture(scope="module")
def llama_no_template(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_gemma_tokenizer()
    tok.chat_template = None
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    path = tmp_path_factory.mktemp("llama") / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def written(out):
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def check(result, out, *needles):
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)
    assert written(out) in ([], ["run.log"]), written(out)


def test_unknown_and_malformed_config_keys_reported_together(tmp_path, model_dir, data_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text('n_trian = 3\nmax_new_tokens = "many"\nselect = "magic"\n')
    r = invoke(["replicate", "--out", tmp_path / "run", "--model", model_dir, "--config", cfg])
    check(r, tmp_path / "run", "unknown config key 'n_trian'", "max_new_tokens='many': expected an integer",
          "select='magic'")


def test_invalid_toml(tmp_path, model_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text("n_train = = 3\n")
    check(invoke(["replicate", "--out", tmp_path / "run", "--model", model_dir, "--config", cfg]), tmp_path / "run",
          "not valid TOML")


def test_missing_data_dir(tmp_path, model_dir):
    r = invoke(["replicate", "--out", tmp_path / "run", "--model", model_dir, "--data-dir", tmp_path / "nope", *BASE])
    check(r, tmp_path / "run", "does not exist", "refusal_direction/splits")


@pytest.mark.parametrize("content,needle", [
    (None, "neither a named set"),
    ('[{"instruction": "a"},\n oops]', "bad.json:2: invalid JSON"),  # the other formats: tests/unit/test_data.py
])
def test_bad_instruction_files(tmp_path, model_dir, data_dir, content, needle):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    r = invoke(["replicate", "--out", tmp_path / "run", "--model", model_dir, "--data-dir", data_dir,
                "--harmful-train", path, *BASE])
    check(r, tmp_path / "run", needle)


def test_several_problems_at_once(tmp_path, data_dir):
    r = invoke(["replicate", "--out", tmp_path / "run", "--model", tmp_path / "no-model", "--data-dir", data_dir,
                "--harmful-train", tmp_path / "missing.json", *BASE])
    check(r, tmp_path / "run", "missing.json", "could not load model")


def test_model_not_found_offline(tmp_path, data_dir):
    r = invoke(["replicate", "--out", tmp_path / "run", "--model", "no-such-org/no-such-model", "--data-dir", data_dir,
                *BASE])
    check(r, tmp_path / "run", "could not load model 'no-such-org/no-such-model'", "local model directory")


def test_gated_model_without_token(tmp_path, data_dir, monkeypatch):
    import transformers

    def gated(*a, **k):
        raise OSError("You are trying to access a gated repo. 401 Client Error")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", gated)
    r = invoke(["replicate", "--out", tmp_path / "run", "--model", "google/gemma-2b-it", "--data-dir", data_dir, *BASE])
    check(r, tmp_path / "run", "gated", "HF_TOKEN", "Accept the license")


def test_no_chat_template(tmp_path, data_dir, llama_no_template):
    r = invoke(["replicate", "--out", tmp_path / "run", "--model", llama_no_template, "--data-dir", data_dir,
                "--layer", "0", "--position", "-1", *BASE])
    check(r, tmp_path / "run", "no chat template", "--chat-template")


def test_layer_and_position_out_of_range(tmp_path, model_dir, data_dir):
    r = invoke(["replicate", "--out", tmp_path / "run", "--model", model_dir, "--data-dir", data_dir,
                "--layer", "40", "--position", "-9", *BASE])
    check(r, tmp_path / "run", "layer=40 is out of range", "(3 layers: 0..2)", "position=-9 is out of range")


def test_positive_position_rejected(tmp_path, model_dir, data_dir):
    r = invoke(["replicate", "--out", tmp_path / "run", "--model", model_dir, "--data-dir", data_dir,
                "--layer", "1", "--position", "2", *BASE])
    check(r, tmp_path / "run", "position=2 must be negative")


def test_direction_file_checks(tmp_path, model_dir, data_dir):
    wrong = tmp_path / "wrong.safetensors"
    save_direction(Direction(torch.randn(7, dtype=torch.float64), 1, -2, "other/model"), wrong)
    r = invoke(["replicate", "--out", tmp_path / "run", "--model", model_dir, "--data-dir", data_dir,
                "--direction-file", wrong, *BASE])
    check(r, tmp_path / "run", "d_model 7 but the model has 64")
    pt = tmp_path / "direction.pt"
    torch.save(torch.randn(64), pt)
    r = invoke(["replicate", "--out", tmp_path / "run2", "--model", model_dir, "--data-dir", data_dir,
                "--direction-file", pt, *BASE])
    check(r, tmp_path / "run2", "pickle", "safetensors")
