"""Search for the least damaging edit that removes refusal: Optuna over the methods' parameters.

`space`: trial parameters -> intervention (interpolated direction; kernel, norm-preserving or subspace form);
`evaluate`: both objectives (refusal on harmful prompts, next-token KL on harmless ones) of many trials in
shared batches; `study`: the Optuna study (SQLite in the run directory, batched ask/tell, recovery of trials
a kill left RUNNING, the Pareto front and the choice rule). The run directory's stage is `run.optimize`.
"""

from .evaluate import TrialEvaluator, TrialScore
from .space import FORMS, build_intervention, interpolated_direction, suggest
from .study import choose, complete_trials, open_study, pareto_front, recover_running, run_batches

__all__ = ["FORMS", "TrialEvaluator", "TrialScore", "build_intervention", "choose", "complete_trials",
           "interpolated_direction", "open_study", "pareto_front", "recover_running", "run_batches", "suggest"]
