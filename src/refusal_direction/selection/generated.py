"""The generation rule: score candidates by what they do, the default selection rule.

The paper's logit scores are a proxy for what a user cares about: does the model still refuse, and how much
else changed. This rule measures the first directly and keeps the proxy as a cheap pre-filter:

1. pre-filter (from the sweep's scores): drop NaN scores, layers >= int(n_layers · (1 - prune_layer_fraction))
   and KL > ``max_kl``; keep the ``top_k`` lowest bypass scores;
2. the judged pool: harmful prompts the *unablated* model refuses (the caller builds it: the harmful
   validation prompts it refuses, plus up to ``select_train_prompts`` refused harmful training prompts —
   a prompt the model answers anyway carries no signal, and 16 of 32 validation prompts were too few to tell
   candidates apart on Qwen2.5-Coder-0.5B: docs/SELECTION.md);
3. generate greedy answers (``new_tokens`` tokens) to the pool with each kept candidate ablated, all
   candidates in one `generation.generate_all` call (one batch on the fast CUDA path, `edits.stacked`), and
   judge each answer with `evaluation.refusal.is_refusal`;
4. choose the lowest refusal rate; ties are broken by the lower KL, then by the lower bypass score.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

from ..core.decoding import GenerationSettings
from ..core.directions import CandidateDirections
from ..core.model import LoadedModel
from ..edits import DirectionalAblation
from ..errors import UserError
from .rules import CandidateScore

log = logging.getLogger(__name__)

NAN, LATE_LAYER, HIGH_KL, NOT_TOP_K = "nan", "late_layer", "kl", "not_top_k"


@dataclass(frozen=True)
class GenerationRule:
    """The generation rule's settings (defaults: config's)."""

    max_kl: float
    top_k: int
    prune_layer_fraction: float
    new_tokens: int

    def max_layer(self, n_layers: int) -> int:
        return int(n_layers * (1.0 - self.prune_layer_fraction))

    def to_json(self) -> dict:
        return {"rule": "generation", "max_kl": self.max_kl, "top_k": self.top_k,
                "prune_layer_fraction": self.prune_layer_fraction, "new_tokens": self.new_tokens}


@dataclass(frozen=True)
class GeneratedScore:
    """A pre-filtered candidate's sweep scores and how often its ablated answers were refusals."""

    score: CandidateScore
    n_refused: int
    n_prompts: int

    @property
    def refusal_rate(self) -> float:
        return self.n_refused / self.n_prompts if self.n_prompts else float("nan")

    def rank_key(self) -> tuple[float, float, float]:
        return self.refusal_rate, self.score.kl, self.score.bypass


@dataclass(frozen=True)
class GenerationResult:
    """The choice, every judged candidate best first, and why every other candidate was not judged."""

    judged: tuple[GeneratedScore, ...]  # ascending (refusal rate, KL, bypass); judged[0] is the choice
    discarded: tuple[tuple[CandidateScore, tuple[str, ...]], ...]
    rule: GenerationRule
    n_layers: int
    baseline_refused: int  # pool prompts refused without any intervention (all, unless none was refused)
    n_prompts: int

    @property
    def chosen(self) -> GeneratedScore:
        return self.judged[0]

    @property
    def position(self) -> int:
        return self.chosen.score.position

    @property
    def layer(self) -> int:
        return self.chosen.score.layer


def prefilter(scores: Sequence[CandidateScore], n_layers: int,
              rule: GenerationRule) -> tuple[list[CandidateScore], list[tuple[CandidateScore, tuple[str, ...]]]]:
    """(the ``top_k`` eligible candidates by ascending bypass score, the others with their reason codes)."""
    eligible, discarded = [], []
    for s in scores:
        if math.isnan(s.bypass) or math.isnan(s.kl):  # finite bypass, NaN KL: not needed (lazy strategy)
            discarded.append((s, (NOT_TOP_K if math.isfinite(s.bypass) else NAN,)))
            continue
        reasons = tuple(code for code, bad in ((LATE_LAYER, s.layer >= rule.max_layer(n_layers)),
                                               (HIGH_KL, s.kl > rule.max_kl)) if bad)
        (discarded.append((s, reasons)) if reasons else eligible.append(s))
    eligible.sort(key=lambda s: s.bypass)  # stable: ties keep the sweep's order
    discarded += [(s, (NOT_TOP_K,)) for s in eligible[rule.top_k:]]
    return eligible[:rule.top_k], discarded


def refusal_counts(lm: LoadedModel, candidates: CandidateDirections, keys: Sequence[tuple[int, int]],
                   harmful: Sequence[str], settings: GenerationSettings) -> list[int]:
    """Refusals among greedy answers to ``harmful`` with each candidate at ``keys`` ablated.

    One `generate_all` call: every candidate is one condition, batched together on the fast path; answers are
    judged with `evaluation.refusal.is_refusal`.
    """
    from ..evaluation.refusal import is_refusal
    from ..generation import generate_all

    interventions = [DirectionalAblation(candidates.get(p, layer).vector, name=f"selection_ablation_p{p}_l{layer}")
                     for p, layer in keys]
    out = generate_all(lm, list(harmful), interventions, settings)
    return [sum(is_refusal(g.text) for g in out[iv.name]) for iv in interventions]


def select_by_generation(lm: LoadedModel, candidates: CandidateDirections, scores: Sequence[CandidateScore],
                         pool: Sequence[str], rule: GenerationRule, settings: GenerationSettings,
                         baseline_refused: int | None = None) -> GenerationResult:
    """Pre-filter ``scores`` (the sweep's bypass and KL), judge the kept candidates' ablated answers to
    ``pool`` (harmful prompts the unablated model refuses: ``baseline_refused`` defaults to all of them), and
    choose the lowest refusal rate (ties: lower KL). Raises UserError when no candidate is eligible."""
    kept, discarded = prefilter(scores, candidates.n_layers, rule)
    if not kept:
        raise UserError(nothing_eligible_message(scores, candidates.n_layers, rule))
    settings = settings.replace(max_new_tokens=rule.new_tokens)
    counts = refusal_counts(lm, candidates, [(s.position, s.layer) for s in kept], pool, settings)
    judged = sorted((GeneratedScore(s, n, len(pool)) for s, n in zip(kept, counts)), key=GeneratedScore.rank_key)
    best = judged[0]
    log.info("generation rule: position %d, layer %d still refuses %d of %d pool prompts ablated at KL %.4f; "
             "%d candidates judged, %d eligible of %d", best.score.position, best.score.layer, best.n_refused,
             len(pool), best.score.kl, len(kept), len(kept) + sum(1 for _, r in discarded if r == (NOT_TOP_K,)),
             len(scores))
    return GenerationResult(tuple(judged), tuple(discarded), rule, candidates.n_layers,
                            len(pool) if baseline_refused is None else baseline_refused, len(pool))


def judged_pool(val: Sequence[str], val_refused: Sequence[bool], train: Sequence[str],
                train_refused: Sequence[bool], max_train: int) -> tuple[list[str], dict]:
    """The pool of prompts the unablated model refuses (validation, then up to ``max_train`` training ones)
    and its record; all validation prompts when it refuses none (no signal either way: logged)."""
    v = [x for x, r in zip(val, val_refused, strict=True) if r]
    t = [x for x, r in zip(train, train_refused, strict=True) if r][:max_train]
    record = {"n_val": len(val), "n_val_refused": len(v), "n_train": len(train), "n_train_refused":
              sum(map(bool, train_refused)), "n_train_used": len(t), "max_train": max_train}
    if not v and not t:
        log.warning("generation rule: the unablated model refuses none of the %d validation and %d training "
                    "prompts; judging on every validation prompt (there is no refusal to remove)", len(val), len(train))
        return list(val), {**record, "fallback": "all validation prompts (none refused)"}
    return v + t, record


def nothing_eligible_message(scores: Sequence[CandidateScore], n_layers: int, rule: GenerationRule) -> str:
    """The error when no candidate passes the pre-filter: the nearest candidates and the setting that keeps one."""
    head = (f"no candidate direction passed the generation rule's pre-filter ({len(scores)} candidates; "
            f"select_max_kl={rule.max_kl}, prune_layer_fraction={rule.prune_layer_fraction} -> layers >= "
            f"{rule.max_layer(n_layers)} pruned).")
    valid = [s for s in scores if not (math.isnan(s.bypass) or math.isnan(s.kl))]
    early = sorted((s for s in valid if s.layer < rule.max_layer(n_layers)), key=lambda s: s.kl)
    if not early:
        return (head + " No candidate in an unpruned layer has finite scores: check the candidate directions and "
                "prune_layer_fraction, or use --dtype float32 if the model overflows in half precision.")
    lines = [head, "Nearest candidates (lowest KL on harmless prompts):"]
    lines += [f"  position {s.position}, layer {s.layer}: KL {s.kl:.4f}, bypass {s.bypass:.3f}" for s in early[:5]]
    lines.append(f"Raise select_max_kl to {math.ceil(early[0].kl * 100) / 100:g} to keep position "
                 f"{early[0].position}, layer {early[0].layer}; or choose the direction by hand with --select fixed "
                 "--layer L --position P.")
    return "\n".join(lines)


def generation_result_to_json(result: GenerationResult, scores: Sequence[CandidateScore]) -> dict:
    """The choice, the rule, judged candidates best first, and every scored candidate with its reasons."""
    from .scores_io import score_to_json

    reasons = {(s.position, s.layer): r for s, r in result.discarded}
    judged = {(g.score.position, g.score.layer): g for g in result.judged}

    def row(s: CandidateScore) -> dict:
        g = judged.get((s.position, s.layer))
        extra = {"refusal_rate": g.refusal_rate, "n_refused": g.n_refused} if g else {}
        return {**score_to_json(s), **extra, "discarded": list(reasons.get((s.position, s.layer), ()))}

    best = result.chosen
    return {
        "rule": "generation",
        "chosen": {**score_to_json(best.score), "refusal_rate": best.refusal_rate, "n_refused": best.n_refused},
        "thresholds": {**result.rule.to_json(), "first_pruned_layer": result.rule.max_layer(result.n_layers)},
        "n_layers": result.n_layers,
        "survivors": [{"position": g.score.position, "layer": g.score.layer, "refusal_rate": g.refusal_rate,
                       "kl_score": g.score.kl} for g in result.judged],
        "generation": {"n_prompts": result.n_prompts, "baseline_refused": result.baseline_refused,
                       "baseline_refusal_rate": result.baseline_refused / result.n_prompts,
                       "new_tokens": result.rule.new_tokens, "judge": "evaluation.refusal.is_refusal"},
        "scores": [row(s) for s in scores],
    }
