"""Activations stage: mean residual stream (resid_pre) at the post-instruction positions.

For every decoder block l and every post-instruction position i (counted from the end of the prompt),
the mean over a dataset of the block's input. Sums are accumulated in float64 and no per-prompt
activation is kept. Prompts are left-padded, so the last n positions of every row are real tokens.
The forward pass stops after the last block's input is captured (no final norm, no unembedding).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .batching import run_batched
from .model import LoadedModel
from .sdpa import restricted_sdpa

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


class NonFiniteActivations(RuntimeError):
    pass


@torch.no_grad()
def capture_resid_pre(lm: LoadedModel, instructions: Sequence[str], n_positions: int | None = None) -> torch.Tensor:
    """resid_pre at the last ``n_positions`` tokens for one batch: [batch, n_positions, n_layers, d_model]."""
    n_positions = n_positions or lm.n_post_instruction
    captured: list[torch.Tensor | None] = [None] * lm.n_layers
    handles = []

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            captured[layer] = x[:, -n_positions:, :].detach().to(lm.device)  # a dispatched block may be elsewhere
            if layer == lm.n_layers - 1:
                raise _StopForward
        return hook

    try:
        for i, site in enumerate(lm.blocks):
            handles.append(site.block.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        enc = lm.tokenize(list(instructions))
        try:
            lm.model(**enc, use_cache=False)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    assert all(c is not None for c in captured)
    return torch.stack(captured, dim=2)  # [batch, n_positions, n_layers, d_model]


def mean_resid_pre(
    lm: LoadedModel,
    instructions: Sequence[str],
    batch_size: int = 32,
    n_positions: int | None = None,
    progress: bool = False,
    desc: str = "activations",
    sdpa: Sequence[str] | None = ("efficient", "math"),
) -> torch.Tensor:
    """Mean resid_pre over ``instructions``: [n_positions, n_layers, d_model], float64, on CPU.

    ``sdpa``: attention kernels allowed on CUDA (`core.sdpa.restricted_sdpa`; None: torch's pick). Batches come in
    many padded lengths, and torch's pick on an H200 (cuDNN) builds an execution plan for each new one.
    """
    n_positions = n_positions or lm.n_post_instruction
    total = torch.zeros(n_positions, lm.n_layers, lm.d_model, dtype=torch.float64, device=lm.device)
    batch_index = [0]

    def step(batch):
        acts = capture_resid_pre(lm, batch, n_positions)
        if not torch.isfinite(acts).all():
            bad = (~torch.isfinite(acts)).flatten(start_dim=3).any(-1).any(0).any(0)  # [n_layers]
            layer = int(bad.nonzero()[0, 0])
            raise NonFiniteActivations(
                f"NaN/inf in resid_pre at layer {layer}, batch {batch_index[0]} of {desc} "
                f"(first prompt: {batch[0][:80]!r}); try --dtype float32")
        total.add_(acts.double().sum(dim=0))
        batch_index[0] += 1
        return [None] * len(batch)

    # Similar lengths share a batch (little padding); the mean does not depend on the order.
    ordered = sorted(instructions, key=lambda x: len(lm.tokenizer(x, add_special_tokens=False)["input_ids"]))
    with restricted_sdpa(lm.device, sdpa):
        run_batched(step, ordered, batch_size, desc=desc, progress=progress)
    return (total / len(instructions)).cpu()
