"""Refusal tokens from the model itself: the first tokens of its own refusals.

The refusal metric needs the tokens a refusal starts with. They differ by model ("I" for gemma-2b-it, "Sorry"
or "I" for Qwen), so instead of one hard-coded word the set is read off the model's greedy answers to harmful
prompts: among the answers the refusal judge marks as refusals, count the first visible token (leading
whitespace-only tokens, e.g. a newline some templates leave to the model, are skipped and counted), then take
the most common first tokens until they cover ``coverage`` of the refusals (at most ``max_tokens``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..core.decoding import Generated
from ..core.model import LoadedModel
from .metric import refusal_token_ids

log = logging.getLogger(__name__)

COVERAGE = 0.9  # the first tokens taken cover at least this fraction of the refusals
MAX_TOKENS = 8  # ... but no more than this many tokens
FALLBACK_WORDS = ("I",)  # when the model refuses none of the prompts (the paper's gemma set)


@dataclass(frozen=True)
class RefusalTokens:
    """The refusal-token set and where it came from."""

    ids: list[int]
    texts: list[str]
    source: str  # "derived" (from the model's refusals), "config" (refusal_tokens) or "fallback"
    n_prompts: int = 0  # answers looked at
    n_refusals: int = 0  # of them, refusals by the judge
    coverage: float | None = None  # fraction of the refusals whose first visible token is in the set
    n_leading_whitespace: int = 0  # refusals whose first generated token was whitespace only (skipped)
    counts: dict[str, int] = field(default_factory=dict)  # first-token text -> refusals starting with it

    def to_json(self) -> dict:
        return {"ids": self.ids, "texts": self.texts, "source": self.source, "n_prompts": self.n_prompts,
                "n_refusals": self.n_refusals, "coverage": self.coverage,
                "n_leading_whitespace": self.n_leading_whitespace, "first_token_counts": self.counts}


def first_visible_token(lm: LoadedModel, token_ids: Sequence[int]) -> tuple[int | None, int]:
    """The first generated token whose text is not whitespace only, and how many tokens were skipped before it."""
    for i, t in enumerate(token_ids):
        if lm.tokenizer.decode([t]).strip():
            return int(t), i
    return None, len(token_ids)


def derive_refusal_tokens(
    lm: LoadedModel,
    answers: Sequence[Generated],
    judge: Callable[[str], int],
    coverage: float = COVERAGE,
    max_tokens: int = MAX_TOKENS,
) -> RefusalTokens:
    """The refusal tokens of ``answers`` (greedy answers to harmful prompts), judged by ``judge(text)``."""
    firsts, leading_ws = [], 0
    for a in answers:
        if not judge(a.text):
            continue
        token, skipped = first_visible_token(lm, a.token_ids)
        if token is not None:
            firsts.append(token)
            leading_ws += skipped > 0
    if not firsts:
        log.warning("the model refused none of %d harmful prompts by the refusal judge; refusal tokens fall back "
                    "to %s (set refusal_tokens to choose others)", len(answers), list(FALLBACK_WORDS))
        ids = refusal_token_ids(lm.tokenizer, FALLBACK_WORDS, lm.chat.suffix)
        return RefusalTokens(ids, [lm.tokenizer.decode([i]) for i in ids], "fallback", len(answers), 0)
    counts = Counter(firsts)
    ids, covered = [], 0
    for token, n in counts.most_common():  # ties: first seen first
        if covered >= coverage * len(firsts) or len(ids) >= max_tokens:
            break
        ids.append(token)
        covered += n
    texts = [lm.tokenizer.decode([i]) for i in ids]
    out = RefusalTokens(ids, texts, "derived", len(answers), len(firsts), covered / len(firsts), leading_ws,
                        {lm.tokenizer.decode([t]): n for t, n in counts.most_common()})
    log.info("refusal tokens from the model's own refusals (%d of %d answers): %s cover %.0f%% of them%s",
             len(firsts), len(answers), list(zip(ids, texts)), 100 * out.coverage,
             f"; {leading_ws} began with whitespace-only tokens (skipped)" if leading_ws else "")
    if leading_ws:
        log.warning("%d of %d refusals begin with a whitespace-only token: the logit metric (validation filter, "
                    "bypass pre-filter) reads only the first answer token, so it under-counts these refusals; the "
                    "generation rule's judge reads the text and is not affected", leading_ws, len(firsts))
    return out


def configured_refusal_tokens(lm: LoadedModel, words: Sequence[str]) -> RefusalTokens:
    """The refusal tokens of the config's ``refusal_tokens`` words (e.g. the paper's per-family sets)."""
    ids = refusal_token_ids(lm.tokenizer, words, lm.chat.suffix)
    return RefusalTokens(ids, [lm.tokenizer.decode([i]) for i in ids], "config")
