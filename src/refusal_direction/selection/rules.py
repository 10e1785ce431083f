"""Selection rules: the candidate scores as values, the paper's filters, the ranking, and what to relax.

Filtering (defaults = the paper's): drop NaN scores, layers >= int(n_layers · (1 - 0.2)), KL > 0.1 and
induce < 0; the survivor with the lowest bypass score is the direction. When nothing survives, the error
names the best candidates, why each was removed, and the smallest threshold changes that would keep one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

from ..config import INDUCE_THRESHOLD, KL_THRESHOLD, PRUNE_LAYER_FRACTION
from ..errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateScore:
    """The three selection scores of the candidate at (position, layer)."""

    position: int
    layer: int
    bypass: float  # mean refusal metric, harmful val, candidate ablated (paper: refusal_score)
    induce: float  # mean refusal metric, harmless val, candidate added at `layer` (paper: steering_score)
    kl: float  # mean KL(baseline ‖ ablated), harmless val, last position (paper: kl_div_score)

    def has_nan(self) -> bool:
        return any(math.isnan(v) for v in (self.bypass, self.induce, self.kl))


@dataclass(frozen=True)
class SelectionThresholds:
    """Filters applied before choosing the lowest bypass score (defaults: the paper's)."""

    kl_threshold: float = KL_THRESHOLD  # discard candidates whose KL score is above this
    induce_threshold: float = INDUCE_THRESHOLD  # discard candidates whose induce score is below this
    prune_layer_fraction: float = PRUNE_LAYER_FRACTION  # discard layers >= int(n_layers * (1 - this))

    def __post_init__(self):
        if not 0.0 <= self.prune_layer_fraction < 1.0:
            raise UserError(f"prune_layer_fraction={self.prune_layer_fraction} must be in [0, 1) "
                            "(0 keeps every layer; the paper uses 0.2)")

    def max_layer(self, n_layers: int) -> int:
        """First pruned layer: layers >= this are discarded."""
        return int(n_layers * (1.0 - self.prune_layer_fraction))


# Reasons a candidate is discarded (codes, as written to JSON).
NAN, LATE_LAYER, HIGH_KL, LOW_INDUCE = "nan", "late_layer", "kl", "induce"


@dataclass(frozen=True)
class SelectionResult:
    """The chosen candidate, the ordered survivors, and why every other candidate was discarded."""

    position: int
    layer: int
    survivors: tuple[CandidateScore, ...]  # ascending bypass score; survivors[0] is the choice
    discarded: tuple[tuple[CandidateScore, tuple[str, ...]], ...]  # (score, reason codes)
    thresholds: SelectionThresholds
    n_layers: int

    @property
    def chosen(self) -> CandidateScore:
        return self.survivors[0]

    @property
    def max_layer(self) -> int:
        return self.thresholds.max_layer(self.n_layers)


def discard_reasons(score: CandidateScore, n_layers: int, thresholds: SelectionThresholds) -> tuple[str, ...]:
    """Every filter that removes ``score`` (empty tuple = it survives)."""
    if score.has_nan():
        return (NAN,)
    reasons = []
    if score.layer >= thresholds.max_layer(n_layers):
        reasons.append(LATE_LAYER)
    if score.kl > thresholds.kl_threshold:
        reasons.append(HIGH_KL)
    if score.induce < thresholds.induce_threshold:
        reasons.append(LOW_INDUCE)
    return tuple(reasons)


def filter_and_rank(
    scores: Sequence[CandidateScore],
    n_layers: int,
    thresholds: SelectionThresholds = SelectionThresholds(),
) -> SelectionResult:
    """Discard candidates by the filters and choose the survivor with the lowest bypass score."""
    survivors, discarded = [], []
    for s in scores:
        reasons = discard_reasons(s, n_layers, thresholds)
        if reasons:
            discarded.append((s, reasons))
        else:
            survivors.append(s)
    if not survivors:
        raise UserError(nothing_survives_message(scores, n_layers, thresholds))
    survivors.sort(key=lambda s: s.bypass)  # stable: ties keep the input order
    best = survivors[0]
    log.info("selected position %d, layer %d (bypass %.3f, induce %.3f, KL %.4f); %d of %d candidates passed "
             "the filters", best.position, best.layer, best.bypass, best.induce, best.kl, len(survivors),
             len(scores))
    return SelectionResult(best.position, best.layer, tuple(survivors), tuple(discarded), thresholds, n_layers)


def describe_reason(code: str, score: CandidateScore, n_layers: int, thresholds: SelectionThresholds) -> str:
    if code == NAN:
        return "a score is NaN (e.g. a zero direction)"
    if code == LATE_LAYER:
        return (f"layer {score.layer} >= {thresholds.max_layer(n_layers)} "
                f"(prune_layer_fraction={thresholds.prune_layer_fraction})")
    if code == HIGH_KL:
        return f"KL {score.kl:.4g} > kl_threshold={thresholds.kl_threshold}"
    if code == LOW_INDUCE:
        return f"induce {score.induce:.4g} < induce_threshold={thresholds.induce_threshold}"
    raise ValueError(code)


def _relaxation(score: CandidateScore, reasons: tuple[str, ...], n_layers: int) -> list[str]:
    """Threshold settings under which ``score`` would survive."""
    out = []
    if LATE_LAYER in reasons:
        out.append(f"prune_layer_fraction={math.floor(1000 * (1.0 - (score.layer + 1) / n_layers)) / 1000:g}")
    if HIGH_KL in reasons:
        out.append(f"kl_threshold={_round_up(score.kl):g}")
    if LOW_INDUCE in reasons:
        out.append(f"induce_threshold={-_round_up(-score.induce):g}")
    return out


def _relaxation_cost(s: CandidateScore, n_layers: int, t: SelectionThresholds) -> float:
    """How far the thresholds must move to keep ``s``, each filter on its own scale."""
    cost = 0.0
    if s.kl > t.kl_threshold:
        cost += s.kl / t.kl_threshold if t.kl_threshold > 0 else 1.0 + s.kl
    if s.induce < t.induce_threshold:
        cost += (t.induce_threshold - s.induce) / max(1.0, abs(t.induce_threshold))
    if s.layer >= t.max_layer(n_layers):
        cost += 1.0 + s.layer - t.max_layer(n_layers)
    return cost


def _round_up(x: float) -> float:
    """A number with 2 significant digits that is >= x."""
    if x == 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(abs(x))) - 1)
    return math.ceil(x / scale - 1e-9) * scale


def nothing_survives_message(scores: Sequence[CandidateScore], n_layers: int,
                             thresholds: SelectionThresholds) -> str:
    """The error when no candidate passes: the best five by bypass score, why each was removed, and up to
    three threshold relaxations (config keys) that would keep one."""
    t = thresholds
    head = (f"no candidate direction passed the selection filters ({len(scores)} candidates; "
            f"kl_threshold={t.kl_threshold}, induce_threshold={t.induce_threshold}, "
            f"prune_layer_fraction={t.prune_layer_fraction} -> layers >= {t.max_layer(n_layers)} pruned).")
    valid = sorted((s for s in scores if not s.has_nan()), key=lambda s: s.bypass)
    if not valid:
        return (head + " Every candidate has a NaN score: check the candidate directions (all zero?) and use "
                "--dtype float32 if the model overflows in half precision.")
    lines = [head, "Best candidates by bypass score (lower = ablation removes refusal better):"]
    for s in valid[:5]:
        why = "; ".join(describe_reason(c, s, n_layers, thresholds) for c in discard_reasons(s, n_layers, thresholds))
        lines.append(f"  position {s.position}, layer {s.layer}: bypass {s.bypass:.3f}, induce {s.induce:.3f}, "
                     f"KL {s.kl:.4f} - removed by: {why}")
    # Suggest the smallest relaxations (relative to the thresholds) among the 10 best by bypass score.
    ranked = sorted(valid[:10], key=lambda s: _relaxation_cost(s, n_layers, thresholds))
    suggestions = []
    for s in ranked:
        relax = _relaxation(s, discard_reasons(s, n_layers, thresholds), n_layers)
        if len(suggestions) < 3 and relax and relax not in [r for r, _ in suggestions]:
            suggestions.append((relax, s))
    lines.append("Relax the thresholds (config keys) to keep one of them, e.g. " + "; or ".join(
        f"{', '.join(r)} (keeps position {s.position}, layer {s.layer})" for r, s in suggestions) +
        ". Or choose the direction by hand with --select fixed --layer L --position P.")
    return "\n".join(lines)
