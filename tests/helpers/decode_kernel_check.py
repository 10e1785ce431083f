"""Run by tests/gpu/test_decode_attention_interpret.py in a fresh process, as ``python -m
tests.helpers.decode_kernel_check`` from the repository root: the decode-attention kernel on CPU under Triton's
interpreter (TRITON_INTERPRET=1 must be set before triton is imported, hence the separate process), float32.

Prints one JSON object: the kernel's probe check for several head shapes (and for a deliberately wrong kernel), and
for a grouped-query and a multi-head tiny model, the fast path's tokens with every decode step's attention on the
kernel against the same run on SDPA (and how many decode-step attention calls the kernel served)."""

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from refusal_direction.accel import folded_attention  # noqa: E402
from refusal_direction.accel.decode_attention import decode_attention  # noqa: E402
from refusal_direction.accel.fast_generation import generate_fast_ids, prompt_ids  # noqa: E402
from refusal_direction.core.model import wrap_model  # noqa: E402
from refusal_direction.edits import Baseline, DirectionalAblation  # noqa: E402
from tests.helpers.sweep_cases import PROMPTS, tiny_arch  # noqa: E402
from tests.helpers.tiny import randomize_norms_, tiny_gemma_tokenizer  # noqa: E402


def tiny_mha():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_gemma_tokenizer()
    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                         initializer_range=0.2))
    randomize_norms_(model)
    return wrap_model(model.eval().requires_grad_(False), tok, model_id="tiny-llama-mha")


def tokens(lm, kernel: bool) -> tuple[list, int]:
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return decode_attention(*args, **kwargs)

    original = folded_attention.decode_kernel_for
    folded_attention.decode_kernel_for = (lambda model, cfg, notes: counted) if kernel else original
    try:
        ivs = [Baseline(), DirectionalAblation(torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0)))]
        out = generate_fast_ids(lm, prompt_ids(lm, PROMPTS), ivs, 10, [], force_tokens=True, decode="eager")
    finally:
        folded_attention.decode_kernel_for = original
    return out.tokens, calls[0]


def main() -> None:
    result = {"probes": {}}
    for heads, kv, dim in ((8, 1, 64), (4, 2, 32), (4, 4, 16)):
        ok, detail = folded_attention.verify_decode_kernel(decode_attention, heads, kv, dim, torch.float32, "cpu")
        result["probes"][f"{heads}/{kv}/{dim}"] = ok
    wrong = lambda *a, **k: decode_attention(*a, **k) * 1.001  # noqa: E731
    result["wrong_kernel_passes"] = folded_attention.verify_decode_kernel(wrong, 4, 2, 32, torch.float32, "cpu")[0]
    for name, lm in (("gqa", tiny_arch("llama")), ("mha", tiny_mha())):
        ref, _ = tokens(lm, kernel=False)
        got, calls = tokens(lm, kernel=True)
        result[name] = {"identical": ref == got, "kernel_calls": calls, "layers": lm.n_layers,
                        "distinct_tokens": len({t for rows in ref.values() for row in rows for t in row})}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
