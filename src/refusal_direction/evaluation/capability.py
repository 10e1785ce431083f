"""Capability checks of an intervention (the paper's coherence measures), on harmless inputs.

- `next_token_kl`: KL(baseline ‖ intervened) of the next-token distribution at the last prompt
  position, per prompt and averaged; an intervention that only removes refusal should leave harmless
  prompts' next-token distributions nearly unchanged.
- `completion_cross_entropy`: mean per-token cross-entropy of given completions under the
  intervention (prompt tokens masked out). With the baseline model's own greedy completions of harmless
  prompts this is the paper's "on-distribution" CE; a large rise means the edit damaged the model.

Both run full forward passes with left padding and position ids taken from the attention mask, so a
batched row sees the same positions as the prompt alone.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence, Union

import torch

from ..core.batching import run_batched
from ..core.model import LoadedModel
from ..core.sdpa import restricted_sdpa
from ..edits import Baseline, Edit, Intervention, apply_intervention

log = logging.getLogger(__name__)

# attention kernels on CUDA: every batch has its own padded length, and cuDNN would build a plan for each
# (core.sdpa); memory-efficient attention, math where it does not apply
SDPA = ("efficient", "math")

Completion = Union[str, Sequence[int]]  # text, or token ids (e.g. `Generated.token_ids`)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (left padding gets 0): [batch, seq]."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def last_token_logprobs(lm: LoadedModel, instructions: Sequence[str], intervention: Intervention) -> torch.Tensor:
    """log p(next token) at the last prompt position under ``intervention``: [batch, vocab] float64."""
    enc = lm.tokenize(list(instructions))
    with apply_intervention(lm, intervention), restricted_sdpa(lm.device, SDPA):
        logits = lm.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False).logits
    return torch.log_softmax(logits[:, -1].double(), dim=-1)


def next_token_kl(
    lm: LoadedModel,
    instructions: Sequence[str],
    intervention: Intervention,
    batch_size: int = 32,
    progress: bool = False,
    baseline: dict | None = None,
) -> dict:
    """KL(baseline ‖ intervened) of the last-position next-token distributions, in nats (float64).

    ``baseline``: a dict shared by calls on the same instructions (e.g. one per condition) that keeps each batch's
    baseline distribution, so it is computed once, not once per intervention; the baseline itself is 0 by
    definition and needs no forward pass. Returns ``{"kl": mean, "per_prompt": [...], "n_prompts": n,
    "intervention": name}``.
    """
    cache = {} if baseline is None else baseline

    def step(batch):
        if isinstance(intervention, Edit) and intervention.identity:
            return [0.0] * len(batch)
        key = tuple(batch)
        if key not in cache:
            cache[key] = last_token_logprobs(lm, batch, Baseline())  # [batch, vocab]
        base = cache[key]
        other = last_token_logprobs(lm, batch, intervention)
        kl = (base.exp() * (base - other)).sum(-1)  # [batch]
        return kl.cpu().tolist()

    per_prompt = run_batched(step, list(instructions), batch_size, desc=f"kl [{intervention.name}]",
                             progress=progress)
    mean = sum(per_prompt) / len(per_prompt) if per_prompt else float("nan")
    log.info("next-token KL(baseline ‖ %s) = %.4g over %d prompts", intervention.name, mean, len(per_prompt))
    return {"kl": mean, "per_prompt": per_prompt, "n_prompts": len(per_prompt), "intervention": intervention.name}


def completion_token_ids(lm: LoadedModel, completion: Completion) -> list[int]:
    if isinstance(completion, str):
        return list(lm.tokenizer(completion, add_special_tokens=False)["input_ids"])
    return [int(t) for t in completion]


@torch.no_grad()
def completion_nll(
    lm: LoadedModel, instructions: Sequence[str], completions: Sequence[Completion], intervention: Intervention
) -> list[tuple[float, int]]:
    """Per example: (sum of −log p over the completion tokens, number of completion tokens)."""
    rows, n_prompt = [], []
    for instruction, completion in zip(instructions, completions, strict=True):
        prompt = lm.encode(instruction)  # special-token strings in the instruction stay text
        rows.append(prompt + completion_token_ids(lm, completion))
        n_prompt.append(len(prompt))
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=lm.device)  # [batch, seq]
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=lm.device)
    # labels[b, t] = token t+1 if it is a completion token, else -100 (prompt or padding)
    labels = torch.full_like(ids, -100)
    for b, (r, p) in enumerate(zip(rows, n_prompt)):
        start = width - len(r) + p  # index of the first completion token
        labels[b, start - 1:width - 1] = ids[b, start:]
    with apply_intervention(lm, intervention), restricted_sdpa(lm.device, SDPA):
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
    keep = labels != -100  # [batch, seq]
    logp = torch.log_softmax(logits[keep].float(), dim=-1)  # [n_tokens, vocab]
    nll = -logp.gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1).double()  # [n_tokens]
    row_of = keep.nonzero()[:, 0]
    sums = torch.zeros(len(rows), dtype=torch.float64, device=nll.device).index_add_(0, row_of, nll)
    return [(float(s), int(n)) for s, n in zip(sums.cpu(), keep.sum(-1).cpu())]


def completion_cross_entropy(
    lm: LoadedModel,
    instructions: Sequence[str],
    completions: Sequence[Completion],
    intervention: Intervention,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Mean per-token cross-entropy (nats) of ``completions`` given their prompts, under ``intervention``.

    Averaged over all completion tokens of all examples (token-weighted). Completions are text or token
    ids; text is tokenized without special tokens and appended to the chat-formatted prompt.
    Returns ``{"ce", "perplexity", "n_tokens", "n_prompts", "intervention"}``.
    """
    if len(instructions) != len(completions):
        raise ValueError(f"{len(instructions)} instructions but {len(completions)} completions")
    pairs = list(zip(instructions, completions))

    def step(batch):
        return completion_nll(lm, [p[0] for p in batch], [p[1] for p in batch], intervention)

    per_example = run_batched(step, pairs, batch_size, desc=f"cross-entropy [{intervention.name}]",
                              progress=progress)
    total = sum(s for s, _ in per_example)
    n_tokens = sum(n for _, n in per_example)
    ce = total / n_tokens if n_tokens else float("nan")
    log.info("completion CE under %s = %.4f nats over %d tokens", intervention.name, ce, n_tokens)
    return {"ce": ce, "perplexity": math.exp(ce) if n_tokens else float("nan"), "n_tokens": n_tokens,
            "n_prompts": len(pairs), "intervention": intervention.name}


__all__ = ["next_token_kl", "completion_cross_entropy", "completion_nll", "last_token_logprobs", "position_ids"]
