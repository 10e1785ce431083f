"""Selection stage: score every candidate direction and pick one automatically.

Two rules: ``generation`` (the default; `generated`: the lowest refusal rate of greedy answers with the
candidate ablated, among the best-bypass candidates with low KL) and ``paper`` (the paper's method, below).
Refusal tokens for the logit metric come from the model's own refusals (`tokens`).

For each candidate r = candidates[position, layer], on small validation sets: the bypass score (refusal
metric on harmful prompts with r ablated; lower = ablating r removes refusal better), the induce score
(refusal metric on harmless prompts with r added at its layer; higher = adding r induces refusal) and the
KL score (how much ablating r changes the harmless next-token distribution). The paper's filters then keep
candidates with low KL, positive induce and an early enough layer; the lowest bypass score wins.

The stage, in order of use:

- `tokens`: the refusal tokens, read off the model's own refusals;
- `metric`: the refusal metric, the validation filter (with a floor, so it cannot collapse silently);
- `sweep`: `score_candidates`, every (candidate, prompt, kind) as a row of a few big batches;
- `passes`, `logits`, `prefix`: the sweep's forward passes (HF's forward with per-row hooks, or the sweep's
  own forward), last-position logits, the shared chat-template opening and the shared prefixes;
- `rules`: the score values, the filters and the ranking (`filter_and_rank`); `lazy`: the same choice with
  induce and KL computed for few candidates; `generated`: the generation rule;
- `scores_io`: scores and results as JSON (ours and the paper's direction_evaluations.json).

The heatmap figure of the scores is drawn by `report.selection_figure`.
"""

from .generated import (
    GeneratedScore,
    GenerationResult,
    GenerationRule,
    generation_result_to_json,
    judged_pool,
    prefilter,
    refusal_counts,
    select_by_generation,
)
from .lazy import select_lazy
from .logits import common_opening
from .metric import (
    FilteredValidation,
    default_refusal_ids,
    filter_validation,
    filter_validation_checked,
    refusal_metric,
    refusal_metrics,
    refusal_token_ids,
    required_prompts,
)
from .passes import CHECKED_DECODER
from .rules import (
    CandidateScore,
    SelectionResult,
    SelectionThresholds,
    describe_reason,
    discard_reasons,
    filter_and_rank,
)
from .scores_io import (
    load_scores,
    result_to_json,
    score_to_json,
    scores_from_json,
    scores_to_json,
    select_from_scores_file,
)
from .sweep import default_max_batch_rows, score_candidates
from .tokens import RefusalTokens, configured_refusal_tokens, derive_refusal_tokens

__all__ = ["CandidateScore", "SelectionThresholds", "SelectionResult", "refusal_token_ids", "default_refusal_ids",
           "refusal_metric", "refusal_metrics", "filter_validation", "score_candidates", "default_max_batch_rows",
           "common_opening", "CHECKED_DECODER", "select_lazy", "filter_and_rank", "discard_reasons",
           "describe_reason", "score_to_json", "scores_to_json", "scores_from_json", "load_scores", "result_to_json",
           "select_from_scores_file", "FilteredValidation", "filter_validation_checked", "required_prompts",
           "GenerationRule", "GeneratedScore", "GenerationResult", "prefilter", "refusal_counts", "judged_pool",
           "select_by_generation", "generation_result_to_json", "RefusalTokens", "derive_refusal_tokens",
           "configured_refusal_tokens"]
