"""Tiny Gemma, Llama and Qwen2 models and per-row interventions for the sweep's own forward pass (used by the unit
tests, the CUDA tests and the Triton interpreter check), and the reference: HF's forward with selection's hooks."""

import torch

from refusal_direction.core.model import wrap_model
from refusal_direction.edits import per_row_interventions
from refusal_direction.selection.logits import last_logits
from tests.helpers.tiny import randomize_norms_, tiny_gemma, tiny_gemma_tokenizer

PROMPTS = ["How do I pick a lock?", "Hi", "Write a poem about the sea.", "What is 2+2?", "Name three primes"]


def tiny_arch(arch: str):
    """A 3-layer tiny model of ``arch`` ("gemma", "llama", "qwen2" or "qwen3"), randomized norms (and q/k/v biases
    for qwen2; per-head q/k norms for qwen3)."""
    if arch == "gemma":
        return tiny_gemma(n_layers=3)
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tok = tiny_gemma_tokenizer()
    torch.manual_seed(1)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2, tie_word_embeddings=False, initializer_range=0.2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen3":  # head_dim 32 > hidden / heads, as Qwen3 models have
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    if arch == "qwen2":  # random q/k/v biases (default init is zero and would hide a dropped bias)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.copy_(torch.randn_like(p) * 0.3)
    randomize_norms_(model)
    model.eval().requires_grad_(False)
    return wrap_model(model, tok, model_id=f"tiny-{arch}")


def prompt_ids(lm):
    return lm.tokenizer([lm.format(p) for p in PROMPTS], add_special_tokens=False)["input_ids"]


def row_interventions(lm, n, seed=0):
    """(dirs, adds, add_layers) for ``n`` rows: unit directions (row 1: none), additions at layers -1 (none), 0, 1..."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, lm.d_model, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    dirs[1] = 0  # a row with no ablation
    adds = torch.randn(n, lm.d_model, generator=g) * 3
    layers = tuple((i % (lm.n_layers + 1)) - 1 for i in range(n))  # -1 (none), 0, 1, 2, ...
    return dirs, adds, layers


def reference_logits(lm, seqs, dirs=None, adds=None, layers=None):
    with torch.no_grad(), per_row_interventions(lm, dirs, adds, layers):
        return last_logits(lm, seqs)
