"""Batched execution with out-of-memory back-off and an optional progress bar.

`run_batched` calls ``fn(batch_items)`` over consecutive slices. On a CUDA out-of-memory error it
halves the batch size, logs it, frees cached memory and retries the same slice; the smaller size is
kept for the rest of the run. A batch size that cannot shrink further re-raises the error.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_batched(
    fn: Callable[[Sequence[T]], list[R]],
    items: Sequence[T],
    batch_size: int,
    desc: str = "",
    progress: bool = False,
    on_batch_size: Callable[[int], None] | None = None,
) -> list[R]:
    """Apply ``fn`` to slices of ``items``; returns the concatenated per-item results in order."""
    from tqdm.auto import tqdm

    results: list[R] = []
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="prompt", dynamic_ncols=True)
    start = 0
    try:
        while start < len(items):
            chunk = items[start:start + batch_size]
            try:
                out = fn(chunk)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not is_oom(exc) or batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                log.warning("%s: out of memory; retrying with batch size %d", desc or "batch", batch_size)
                if on_batch_size:
                    on_batch_size(batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            assert len(out) == len(chunk), "batch function must return one result per item"
            results.extend(out)
            start += len(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
    return results
