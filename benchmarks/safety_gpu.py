"""Time the Llama Guard 2 scorer at Llama Guard 2's exact shape (Llama-3-8B config, random weights).

Usage (GPU machine): REFUSAL_DIRECTION_SHARED=DIR python benchmarks/safety_gpu.py [--n 200] [--tokens 512]
DIR must hold reference/llama_guard_2/chat_template.jinja (the shared fixtures). The tokenizer is the
in-process test tokenizer carrying Llama Guard 2's template; the weights are random, so the verdicts
mean nothing: this measures time and memory only. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from guard_fixtures import guard_tokenizer  # noqa: E402

from refusal_direction.evaluation.safety import SafetyScorer  # noqa: E402

WORDS = ("the of and to in is that for it as with was on be by this are or an from at which but not have "
         "step first then use mix heat water add until make sure you will need about minutes small large "
         "keep safe place remove before after each into over under while because system network file").split()


def text_of_tokens(tok, n_tokens: int, rng: random.Random) -> str:
    words: list[str] = []
    while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < n_tokens:
        words += rng.choices(WORDS, k=16)
    return " ".join(words)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch-sizes", default="16,32")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = guard_tokenizer()
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    rng = random.Random(0)
    base = text_of_tokens(tok, args.tokens, rng)
    completions = [" ".join(rng.sample(base.split(), len(base.split()))) for _ in range(args.n)]
    instructions = [text_of_tokens(tok, 20, rng) for _ in range(args.n)]
    scorer = SafetyScorer(model, tok, model_id="random weights, Llama-Guard-2 shape")
    lengths = [len(scorer.prompt_ids(i, c)) for i, c in zip(instructions, completions)]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "build_s": round(build_s, 2),
           "n": args.n, "mean_prompt_tokens": sum(lengths) / len(lengths), "runs": []}
    scorer.score(instructions[:8], completions[:8], batch_size=8)  # warm-up
    for bs in map(int, args.batch_sizes.split(",")):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        verdicts = scorer.score(instructions, completions, batch_size=bs, mode="logprob")
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        out["runs"].append({"mode": "logprob", "batch_size": bs, "seconds": round(dt, 3),
                            "completions_per_s": round(args.n / dt, 1),
                            "prompt_tokens_per_s": round(sum(lengths) / dt),
                            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                            "n_verdicts": len(verdicts)})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
