"""The Optuna study: storage, sampler, batched ask/tell, recovery after a kill, the front and the choice.

- Storage: Optuna's journal storage on one append-only file (``study.journal``, `JournalFileBackend`),
  ``load_if_exists=True``: every ask and tell is one appended line, written as it happens, so a killed search
  loses at most the batch in flight. Within a batch the asks and sampled parameters are written together, and
  so are the tells (`batched_writes`: one fsync each instead of one per parameter). (Optuna's SQLite storage
  works too — a path ending in ``.db`` — but its asks and tells are transactions: on a 2-core machine 200
  trials spent ~20 s in it, ~4 s in the journal.)
  A line cut short by a kill during its write is removed on open (logged), so the next append stays readable.
- Sampler: Optuna's multi-objective TPE (``constant_liar=True``, so the K trials asked before any is told
  spread out instead of piling on one point), seeded; both objectives are minimised: (refusal, KL).
- Batches: ``ask`` K trials, build K interventions, score them together (`TrialEvaluator`), ``tell`` K.
- Recovery: trials asked but never told (the process was killed) stay RUNNING in the database. On open,
  `recover_running` marks each FAIL and enqueues its parameters again, so the next batch re-evaluates exactly
  those points; complete trials and their values are kept. (A resumed sampler restarts its random stream
  from the seed, so a resumed search is not bit-identical to an uninterrupted one.)
- Choice rule (`choose`): among the Pareto-front trials with refusal <= ``target``, the one with the lowest
  KL; if none reaches the target, the lowest refusal (ties: lowest KL). Ties of both: the lowest number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Callable

from ..errors import UserError

log = logging.getLogger(__name__)

INSTALL = "pip install 'refusal-direction[search]'"
STUDY_NAME = "optimize"


def import_optuna():
    """optuna, or a `UserError` that names the install command."""
    try:
        import optuna
    except ImportError:
        raise UserError(f"optimize needs Optuna, which is not installed: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_study(path: Path, seed: int):
    """Create or reload the study in ``path`` (a journal file; SQLite if it ends in ``.db``), with the seeded
    multi-objective TPE sampler."""
    optuna = import_optuna()
    path.parent.mkdir(parents=True, exist_ok=True)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True, group=True)
    try:
        return optuna.create_study(study_name=STUDY_NAME, storage=_storage(optuna, path), sampler=sampler,
                                   directions=["minimize", "minimize"], load_if_exists=True)
    except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise UserError(f"the optimize study {path} is damaged and cannot be read ({type(exc).__name__}: "
                        f"{str(exc)[:120]}); move it away to start a new study in this run directory, or restore "
                        "it from a copy") from None


def _storage(optuna, path: Path):
    if path.suffix == ".db":
        return f"sqlite:///{path}"
    drop_partial_line(path)
    return optuna.storages.JournalStorage(_batched_journal_class()(str(path)))


def _batched_journal_class():
    """A `JournalFileBackend` that can hold its appends in memory for a while (`batched_writes`)."""
    from optuna.storages.journal import JournalFileBackend

    class BatchedJournalFile(JournalFileBackend):
        """Appends go to the file at once (write + fsync each, Optuna's behaviour) unless `batched_writes` holds
        them: then they wait in memory, are read back from there, and go to the file in one write + fsync when
        the block ends. One process per study file (the run directory's)."""

        def __init__(self, file_path: str):
            super().__init__(file_path)
            self.pending: list | None = None
            self.n_file = sum(1 for _ in super().read_logs(0))  # logs on file (and their offsets, cached)

        def append_logs(self, logs) -> None:
            if self.pending is not None:
                self.pending.extend(logs)
            else:
                self.write(logs)

        def write(self, logs) -> None:
            if not logs:
                return
            super().append_logs(logs)
            offsets = self._log_number_offset
            for entry in logs:  # where each new line starts, so the next read seeks instead of scanning the file
                if self.n_file in offsets:
                    line = json.dumps(entry, separators=(",", ":"))
                    offsets[self.n_file + 1] = offsets[self.n_file] + len(line.encode("utf-8")) + 1
                self.n_file += 1

        def read_logs(self, log_number_from: int):
            if log_number_from < self.n_file:
                yield from super().read_logs(log_number_from)
            yield from (self.pending or [])[max(log_number_from - self.n_file, 0):]

    return BatchedJournalFile


@contextlib.contextmanager
def batched_writes(study):
    """Within the block, the study's journal appends (one per trial created and per parameter sampled) are held in
    memory and written with one fsync at the end (a kill inside the block loses only what the block asked). A
    no-op for other storages."""
    backend = getattr(getattr(study, "_storage", None), "_backend", None)
    if not hasattr(backend, "pending") or backend.pending is not None:
        yield
        return
    backend.pending = []
    try:
        yield
    finally:
        held, backend.pending = backend.pending, None
        backend.write(held)


def drop_partial_line(path: Path) -> bool:
    """Cut a journal's unfinished last line (a kill during its write); True if one was cut."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return False
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    log.warning("optimize: %s ended in an unfinished line (%d bytes, a kill during a write): removed",
                path, len(data) - keep)
    return True


def recover_running(study) -> int:
    """Mark RUNNING trials (asked, never told: the last process was killed) FAIL and re-enqueue their params."""
    optuna = import_optuna()
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number}, skip_if_exists=False)
    if stale:
        log.info("optimize: %d trial(s) were asked but never told (killed run): marked FAIL, parameters re-enqueued",
                 len(stale))
    return len(stale)


def complete_trials(study) -> list:
    optuna = import_optuna()
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def pareto_front(study) -> list:
    """The non-dominated complete trials (refusal, KL), by refusal then KL."""
    return sorted(study.best_trials, key=lambda t: (t.values[0], t.values[1], t.number))


def choose(front: list, target: float):
    """The chosen trial of the module docstring's rule; None for an empty front."""
    if not front:
        return None
    reached = [t for t in front if t.values[0] <= target + 1e-12]
    if reached:
        return min(reached, key=lambda t: (t.values[1], t.number))
    return min(front, key=lambda t: (t.values[0], t.values[1], t.number))


def run_batches(study, n_trials: int, batch_trials: int, suggest: Callable, build: Callable, evaluate: Callable,
                progress: bool = False) -> dict:
    """Ask/evaluate/tell until ``n_trials`` trials are complete; {"told", "seconds", "trials_per_s", "phases"}
    (seconds spent asking, sampling the parameters (TPE), building the interventions, evaluating them and telling
    the results).

    ``suggest(trial) -> params``, ``build(params, name) -> intervention``,
    ``evaluate([interventions]) -> [TrialScore]``.
    """
    if batch_trials < 1:
        raise UserError(f"batch size {batch_trials} must be at least 1")
    todo = max(0, n_trials - len(complete_trials(study)))
    bar = _bar(todo, progress)
    told, t0 = 0, time.perf_counter()
    phases = dict.fromkeys(("ask_s", "sample_s", "build_s", "evaluate_s", "tell_s"), 0.0)
    try:
        while told < todo:
            with batched_writes(study):  # on file before the evaluation: a kill during it leaves them RUNNING
                with _timed(phases, "ask_s"):
                    trials = [study.ask() for _ in range(min(batch_trials, todo - told))]
                with _timed(phases, "sample_s"):
                    params = [suggest(t) for t in trials]
            with _timed(phases, "build_s"):
                ivs = [build(p, f"trial{t.number}") for p, t in zip(params, trials)]
            with _timed(phases, "evaluate_s"):
                scores = evaluate(ivs)
            with _timed(phases, "tell_s"), batched_writes(study):
                _tell(study, trials, scores)
            told += len(trials)
            rate = told / (time.perf_counter() - t0)
            if bar is not None:
                bar.update(len(trials))
                bar.set_postfix_str(f"{rate:.2f} trials/s")
            log.info("optimize: %d/%d trials, %.2f trials/s; front (refusal, KL): %s", told, todo, rate,
                     ", ".join(f"({t.values[0]:.3f}, {t.values[1]:.4f})" for t in pareto_front(study)[:6]))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    log.info("optimize: %d trials in %.1f s (%s)", told, seconds, ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    return {"told": told, "seconds": seconds, "trials_per_s": told / seconds if told else None, "phases": phases}


@contextlib.contextmanager
def _timed(phases: dict, key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[key] += time.perf_counter() - start


def _tell(study, trials, scores) -> None:
    for t, score in zip(trials, scores, strict=True):
        t.set_user_attr("n_refusals", score.n_refusals)
        t.set_user_attr("n_harmful", score.n_harmful)
        study.tell(t, [score.refusal, score.kl])


def _bar(total: int, progress: bool):
    if not progress or not total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="optimize", unit="trial")


__all__ = ["INSTALL", "import_optuna", "open_study", "drop_partial_line", "recover_running", "complete_trials",
           "pareto_front", "choose", "run_batches"]
