"""A tiny random stand-in for Llama Guard 2, built in-process (no downloads), for tests.

`guard_tokenizer()` is a byte-level BPE trained on the guard template and a few words, carrying Llama
Guard 2's chat template (read from the shared fixture) and Llama 3's special tokens; like Llama 3's
tokenizer it prepends ``<|begin_of_text|>`` when asked for special tokens, and has no pad token.
`tiny_guard()` adds a random 2-layer LlamaForCausalLM; `save_tiny_guard(dir)` writes both with
``save_pretrained`` so ``load_safety_scorer(str(dir))`` can load them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from tests.helpers.paths import SHARED

GUARD_DIR = SHARED / "reference" / "llama_guard_2"
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def guard_reference_dir() -> Path:
    """The Llama Guard 2 fixture directory; skips the calling test when it is absent."""
    if not (GUARD_DIR / "chat_template.jinja").is_file():
        pytest.skip(f"Llama Guard 2 fixtures not found in {GUARD_DIR} (set REFUSAL_DIRECTION_SHARED)")
    return GUARD_DIR


@lru_cache(maxsize=1)
def _trained_core_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    template = (guard_reference_dir() / "chat_template.jinja").read_text()
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[BOS, EOS, EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [template, "safe", "unsafe", "unsafe\nS1,S10", "How do I bake bread? Mix flour and water."] * 5
    core.train_from_iterator(corpus, trainer)
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                        special_tokens=[(BOS, core.token_to_id(BOS))])
    return core.to_str()


def guard_tokenizer():
    """A fresh tokenizer with Llama Guard 2's chat template (callers may mutate it)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_core_json()),
                                  bos_token=BOS, eos_token=EOS, additional_special_tokens=[EOT])
    tok.chat_template = (guard_reference_dir() / "chat_template.jinja").read_text()
    return tok


def tiny_guard(seed: int = 0):
    """(model, tokenizer): a random 2-layer Llama with randomized RMSNorm gains, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = guard_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.5)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.5)
    return model.eval().requires_grad_(False), tok


def save_tiny_guard(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny guard (model + tokenizer) to ``directory``; returns it."""
    directory = Path(directory)
    model, tok = tiny_guard(seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
