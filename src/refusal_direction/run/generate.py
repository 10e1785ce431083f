"""Stage generate: greedy completions of every condition (baseline, ablation, activation addition), as JSONL."""

from __future__ import annotations

import logging
import time

from ..accel import PartialResults
from ..core.directions import Direction
from ..data.instructions import Instruction, Samples
from ..edits import ActivationAddition, Baseline, DirectionalAblation, Intervention
from ..errors import UserError
from ..evaluation.refusal import is_refusal
from ..fileio import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from .extract import xstest_items
from .rundir import CONDITION_FILES, Run

log = logging.getLogger(__name__)


def condition_intervention(condition: str, direction: Direction, coeff: float) -> Intervention:
    if condition in ("baseline", "harmless_baseline", "xstest_safe_baseline", "xstest_unsafe_baseline"):
        return Baseline()
    if condition in ("ablation", "xstest_safe_ablation", "xstest_unsafe_ablation"):
        return DirectionalAblation(direction.vector)
    if condition == "actadd_negative":
        return ActivationAddition(direction.vector, direction.layer, -coeff, name="actadd_negative")
    if condition in ("harmless_actadd", "xstest_safe_actadd"):
        return ActivationAddition(direction.vector, direction.layer, coeff, name="actadd")
    raise ValueError(condition)


def stage_generate(run: Run, samples: Samples, direction: Direction, force: bool = False) -> None:
    from ..generation import choose_backend, generate_sets

    c, settings = run.config, run.generation
    backend = choose_backend(run.lm, settings.backend)
    check_backend(run, backend, force, settings.step)
    per_condition = backend == "hf"  # the fast path runs every set's conditions in one batch
    shared: dict[str, Intervention] = {}  # one object per intervention: a condition shared by sets is one
    sets, jobs = [], []  # jobs[k]: (dataset key, items, {intervention name: condition}) of sets[k]
    for dataset_key in ("eval", "harmless_eval", "xstest_safe", "xstest_unsafe"):
        todo = [cond for cond in c.all_conditions if CONDITION_FILES[cond][0] == dataset_key
                and (force or completions_problem(run, cond, dataset_items(run, samples, dataset_key), redo=True))]
        if not todo:
            continue
        items = dataset_items(run, samples, dataset_key)
        ivs = {}
        for cond in todo:
            iv = condition_intervention(cond, direction, c.actadd_coeff)
            ivs[cond] = shared.setdefault(iv.name, iv)
        sets.append(([i.text for i in items], list(ivs.values())))
        jobs.append((dataset_key, items, {iv.name: cond for cond, iv in ivs.items()}))
    if not sets:
        return

    def done(k, name, gens, seconds):
        _, items, condition_of = jobs[k]
        write_completions(run, condition_of[name], items, gens)
        if per_condition:
            run.timing(f"generate_{condition_of[name]}_s", seconds)

    partial = None
    if not per_condition:  # the fast path's finished batches, kept until every completion file is written
        partial = PartialResults(run.layout.generate_partial)
        if force:
            partial.remove()
    t0 = time.perf_counter()
    generate_sets(run.lm, sets, settings, on_done=done, partial=partial)
    run.timing("generate_s", time.perf_counter() - t0)  # every set (on the fast path: one shared batch)
    run.layout.generate_partial.unlink(missing_ok=True)  # also one left by a killed fast run resumed on HF generate


def dataset_items(run: Run, samples: Samples, dataset_key: str) -> list[Instruction]:
    """The instructions of one of the run's evaluation sets (the samples' sets, or XSTest's)."""
    return xstest_items(run, dataset_key) if dataset_key.startswith("xstest_") else getattr(samples, dataset_key)


def write_completions(run: Run, condition: str, items: list[Instruction], gens) -> None:
    n_first = run.config.refusal_first_n_tokens
    tok = run.lm.tokenizer
    records = []
    for item, g in zip(items, gens, strict=True):
        first = tok.decode(g.token_ids[:n_first], skip_special_tokens=True)
        records.append({"id": item.id, "category": item.category, "instruction": item.text,
                        "completion": g.text, "refusal": is_refusal(g.text),
                        "refusal_first_n": is_refusal(first), "n_tokens": len(g.token_ids), "stopped": g.stopped})
    atomic_write_jsonl(run.completions_path(condition), records)
    log.info("%s: refusal score %.3f over %d completions", condition,
             sum(r["refusal"] for r in records) / max(1, len(records)), len(records))


def check_backend(run: Run, backend: str, force: bool, step: str) -> None:
    """Completions of one run come from one generation backend and, on the fast path, one decode step (in bf16 the
    two steps round differently): record them, refuse a switch on resume (a fast-path run whose step is not recorded
    resumes on neither)."""
    path = run.layout.environment
    env = read_json(path, "run file") if path.is_file() else {}
    old = env.get("generation_backend")
    old_step = env.get("decode_step") if old == "fast" else None
    step = step if backend == "fast" else None
    done = any(run.completions_path(cond).is_file() for cond in run.config.conditions)
    if old and old != backend and done and not force:
        raise UserError(f"run directory {run.out} generated its completions with the {old!r} backend; resuming "
                        f"with {backend!r} would mix them. Resume with --generation-backend {old} (in a --config "
                        "file), or pass --force to regenerate")
    if old == backend == "fast" and old_step != step and done and not force:
        if old_step is None:
            raise UserError(f"run directory {run.out} does not record the decode step of its completions; resuming "
                            f"on {step!r} could mix two steps. Pass --force to regenerate")
        raise UserError(f"run directory {run.out} generated its completions on the {old_step!r} decode step; "
                        f"resuming on {step!r} would mix them. Resume with decode_step = \"{old_step}\" in a "
                        "--config file, or pass --force to regenerate")
    if path.is_file() and (old != backend or env.get("decode_step") != step):
        atomic_write_json(path, {**env, "generation_backend": backend, "decode_step": step})


RECORD_KEYS = ("instruction", "completion", "refusal", "refusal_first_n", "n_tokens", "stopped")


def completions_problem(run: Run, condition: str, items: list[Instruction], redo: bool = False) -> str | None:
    """Why ``condition``'s completion file cannot be reused for ``items`` (missing, row count, order), or None.

    With ``redo`` a damaged file is reported in the log as being redone."""
    path = run.completions_path(condition)
    if not path.is_file():
        return "missing"
    try:
        records = read_jsonl(path, "completions file")
    except UserError as exc:
        problem = str(exc)
    else:
        problem = None
        if len(records) != len(items):
            problem = f"{path} has {len(records)} rows but the run has {len(items)} samples"
        elif any(r.get("instruction") != i.text for r, i in zip(records, items)):
            problem = f"{path} holds completions of other instructions than the run's samples"
        elif any(k not in r for r in records for k in RECORD_KEYS):
            problem = f"{path} has records without the fields {', '.join(RECORD_KEYS)}"
    if problem and redo:
        log.warning("redoing %s: %s", condition, problem)
    return problem


def load_completions(run: Run) -> dict[str, list[dict]]:
    return {cond: read_jsonl(run.completions_path(cond), "completions file") for cond in run.config.all_conditions
            if run.completions_path(cond).is_file()}


def check_completions(run: Run, samples: Samples) -> None:
    """Every completion file matches the run's samples (else scores would pair unrelated rows)."""
    for cond in run.config.all_conditions:
        problem = completions_problem(run, cond, dataset_items(run, samples, CONDITION_FILES[cond][0]))
        if problem and problem != "missing":
            raise UserError(f"{problem}; re-run `refusal-direction generate {run.out} --force` (or the same "
                            "replicate command) to regenerate it")
