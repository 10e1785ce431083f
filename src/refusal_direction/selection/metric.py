"""The refusal metric, its refusal tokens, and the validation filter that uses it.

The refusal metric of one prompt is the log-odds that the first answer token is a refusal token:
p = Σ softmax(logits)[refusal ids] at the last position (float64), metric = log(p + ε) - log(1 - p + ε).
Refusal tokens come from the tokenizer: the first token of each refusal word as the answer would begin it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


@dataclass(frozen=True)
class FilteredValidation:
    """The validation prompts selection scores on, and how many the filter kept before any top-up."""

    harmful: list[str]
    harmless: list[str]
    n_harmful: int  # before the filter
    n_harmless: int
    n_harmful_passed: int  # passed the filter (refused: metric > 0)
    n_harmless_passed: int  # passed the filter (not refused: metric < 0)
    min_prompts: int | None  # the stated minimum per kind (None: no top-up, the paper's filter)

    @property
    def topped_up(self) -> bool:
        return len(self.harmful) > self.n_harmful_passed or len(self.harmless) > self.n_harmless_passed

    def to_json(self) -> dict:
        return {"n_harmful": self.n_harmful, "n_harmless": self.n_harmless,
                "n_harmful_passed": self.n_harmful_passed, "n_harmless_passed": self.n_harmless_passed,
                "n_harmful_used": len(self.harmful), "n_harmless_used": len(self.harmless),
                "min_prompts": self.min_prompts, "topped_up": self.topped_up}


def required_prompts(min_prompts: int, n: int) -> int:
    """The filter's floor for a set of ``n`` prompts: min(min_prompts, half the set), at least 1."""
    return max(1, min(min_prompts, n // 2))


def _keep(items: Sequence[str], metrics: Sequence[float], passes, floor: int, descending: bool) -> list[str]:
    """Items whose metric passes, topped up by metric rank (most refused first if ``descending``) to ``floor``;
    in their original order."""
    keep = {i for i, m in enumerate(metrics) if passes(m)}
    ranked = sorted(range(len(items)), key=lambda i: -metrics[i] if descending else metrics[i])
    for i in ranked:
        if len(keep) >= floor:
            break
        keep.add(i)
    return [items[i] for i in sorted(keep)]


def filter_validation_checked(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 32,
    min_prompts: int | None = None,
) -> FilteredValidation:
    """The validation filter, which cannot collapse silently: keep harmful instructions the model refuses
    (metric > 0) and harmless ones it does not (< 0); where fewer than ``required_prompts(min_prompts, n)``
    pass, warn with the counts and top up by metric rank. ``min_prompts=None``: no top-up (the paper's)."""
    refusal_ids = list(refusal_ids) if refusal_ids is not None else default_refusal_ids(lm)
    m_harmful = refusal_metrics(lm, harmful, refusal_ids, batch_size).tolist()
    m_harmless = refusal_metrics(lm, harmless, refusal_ids, batch_size).tolist()
    passed = sum(m > 0 for m in m_harmful), sum(m < 0 for m in m_harmless)
    floors = (0, 0) if min_prompts is None else (required_prompts(min_prompts, len(harmful)),
                                                 required_prompts(min_prompts, len(harmless)))
    kept_harmful = _keep(harmful, m_harmful, lambda m: m > 0, floors[0], descending=True)
    kept_harmless = _keep(harmless, m_harmless, lambda m: m < 0, floors[1], descending=False)
    log.info("validation filter: kept %d/%d harmful (refused) and %d/%d harmless (not refused)",
             passed[0], len(harmful), passed[1], len(harmless))
    for kind, n_pass, n, floor in (("harmful", passed[0], len(harmful), floors[0]),
                                   ("harmless", passed[1], len(harmless), floors[1])):
        if n_pass < floor:
            log.warning("validation filter: only %d of %d %s prompts passed (minimum %d = min(min_val_prompts=%d, "
                        "half the set)); topped up to %d by refusal metric rank (refusal tokens %s)", n_pass, n,
                        kind, floor, min_prompts, floor, refusal_ids)
    if not kept_harmful or not kept_harmless:
        raise UserError(
            f"after filtering, {len(kept_harmful)} harmful and {len(kept_harmless)} harmless validation "
            f"instructions are left (harmful kept if the model refuses them, harmless if it does not; refusal "
            f"tokens {refusal_ids}); the model may not refuse, or its answers may not start with these "
            "tokens. Use more validation instructions, other refusal tokens, or select the direction by "
            "hand (--select fixed --layer L --position P)")
    return FilteredValidation(kept_harmful, kept_harmless, len(harmful), len(harmless), passed[0], passed[1],
                              min_prompts)


def filter_validation(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 32,
) -> tuple[list[str], list[str]]:
    """The paper's filter: keep harmful instructions the model refuses (metric > 0) and harmless ones it does
    not (< 0); raises UserError when a kind is left empty."""
    kept = filter_validation_checked(lm, harmful, harmless, refusal_ids, batch_size)
    return kept.harmful, kept.harmless
