"""Print an optimize study's state: trials by state and the Pareto front (refusal, KL), for the kill -9 check.

    python benchmarks/study_state.py RUN/optimize/study.journal
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

from refusal_direction.search import open_study, pareto_front

if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
    print(f"usage: python benchmarks/study_state.py RUN/optimize/study.journal (an existing study file; got "
          f"{sys.argv[1:]})", file=sys.stderr)
    sys.exit(2)
study = open_study(Path(sys.argv[1]), seed=0)
states = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))
print("trials by state:", dict(sorted(states.items())))
print("front (number: refusal, KL):", "; ".join(f"{t.number}: {t.values[0]:.4f}, {t.values[1]:.5f}"
                                                for t in pareto_front(study)))
