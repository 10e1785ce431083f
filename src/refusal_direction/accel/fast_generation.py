"""Fast greedy generation: all conditions in one batch, a static KV cache, a CUDA graph per decode step.

The paper's path (`generation.generate_hf`) runs HF ``generate`` once per condition at a small batch
size, so every step re-reads all weights for a handful of prompts and spends most of its time in Python.
Here, for the same greedy tokens:

- all conditions share ONE batch: row ``c * n_prompts + i`` is prompt i under intervention c, and each
  intervention's hooks get a per-row switch (``apply_intervention(lm, iv, rows=mask)``), so the weights
  are read once per step for every condition;
- prompts are left-padded and prefilled once with HF's position ids (``cumsum(mask) - 1``); only the last
  position's logits are computed (``logits_to_keep=1``);
- a transformers `StaticCache` keeps every tensor address fixed, so the single-token decode step (HF
  forward, argmax and bookkeeping, all on the device) is captured once as a CUDA graph and replayed;
- the host checks "all rows finished?" every `CHECK_EVERY` steps (one sync); rows that finished earlier
  keep decoding but are cut at their first stop token, which is what HF ``generate`` returns too;
- grouped-query attention under a padding mask is folded (the query heads that share a KV head become
  query rows of that head), so SDPA reads each KV head once instead of HF's per-step ``repeat_kv`` copy.
- on CUDA, RMSNorms and the rotary embedding run with fewer kernels (`fusion.fused_kernels`), each swap
  made only where it is verified to reproduce the original on the model's own shapes and dtype.

Nothing is model-specific. A model this cannot run (encoder-decoder, no ``position_ids`` /
``past_key_values``, no `StaticCache`) falls back to `generate_hf` per condition, with the reason logged.
Models with sliding-window cache layers decode without CUDA graphs (their cache keeps a Python counter).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..core.batching import run_batched
from ..core.decoding import Generated, GenerationSettings, generate_hf, stop_ids
from ..core.interventions import Intervention, apply_intervention
from ..core.model import LoadedModel
from .fusion import fused_kernels, restricted_sdpa

log = logging.getLogger(__name__)

CHECK_EVERY = 16  # decode steps between host checks of "every row has stopped"
WARMUP_STEPS = 2  # eager decode steps before graph capture (cuBLAS/allocator warm-up, on a side stream)
FOLDED_SDPA = "refusal_direction_folded_sdpa"  # name registered with transformers' AttentionInterface
DECODE_MODES = ("auto", "cuda-graph", "compile", "eager")
# SDPA kernels allowed on CUDA, in torch's order of preference. Measured on an H200 (gemma-2b shape, 200 rows):
# memory-efficient attention decodes in 3.08 s against 3.44 s for torch's default pick (cuDNN); math is the
# fallback for shapes it does not take. None: torch's choice.
SDPA_BACKENDS = ("efficient", "math")


class FastPathUnsupported(RuntimeError):
    """This model cannot use the fast path; the message says why."""


@dataclass(frozen=True)
class FastStats:
    """What the fast path did, summed over chunks (for logs and benchmarks)."""

    rows: int  # batch rows of the largest chunk (conditions x prompts)
    chunks: int  # batches run one after another (1 unless memory forced a split)
    prompt_len: int  # longest padded prompt, tokens
    steps: int  # new tokens produced per row (max over chunks)
    prefill_s: float
    capture_s: float  # CUDA-graph capture (or first compiled call), 0 for eager
    decode_s: float
    decode: str  # "cuda-graph" | "compile" | "eager"
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class FastResult:
    tokens: dict[str, list[list[int]]]  # per intervention name, per prompt: new token ids
    stopped: dict[str, list[bool]]  # per intervention name, per prompt: ended on a stop token
    stats: FastStats


def generate_fast(
    lm: LoadedModel,
    instructions: Sequence[str],
    interventions: Sequence[Intervention],
    settings: GenerationSettings = GenerationSettings(),
    progress: bool = False,
    *,
    force_tokens: bool = False,
    decode: str = "auto",
    max_rows: int | None = None,
    sdpa_backends: Sequence[str] | None = SDPA_BACKENDS,
    fuse: bool = True,
) -> dict[str, list[Generated]]:
    """Greedy completions of ``instructions`` under every intervention at once: {intervention name: list}.

    Same tokens as `generate_hf` (exactly so in float32). ``settings.batch_size`` is not used: the batch
    holds every prompt under every condition unless ``max_rows`` (default: sized from free device
    memory) splits it. ``force_tokens`` ignores stop tokens and decodes exactly ``max_new_tokens``.
    ``fuse``: on CUDA, run RMSNorms and the rotary embedding with fewer kernels wherever that is verified to
    reproduce them (`fusion.fused_kernels`).
    """
    eos = stop_ids(lm, settings)
    prompts = prompt_ids(lm, instructions)
    try:
        result = generate_fast_ids(lm, prompts, interventions, settings.max_new_tokens, eos,
                                   force_tokens=force_tokens, decode=decode, max_rows=max_rows, progress=progress,
                                   sdpa_backends=sdpa_backends, fuse=fuse)
    except FastPathUnsupported as exc:
        log.warning("fast generation is not available for %s (%s); falling back to HF generate per condition",
                    lm.model_id, exc)
        return {iv.name: generate_hf(lm, instructions, iv, settings, progress) for iv in interventions}
    return {name: [Generated(lm.tokenizer.decode(ids, skip_special_tokens=True), ids, stopped)
                   for ids, stopped in zip(rows, result.stopped[name], strict=True)]
            for name, rows in result.tokens.items()}


def prompt_ids(lm: LoadedModel, instructions: Sequence[str]) -> list[list[int]]:
    """Chat-formatted token ids of each instruction, unpadded (the same ids `LoadedModel.tokenize` pads)."""
    if not instructions:
        return []
    enc = lm.tokenizer([lm.format(x) for x in instructions], add_special_tokens=False)
    return [list(ids) for ids in enc["input_ids"]]


@torch.no_grad()
def generate_fast_ids(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    interventions: Sequence[Intervention],
    max_new_tokens: int,
    stop: Sequence[int],
    *,
    force_tokens: bool = False,
    decode: str = "auto",
    max_rows: int | None = None,
    progress: bool = False,
    sdpa_backends: Sequence[str] | None = SDPA_BACKENDS,
    fuse: bool = True,
) -> FastResult:
    """The fast path on token ids (no tokenizer needed). Raises `FastPathUnsupported` for unsupported models."""
    names = [iv.name for iv in interventions]
    if len(set(names)) != len(names):
        raise ValueError(f"intervention names must be unique to share a batch, got {names}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    check_supported(lm)
    mode = resolve_decode(decode, lm.device)
    n_cond = len(interventions)
    if not prompts or not n_cond:
        return FastResult({n: [] for n in names}, {n: [] for n in names}, FastStats(0, 0, 0, 0, 0.0, 0.0, 0.0, mode))
    longest = max(len(p) for p in prompts)
    per_chunk = prompts_per_chunk(lm, len(prompts), n_cond, longest + max_new_tokens, max_rows)
    stats: list[FastStats] = []

    def step(chunk):
        out, st = generate_chunk(lm, chunk, interventions, max_new_tokens, stop, force_tokens, mode, progress,
                                 sdpa_backends, fuse)
        stats.append(st)
        return out

    per_prompt = run_batched(step, [list(p) for p in prompts], per_chunk, desc="generate [fast]")
    tokens = {n: [per_prompt[i][c][0] for i in range(len(prompts))] for c, n in enumerate(names)}
    stopped = {n: [per_prompt[i][c][1] for i in range(len(prompts))] for c, n in enumerate(names)}
    total = FastStats(rows=max(s.rows for s in stats), chunks=len(stats), prompt_len=max(s.prompt_len for s in stats),
                      steps=max(s.steps for s in stats), prefill_s=sum(s.prefill_s for s in stats),
                      capture_s=sum(s.capture_s for s in stats), decode_s=sum(s.decode_s for s in stats),
                      decode=stats[-1].decode, notes=tuple(dict.fromkeys(n for s in stats for n in s.notes)))
    log.info("fast generation: %d prompts x %d conditions in %d batch(es) of <=%d rows, %d new tokens, %s; "
             "prefill %.2fs, capture %.2fs, decode %.2fs", len(prompts), n_cond, total.chunks, total.rows,
             total.steps, total.decode, total.prefill_s, total.capture_s, total.decode_s)
    return FastResult(tokens, stopped, total)


# --------------------------------------------------------------------------------------------------
# Checks and sizing


def check_supported(lm: LoadedModel) -> None:
    """Raise `FastPathUnsupported` when the model cannot be driven step by step with a `StaticCache`."""
    config = lm.model.config
    if getattr(config, "is_encoder_decoder", False):
        raise FastPathUnsupported("encoder-decoder models are not supported")
    params = inspect.signature(lm.model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [k for k in ("position_ids", "past_key_values", "attention_mask") if k not in params and not takes_any]
    if missing:
        raise FastPathUnsupported(f"{type(lm.model).__name__}.forward does not take {', '.join(missing)}")
    try:
        from transformers import StaticCache  # noqa: F401
    except ImportError as exc:  # pragma: no cover - transformers too old
        raise FastPathUnsupported(f"transformers has no StaticCache ({exc}); pip install -U transformers") from exc


def resolve_decode(decode: str, device: torch.device) -> str:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode={decode!r}: use one of {', '.join(DECODE_MODES)}")
    if decode == "auto":
        return "cuda-graph" if device.type == "cuda" else "eager"
    if decode in ("cuda-graph", "compile") and device.type != "cuda":
        log.info("decode=%s needs CUDA (model on %s); decoding eagerly", decode, device)
        return "eager"
    return decode


def kv_bytes_per_token(lm: LoadedModel) -> int:
    """Bytes of K and V one token adds to the cache, over all layers."""
    cfg = lm.model.config.get_text_config()
    heads = int(getattr(cfg, "num_attention_heads", 1))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return 2 * lm.n_layers * kv_heads * head_dim * lm.dtype.itemsize


def prompts_per_chunk(lm: LoadedModel, n_prompts: int, n_cond: int, total_len: int, max_rows: int | None) -> int:
    """Prompts per batch so that conditions x prompts rows fit: ``max_rows`` or about half the free memory."""
    if max_rows is None:
        if lm.device.type != "cuda":
            return n_prompts
        cfg = lm.model.config.get_text_config()
        free, _ = torch.cuda.mem_get_info(lm.device)
        inter = int(getattr(cfg, "intermediate_size", 4 * lm.d_model))
        per_row = (kv_bytes_per_token(lm) * total_len  # static KV cache
                   + 3 * int(cfg.vocab_size) * 4  # last-position logits and argmax temporaries
                   + 4 * total_len * (lm.d_model + inter) * lm.dtype.itemsize)  # prefill activations
        max_rows = max(n_cond, int(0.5 * free // per_row))
    if max_rows < n_cond:
        raise ValueError(f"max_rows={max_rows} is smaller than the {n_cond} conditions that share each prompt")
    return max(1, min(n_prompts, max_rows // n_cond))


def pad_id(lm: LoadedModel) -> int:
    for value in (getattr(lm.tokenizer, "pad_token_id", None), getattr(lm.model.config, "pad_token_id", None)):
        if value is not None:
            return int(value)
    return 0


# --------------------------------------------------------------------------------------------------
# Grouped-query attention without repeat_kv


def folded_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """HF attention function: SDPA with the query heads of each KV head folded into query rows.

    query [batch, h_q, q, d], key/value [batch, h_kv, s, d]; returns [batch, q, h_q, d_v] like HF's sdpa.
    Same result as ``repeat_kv`` + SDPA without copying K/V h_q/h_kv times; cases it does not cover
    (no mask, no GQA, a per-head mask, position bias, dropout) go to HF's own sdpa function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h_q, q, d = query.shape
    h_kv = key.shape[1]
    if (attention_mask is None or h_q == h_kv or h_q % h_kv or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or dropout or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rep = h_q // h_kv
    folded = query.reshape(b, h_kv, rep * q, d)  # row r*q + i = query head (g*rep + r) at position i
    mask = attention_mask if attention_mask.shape[2] == 1 else attention_mask.repeat(1, 1, rep, 1)  # [b,1,rep*q,s]
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    out = out.reshape(b, h_q, q, value.shape[-1])  # [batch, h_q, q, d_v]
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def folded_gqa_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Switch an SDPA grouped-query model to `folded_sdpa_attention` for the block; yields whether it did."""
    cfg = model.config.get_text_config()
    heads, kv_heads = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if (getattr(model.config, "_attn_implementation", None) != "sdpa" or not heads or not kv_heads
            or heads == kv_heads or not hasattr(model, "set_attn_implementation")):
        yield False
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FOLDED_SDPA, folded_sdpa_attention)
    AttentionMaskInterface.register(FOLDED_SDPA, sdpa_mask)
    try:
        model.set_attn_implementation(FOLDED_SDPA)
    except Exception as exc:  # any refusal leaves the model as it was
        log.info("keeping HF sdpa attention (%s)", exc)
        yield False
        return
    try:
        yield model.config._attn_implementation == FOLDED_SDPA
    finally:
        model.set_attn_implementation("sdpa")


# --------------------------------------------------------------------------------------------------
# One batch


class _Decoder:
    """Static buffers of the single-token decode step; their addresses never change, so it can be captured."""

    def __init__(self, model, cache, mask: torch.Tensor, first: torch.Tensor, next_position: torch.Tensor,
                 stop: torch.Tensor, max_new_tokens: int):
        rows = first.shape[0]
        self.model, self.cache, self.mask, self.stop = model, cache, mask, stop  # mask [rows, cache_len]
        self.ids = first[:, None].clone()  # [rows, 1] the token fed next
        self.position = next_position.clone()  # [rows, 1] its position id
        self.tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=first.device)  # [rows, new]
        self.tokens[:, 0] = first
        self.index = torch.ones(1, dtype=torch.long, device=first.device)  # column the next token goes to
        self.done = (first[:, None] == stop).any(-1)  # [rows]

    def step(self) -> None:
        logits = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.position,
                            past_key_values=self.cache, use_cache=True).logits  # [rows, 1, vocab]
        nxt = logits[:, -1].argmax(-1)  # [rows]
        self.tokens.index_copy_(1, self.index, nxt[:, None])
        self.done.logical_or_((nxt[:, None] == self.stop).any(-1))
        self.ids.copy_(nxt[:, None])
        self.position.add_(1)
        self.index.add_(1)


def generate_chunk(
    lm: LoadedModel,
    prompts: list[list[int]],
    interventions: Sequence[Intervention],
    max_new_tokens: int,
    stop: Sequence[int],
    force_tokens: bool,
    mode: str,
    progress: bool = False,
    sdpa_backends: Sequence[str] | None = None,
    fuse: bool = False,
) -> tuple[list[list[tuple[list[int], bool]]], FastStats]:
    """Generate for one batch of prompts under every intervention: [prompt][condition] -> (ids, stopped)."""
    from transformers import StaticCache

    model, device = lm.model, lm.device
    n_cond, n_prompts = len(interventions), len(prompts)
    rows = n_cond * n_prompts
    length = max(len(p) for p in prompts)
    cache_len = length + max_new_tokens
    ids = torch.full((n_prompts, length), pad_id(lm), dtype=torch.long)
    mask = torch.zeros(n_prompts, cache_len, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p):] = 1  # generated positions are 1 from the start: causality hides the future
    ids = ids.repeat(n_cond, 1).to(device)  # [rows, length]; row c*n_prompts + i = prompt i, condition c
    mask = mask.repeat(n_cond, 1).to(device)  # [rows, cache_len]
    prompt_mask = mask[:, :length]
    position = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)  # [rows, length], as HF generate
    condition = torch.arange(rows, device=device) // n_prompts
    # [rows] each, in the model's dtype (no conversion kernel per hook call): 1 where the intervention applies
    switches = [(condition == c).to(lm.dtype) for c in range(n_cond)]
    stop_t = torch.tensor(sorted(set(stop)) or [-1], dtype=torch.long, device=device)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    notes: list[str] = []
    if not keep:
        notes.append("forward has no logits_to_keep: prefill computes logits for every position")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with contextlib.ExitStack() as stack:
        if stack.enter_context(folded_gqa_attention(model)):
            notes.append("grouped-query attention folded into query rows")
        notes += stack.enter_context(restricted_sdpa(device, sdpa_backends))
        notes += stack.enter_context(fused_kernels(model, fuse))
        for iv, switch in zip(interventions, switches):
            stack.enter_context(apply_intervention(lm, iv, rows=switch))
        t0 = time.perf_counter()
        try:
            cache = StaticCache(config=model.config, max_cache_len=cache_len)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                           use_cache=True, **keep).logits  # [rows, 1 or length, vocab]
        except (TypeError, ValueError, NotImplementedError, AttributeError, KeyError) as exc:
            raise FastPathUnsupported(f"{type(exc).__name__} in the static-cache prefill: {exc}") from exc
        dec = _Decoder(model, cache, mask, logits[:, -1].argmax(-1), position[:, -1:] + 1, stop_t, max_new_tokens)
        del logits
        sync()
        prefill_s = time.perf_counter() - t0

        plain_layers = all(type(layer).__name__ == "StaticLayer" for layer in cache.layers)
        if mode in ("cuda-graph", "compile") and not plain_layers:
            notes.append("sliding-window cache layers keep a Python counter: decoded without CUDA graphs")
            mode = "eager"
        if mode == "cuda-graph" and max_new_tokens <= 1 + WARMUP_STEPS:
            mode = "eager"
        produced, capture_s = 1, 0.0
        t0 = time.perf_counter()
        bar = _bar(progress, max_new_tokens)
        bar.update(1)
        step = dec.step
        if mode == "compile":  # experimental: the first call compiles, counted as capture time
            for buf in (dec.ids, dec.position, dec.tokens, dec.index, dec.done, dec.mask):
                torch._dynamo.mark_static_address(buf)
            step = torch.compile(dec.step, mode="reduce-overhead")
            t1 = time.perf_counter()
            step()
            sync()
            capture_s += time.perf_counter() - t1
            produced += 1
            bar.update(1)
        graph_replay = None
        while produced < max_new_tokens:
            run = graph_replay
            if run is None and mode == "cuda-graph":
                side = torch.cuda.Stream(device)  # warm-up steps (real steps, eager) on a side stream
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_STEPS):
                        dec.step()
                torch.cuda.current_stream(device).wait_stream(side)
                produced += WARMUP_STEPS
                bar.update(WARMUP_STEPS)
                t1 = time.perf_counter()
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph):
                        dec.step()
                    run = graph_replay = graph.replay
                except Exception as exc:  # e.g. a host sync inside the model's forward
                    log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(exc).__name__, exc)
                    notes.append(f"CUDA graph capture failed: {type(exc).__name__}")
                    mode = "eager"
                capture_s += time.perf_counter() - t1
            (run or step)()
            produced += 1
            bar.update(1)
            if not force_tokens and produced % CHECK_EVERY == 0 and bool(dec.done.all()):
                break
        tokens = dec.tokens[:, :produced].cpu()  # [rows, produced]
        decode_s = time.perf_counter() - t0 - capture_s
        bar.close()

    stop_set = set(stop)
    out: list[list[tuple[list[int], bool]]] = [[] for _ in range(n_prompts)]
    for r, row in enumerate(tokens.tolist()):
        end = None if force_tokens else next((k + 1 for k, t in enumerate(row) if t in stop_set), None)
        out[r % n_prompts].append((row if end is None else row[:end], end is not None))
    stats = FastStats(rows, 1, length, produced, prefill_s, capture_s, decode_s, mode, tuple(notes))
    return out, stats


def _bar(progress: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate [fast]", unit="tok", disable=not progress, dynamic_ncols=True)
