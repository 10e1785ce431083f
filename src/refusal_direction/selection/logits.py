"""Last-position logits through HF's forward, and the chat template's opening computed once as a KV cache.

The opening (e.g. "<bos><start_of_turn>user\\n", or a default system prompt) is the same tokens at the same
positions in every prompt, and causal attention keeps its activations independent of what follows: under one
intervention they are the same for every prompt. So the sweep computes them once per distinct intervention
and hands them to the rows as keys and values. `opening_matches` checks once that an architecture takes the
cache; `reproduces_logits` is the check every shortcut of the sweep passes before it is used (5 % per row, or in
bf16/fp16 twice HF's own one-at-a-time vs batch difference: `noise_tolerance`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from typing import Sequence

import torch

from ..core.model import LoadedModel
from ..core.padding import device_tensor, left_pad, pad_id, position_ids

log = logging.getLogger(__name__)

CHECK_TOLERANCE = 5e-2  # a shortcut's largest relative logit error (per row) against HF's forward
MAX_TOLERANCE = 0.25  # the most `noise_tolerance` allows in bf16/fp16: one halved logit row (0.5) still fails


@functools.cache
def _accepts_logits_to_keep(model_type: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError):
        return False


def tokenize_each(lm: LoadedModel, instructions: Sequence[str]) -> list[list[int]]:
    """Chat-formatted token ids per instruction, unpadded (padding happens per batch)."""
    return lm.tokenizer([lm.format(x) for x in instructions], add_special_tokens=False)["input_ids"]


def last_logits(lm: LoadedModel, seqs: Sequence[Sequence[int]], past=None, past_len: int = 0) -> torch.Tensor:
    """Next-token logits after each prompt: [batch, vocab] in the model's dtype.

    ``past``: a KV cache of ``past_len`` tokens that precede every sequence (`opening_cache`); the sequences
    are then continuations, left-padded after the cached tokens with position ids that skip the padding.
    """
    input_ids, mask = left_pad(seqs, pad_id(lm.tokenizer, lm.model.config), lm.device)
    kwargs: dict = {"use_cache": False}
    if past is not None:
        position = position_ids(mask, past_len)  # the padding hole does not count
        mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, past_len), mask], dim=1)
        kwargs = {"past_key_values": past, "position_ids": position, "use_cache": True}
    if not _accepts_logits_to_keep(type(lm.model)):
        return lm.model(input_ids=input_ids, attention_mask=mask, **kwargs).logits[:, -1, :]
    # logits_to_keep=1 hands the LM head a strided view [batch, 1, d]; on CUDA that runs as a batched
    # matrix-vector product that re-reads the whole unembedding per row (measured on an H200 at
    # gemma-2b shape, 1024 rows: 239 ms vs 1.5 ms). A contiguous copy makes it one matrix product.
    head = lm.model.get_output_embeddings()
    handle = None if head is None else \
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        out = lm.model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    return out.logits[:, -1, :]


def common_opening(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix shared by every sequence, leaving each at least one token of its own."""
    if not seqs:
        return []
    limit, first = min(len(s) for s in seqs) - 1, seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return list(first[:n])


def opening_cache(lm: LoadedModel, opening: Sequence[int], n: int):
    """KV cache of ``opening`` for ``n`` rows, computed under whatever hooks are active (row i = intervention i).
    Runs the decoder alone where the model exposes it: no LM head for tokens whose logits nobody reads."""
    ids = device_tensor([list(opening)], lm.device).expand(n, -1)
    decoder = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else None
    return (decoder if isinstance(decoder, torch.nn.Module) else lm.model)(input_ids=ids,
                                                                          use_cache=True).past_key_values


def opening_matches(lm: LoadedModel, opening: Sequence[int], seqs: Sequence[Sequence[int]],
                    logits: torch.Tensor) -> bool:
    """Whether continuing from the opening's cache reproduces full-pass ``logits`` for ``seqs`` (checks that
    this architecture takes a cache, position ids and a mask with a hole)."""
    def shared() -> torch.Tensor:
        cache = opening_cache(lm, opening, 1)
        cache.reorder_cache(torch.zeros(len(seqs), dtype=torch.long, device=lm.device))
        return last_logits(lm, [s[len(opening):] for s in seqs], cache, len(opening))

    return reproduces_logits(lm, "shared chat-template opening", shared, logits,
                             lambda: torch.cat([last_logits(lm, [s]) for s in seqs]))


def relative_error(got: torch.Tensor, ref: torch.Tensor, per_row: bool = True) -> float:
    """The checks' measure: the largest over rows of ||got_r - ref_r|| / ||ref_r - mean(ref_r)|| (a constant shift
    of a row's logits is free; one wrong row counts in full); ``per_row=False``: one norm over the batch."""
    got, ref = got.float().reshape(-1, got.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    if not per_row:
        return float((got - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm().clamp_min(1e-30))
    spread = (ref - ref.mean(-1, keepdim=True)).norm(dim=-1).clamp_min(1e-30)
    return float(((got - ref).norm(dim=-1) / spread).max())


def _noise_applies(lm: LoadedModel) -> bool:
    """16-bit weights and rotary positions: there HF's forward one row at a time vs left-padded in a batch is the
    same mathematics (positions shift uniformly), so their difference is rounding alone."""
    decoder = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else None
    return lm.dtype in (torch.bfloat16, torch.float16) and \
        isinstance(getattr(decoder, "rotary_emb", None), torch.nn.Module)


def noise_tolerance(lm: LoadedModel, what: str, logits: torch.Tensor, one_at_a_time: torch.Tensor) -> float:
    """Twice the largest per-row error of HF's forward against itself (``one_at_a_time`` vs the batch ``logits``:
    other kernels, other roundings), within [`CHECK_TOLERANCE`, `MAX_TOLERANCE`]. Two equal computations in bf16
    differ by what rounding through the blocks amplifies: 6.9 % (whole-batch norm) at Llama-3-8B's shape with
    random weights on an H200, where the sweep forward agrees with HF's to 2e-5 in float32
    (benchmarks/check_noise.py): a fixed 5 % refused a correct shortcut there."""
    noise = relative_error(one_at_a_time, logits)
    if not math.isfinite(noise):
        return CHECK_TOLERANCE
    tolerance = min(max(CHECK_TOLERANCE, 2 * noise), MAX_TOLERANCE)
    log.info("HF's forward of %s in %s: the %s rows one at a time differ from one batch by %.3g (largest row); "
             "the %s check allows %.3g", lm.model_id, str(lm.dtype).removeprefix("torch."), what, noise, what,
             tolerance)
    return tolerance


def reproduces_logits(lm: LoadedModel, what: str, compute, logits: torch.Tensor, one_at_a_time=None) -> bool:
    """Whether ``compute()`` (a shortcut) gives ``logits`` (HF's full pass, one batch) to `CHECK_TOLERANCE`
    relative error per row; logs why not. ``one_at_a_time``: a callable giving the same rows through HF's forward
    one at a time; only if the shortcut misses 5 % in a 16-bit dtype is it run, and the bound becomes
    `noise_tolerance`."""
    try:
        got = compute()
    except Exception as exc:  # any architecture surprise: full passes
        log.info("%s unavailable for %s (%s: %s); using full forward passes", what, lm.model_id,
                 type(exc).__name__, exc)
        return False
    err, tolerance = relative_error(got, logits), CHECK_TOLERANCE
    if not err <= tolerance and math.isfinite(err) and one_at_a_time is not None and _noise_applies(lm):
        tolerance = noise_tolerance(lm, what, logits, one_at_a_time())
    if not err <= tolerance:  # a NaN fails too
        log.info("%s does not reproduce %s's logits (relative error %.3g > %.3g); using full forward passes", what,
                 lm.model_id, err, tolerance)
        return False
    log.debug("%s check: relative logit error %.3g", what, err)
    return True
