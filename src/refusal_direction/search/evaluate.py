"""Both objectives of many trials at once: refusal rate on harmful prompts and next-token KL on harmless ones.

`TrialEvaluator.evaluate(interventions)` scores K interventions together:

- refusal: one `generation.generate_all` call with all K interventions (on CUDA the fast path decodes every
  trial's rows in one batch; elsewhere HF generate runs them one after another), each completion judged by
  the run's judge; the objective is the share of refusals (an unreadable verdict counts as a refusal).
- KL: KL(baseline ‖ trial) of the next-token distribution at the last prompt position (as
  `evaluation.capability.next_token_kl`), mean over the harmless prompts. The K trials' rows share forward
  passes: the prompts are repeated once per trial ([K · n, seq], up to ``max_rows`` rows per pass) and every
  trial acts on its own rows only (`edits.stacked.apply_interventions`: the projection forms stacked into one
  hook per site, the others with per-row switches). Only the last position's logits are computed. The
  baseline distribution is computed once per evaluator.

Evaluating a trial alone or among others gives the same values up to rounding (a row's own arithmetic is the
same; the stacked and switched hook forms round differently).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..core.batching import run_batched
from ..core.decoding import GenerationSettings
from ..core.head import packed_head_input
from ..core.model import LoadedModel
from ..edits.stacked import apply_interventions
from ..evaluation.capability import position_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialScore:
    """One trial's objectives and the counts behind them."""

    refusal: float  # share of harmful prompts judged a refusal
    kl: float  # mean next-token KL(baseline ‖ trial) over the harmless prompts, nats
    n_refusals: int
    n_harmful: int


def _last_logprobs(lm: LoadedModel, enc: dict) -> torch.Tensor:
    """log-softmax of the last position's logits, [batch, vocab] float64 (only that position is unembedded)."""
    mask = enc["attention_mask"]
    with packed_head_input(lm.model):  # the last position's rows, packed (core.head)
        out = lm.model(**enc, position_ids=position_ids(mask), use_cache=False, logits_to_keep=1)
    return torch.log_softmax(out.logits[:, -1].double(), dim=-1)


@dataclass
class TrialEvaluator:
    """Scores batches of interventions on fixed prompts (see the module docstring)."""

    lm: LoadedModel
    harmful: Sequence[str]
    harmless: Sequence[str]
    judge: object  # evaluation.judges.Judge
    settings: GenerationSettings  # the search's generation (budget, batch, stopping, backend, decode step)
    max_rows: int = 2048  # rows per KL forward pass (fewer on out-of-memory)
    _base: torch.Tensor | None = field(default=None, repr=False)  # [n_harmless, vocab]
    _enc: dict | None = field(default=None, repr=False)
    _verdicts: dict = field(default_factory=dict, repr=False)  # (prompt index, answer) -> the judge's verdict
    # seconds in each part of `evaluate` (generation, judge, KL forward passes) and the texts judged, summed over calls
    timings: dict = field(default_factory=lambda: {"generate_s": 0.0, "judge_s": 0.0, "kl_s": 0.0, "judged": 0})

    def _harmless_batch(self, copies: int) -> dict:
        if self._enc is None:
            self._enc = self.lm.tokenize(list(self.harmless))
        return {k: v.repeat(copies, 1) for k, v in self._enc.items()}

    @torch.no_grad()
    def baseline(self) -> torch.Tensor:
        if self._base is None:
            self._base = _last_logprobs(self.lm, self._harmless_batch(1))
        return self._base

    @torch.no_grad()
    def kl(self, interventions: Sequence) -> list[float]:
        """Mean next-token KL per intervention, the trials' rows sharing forward passes."""
        n = len(self.harmless)
        base = self.baseline()  # [n, vocab]

        def passes(chunk) -> list[float]:
            enc = self._harmless_batch(len(chunk))
            trial = torch.arange(len(chunk) * n, device=self.lm.device) // n
            switches = [(trial == j).to(self.lm.dtype) for j in range(len(chunk))]
            with apply_interventions(self.lm, chunk, switches):
                other = _last_logprobs(self.lm, enc).view(len(chunk), n, -1)  # [K, n, vocab]
            kl = (base.exp() * (base - other)).sum(-1)  # [K, n]
            return kl.mean(-1).cpu().tolist()

        # up to max_rows rows per pass; a pass that runs out of memory is retried with half as many trials, and the
        # smaller size is kept for the later calls of this search
        return run_batched(passes, list(interventions), max(1, self.max_rows // max(n, 1)), desc="optimize KL",
                           on_batch_size=lambda trials: setattr(self, "max_rows", trials * max(n, 1)))

    def refusals(self, interventions: Sequence) -> list[tuple[int, int]]:
        """(refusals, prompts) per intervention, from one `generate_all` call."""
        from ..generation import generate_all

        t0 = time.perf_counter()
        gens = generate_all(self.lm, list(self.harmful), list(interventions), self.settings)
        t1 = time.perf_counter()
        new = {(i, g.text) for iv in interventions for i, g in enumerate(gens[iv.name])} - self._verdicts.keys()
        if new:  # each distinct (prompt, answer) is judged once per search: many trials give the same answers
            todo = sorted(new)
            verdicts = self.judge.judge([self.harmful[i] for i, _ in todo], [t for _, t in todo])
            self._verdicts.update(zip(todo, verdicts, strict=True))
        self.timings["generate_s"] += t1 - t0
        self.timings["judge_s"] += time.perf_counter() - t1
        self.timings["judged"] += len(new)
        counts = []
        for iv in interventions:
            verdicts = [self._verdicts[(i, g.text)] for i, g in enumerate(gens[iv.name])]
            counts.append((sum(v is not False for v in verdicts), len(verdicts)))
        return counts

    def evaluate(self, interventions: Sequence) -> list[TrialScore]:
        names = [iv.name for iv in interventions]
        if len(set(names)) != len(names):
            raise ValueError(f"interventions sharing a batch need unique names, got {names}")
        counts = self.refusals(interventions)
        t0 = time.perf_counter()
        kls = self.kl(interventions)  # ends in .tolist(): the device's work is done when it returns
        self.timings["kl_s"] += time.perf_counter() - t0
        return [TrialScore(k / n if n else float("nan"), kl, k, n) for (k, n), kl in zip(counts, kls, strict=True)]


__all__ = ["TrialEvaluator", "TrialScore"]
