"""Which attention kernels PyTorch's scaled-dot-product attention may use on CUDA, for a block of code.

Extraction, the selection sweep, fast generation and the capability checks restrict SDPA to memory-efficient / math
kernels on CUDA (cuDNN builds a plan per new shape, which was measured as a 2.7-3.3 s outlier on an H200). On other
devices nothing changes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

SDPA_NAMES = ("flash", "efficient", "cudnn", "math")


@contextlib.contextmanager
def restricted_sdpa(device: torch.device, names: Sequence[str] | None) -> Iterator[list[str]]:
    """Restrict PyTorch's scaled-dot-product attention to ``names`` (in order of preference) on CUDA for the
    block; None or a non-CUDA device: torch's own choice. Yields a note for logs (empty if nothing changed)."""
    if not names or torch.device(device).type != "cuda":
        yield []
        return
    bad = [n for n in names if n not in SDPA_NAMES]
    if bad:
        raise ValueError(f"unknown SDPA backend(s) {bad}: use {', '.join(SDPA_NAMES)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    with sdpa_kernel([table[n] for n in names]):
        yield [f"SDPA backends: {', '.join(names)}"]
