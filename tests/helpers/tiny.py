"""Tiny random models and tokenizers built in-process (no downloads), for tests.

`tiny_gemma_tokenizer()` is a character-level tokenizer that knows Gemma's special tokens and whole
tokens for "\\n", "user" and "model", carrying gemma-2b-it's chat template. `tiny_gemma()` is a random
GemmaForCausalLM (2-4 layers, small hidden size) with randomized RMSNorm gains, wrapped as a
LoadedModel.
"""

from __future__ import annotations

import string

import torch

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def tiny_gemma_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r\t"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    for word in ("user", "model", "I"):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    core.add_tokens(["user", "model"])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = GEMMA_TEMPLATE
    tok.padding_side = "left"
    return tok


def randomize_norms_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every RMSNorm a random gain (default init hides bugs, e.g. the tied-embedding one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def tiny_gemma_hf(n_layers: int = 3, hidden: int = 64, seed: int = 0, tie: bool = True):
    from transformers import GemmaConfig, GemmaForCausalLM

    tok = tiny_gemma_tokenizer()
    torch.manual_seed(seed)
    config = GemmaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=hidden // 4, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2, tie_word_embeddings=tie, hidden_activation="gelu_pytorch_tanh",
                         initializer_range=0.2)
    model = GemmaForCausalLM(config)
    randomize_norms_(model, seed)
    model.eval().requires_grad_(False)
    return model, tok


def tiny_gemma(n_layers: int = 3, hidden: int = 64, seed: int = 0, tie: bool = True):
    from refusal_direction.core.model import wrap_model

    model, tok = tiny_gemma_hf(n_layers, hidden, seed, tie)
    return wrap_model(model, tok, model_id="tiny-gemma")


def save_tiny_gemma(path, **kwargs):
    """Write a tiny Gemma + tokenizer to ``path`` (loadable with load_model(str(path)))."""
    model, tok = tiny_gemma_hf(**kwargs)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_family_lm(family: str):
    """A tiny wrapped model of one family: ``gemma-tied`` / ``gemma-untied`` (no biases), ``llama-biases``
    (attention and MLP biases, tied embedding), ``llama-no-writer-bias`` (the same without biases) or ``gpt2``
    (Conv1D writers with biases, learned positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from refusal_direction.core.model import wrap_model

    if family.startswith("gemma"):
        return tiny_gemma(n_layers=3, tie=family == "gemma-tied")
    tok = tiny_gemma_tokenizer()
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=3, n_head=4, n_positions=256,
                                           pad_token_id=0, eos_token_id=1, bos_token_id=2))
    elif family in ("llama-biases", "llama-no-writer-bias"):
        biases = family == "llama-biases"  # without: no biases at all (Qwen2 keeps q/k/v biases, no writer bias)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, attention_bias=biases, mlp_bias=biases, tie_word_embeddings=True,
            pad_token_id=0, eos_token_id=1, bos_token_id=2))
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    randomize_norms_(model)
    model.eval().requires_grad_(False)
    return wrap_model(model, tok, family)
