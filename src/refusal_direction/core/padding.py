"""Left padding, position ids, the pad id, small host->device copies: defined once, used by every forward pass.

Prompts are left-padded (the chat template's end sits at the last position of every row), so position ids
count real tokens only: padded slots get position 0 and are masked out of attention.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pad_id(tokenizer, config=None) -> int:
    """The id written into padded slots: the tokenizer's pad token, else the model config's, else eos, else 0.

    Padded slots are masked, so the id never changes a result; it only has to be a valid token id.
    """
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def position_ids(mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Position ids [batch, length] of a left-padded attention mask: real tokens at offset, offset + 1, ...

    Padded slots get ``offset`` (they are masked; HF's ``generate`` does the same).
    """
    return offset + (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` [batch, max_len] (long) of token-id lists."""
    if not seqs:
        raise ValueError("left_pad needs at least one sequence")
    width = max(len(s) for s in seqs)
    ids = [[pad] * (width - len(s)) + list(s) for s in seqs]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in seqs]
    return device_tensor(ids, device), device_tensor(mask, device)


def device_tensor(values: list, device: torch.device | str, dtype=torch.long) -> torch.Tensor:
    """A small host list on ``device``; on CUDA through pinned memory, so the copy does not wait for queued kernels."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
