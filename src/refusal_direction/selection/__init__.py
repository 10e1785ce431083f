"""Selection stage: score every candidate direction and pick one automatically (the paper's method).

For each candidate r = candidates[position, layer], on small validation sets: the bypass score (refusal
metric on harmful prompts with r ablated; lower = ablating r removes refusal better), the induce score
(refusal metric on harmless prompts with r added at its layer; higher = adding r induces refusal) and the
KL score (how much ablating r changes the harmless next-token distribution). The paper's filters then keep
candidates with low KL, positive induce and an early enough layer; the lowest bypass score wins.

The stage, in order of use:

- `metric`: refusal tokens, the refusal metric, the validation filter;
- `sweep`: `score_candidates`, every (candidate, prompt, kind) as a row of a few big batches;
- `passes`, `logits`, `prefix`: the sweep's forward passes (HF's forward with per-row hooks, or the sweep's
  own forward), last-position logits, the shared chat-template opening and the shared prefixes;
- `rules`: the score values, the filters and the ranking (`filter_and_rank`); `lazy`: the same choice with
  induce and KL computed for few candidates;
- `scores_io`: scores and results as JSON (ours and the paper's direction_evaluations.json).

The heatmap figure of the scores is drawn by `report.selection_figure`.
"""

from .lazy import select_lazy
from .logits import common_opening
from .metric import default_refusal_ids, filter_validation, refusal_metric, refusal_metrics, refusal_token_ids
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

__all__ = ["CandidateScore", "SelectionThresholds", "SelectionResult", "refusal_token_ids", "default_refusal_ids",
           "refusal_metric", "refusal_metrics", "filter_validation", "score_candidates", "default_max_batch_rows",
           "common_opening", "CHECKED_DECODER", "select_lazy", "filter_and_rank", "discard_reasons",
           "describe_reason", "score_to_json", "scores_to_json", "scores_from_json", "load_scores", "result_to_json",
           "select_from_scores_file"]
