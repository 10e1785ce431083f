"""Stage generate: greedy completions of every condition (baseline, ablation, activation addition), as JSONL."""

from __future__ import annotations

import logging
import time

from ..core.directions import Direction
from ..core.interventions import ActivationAddition, Baseline, DirectionalAblation, Intervention
from ..data.instructions import Instruction, Samples
from ..evaluation.refusal import is_refusal
from ..fileio import atomic_write_jsonl, read_jsonl
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
    from ..core.decoding import GenerationSettings
    from ..generation import choose_backend, generate_all

    c = run.config
    settings = GenerationSettings(c.max_new_tokens, c.batch_size, c.stop_at_end_of_turn)
    per_condition = choose_backend(run.lm, c.generation_backend) == "hf"  # the fast path runs them together
    for dataset_key in ("eval", "harmless_eval", "xstest_safe", "xstest_unsafe"):
        todo = [cond for cond in c.all_conditions if CONDITION_FILES[cond][0] == dataset_key
                and (force or not run.completions_path(cond).is_file())]
        if not todo:
            continue
        items: list[Instruction] = (xstest_items(run, dataset_key) if dataset_key.startswith("xstest_")
                                    else getattr(samples, dataset_key))
        interventions = {cond: condition_intervention(cond, direction, c.actadd_coeff) for cond in todo}
        condition_of = {iv.name: cond for cond, iv in interventions.items()}

        def done(name, gens, seconds, items=items, condition_of=condition_of):
            write_completions(run, condition_of[name], items, gens)
            if per_condition:
                run.timing(f"generate_{condition_of[name]}_s", seconds)

        t0 = time.perf_counter()
        generate_all(run.lm, [i.text for i in items], list(interventions.values()), settings,
                     progress=run.progress, backend=c.generation_backend, on_done=done)
        run.timing(f"generate_{dataset_key}_s", time.perf_counter() - t0)


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


def load_completions(run: Run) -> dict[str, list[dict]]:
    return {cond: read_jsonl(run.completions_path(cond)) for cond in run.config.all_conditions
            if run.completions_path(cond).is_file()}
