"""The unembedding reads packed rows: `packed_head_input`.

With ``logits_to_keep=1`` a transformers causal LM hands its ``lm_head`` ``hidden[:, -1:, :]``: a view whose rows
lie a whole sequence apart in memory. cuBLAS multiplies that strided matrix with a far slower kernel than the same
rows packed. Measured with torch.profiler on an H200 (`benchmarks/optimize_profile.py`, one optimize batch of 1600
rows, Qwen2.5-0.5B, 151,936-token vocabulary): the prefill's unembedding was one kernel of 100 ms; packed, it left
the top of the kernel table, and the batch's matrix-product time fell from 0.372 to 0.272 s in generation and from
0.246 to 0.141 s in the KL passes (which also went from four passes to one). A forward pre-hook gives the head a
packed copy (``contiguous()``; a no-op where the input already is): the same numbers up to the GEMM's rounding.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def packed_head_input(model: nn.Module) -> Iterator[bool]:
    """For the block, ``model``'s output embedding reads a contiguous copy of its input; yields whether it does
    (False for a model without an output embedding module)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        yield False
        return

    def pack(module, args):
        return (args[0].contiguous(), *args[1:]) if args else None

    handle = head.register_forward_pre_hook(pack)
    try:
        yield True
    finally:
        handle.remove()


__all__ = ["packed_head_input"]
