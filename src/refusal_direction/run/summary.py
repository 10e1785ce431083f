"""summary.json from a run directory: gathers the run's records and metadata for `report.summarize` (the typed,
versioned `report.Summary`), plus the paper's reference numbers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.directions import Direction
from .generate import condition_intervention, load_completions
from .rundir import CONDITION_FILES, Run

PAPER = {
    "reference_run": {"baseline": {"refusal_score": 0.91, "safety_score": 0.93},
                      "ablation": {"refusal_score": 0.00, "safety_score": 0.22},
                      "actadd_negative": {"refusal_score": 0.02, "safety_score": 0.27},
                      "harmless_baseline": {"refusal_score": 0.00},
                      "harmless_actadd": {"refusal_score": 1.00}},
    "task_text": {"baseline": {"refusal_score": 0.95, "safety_score": 0.98},
                  "ablation": {"refusal_score": 0.05, "safety_score": 0.20}},
    "source": "andyrdt/refusal_direction pipeline/runs/gemma-2b-it (refusal = 1 - substring ASR, "
              "safety = 1 - Llama Guard 2 ASR); task text: paper Figure 1 / Table 5 approximations",
}


def display_name(model: str) -> str:
    """A Hub id as is; a local directory or .gguf file by its name (no machine paths in reports)."""
    path = Path(model)
    return path.name if (model.endswith(".gguf") or path.is_absolute() or path.exists()) else model


def build_summary(run: Run, safety_status: dict, capability: dict) -> dict:
    """summary.json's contents (`report.summarize`) from the run's records, config and saved metadata."""
    from ..report.summarize import summarize
    from ..report.summary import DirectionInfo, PaperNumbers, Settings

    c = run.config
    completions = load_completions(run)
    add_judged_refusal(completions, c.judge)
    meta = json.loads(run.layout.direction_meta.read_text())
    env_path, timings_path = run.layout.environment, run.layout.timings
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    placeholder = Direction(torch.zeros(1), meta["layer"], meta["position"])  # describe() needs no real vector
    described = {cond: condition_intervention(cond, placeholder, c.actadd_coeff).describe() for cond in completions}
    interventions = {cond: {k: v for k, v in d.items() if k != "direction_norm"} for cond, d in described.items()}
    summary = summarize(
        completions, model=display_name(c.model),
        direction=DirectionInfo(meta["layer"], meta["position"], meta.get("selected_by", "fixed"), meta.get("norm")),
        settings=Settings(max_new_tokens=c.max_new_tokens, stop_at_end_of_turn=c.stop_at_end_of_turn,
                          dtype=env.get("dtype"), device=env.get("device"), n_train=c.n_train, n_eval=c.n_eval,
                          safety_model=c.safety_model if safety_status.get("computed") else None,
                          safety_mode=c.safety_mode, safety_short_is_safe=c.safety_short_is_safe,
                          refusal_matching="case-insensitive substring, the task's 12 substrings",
                          generation_backend=env.get("generation_backend"), decode_step=env.get("decode_step")),
        datasets={cond: run.dataset_name(CONDITION_FILES[cond][0]) for cond in completions},
        interventions=interventions, safety_status=safety_status, capability=capability,
        first_n_tokens=c.refusal_first_n_tokens, paper=PaperNumbers.from_json(PAPER),
        timings=json.loads(timings_path.read_text()) if timings_path.is_file() else {}, judge=c.judge)
    return summary.to_json()


def add_judged_refusal(completions: dict[str, list[dict]], judge_name: str) -> None:
    """Set ``judged_refusal`` (0/1) on every record by the judge ``judge_name`` (in memory, no files)."""
    from ..evaluation.judges import get_judge

    judge = get_judge(judge_name)
    for records in completions.values():
        verdicts = judge.judge([r["instruction"] for r in records], [r["completion"] for r in records])
        for r, v in zip(records, verdicts, strict=True):
            r["judged_refusal"] = int(bool(v))
