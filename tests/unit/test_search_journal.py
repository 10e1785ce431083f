"""The study journal's batched writes (search/study.py `batched_writes`): inside the block nothing reaches the file
but the study sees its own trials; at the end one write puts them on file, and a reopened study equals it."""

import pytest

pytest.importorskip("optuna")

from refusal_direction.edits import suggest  # noqa: E402
from refusal_direction.search import complete_trials, open_study  # noqa: E402
from refusal_direction.search.study import batched_writes  # noqa: E402


def test_batched_writes_hold_appends_until_the_block_ends(tmp_path):
    path = tmp_path / "study.journal"
    study = open_study(path, seed=0)
    size = path.stat().st_size
    with batched_writes(study):
        trials = [study.ask() for _ in range(4)]
        params = [suggest(t, [-2, -1], 6) for t in trials]
        assert path.stat().st_size == size  # held in memory
        assert [t.params for t in study.get_trials(deepcopy=False)] == params  # yet read back in-process
    assert path.stat().st_size > size
    with batched_writes(study):
        for i, t in enumerate(trials):
            study.tell(t, [i / 4, 1 - i / 4])
    again = open_study(path, seed=0)
    assert [(t.params, t.values) for t in complete_trials(again)] == [(t.params, t.values)
                                                                    for t in complete_trials(study)]
    assert len(complete_trials(again)) == 4
    study.ask()  # outside a block: written at once, as Optuna does
    assert len(open_study(path, seed=0).trials) == 5
