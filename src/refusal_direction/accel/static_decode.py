"""One batch of the fast path: prefill into a `StaticCache`, then single-token decode steps, then the cut rows.

Rows are ``condition x prompt`` (row ``c * n_prompts + i`` is prompt i under intervention c). The prompts are
left-padded and prefilled once; the decode step (HF's forward with the hooks, or `own_step.OwnStep`; argmax and
bookkeeping, all on the device) writes into static buffers (`_Decoder`), so it is captured once as a CUDA graph and
replayed, compiled, or run eagerly. The host checks "all rows finished?" every `CHECK_EVERY` steps; rows that
finished earlier keep decoding and are cut at their first stop token afterwards, which is what HF ``generate``
returns too.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core.head import packed_head_input
from ..core.model import LoadedModel
from ..core.padding import left_pad, pad_id, position_ids
from ..edits import Intervention
from ..edits.stacked import apply_interventions
from .folded_attention import folded_gqa_attention
from .fusion import fused_kernels, restricted_sdpa
from .own_step import OWN_STEP_TOLERANCE, foreign_hooks, own_step_for

log = logging.getLogger(__name__)

CHECK_EVERY = 16  # decode steps between host checks of "every row has stopped"
WARMUP_STEPS = 2  # eager decode steps before graph capture (cuBLAS/allocator warm-up, on a side stream)


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
        self.own: Callable[[], torch.Tensor] | None = None  # `own_step.OwnStep` when chosen (no bound method here:
        # that would make the decoder refer to itself and keep its cache alive until the cyclic collector runs)

    def hf_forward(self) -> torch.Tensor:
        """HF's model forward (with the interventions' hooks) for the fed token: logits [rows, vocab]."""
        return self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.position,
                          past_key_values=self.cache, use_cache=True).logits[:, -1]  # [rows, vocab]

    def forward(self) -> torch.Tensor:
        """Logits [rows, vocab] of the fed token: the own step's if one is set, else HF's forward."""
        return self.own() if self.own is not None else self.hf_forward()

    def step(self) -> None:
        self.advance(self.forward())

    def checked_own_step(self) -> float:
        """One decode step by the own step and by HF's forward, which then overwrites the new slot's keys and
        values with its own; HF's logits advance the decoder, so either step can go on from here. Returns the
        relative difference of the two steps' logits (one host sync)."""
        own = self.own().float()
        ref = self.hf_forward()
        self.advance(ref)
        ref = ref.float()
        return float((own - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm().clamp_min(1e-30))

    def advance(self, logits: torch.Tensor) -> None:
        """Greedy token of ``logits`` [rows, vocab] into the buffers: the next step's input, stops, the count."""
        nxt = logits.argmax(-1)  # [rows]
        self.tokens.index_copy_(1, self.index, nxt[:, None])
        self.done.logical_or_((nxt[:, None] == self.stop).any(-1))
        self.ids.copy_(nxt[:, None])
        self.position.add_(1)
        self.index.add_(1)


def generate_chunk(
    lm: LoadedModel,
    rows: list[tuple[list[int], int]],
    interventions: Sequence[Intervention],
    max_new_tokens: int,
    stop: Sequence[int],
    force_tokens: bool,
    mode: str,
    progress: bool = False,
    sdpa_backends: Sequence[str] | None = None,
    fuse: bool = False,
    step: str = "hf",
) -> tuple[list[tuple[list[int], bool]], FastStats]:
    """Generate one batch: row b is prompt ``rows[b][0]`` under ``interventions[rows[b][1]]``; per row, in order:
    (new token ids, stopped). ``step``: "hf" (HF's forward with hooks) or "own" (`own_step.OwnStep` where it
    supports the model and the interventions, else HF's, with the reason in the stats' notes)."""
    model, device = lm.model, lm.device
    n_rows = len(rows)
    ids, mask, position = _batch_inputs(lm, [p for p, _ in rows], max_new_tokens)
    length = ids.shape[1]
    condition = torch.tensor([c for _, c in rows], device=device)
    # [rows] each, in the model's dtype (no conversion kernel per hook call): 1 where the intervention applies
    switches = [(condition == c).to(lm.dtype) for c in range(len(interventions))]
    stop_t = torch.tensor(sorted(set(stop)) or [-1], dtype=torch.long, device=device)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    notes: list[str] = []
    if not keep:
        notes.append("forward has no logits_to_keep: prefill computes logits for every position")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hooks = foreign_hooks(lm) if step == "own" else ""  # before the contexts below add the fast path's

    with contextlib.ExitStack() as stack:
        if stack.enter_context(folded_gqa_attention(model, decode_kernel=fuse, notes=notes)):
            notes.append("grouped-query attention folded into query rows")
        notes += stack.enter_context(restricted_sdpa(device, sdpa_backends))
        notes += stack.enter_context(fused_kernels(model, fuse))
        hooked = stack.enter_context(apply_interventions(lm, interventions, switches))
        stack.enter_context(packed_head_input(model))
        if hooked["stacked"]:
            notes.append(f"{hooked['stacked']} projection interventions stacked: one hook per site")
        t0 = time.perf_counter()
        dec = _prefill(model, ids, mask, position, stop_t, max_new_tokens, keep)
        sync()
        prefill_s = time.perf_counter() - t0
        produced = 1
        if step == "own" and max_new_tokens > 1:
            dec.own = own_step_for(lm, dec.cache, mask[:, :length], condition, interventions, dec.ids, dec.position,
                                   fuse, notes, hooks)
            produced += _check_own_step(dec, notes)
        mode = _decode_mode(mode, dec.cache, max_new_tokens, notes)
        tokens, produced, capture_s, decode_s, mode = _decode(dec, mode, max_new_tokens, force_tokens, progress,
                                                              sync, notes, produced)

    out = _cut_rows(tokens, stop, force_tokens)
    stats = FastStats(n_rows, 1, length, produced, prefill_s, capture_s, decode_s, mode, tuple(notes))
    return out, stats


def _batch_inputs(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids [rows, length], attention mask over the whole static cache [rows, length + max_new] and position
    ids [rows, length] of the left-padded prompts, one row each."""
    ids, prompt_mask = left_pad(prompts, pad_id(lm.tokenizer, lm.model.config))  # [rows, length], on the host
    # generated positions are 1 from the start: causality hides the future
    mask = torch.cat([prompt_mask, torch.ones(len(prompts), max_new_tokens, dtype=torch.long)], dim=1)
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    position = position_ids(mask[:, :ids.shape[1]])  # [rows, length], as HF generate
    return ids, mask, position


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, stop: torch.Tensor,
             max_new_tokens: int, keep: dict) -> _Decoder:
    """The prompts' forward into a fresh `StaticCache`; the decoder holds its first new token per row."""
    from transformers import StaticCache

    try:
        cache = StaticCache(config=model.config, max_cache_len=mask.shape[1])
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                       use_cache=True, **keep).logits  # [rows, 1 or length, vocab]
    except (TypeError, ValueError, NotImplementedError, AttributeError, KeyError) as exc:
        raise FastPathUnsupported(f"{type(exc).__name__} in the static-cache prefill: {exc}") from exc
    return _Decoder(model, cache, mask, logits[:, -1].argmax(-1), position[:, -1:] + 1, stop, max_new_tokens)


def _check_own_step(dec: _Decoder, notes: list[str]) -> int:
    """The batch's first decode step on both steps (`_Decoder.checked_own_step`); the own step goes on only if its
    logits are HF's within `OWN_STEP_TOLERANCE`. Returns the steps made (0 without an own step, else 1)."""
    if dec.own is None:
        return 0
    err = dec.checked_own_step()
    if err <= OWN_STEP_TOLERANCE:
        notes.append(f"own decode step with {dec.own.attention_name}")
        notes.append(f"own decode step checked on the batch's first step: relative logit difference {err:.1e}")
    else:
        log.warning("own decode step differs from HF's step on this batch's first step (relative logit difference "
                    "%.3g > %.3g); decoding with HF's step", err, OWN_STEP_TOLERANCE)
        notes.append(f"own decode step unavailable (first step {err:.2g} from HF's): HF's step")
        dec.own = None
    return 1


def _decode_mode(mode: str, cache, max_new_tokens: int, notes: list[str]) -> str:
    """``mode``, or "eager" where graphs cannot help (sliding-window cache layers, too few steps)."""
    plain_layers = all(type(layer).__name__ == "StaticLayer" for layer in cache.layers)
    if mode in ("cuda-graph", "compile") and not plain_layers:
        notes.append("sliding-window cache layers keep a Python counter: decoded without CUDA graphs")
        mode = "eager"
    if mode == "cuda-graph" and max_new_tokens <= 1 + WARMUP_STEPS:
        mode = "eager"
    return mode


def _decode(dec: _Decoder, mode: str, max_new_tokens: int, force_tokens: bool, progress: bool,
            sync: Callable[[], None], notes: list[str], produced: int = 1
            ) -> tuple[torch.Tensor, int, float, float, str]:
    """Decode steps after the ``produced`` tokens made so far (the prefill's, the own step's check): (tokens [rows,
    produced] on the host, produced, capture seconds, decode seconds, the mode that ran)."""
    device = dec.tokens.device
    capture_s = 0.0
    t0 = time.perf_counter()
    bar = _bar(progress, max_new_tokens)
    bar.update(produced)
    step = dec.step
    if mode == "compile":  # experimental: the first call compiles, counted as capture time
        step = _compiled_step(dec)
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
            _warm_up(dec, device)
            produced += WARMUP_STEPS
            bar.update(WARMUP_STEPS)
            t1 = time.perf_counter()
            run = graph_replay = _capture_graph(dec, notes)
            if run is None:
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
    return tokens, produced, capture_s, decode_s, mode


def _compiled_step(dec: _Decoder) -> Callable[[], None]:
    own = [dec.own.slot, dec.own.mask] if dec.own is not None else []
    for buf in [dec.ids, dec.position, dec.tokens, dec.index, dec.done, dec.mask, *own]:
        torch._dynamo.mark_static_address(buf)
    return torch.compile(dec.step, mode="reduce-overhead")


def _warm_up(dec: _Decoder, device: torch.device) -> None:
    """`WARMUP_STEPS` real (eager) decode steps on a side stream, as CUDA-graph capture requires."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            dec.step()
    torch.cuda.current_stream(device).wait_stream(side)


def _capture_graph(dec: _Decoder, notes: list[str]) -> Callable[[], None] | None:
    """The decode step captured as a CUDA graph (its replay), or None (reason logged) if capture fails."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            dec.step()
        return graph.replay
    except Exception as exc:  # e.g. a host sync inside the model's forward
        log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(exc).__name__, exc)
        notes.append(f"CUDA graph capture failed: {type(exc).__name__}")
        return None


def _cut_rows(tokens: torch.Tensor, stop: Sequence[int], force_tokens: bool) -> list[tuple[list[int], bool]]:
    """Per row: (ids up to and including the first stop token, whether one was found)."""
    stop_set = set(stop)
    out: list[tuple[list[int], bool]] = []
    for row in tokens.tolist():
        end = None if force_tokens else next((k + 1 for k, t in enumerate(row) if t in stop_set), None)
        out.append((row if end is None else row[:end], end is not None))
    return out


def _bar(progress: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate [fast]", unit="tok", disable=not progress, dynamic_ncols=True)
