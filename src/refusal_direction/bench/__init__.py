"""Benchmark: the paper's generation (HF ``generate`` + hooks, batch 8) against the fast path, in one run.

Workload: synthetic prompts of random token ids with JailbreakBench-like instruction lengths (15-45
tokens) inside the model's chat prefix and suffix, two conditions (baseline and directional ablation
along a random direction), and exactly ``new_tokens`` greedy tokens per row (stop tokens ignored), so
every run does the same work. Models are given as token ids through `IdTokenizer` ("2 106 1645 108"),
so random-weight models of a real shape need no vocabulary, and every library function that takes
instruction strings runs unchanged.

Measured side by side: (a) the paper's approach, timed on ``paper_batches`` batches per condition and
scaled to all batches (the result says so); (b) `fast_generation.generate_fast_ids`, first and repeated
call; their ratio; the device's floor (bytes of weights and KV cache read per step over measured copy
bandwidth, FLOPs over measured matmul rate); token agreement between (a) and (b); (b) with and without
CUDA graphs; activation extraction for 128+128 prompts; and, when `selection.score_candidates` exists,
the candidate sweep. `run_benchmark` returns a dict; `format_report` renders it as text for the CLI.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..accel.fast_generation import FastResult, generate_fast_ids, kv_bytes_per_token, prompt_ids
from ..core.interventions import Baseline, DirectionalAblation, Intervention, apply_intervention
from ..core.model import ChatFormat, LoadedModel, find_blocks
from ..errors import UserError

log = logging.getLogger(__name__)

INSTRUCTION_TOKENS = (15, 45)  # JailbreakBench instructions are about 15-45 gemma tokens long


@dataclass(frozen=True)
class Shape:
    """A random-weight model: its GemmaConfig fields and the token ids of its chat format."""

    config: dict
    prefix_ids: tuple[int, ...]  # <bos><start_of_turn>user\n
    suffix_ids: tuple[int, ...]  # <end_of_turn>\n<start_of_turn>model\n (post-instruction tokens)
    special_ids: tuple[int, ...]
    first_body_id: int  # instruction tokens are drawn from [first_body_id, vocab_size)


_GEMMA_COMMON = dict(hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                     pad_token_id=0, attention_bias=False)
SHAPES = {
    # gemma-2b-it's exact shape (2.506 B parameters); 1645 stands in for "user".
    "gemma-2b-shape": Shape(dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                                 num_attention_heads=8, num_key_value_heads=1, head_dim=256, **_GEMMA_COMMON),
                            (2, 106, 1645, 108), (107, 108, 106, 2516, 108), (0, 1, 2, 106, 107), 1000),
    "tiny": Shape(dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16, **_GEMMA_COMMON),
                  (2, 3, 6, 5), (4, 5, 3, 7, 5), (0, 1, 2, 3, 4), 8),
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


def random_model(shape: str = "tiny", device: str = "auto", dtype: str = "auto", seed: int = 0,
                 **config) -> LoadedModel:
    """A random-weight Gemma of a named shape (see `SHAPES`), built directly on the device.

    ``config`` overrides GemmaConfig fields. With the default ``initializer_range`` (0.02) greedy decoding
    repeats the last prompt token forever; ``initializer_range=0.08`` gives varied tokens.
    """
    from transformers import GemmaConfig, GemmaForCausalLM

    from ..core.model import resolve_device, resolve_dtype

    if shape not in SHAPES:
        raise UserError(f"unknown model shape {shape!r}; use one of {', '.join(SHAPES)} or a model directory")
    spec = SHAPES[shape]
    device = resolve_device(device)
    torch_dtype, reason = resolve_dtype(dtype, device)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch_dtype)  # as from_pretrained does: no float32 copy of the weights
        with torch.device(device):
            model = GemmaForCausalLM(GemmaConfig(**{**spec.config, **config}))
    finally:
        torch.set_default_dtype(old)
    model.eval().requires_grad_(False)  # no .to(dtype): rotary inv_freq stays float32, as from_pretrained leaves it
    lm = id_model(model, f"{shape} (random weights)", spec.prefix_ids, spec.suffix_ids, spec.special_ids,
                  pad=0, bos=2, eos=1, first_body_id=spec.first_body_id)
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


def bench_model(model: str | LoadedModel = "tiny", device: str = "auto", dtype: str = "auto",
                seed: int = 0) -> LoadedModel:
    """``tiny`` / ``gemma-2b-shape`` (random weights), a local model directory or .gguf, or a LoadedModel."""
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


# --------------------------------------------------------------------------------------------------
# The two generation paths


@contextlib.contextmanager
def no_stop_tokens(model: torch.nn.Module) -> Iterator[None]:
    """HF generate fills a missing eos from the model's generation config: clear it so runs are forced."""
    gen = getattr(model, "generation_config", None)
    old = getattr(gen, "eos_token_id", None)
    try:
        if gen is not None:
            gen.eos_token_id = None
        yield
    finally:
        if gen is not None:
            gen.eos_token_id = old


@torch.no_grad()
def paper_generate(lm: LoadedModel, instructions: Sequence[str], intervention: Intervention, new_tokens: int,
                   batch_size: int = 8, n_batches: int | None = None) -> tuple[list[list[int]], list[float]]:
    """The paper's approach (what `generation.generate_hf` does), forced to ``new_tokens``: HF ``generate``
    with the intervention's hooks, one batch of ``batch_size`` at a time. Returns the token ids of the
    prompts it ran and the seconds of each batch (only the first ``n_batches`` batches run)."""
    from ..core.decoding import greedy_config

    config = greedy_config(lm, new_tokens, None)
    batches = [instructions[i:i + batch_size] for i in range(0, len(instructions), batch_size)][:n_batches]
    tokens, seconds = [], []
    with no_stop_tokens(lm.model):
        for batch in batches:
            _sync(lm)
            t0 = time.perf_counter()
            enc = lm.tokenize(list(batch))
            with apply_intervention(lm, intervention):
                seq = lm.model.generate(**enc, generation_config=config)
            new = seq[:, enc["input_ids"].shape[1]:].tolist()
            seconds.append(time.perf_counter() - t0)
            tokens.extend(new)
    return tokens, seconds


def fast_generate(lm: LoadedModel, instructions: Sequence[str], interventions: Sequence[Intervention],
                  new_tokens: int, decode: str = "auto", **kwargs) -> tuple[FastResult, float]:
    """`generate_fast_ids` forced to ``new_tokens``, timed end to end (tokenizing to tokens on the host)."""
    _sync(lm)
    t0 = time.perf_counter()
    result = generate_fast_ids(lm, prompt_ids(lm, instructions), interventions, new_tokens, [],
                               force_tokens=True, decode=decode, **kwargs)
    _sync(lm)
    return result, time.perf_counter() - t0


def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict:
    """Row-wise comparison of two greedy runs: identical rows, position-wise agreement, first divergence."""
    firsts, same = [], 0
    for a, b in zip(reference, other):
        n = min(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), n)
        firsts.append(first)
        same += sum(x == y for x, y in zip(a, b))
    total = sum(min(len(a), len(b)) for a, b in zip(reference, other))
    return {"rows": len(firsts), "identical_rows": sum(f == min(len(a), len(b)) for f, a, b
                                                     in zip(firsts, reference, other)),
            "token_agreement": same / total if total else 1.0,
            "mean_first_divergence": sum(firsts) / len(firsts) if firsts else 0.0,
            "min_first_divergence": min(firsts) if firsts else 0}


# --------------------------------------------------------------------------------------------------
# Device ceilings and the floor


def _sync(lm_or_device) -> None:
    device = lm_or_device.device if isinstance(lm_or_device, LoadedModel) else torch.device(lm_or_device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up (CUDA events on GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: torch.device) -> dict:
    """Copy bandwidth (bytes read + written) and dense matmul rate, measured on random data."""
    gpu = device.type == "cuda"
    n = (1 << 30 if gpu else 1 << 26) // 2  # 1 GiB (GPU) / 64 MiB (CPU) of bf16
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy_s = _time(lambda: y.copy_(x), device, 10 if gpu else 3)
    m = 8192 if gpu else 512
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    mm_s = _time(lambda: a @ b, device, 10 if gpu else 3)
    return {"copy_bandwidth_GBps": 2 * n * 2 / copy_s / 1e9, "matmul_TFLOPs": 2 * m ** 3 / mm_s / 1e12,
            "matmul_dtype": str(dtype).removeprefix("torch."), "measured_on": "random data, median of repeats"}


def generation_floor(lm: LoadedModel, rows: int, prompt_len: int, steps: int, ceilings: dict) -> dict:
    """Fewest seconds any implementation needs for the decode: bytes over bandwidth vs FLOPs over rate."""
    cfg = lm.model.config.get_text_config()
    params = sum(p.numel() for p in lm.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    kv = kv_bytes_per_token(lm)
    context = steps * prompt_len + steps * (steps - 1) / 2  # sum over steps of tokens already cached, per row
    kv_bytes = rows * kv * (context + steps)  # read the cache, write one token per step
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    flops = 2 * params * rows * steps + 4 * rows * lm.n_layers * heads * head_dim * context
    memory_s = (steps * weight_bytes + kv_bytes) / (ceilings["copy_bandwidth_GBps"] * 1e9)
    compute_s = flops / (ceilings["matmul_TFLOPs"] * 1e12)
    return {"params": params, "weight_bytes": weight_bytes, "kv_bytes_per_token": kv, "steps": steps, "rows": rows,
            "bytes": steps * weight_bytes + kv_bytes, "flops": flops, "memory_s": memory_s, "compute_s": compute_s,
            "seconds": max(memory_s, compute_s)}


# --------------------------------------------------------------------------------------------------
# Other stages


def time_activations(lm: LoadedModel, n: int = 128, seed: int = 0, batch_size: int = 32) -> dict:
    """`activations.mean_resid_pre` over n harmful + n harmless prompts, all layers and post-instruction positions."""
    from ..core.activations import mean_resid_pre

    harmful, harmless = synthetic_instructions(lm, n, seed + 1), synthetic_instructions(lm, n, seed + 2)
    mean_resid_pre(lm, harmful[:batch_size], batch_size=batch_size)  # warm-up
    _sync(lm)
    t0 = time.perf_counter()
    mean_resid_pre(lm, harmful, batch_size=batch_size)
    mean_resid_pre(lm, harmless, batch_size=batch_size)
    _sync(lm)
    seconds = time.perf_counter() - t0
    return {"prompts": 2 * n, "batch_size": batch_size, "positions": lm.n_post_instruction, "layers": lm.n_layers,
            "seconds": seconds, "target_s": 2.0}


def sweep_inputs(lm: LoadedModel, n: int = 32, seed: int = 0):
    """A selection sweep's inputs: random candidates for every (position, layer), n harmful and n harmless
    synthetic instructions, and one ordinary token id as the refusal token (id text has no words)."""
    from ..core.directions import CandidateDirections

    g = torch.Generator().manual_seed(seed)
    n_pos = lm.n_post_instruction
    candidates = CandidateDirections(torch.randn(n_pos, lm.n_layers, lm.d_model, generator=g, dtype=torch.float64),
                                     list(range(-n_pos, 0)), {"model_id": lm.model_id})
    harmful, harmless = synthetic_instructions(lm, n, seed + 3), synthetic_instructions(lm, n, seed + 4)
    return candidates, harmful, harmless, [int(lm.extra.get("first_body_id", 8))]


def time_selection(lm: LoadedModel, n: int = 32, seed: int = 0, repeats: int = 2, ceilings: dict | None = None,
                   **options) -> dict:
    """`selection.score_candidates` over every (position, layer) candidate with n harmful + n harmless prompts:
    the first call in the process (cold) and ``repeats`` more (warm). ``options`` go to score_candidates."""
    from ..selection import score_candidates

    candidates, harmful, harmless, refusal_ids = sweep_inputs(lm, n, seed)
    n_pos = lm.n_post_instruction

    def once() -> float:
        _sync(lm)
        t0 = time.perf_counter()
        score_candidates(lm, candidates, harmful, harmless, refusal_ids=refusal_ids, **options)
        _sync(lm)
        return time.perf_counter() - t0

    cold = once()
    warm = [once() for _ in range(repeats)]
    out = {"candidates": n_pos * lm.n_layers, "prompts": 2 * n, "seconds": sorted(warm)[len(warm) // 2] if warm
           else cold, "cold_s": cold, "warm_s": warm, "options": options, "target_s": 2.0}
    if ceilings:
        out["floor"] = selection_floor(lm, harmful, harmless, n_pos, ceilings)
    return out


def selection_floor(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], n_pos: int,
                    ceilings: dict) -> dict:
    """Matrix-product FLOPs the sweep's algorithm cannot avoid, over the measured matmul rate.

    Bypass and KL rows run every block over the prompt minus the shared chat-template opening; induce rows run
    blocks l..n-1 from the baseline's block-l input; in the last block only the key/value projections need every
    position (the query, output projection and MLP only the last: the sweep forward's shortcut); every row needs
    the LM head at its last position. Attention scores and element-wise work are left out, so the true floor is
    higher.
    """
    from ..selection import common_opening

    harmful_ids, harmless_ids = prompt_ids(lm, harmful), prompt_ids(lm, harmless)
    opening = len(common_opening(harmful_ids + harmless_ids))
    cfg = lm.model.config.get_text_config()
    embed = lm.model.get_input_embeddings().weight.numel()
    per_layer = (sum(p.numel() for p in lm.model.parameters()) - embed) / lm.n_layers
    attn = getattr(lm.blocks[-1].block, "self_attn", None)
    kv = attn.k_proj.weight.numel() + attn.v_proj.weight.numel() if hasattr(attn, "k_proj") else per_layer
    layers = lm.n_layers
    ablated = sum(len(x) - opening for x in harmful_ids) + sum(len(x) - opening for x in harmless_ids)
    n_rows = len(harmful_ids) + len(harmless_ids)
    # every block but the last over all tokens, the last one's k/v over all tokens and the rest at one position
    param_tokens = n_pos * layers * (per_layer * (layers - 1) * ablated + kv * ablated + (per_layer - kv) * n_rows)
    induce_tokens = sum(len(x) - opening for x in harmless_ids)
    param_tokens += n_pos * (per_layer * sum(layers - 1 - layer for layer in range(layers)) * induce_tokens
                             + layers * (kv * induce_tokens + (per_layer - kv) * len(harmless_ids)))
    head = 2 * int(cfg.vocab_size) * lm.d_model * n_pos * layers * (len(harmful_ids) + 2 * len(harmless_ids))
    flops = 2 * param_tokens + head
    return {"flops": flops, "opening_tokens": opening, "seconds": flops / (ceilings["matmul_TFLOPs"] * 1e12),
            "note": "matmul FLOPs only, at the measured dense bf16 rate"}


# --------------------------------------------------------------------------------------------------
# The benchmark


def describe_environment(lm: LoadedModel) -> dict:
    import transformers

    device = lm.device
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "device_type": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "dtype": str(lm.dtype).removeprefix("torch."), "dtype_reason": lm.dtype_reason}


@torch.no_grad()
def run_benchmark(
    lm_or_config: str | LoadedModel = "tiny",
    n_prompts: int = 100,
    new_tokens: int = 512,
    paper_batches: int = 2,
    paper_batch_size: int = 8,
    activation_prompts: int = 128,
    selection_prompts: int = 32,
    seed: int = 0,
    device: str = "auto",
    eager_check: bool = True,
    compile_check: bool = False,
    fast_options: dict | None = None,
) -> dict:
    """Time the paper's generation and the fast path on the same synthetic workload; see the module doc.

    ``fast_options``: keyword arguments for `generate_fast_ids` (e.g. ``sdpa_backends``), recorded in the result.
    """
    fast_options = dict(fast_options or {})
    if n_prompts < 1 or new_tokens < 1 or paper_batches < 1:
        raise UserError(f"n_prompts={n_prompts}, new_tokens={new_tokens}, paper_batches={paper_batches}: "
                        "each must be at least 1")
    lm = bench_model(lm_or_config, device=device, seed=seed)
    instructions = synthetic_instructions(lm, n_prompts, seed)
    lengths = [len(p) for p in prompt_ids(lm, instructions)]
    g = torch.Generator().manual_seed(seed)
    conditions: list[Intervention] = [Baseline(), DirectionalAblation(torch.randn(lm.d_model, generator=g))]
    n_tokens = n_prompts * new_tokens * len(conditions)
    result: dict = {
        "environment": describe_environment(lm),
        "model": {"name": lm.model_id, "params": sum(p.numel() for p in lm.model.parameters()),
                  "n_layers": lm.n_layers, "d_model": lm.d_model},
        "workload": {"n_prompts": n_prompts, "conditions": [c.name for c in conditions], "new_tokens": new_tokens,
                     "tokens": n_tokens, "forced": True,
                     "prompt_tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}},
    }
    log.info("bench: %s on %s, %d prompts x %d conditions x %d tokens", lm.model_id,
             result["environment"]["device"], n_prompts, len(conditions), new_tokens)

    # Warm-up (kernels, cuBLAS handles) for both paths, on a few tokens.
    paper_generate(lm, instructions[:paper_batch_size], conditions[1], 2, paper_batch_size, 1)
    fast_generate(lm, instructions[:2], conditions, 4)

    # (a) The paper's approach, timed on a few batches per condition and scaled.
    total_batches = math.ceil(n_prompts / paper_batch_size)
    timed = min(paper_batches, total_batches)
    paper: dict = {"batch_size": paper_batch_size, "batches_timed": timed, "batches_total": total_batches,
                   "scaled": timed < total_batches, "per_condition": {}}
    paper_tokens = {}
    for i, c in enumerate(conditions):
        toks, secs = paper_generate(lm, instructions, c, new_tokens, paper_batch_size, timed)
        paper_tokens[c.name] = toks
        # The process's first full-length batch pays one-time costs (kernel/plan selection for every new
        # sequence length): keep it out of the per-batch time when another batch was timed, and report it.
        steady = secs[1:] if i == 0 and len(secs) > 1 else secs
        per_batch = sorted(steady)[len(steady) // 2]
        paper["per_condition"][c.name] = {"batch_seconds": secs, "seconds_per_batch": per_batch,
                                          "seconds": per_batch * total_batches}
        if steady is not secs:
            paper["first_batch_one_time_s"] = secs[0] - per_batch
        log.info("paper approach [%s]: %.2fs per batch of %d (batches: %s)", c.name, per_batch, paper_batch_size,
                 ", ".join(f"{x:.2f}s" for x in secs))
    paper["seconds"] = sum(v["seconds"] for v in paper["per_condition"].values())
    paper["tokens_per_s"] = n_tokens / paper["seconds"]
    paper["note"] = (f"timed {timed} of {total_batches} batches per condition, median batch x {total_batches}"
                     if paper["scaled"] else f"median batch x {total_batches}")
    if "first_batch_one_time_s" in paper:
        paper["note"] += f"; first batch's one-time {paper['first_batch_one_time_s']:.1f}s not counted"
    result["paper"] = paper

    # (b) The fast path: first call in the process, then a repeat.
    fast: dict = {}
    runs = {}
    for label in ("first", "repeat"):
        res, secs = fast_generate(lm, instructions, conditions, new_tokens, **fast_options)
        runs[label] = res
        fast[label] = {"seconds": secs, "tokens_per_s": n_tokens / secs, "rows": res.stats.rows,
                       "chunks": res.stats.chunks, "prefill_s": res.stats.prefill_s,
                       "capture_s": res.stats.capture_s, "decode_s": res.stats.decode_s,
                       "decode": res.stats.decode, "notes": list(res.stats.notes)}
        log.info("fast path (%s call): %.2fs (%s)", label, secs, res.stats.decode)
    fast["options"] = fast_options
    result["fast"] = fast
    result["speedup"] = paper["seconds"] / fast["first"]["seconds"]
    result["speedup_repeat"] = paper["seconds"] / fast["repeat"]["seconds"]
    result["fast_repeat_identical"] = runs["first"].tokens == runs["repeat"].tokens
    rows = [r for v in runs["first"].tokens.values() for r in v]
    result["distinct_tokens_per_row"] = sum(len(set(r)) for r in rows) / len(rows)  # ~1: degenerate (repeats)

    # Token agreement of the two paths on the prompts the paper's approach ran.
    n_ref = len(next(iter(paper_tokens.values())))
    result["agreement"] = {c.name: agreement(paper_tokens[c.name], runs["first"].tokens[c.name][:n_ref])
                           for c in conditions}

    if eager_check and runs["first"].stats.decode != "eager":
        res, secs = fast_generate(lm, instructions, conditions, new_tokens, decode="eager", **fast_options)
        result["eager"] = {"seconds": secs, "tokens_per_s": n_tokens / secs,
                           "identical_to_graph": res.tokens == runs["first"].tokens,
                           "agreement": {n: agreement(res.tokens[n], runs["first"].tokens[n]) for n in res.tokens}}
    if lm.device.type == "cuda" and fast_options.get("fuse", True):  # what the fused RMSNorm and rotary bring
        res, secs = fast_generate(lm, instructions, conditions, new_tokens, **{**fast_options, "fuse": False})
        result["unfused"] = {"seconds": secs, "decode_s": res.stats.decode_s,
                             "agreement": {n: agreement(res.tokens[n], runs["first"].tokens[n]) for n in res.tokens}}
    if compile_check and lm.device.type == "cuda":
        try:
            res, secs = fast_generate(lm, instructions, conditions, new_tokens, decode="compile", **fast_options)
            res2, secs2 = fast_generate(lm, instructions, conditions, new_tokens, decode="compile", **fast_options)
            result["compile"] = {"first_seconds": secs, "first_compile_s": res.stats.capture_s,
                                 "repeat_seconds": secs2, "repeat_decode_s": res2.stats.decode_s,
                                 "identical_to_graph": res2.tokens == runs["first"].tokens}
        except Exception as exc:  # torch.compile support varies by model and version: report it
            result["compile"] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}

    ceilings = measure_ceilings(lm.device)
    result["ceilings"] = ceilings
    result["floor"] = generation_floor(lm, n_prompts * len(conditions), max(lengths), new_tokens, ceilings)
    result["floor_ratio"] = fast["first"]["seconds"] / result["floor"]["seconds"]

    result["activations"] = time_activations(lm, activation_prompts, seed)
    result["selection"] = time_selection(lm, selection_prompts, seed, ceilings=ceilings)
    # the same sweep through HF's forward with per-row hooks (the reference path), for comparison
    result["selection_hf_forward"] = time_selection(lm, selection_prompts, seed, repeats=2, fast_forward=False)
    return result


def bench_main(model: str = "tiny", n_prompts: int = 100, new_tokens: int = 512, paper_batches: int = 2,
               json_path: str | Path | None = None, device: str = "auto", **kwargs) -> dict:
    """What ``refusal-direction bench`` runs: the benchmark, written to ``json_path`` if given."""
    result = run_benchmark(model, n_prompts=n_prompts, new_tokens=new_tokens, paper_batches=paper_batches,
                           device=device, **kwargs)
    result["command"] = (f"refusal-direction bench --model {model} --n-prompts {n_prompts} --new-tokens {new_tokens} "
                         f"--paper-batches {paper_batches}")
    if json_path:
        from ..fileio import atomic_write_json

        atomic_write_json(json_path, result)
    return result


def format_report(r: dict) -> str:
    """The benchmark as a short plain-text table (the CLI prints it)."""
    env, w, p, f, fl = r["environment"], r["workload"], r["paper"], r["fast"], r["floor"]
    lines = [
        f"{r['model']['name']} ({r['model']['params'] / 1e6:,.1f} M params, {env['dtype']}) on {env['device']}; "
        f"torch {env['torch']}, transformers {env['transformers']}",
        f"workload: {w['n_prompts']} prompts ({w['prompt_tokens']['min']}-{w['prompt_tokens']['max']} tokens) x "
        f"{len(w['conditions'])} conditions x {w['new_tokens']} forced new tokens = {w['tokens']} tokens",
        "",
        f"{'path':<44}{'seconds':>10}{'tokens/s':>12}",
        f"{'(a) paper: HF generate + hooks, batch ' + str(p['batch_size']):<44}{p['seconds']:>10.2f}"
        f"{p['tokens_per_s']:>12.0f}   {p['note']}",
    ]
    for label in ("first", "repeat"):
        x = f[label]
        lines.append(f"{'(b) fast path, ' + label + ' call':<44}{x['seconds']:>10.2f}{x['tokens_per_s']:>12.0f}   "
                     f"{x['decode']}, {x['rows']} rows; prefill {x['prefill_s']:.2f}s, capture {x['capture_s']:.2f}s, "
                     f"decode {x['decode_s']:.2f}s")
    if "eager" in r:
        e = r["eager"]
        lines.append(f"{'    fast path without CUDA graphs':<44}{e['seconds']:>10.2f}{e['tokens_per_s']:>12.0f}   "
                     f"tokens identical to graph run: {e['identical_to_graph']}")
    if "unfused" in r:
        u = r["unfused"]
        same = sum(a["identical_rows"] for a in u["agreement"].values())
        rows = sum(a["rows"] for a in u["agreement"].values())
        label = "    fast path without fused norm/rotary"
        lines.append(f"{label:<44}{u['seconds']:>10.2f}{w['tokens'] / u['seconds']:>12.0f}   "
                     f"decode {u['decode_s']:.2f}s; {same}/{rows} rows identical to the fused run")
    if "compile" in r:
        c = r["compile"]
        text = c.get("failed") or (f"first {c['first_seconds']:.2f}s (compile {c['first_compile_s']:.1f}s), "
                                   f"repeat {c['repeat_seconds']:.2f}s")
        lines.append(f"    torch.compile(mode='reduce-overhead'): {text}")
    lines += [
        f"{'device floor (decode)':<44}{fl['seconds']:>10.2f}{w['tokens'] / fl['seconds']:>12.0f}   "
        f"memory {fl['memory_s']:.2f}s at {r['ceilings']['copy_bandwidth_GBps']:.0f} GB/s, compute "
        f"{fl['compute_s']:.2f}s at {r['ceilings']['matmul_TFLOPs']:.3g} TFLOP/s",
        "",
        f"speed-up (a)/(b): {r['speedup']:.1f}x first call, {r['speedup_repeat']:.1f}x repeat; "
        f"fast path / floor: {r['floor_ratio']:.1f}x",
    ]
    for name, a in r["agreement"].items():
        lines.append(f"agreement with (a) [{name}]: {a['identical_rows']}/{a['rows']} rows identical, "
                     f"{a['token_agreement']:.1%} of tokens, first divergence at token "
                     f"{a['mean_first_divergence']:.0f} on average")
    if r.get("distinct_tokens_per_row", 2) < 2:
        lines.append("  (the completions repeat one token, so this agreement says little about numerics)")
    act = r["activations"]
    lines.append(f"activations: mean resid_pre of {act['prompts']} prompts, {act['layers']} layers x "
                 f"{act['positions']} positions: {act['seconds']:.2f}s (target {act['target_s']:.0f}s)")
    sel = r["selection"]
    floor = f"; matmul floor {sel['floor']['seconds']:.2f}s" if "floor" in sel else ""
    lines.append(f"selection: {sel['candidates']} candidates, {sel['prompts']} prompts: {sel['seconds']:.2f}s warm, "
                 f"{sel['cold_s']:.2f}s first call (target {sel['target_s']:.0f}s{floor})")
    if "selection_hf_forward" in r:
        lines.append(f"  same sweep through HF's forward with hooks: {r['selection_hf_forward']['seconds']:.2f}s warm")
    return "\n".join(lines)
