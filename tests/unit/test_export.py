"""Weight orthogonalization equals hook ablation; exports reload untied with plain transformers."""

import copy
import json

import pytest
import torch

from refusal_direction.core.directions import Direction
from refusal_direction.core.model import wrap_model
from refusal_direction.edits import DirectionalAblation, apply_intervention, orthogonalize_weights_
from refusal_direction.errors import UserError
from refusal_direction.export import (
    EXPORT_INFO,
    direction_digest,
    export_model,
    read_export_info,
    verify_export,
)
from tests.helpers.tiny import randomize_norms_, tiny_gemma, tiny_gemma_tokenizer

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi", "List three colours."]


@pytest.fixture(scope="module")
def lm():
    return tiny_gemma(tie=True)


@pytest.fixture(scope="module")
def direction(lm):
    g = torch.Generator().manual_seed(1)
    return Direction(torch.randn(lm.d_model, generator=g, dtype=torch.float64), layer=1, position=-2,
                     model_id=lm.model_id)


def logits(model, enc):
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**enc, position_ids=pos).logits


def hooked_logits(lm, direction, enc):
    with apply_intervention(lm, DirectionalAblation(direction.vector)):
        return logits(lm.model, enc)


def test_orthogonalized_weights_match_hooks(lm, direction):
    enc = lm.tokenize(PROMPTS)
    ref = hooked_logits(lm, direction, enc)
    model = copy.deepcopy(lm.model)
    edited = orthogonalize_weights_(model, direction)
    diff = (logits(model, enc) - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert edited.untied and model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    # lm_head is the original (unedited) unembedding
    assert torch.equal(model.lm_head.weight, lm.model.lm_head.weight)
    n_blocks = lm.n_layers
    assert len(edited.names) == 1 + 2 * n_blocks


def test_without_untying_the_mismatch_is_detected(lm, direction):
    """Editing the tied embedding edits the unembedding too: logits differ from the hooks, and verify_export says so."""
    enc = lm.tokenize(PROMPTS)
    ref = hooked_logits(lm, direction, enc)
    model = copy.deepcopy(lm.model)
    orthogonalize_weights_(model, direction, untie=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    diff = (logits(model, enc) - ref).abs().max().item()
    assert diff > 1e-3, diff
    result = verify_export(lm, model, direction, PROMPTS, max_new_tokens=4)
    assert not result["ok"] and result["max_abs_logit_diff"] > 1e-3, result


def test_caller_model_is_unchanged_and_hooks_gone(lm, direction, tmp_path):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    export_model(lm, direction, tmp_path / "out", {"run_dir": "runs/x"})
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    assert lm.model.config.tie_word_embeddings
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_export_reloads_with_plain_transformers(lm, direction, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_model(lm, direction, tmp_path / "exported", {"run_dir": "runs/x"})
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert reloaded.config.tie_word_embeddings is False
    assert not torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)
    assert torch.equal(reloaded.lm_head.weight, lm.model.lm_head.weight)

    result = verify_export(lm, reloaded, direction, PROMPTS, max_new_tokens=12, batch_size=3)
    assert result["max_abs_logit_diff"] <= 1e-4, result
    assert result["agreement"] == 1.0 and result["n_identical"] == len(PROMPTS)
    assert result["max_rel_projection"] < 1e-5, result
    assert result["ok"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_export_readme_provenance_and_out_dir_rules(lm, direction, tmp_path):
    out = export_model(lm, direction, tmp_path / "e", {"run_dir": "runs/abc"})
    readme = (out / "README.md").read_text()
    assert "safety research and evaluation only" in readme.lower()
    assert "not for deployment" in readme.lower()
    assert "runs/abc" in readme and "AutoModelForCausalLM.from_pretrained" in readme
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info == read_export_info(out)
    assert info["direction"]["layer"] == 1 and info["direction"]["position"] == -2
    assert info["direction"]["sha256_float64"] == direction_digest(direction)
    assert info["untied_lm_head"] is True and info["run"]["run_dir"] == "runs/abc"
    assert not list(tmp_path.glob("*.tmp-*"))

    with pytest.raises(UserError, match="--force"):
        export_model(lm, direction, out, {})
    export_model(lm, direction, out, {"run_dir": "runs/def"}, force=True)
    assert "runs/def" in (out / "README.md").read_text()

    other = tmp_path / "not-an-export"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(UserError, match="not empty"):
            export_model(lm, direction, other, {}, force=force)
    assert (other / "notes.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    export_model(lm, direction, empty, {})
    assert (empty / "model.safetensors").is_file()


def test_sandwich_norm_model_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = tiny_gemma_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                          eos_token_id=1, bos_token_id=2)
    model = Gemma2ForCausalLM(config).eval()
    assert hasattr(model.model.layers[0], "post_feedforward_layernorm")
    lm = wrap_model(model, tok, "tiny-gemma2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="sandwich"):
        orthogonalize_weights_(lm, torch.randn(64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing edited


@pytest.mark.parametrize("family", ["llama-with-biases", "gpt2"])
def test_other_families_match_hooks(family):
    """Biases (Llama with attention/MLP bias) and learned positions + Conv1D (GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = tiny_gemma_tokenizer()
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                           pad_token_id=0, eos_token_id=1, bos_token_id=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
            pad_token_id=0, eos_token_id=1, bos_token_id=2))
    randomize_norms_(model)
    model.eval().requires_grad_(False)
    lm = wrap_model(model, tok, family)
    direction = Direction(torch.randn(64, dtype=torch.float64), 0, -1)
    enc = lm.tokenize(PROMPTS)
    ref = hooked_logits(lm, direction, enc)
    edited_model = copy.deepcopy(model)
    edited = orthogonalize_weights_(edited_model, direction)
    assert (logits(edited_model, enc) - ref).abs().max().item() <= 1e-4
    assert any(n.endswith("bias") for n in edited.names)
    if family == "gpt2":
        assert "transformer.wpe.weight" in edited.names


def test_wrong_direction_width_is_refused(lm):
    with pytest.raises(UserError, match="d_model"):
        orthogonalize_weights_(copy.deepcopy(lm.model), torch.randn(lm.d_model + 1))


def test_qwen3_export_matches_hooks():
    """Qwen3's per-head q/k norms sit inside attention, before the rotary embedding: the writers' edit is exact."""
    from tests.helpers.sweep_cases import tiny_arch

    lm = tiny_arch("qwen3")
    direction = Direction(torch.randn(lm.d_model, dtype=torch.float64), 0, -1)
    enc = lm.tokenize(PROMPTS)
    ref = hooked_logits(lm, direction, enc)
    edited_model = copy.deepcopy(lm.model)
    orthogonalize_weights_(edited_model, direction)
    assert (logits(edited_model, enc) - ref).abs().max().item() <= 1e-4
    assert (logits(lm.model, enc) - ref).abs().max().item() > 1e-2  # the direction matters


def test_export_force_keeps_the_users_files_and_refuses_an_export_it_cannot_read(lm, direction, tmp_path):
    """`--force` into a previous export replaces the files the export listed as its own and keeps the rest (a
    user's notes, a results folder); an export without that list is refused instead of cleared."""
    out = export_model(lm, direction, tmp_path / "e", {"run_dir": "runs/abc"})
    listed = read_export_info(out)["files"]
    assert {"README.md", EXPORT_INFO, "config.json"} <= set(listed) and "notes.md" not in listed
    (out / "notes.md").write_text("mine")
    (out / "results").mkdir()
    (out / "results" / "scores.csv").write_text("1,2")
    export_model(lm, direction, out, {"run_dir": "runs/def"}, force=True)
    assert (out / "notes.md").read_text() == "mine" and (out / "results" / "scores.csv").read_text() == "1,2"
    assert "runs/def" in (out / "README.md").read_text() and not list(tmp_path.glob("e.old-*"))
    info = json.loads((out / EXPORT_INFO).read_text())
    del info["files"]
    (out / EXPORT_INFO).write_text(json.dumps(info))
    with pytest.raises(UserError, match="does not list its own files"):
        export_model(lm, direction, out, {}, force=True)
    assert (out / "notes.md").read_text() == "mine"

