"""Search for the least damaging edit that removes refusal: Optuna over the searchable methods' parameters.

The search space is the composite edit of `edits.methods.composite` (interpolated direction; one searchable
method's form and its own parameters); `evaluate`: both objectives (refusal on harmful prompts, next-token KL on
harmless ones) of many trials in shared batches; `study`: the Optuna study (journal file in the run directory,
batched ask/tell, recovery of trials a kill left RUNNING, the Pareto front and the choice rule). The run
directory's stage is `run.optimize`.
"""

from .evaluate import TrialEvaluator, TrialScore
from .study import choose, complete_trials, open_study, pareto_front, recover_running, run_batches

__all__ = ["TrialEvaluator", "TrialScore", "choose", "complete_trials", "open_study", "pareto_front",
           "recover_running", "run_batches"]
