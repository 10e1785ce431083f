"""Synthetic models and prompts for the benchmark: random-weight models of a real shape driven by token ids.

Models are given as token ids through `IdTokenizer` ("2 106 1645 108"), so random-weight models of a real
shape need no vocabulary, and every library function that takes instruction strings runs unchanged.
Prompts are random token ids with JailbreakBench-like instruction lengths (15-45 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.model import ChatFormat, LoadedModel, find_blocks
from ..errors import UserError

INSTRUCTION_TOKENS = (15, 45)  # JailbreakBench instructions are about 15-45 gemma tokens long


@dataclass(frozen=True)
class Shape:
    """A random-weight model: its config fields (of ``family``'s config class) and the token ids of its chat format."""

    config: dict
    prefix_ids: tuple[int, ...]  # <bos><start_of_turn>user\n
    suffix_ids: tuple[int, ...]  # <end_of_turn>\n<start_of_turn>model\n (post-instruction tokens)
    special_ids: tuple[int, ...]
    first_body_id: int  # instruction tokens are drawn from [first_body_id, vocab_size)
    family: str = "gemma"  # "gemma" (GemmaForCausalLM) or "llama" (LlamaForCausalLM)


_GEMMA_COMMON = dict(hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                     pad_token_id=0, attention_bias=False)
# Llama-3's fields shared by its sizes (8 KV heads of 128 dims, untied unembedding), and its chat format's ids:
# <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n ... <|eot_id|><|start_header_id|>assistant
# <|end_header_id|>\n\n (271 = "\n\n"); prefix, suffix, special ids, first body id.
_LLAMA3_COMMON = dict(vocab_size=128256, num_key_value_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
                      mlp_bias=False, bos_token_id=128000, eos_token_id=128009, pad_token_id=128004)
_LLAMA3_IDS = ((128000, 128006, 882, 128007, 271), (128009, 128006, 78191, 128007, 271),
               (128000, 128001, 128004, 128006, 128007, 128009), 1000)

SHAPES = {
    # gemma-2b-it's exact shape (2.506 B parameters); 1645 stands in for "user".
    "gemma-2b-shape": Shape(dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                                 num_attention_heads=8, num_key_value_heads=1, head_dim=256, **_GEMMA_COMMON),
                            (2, 106, 1645, 108), (107, 108, 106, 2516, 108), (0, 1, 2, 106, 107), 1000),
    "tiny": Shape(dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16, **_GEMMA_COMMON),
                  (2, 3, 6, 5), (4, 5, 3, 7, 5), (0, 1, 2, 3, 4), 8),
    # Llama-3-8B(-Instruct)'s exact shape (8.03 B parameters)
    "llama-3-8b-shape": Shape(dict(_LLAMA3_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32), *_LLAMA3_IDS, family="llama"),
    # Llama-3-70B(-Instruct)'s exact shape (70.6 B parameters, 131 GiB in bf16: the weights alone nearly fill an
    # H200, so build it over several GPUs with `dispatched.random_dispatched_model`), same chat-format ids as the 8B.
    "llama-3-70b-shape": Shape(dict(_LLAMA3_COMMON, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64), *_LLAMA3_IDS, family="llama"),
}


class IdTokenizer:
    """A stand-in tokenizer whose text is space-separated token ids ("2 106 1645 108").

    Enough of the HF tokenizer interface for this package (call with padding, decode, special ids), so
    a model can be driven by token ids alone.
    """

    def __init__(self, pad_token_id: int, bos_token_id: int | None, eos_token_id: int | None,
                 special_ids: Sequence[int] = ()):
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        self.all_special_ids = sorted({*special_ids, *(i for i in (pad_token_id, bos_token_id, eos_token_id)
                                                       if i is not None)})
        self.padding_side = "left"

    @staticmethod
    def encode_text(ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __call__(self, texts, padding: bool = False, add_special_tokens: bool = False, return_tensors=None, **_):
        single = isinstance(texts, str)
        ids = [[int(t) for t in s.split()] for s in ([texts] if single else texts)]
        if not padding and return_tensors is None:
            return {"input_ids": ids[0] if single else ids}
        width = max(len(x) for x in ids)
        input_ids = [[self.pad_token_id] * (width - len(x)) + x for x in ids]
        mask = [[0] * (width - len(x)) + [1] * len(x) for x in ids]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "attention_mask": torch.tensor(mask)}
        return {"input_ids": input_ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return self.encode_text(i for i in ids if i not in skip)


def id_model(hf_model: torch.nn.Module, model_id: str, prefix_ids: Sequence[int], suffix_ids: Sequence[int],
             special_ids: Sequence[int], pad: int, bos: int | None, eos: int | None,
             first_body_id: int) -> LoadedModel:
    """Wrap an HF causal LM as a `LoadedModel` that reads and writes token-id text (see `IdTokenizer`)."""
    tok = IdTokenizer(pad, bos, eos, [*special_ids, suffix_ids[0]])
    chat = ChatFormat(IdTokenizer.encode_text(prefix_ids) + " ", " " + IdTokenizer.encode_text(suffix_ids),
                      "synthetic token ids")
    blocks, final_norm = find_blocks(hf_model)
    return LoadedModel(model=hf_model, tokenizer=tok, model_id=model_id, chat=chat,
                       post_instruction_ids=list(suffix_ids), blocks=blocks, final_norm=final_norm,
                       extra={"first_body_id": first_body_id})


def build_model(family: str, fields: dict, dtype: torch.dtype, device) -> torch.nn.Module:
    """A Llama or Gemma causal LM of config ``fields`` built on ``device`` in ``dtype`` (as from_pretrained does: no
    float32 copy of the weights; "meta": shapes only)."""
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            return (LlamaForCausalLM(LlamaConfig(**fields)) if family == "llama"
                    else GemmaForCausalLM(GemmaConfig(**fields)))
    finally:
        torch.set_default_dtype(old)


FIT_SHARE = 0.85  # weights may take at most this share of a GPU's free memory (the rest: KV cache, activations)


def check_fits(shape: str, meta_model: torch.nn.Module, device: torch.device) -> None:
    """Refuse (one line, what to do) a shape whose weights take more than `FIT_SHARE` of the GPU's free memory:
    Llama-3-70B's 131 GiB would load on an H200 (139 GiB free) and run out of memory at the first batch."""
    if device.type != "cuda":
        return
    need = sum(p.numel() * p.element_size() for p in meta_model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    if need > FIT_SHARE * free:
        raise UserError(f"{shape} needs {need / 2 ** 30:.1f} GiB for its weights but {device} has "
                        f"{free / 2 ** 30:.1f} GiB free (at most {FIT_SHARE:.0%} of it for weights); spread it over "
                        f"several GPUs: python benchmarks/multi_gpu.py --model {shape}")


def random_model(shape: str = "tiny", device: str = "auto", dtype: str = "auto", seed: int = 0,
                 **config) -> LoadedModel:
    """A random-weight model of a named shape (see `SHAPES`: a Gemma or a Llama), built directly on the device.

    ``config`` overrides the shape's config fields. With the default ``initializer_range`` (0.02) greedy decoding
    repeats the last prompt token forever; ``initializer_range=0.08`` gives varied tokens.
    """
    from ..core.model import resolve_device, resolve_dtype

    if shape not in SHAPES:
        raise UserError(f"unknown model shape {shape!r}; use one of {', '.join(SHAPES)} or a model directory")
    spec = SHAPES[shape]
    device = resolve_device(device)
    torch_dtype, reason = resolve_dtype(dtype, device)
    fields = {**spec.config, **config}
    check_fits(shape, build_model(spec.family, fields, torch_dtype, "meta"), torch.device(device))
    torch.manual_seed(seed)
    model = build_model(spec.family, fields, torch_dtype, device)
    model.eval().requires_grad_(False)  # no .to(dtype): rotary inv_freq stays float32, as from_pretrained leaves it
    lm = id_model(model, f"{shape} (random weights)", spec.prefix_ids, spec.suffix_ids, spec.special_ids,
                  pad=spec.config["pad_token_id"], bos=spec.config["bos_token_id"], eos=spec.config["eos_token_id"],
                  first_body_id=spec.first_body_id)
    lm.dtype_reason = reason
    return lm


def as_id_model(lm: LoadedModel) -> LoadedModel:
    """The same model driven by token ids: chat prefix/suffix ids come from its own tokenizer."""
    if isinstance(lm.tokenizer, IdTokenizer):
        return lm
    tok = lm.tokenizer
    prefix = tok(lm.chat.prefix, add_special_tokens=False)["input_ids"]
    special = list(getattr(tok, "all_special_ids", []))
    out = id_model(lm.model, lm.model_id, prefix, lm.post_instruction_ids, special, pad=tok.pad_token_id,
                   bos=tok.bos_token_id, eos=tok.eos_token_id, first_body_id=min(100, len(tok) // 2))
    out.extra["vocab_size"] = min(len(tok), int(lm.model.config.get_text_config().vocab_size))
    out.dtype_reason = lm.dtype_reason
    return out


def gpu_script_problem(model: str, script: str) -> str | None:
    """Why a GPU benchmark script cannot run with ``--model model`` here (no such shape or model path, or no CUDA
    device), or None: the one line it prints before exiting with 2."""
    from pathlib import Path

    if model not in SHAPES and not Path(model).expanduser().exists():
        return (f"--model {model}: neither a bench shape ({', '.join(SHAPES)}) nor an existing model directory or "
                ".gguf file; pass one of those")
    if not torch.cuda.is_available():
        return f"{script} needs a CUDA device"
    return None


def bench_model(model: str | LoadedModel = "tiny", device: str = "auto", dtype: str = "auto",
                seed: int = 0) -> LoadedModel:
    """A name in `SHAPES` (random weights), a local model directory or .gguf, or a LoadedModel."""
    if isinstance(model, LoadedModel):
        return as_id_model(model)
    if model in SHAPES:
        return random_model(model, device, dtype, seed)
    from ..core.model import load_model

    return as_id_model(load_model(model, device=device, dtype=dtype))


def synthetic_instructions(lm: LoadedModel, n: int, seed: int = 0,
                           lengths: tuple[int, int] = INSTRUCTION_TOKENS) -> list[str]:
    """``n`` instructions of random token ids, lengths uniform in ``lengths`` (inclusive), as id text."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(lm.extra.get("vocab_size") or lm.model.config.get_text_config().vocab_size)
    low = int(lm.extra.get("first_body_id", 8))
    special = set(lm.tokenizer.all_special_ids)
    out = []
    for _ in range(n):
        k = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        ids = [i for i in torch.randint(low, vocab, (k,), generator=g).tolist() if i not in special] or [low]
        out.append(IdTokenizer.encode_text(ids))
    return out
