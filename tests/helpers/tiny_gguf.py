"""A tiny Qwen2 model written as a real GGUF file with the ``gguf`` package (Q8_0 matrices, F32 norms and biases,
a byte-level BPE tokenizer with a ChatML template), which transformers loads like any GGUF: dequantizing it,
converting its tokenizer. No download; about 100 kB."""

from __future__ import annotations

from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tiny_gguf(path: Path, tie: bool = True, n_layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write the tiny model to ``path`` (a ``.gguf`` file); ``tie=False`` adds a separate ``output.weight``."""
    import gguf
    import numpy as np

    gguf_tokens = SPECIALS + [chr(c) for c in range(33, 127)] + ["Ċ", "Ġ", "ab", "abc"]  # byte-level "\n", " "
    heads, kv_heads, ffn = 4, 2, 2 * hidden
    kv = kv_heads * hidden // heads
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(gguf_tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(gguf_tokens) - len(SPECIALS)))
    w.add_token_merges(["a b", "ab c"])
    w.add_chat_template(CHATML)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)

    def tensor(name: str, *shape: int) -> None:
        values = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        if len(shape) == 2:  # matrices in 8-bit blocks, as most GGUF files store them
            blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, values)

    tensor("token_embd.weight", len(gguf_tokens), hidden)
    tensor("output_norm.weight", hidden)
    if not tie:
        tensor("output.weight", len(gguf_tokens), hidden)
    for i in range(n_layers):
        for part, shape in [("attn_norm.weight", (hidden,)), ("ffn_norm.weight", (hidden,)),
                            ("attn_q.weight", (hidden, hidden)), ("attn_q.bias", (hidden,)),
                            ("attn_k.weight", (kv, hidden)), ("attn_k.bias", (kv,)),
                            ("attn_v.weight", (kv, hidden)), ("attn_v.bias", (kv,)),
                            ("attn_output.weight", (hidden, hidden)), ("ffn_gate.weight", (ffn, hidden)),
                            ("ffn_up.weight", (ffn, hidden)), ("ffn_down.weight", (hidden, ffn))]:
            tensor(f"blk.{i}.{part}", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
