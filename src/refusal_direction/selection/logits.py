"""Last-position logits through HF's forward, and the chat template's opening computed once as a KV cache.

The opening (e.g. "<bos><start_of_turn>user\\n", or a default system prompt) is the same tokens at the same
positions in every prompt, and causal attention keeps its activations independent of what follows: under one
intervention they are the same for every prompt. So the sweep computes them once per distinct intervention
and hands them to the rows as keys and values. `opening_matches` checks once that an architecture takes the
cache; `reproduces_logits` is the check every shortcut of the sweep passes before it is used, to the
`check_tolerance` of the model's dtype.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Sequence

import torch

from ..core.model import LoadedModel
from ..core.padding import device_tensor, left_pad, pad_id, position_ids

log = logging.getLogger(__name__)

CHECK_TOLERANCE = 5e-2  # a shortcut's largest relative logit error against HF's forward in float32
MAX_TOLERANCE = 0.25  # the most `check_tolerance` allows in bf16/fp16: a halved logit row (0.5) still fails


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
                    logits: torch.Tensor, tolerance: float = CHECK_TOLERANCE) -> bool:
    """Whether continuing from the opening's cache reproduces full-pass ``logits`` for ``seqs`` (checks that
    this architecture takes a cache, position ids and a mask with a hole)."""
    def shared() -> torch.Tensor:
        cache = opening_cache(lm, opening, 1)
        cache.reorder_cache(torch.zeros(len(seqs), dtype=torch.long, device=lm.device))
        return last_logits(lm, [s[len(opening):] for s in seqs], cache, len(opening))

    return reproduces_logits(lm, "shared chat-template opening", shared, logits, tolerance)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref - its row means||: the checks' measure (a constant shift of a row's logits is free)."""
    got, ref = got.float(), ref.float()
    return float((got - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm().clamp_min(1e-30))


def check_tolerance(lm: LoadedModel, seqs: Sequence[Sequence[int]]) -> float:
    """The relative error a shortcut may show against HF's forward: `CHECK_TOLERANCE`, or in a 16-bit dtype twice
    the error HF's forward shows against itself (``seqs`` one at a time vs as one batch: other kernels, other
    roundings, the same mathematics), at most `MAX_TOLERANCE`. Two equal computations in bf16 differ by what
    rounding through the blocks amplifies: 6.9 % at Llama-3-8B's shape with random weights on an H200, where
    float32 agrees to 2e-5 (benchmarks/check_noise.py), so a fixed 5 % refused a correct shortcut there."""
    if lm.dtype not in (torch.bfloat16, torch.float16) or len(seqs) < 2:
        return CHECK_TOLERANCE
    batch = last_logits(lm, seqs)
    noise = relative_error(torch.cat([last_logits(lm, [s]) for s in seqs]), batch)
    tolerance = min(max(CHECK_TOLERANCE, 2 * noise), MAX_TOLERANCE)
    log.log(logging.INFO if tolerance > CHECK_TOLERANCE else logging.DEBUG,
            "%s's own forward in %s: one prompt at a time vs one batch differ by %.3g (relative); shortcut checks "
            "allow %.3g", lm.model_id, str(lm.dtype).removeprefix("torch."), noise, tolerance)
    return tolerance


def reproduces_logits(lm: LoadedModel, what: str, compute, logits: torch.Tensor,
                      tolerance: float = CHECK_TOLERANCE) -> bool:
    """Whether ``compute()`` (a shortcut) gives ``logits`` (the full pass) to ``tolerance`` relative error
    (`check_tolerance`); logs why not."""
    try:
        got = compute()
    except Exception as exc:  # any architecture surprise: full passes
        log.info("%s unavailable for %s (%s: %s); using full forward passes", what, lm.model_id,
                 type(exc).__name__, exc)
        return False
    err = relative_error(got, logits)
    if not err <= tolerance:  # a NaN fails too
        log.info("%s does not reproduce %s's logits (relative error %.3g > %.3g); using full forward passes", what,
                 lm.model_id, err, tolerance)
        return False
    log.debug("%s check: relative logit error %.3g", what, err)
    return True
