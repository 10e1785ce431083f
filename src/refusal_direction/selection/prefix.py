"""Shared prefixes: an activation addition at block l leaves blocks 0..l-1 as in the baseline, so the sweep's
induce rows start from the baseline's block-l input instead of running the whole model.

`capture_prefix` runs the baseline once and keeps every block's input and call arguments; `replay` runs
the remaining blocks for rows that add a vector at their own start block. `replay_matches` checks once, per
architecture, that replaying the baseline from block 0 gives the model's own logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.model import LoadedModel
from ..core.padding import device_tensor
from .logits import last_logits, reproduces_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Prefix:
    """A baseline forward pass of ``batch`` prompts: every block's input and call arguments."""

    resid: list[torch.Tensor]  # per block: input hidden states [batch, seq, d_model]
    calls: list[tuple[tuple, dict]]  # per block: positional arguments after hidden_states, keyword arguments
    batch: int


def capture_prefix(lm: LoadedModel, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Prefix]:
    """Last-position logits [batch, vocab] of an unintervened forward pass, and its Prefix."""
    resid: list = [None] * lm.n_layers
    calls: list = [None] * lm.n_layers

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            x = args[0] if args else kwargs.pop("hidden_states")
            resid[layer] = x.detach().clone()
            calls[layer] = (tuple(args[1:]), kwargs)
        return hook

    handles = [site.block.register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i, site in enumerate(lm.blocks)]
    try:
        logits = last_logits(lm, seqs)
    finally:
        for h in handles:
            h.remove()
    return logits, Prefix(resid, calls, len(seqs))


def _select_rows(obj, rows: torch.Tensor, batch: int):
    """Index the batch dimension of every per-row tensor in a block's call arguments."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows) if obj.dim() >= 2 and obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_select_rows(o, rows, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: _select_rows(v, rows, batch) for k, v in obj.items()}
    return obj


def replay(lm: LoadedModel, prefix: Prefix, prompts: Sequence[int], starts: Sequence[int],
           vectors: torch.Tensor) -> torch.Tensor:
    """Last-position logits [n, vocab] of row i = prompt ``prompts[i]`` of ``prefix`` with ``vectors[i]``
    added at block ``starts[i]``'s input; blocks before ``starts[i]`` are not recomputed."""
    order = sorted(range(len(prompts)), key=lambda i: starts[i])
    h, active, nxt = None, [], 0
    for layer in range(starts[order[0]], lm.n_layers):
        joining = []
        while nxt < len(order) and starts[order[nxt]] == layer:
            joining.append(order[nxt])
            nxt += 1
        if joining:
            x = prefix.resid[layer].index_select(0, device_tensor([prompts[i] for i in joining], lm.device))
            x = x + vectors.index_select(0, device_tensor(joining, lm.device)).unsqueeze(1)  # [n_join, seq, d]
            h = x if h is None else torch.cat([h, x])
            active += joining
            rows = device_tensor([prompts[i] for i in active], lm.device)
        args, kwargs = prefix.calls[layer]
        out = lm.blocks[layer].block(h, *_select_rows(args, rows, prefix.batch),
                                     **_select_rows(kwargs, rows, prefix.batch))
        h = out[0] if isinstance(out, tuple) else out
    logits = lm.model.get_output_embeddings()(lm.final_norm(h[:, -1:, :]).contiguous())[:, -1, :]
    cap = getattr(lm.model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    out = torch.empty_like(logits)
    out[device_tensor(active, lm.device)] = logits
    return out


def replay_matches(lm: LoadedModel, prefix: Prefix, logits: torch.Tensor) -> bool:
    """Whether replaying the baseline from block 0 reproduces the model's own logits (checks that the
    block arguments, the final norm and the head were found right for this architecture)."""
    if lm.final_norm is None or lm.model.get_output_embeddings() is None:
        log.info("shared-prefix replay unavailable for %s (no final norm or output embeddings found); using "
                 "full forward passes", lm.model_id)
        return False
    n = prefix.batch
    zeros = torch.zeros(n, lm.d_model, device=lm.device, dtype=lm.dtype)
    # HF's own blocks on both sides (measured 0 at 8B shape in bf16): the fixed bound, no noise allowance
    return reproduces_logits(lm, "shared-prefix replay", lambda: replay(lm, prefix, list(range(n)), [0] * n, zeros),
                             logits)
