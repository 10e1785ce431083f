"""Model stage: chat format, post-instruction tokens, residual sites."""

import pytest
import torch

from refusal_direction.core.activations import capture_resid_pre
from refusal_direction.core.model import GEMMA_PREFIX, GEMMA_SUFFIX, derive_chat_format, load_model
from refusal_direction.errors import UserError
from tests.helpers.prompts import PROMPTS
from tests.helpers.tiny import save_tiny_gemma, tiny_gemma_tokenizer


def test_gemma_post_instruction_tokens_are_the_papers_five(tiny_lm):
    assert tiny_lm.post_instruction_tokens() == ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
    assert tiny_lm.format("Hi") == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_template_derivation_matches_the_paper_format():
    """Deriving from the tokenizer's own Gemma template gives the paper's exact prefix/suffix."""
    chat = derive_chat_format(tiny_gemma_tokenizer(), model_type="not-gemma")
    assert (chat.prefix, chat.suffix) == (GEMMA_PREFIX, GEMMA_SUFFIX)


def test_no_chat_template_is_a_clear_error():
    tok = tiny_gemma_tokenizer()
    tok.chat_template = None
    with pytest.raises(UserError, match="--chat-template"):
        derive_chat_format(tok, model_type="llama")


def test_tokenize_left_pads_and_ends_with_post_instruction_ids(tiny_lm):
    enc = tiny_lm.tokenize(PROMPTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()
    n = tiny_lm.n_post_instruction
    assert (ids[:, -n:] == torch.tensor(tiny_lm.post_instruction_ids)).all()


def test_captured_resid_pre_equals_output_hidden_states(tiny_lm):
    acts = capture_resid_pre(tiny_lm, PROMPTS)  # [batch, n_pos, n_layers, d]
    with torch.no_grad():
        hs = tiny_lm.model(**tiny_lm.tokenize(PROMPTS), output_hidden_states=True).hidden_states
    n = tiny_lm.n_post_instruction
    assert acts.shape == (len(PROMPTS), n, tiny_lm.n_layers, tiny_lm.d_model)
    for layer in range(tiny_lm.n_layers):
        assert torch.equal(acts[:, :, layer], hs[layer][:, -n:])


def test_load_model_from_local_directory(tmp_path, tiny_lm):
    save_tiny_gemma(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), device="cpu")
    assert lm.n_layers == 3 and lm.dtype == torch.float32
    assert (lm.chat.prefix, lm.chat.suffix) == (tiny_lm.chat.prefix, tiny_lm.chat.suffix)  # the template survives
    assert lm.post_instruction_ids == tiny_lm.post_instruction_ids
    assert "float32" in lm.dtype_reason


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="could not load model"):
        load_model("no-such-org/no-such-model-xyz", device="cpu")
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")
