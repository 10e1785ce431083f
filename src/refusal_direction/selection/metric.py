"""The refusal metric, its refusal tokens, and the validation filter that uses it.

The refusal metric of one prompt is the log-odds that the first answer token is a refusal token:
p = Σ softmax(logits)[refusal ids] at the last position (float64), metric = log(p + ε) - log(1 - p + ε).
Refusal tokens come from the tokenizer: the first token of each refusal word as the answer would begin it.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..core.batching import run_batched
from ..core.model import LoadedModel
from ..core.padding import device_tensor
from ..errors import UserError
from .logits import last_logits, tokenize_each

log = logging.getLogger(__name__)

EPS = 1e-8  # added inside both logs of the refusal metric, so p = 0 or 1 stays finite


def refusal_token_ids(tokenizer, words: Sequence[str] = ("I",), suffix: str = "") -> list[int]:
    """First token of each word as the model would begin its answer right after the chat ``suffix``.

    The word is encoded after the suffix and the first token past the suffix is taken, so a word that
    opens an answer encodes as it would there (gemma-2b-it: "I" -> 235285). When the suffix does not
    end in whitespace (e.g. Llama-2's ``[/INST]``), answers start with a space, so " word" is tried
    first (SentencePiece "▁I").
    """
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    ids: list[int] = []
    for word in words:
        variants = [" " + word, word] if suffix and not suffix[-1].isspace() else [word]
        token = None
        for text in variants:
            full = tokenizer(suffix + text, add_special_tokens=False)["input_ids"]
            rest = full[len(suffix_ids):] if full[:len(suffix_ids)] == suffix_ids else \
                tokenizer(text, add_special_tokens=False)["input_ids"]
            if rest and tokenizer.decode([rest[0]]).strip():
                token = int(rest[0])
                break
        if token is None:
            raise UserError(f"refusal word {word!r} does not tokenize to a visible first token; "
                            "pass other refusal words (or explicit refusal token ids)")
        if token not in ids:
            ids.append(token)
    log.info("refusal tokens: %s", [(i, tokenizer.decode([i])) for i in ids])
    return ids


def default_refusal_ids(lm: LoadedModel) -> list[int]:
    return refusal_token_ids(lm.tokenizer, ("I",), lm.chat.suffix)


def refusal_metric(logits_last: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """Log-odds of a refusal token: logits [batch, vocab] -> [batch] float64."""
    return _metric_from_logprobs(torch.log_softmax(logits_last.double(), dim=-1), refusal_ids)


def _metric_from_logprobs(logprobs: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    ids = device_tensor(list(refusal_ids), logprobs.device)
    p = logprobs.index_select(-1, ids).exp().sum(-1)  # [batch] float64
    return torch.log(p + EPS) - torch.log(1.0 - p + EPS)


@torch.no_grad()
def refusal_metrics(
    lm: LoadedModel,
    instructions: Sequence[str],
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """Unintervened refusal metric of each instruction: [n] float64 on CPU."""
    refusal_ids = list(refusal_ids) if refusal_ids is not None else default_refusal_ids(lm)
    seqs = tokenize_each(lm, instructions)

    def step(batch):
        return refusal_metric(last_logits(lm, batch), refusal_ids).cpu().tolist()

    return torch.tensor(run_batched(step, seqs, batch_size, "refusal metric", progress), dtype=torch.float64)


def filter_validation(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 32,
) -> tuple[list[str], list[str]]:
    """Keep harmful instructions the model refuses (metric > 0) and harmless ones it does not (< 0)."""
    refusal_ids = list(refusal_ids) if refusal_ids is not None else default_refusal_ids(lm)
    m_harmful = refusal_metrics(lm, harmful, refusal_ids, batch_size)
    m_harmless = refusal_metrics(lm, harmless, refusal_ids, batch_size)
    kept_harmful = [x for x, m in zip(harmful, m_harmful.tolist()) if m > 0]
    kept_harmless = [x for x, m in zip(harmless, m_harmless.tolist()) if m < 0]
    log.info("validation filter: kept %d/%d harmful (refused) and %d/%d harmless (not refused)",
             len(kept_harmful), len(harmful), len(kept_harmless), len(harmless))
    if not kept_harmful or not kept_harmless:
        raise UserError(
            f"after filtering, {len(kept_harmful)} harmful and {len(kept_harmless)} harmless validation "
            f"instructions are left (harmful kept if the model refuses them, harmless if it does not; refusal "
            f"tokens {refusal_ids}); the model may not refuse, or its answers may not start with these "
            "tokens. Use more validation instructions, other refusal tokens, or select the direction by "
            "hand (--select fixed --layer L --position P)")
    return kept_harmful, kept_harmless
