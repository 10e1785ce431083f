"""summary.json: per-condition scores with intervals, paired tests, settings and the paper's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.directions import Direction
from ..evaluation.refusal import per_category
from ..evaluation.stats import agreement_table, mcnemar, rate
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
    c = run.config
    completions = load_completions(run)
    direction_meta = json.loads(run.direction_path.with_suffix(".json").read_text())
    conditions = {}
    for cond, records in completions.items():
        dataset_key, _ = CONDITION_FILES[cond]
        refusal = [r["refusal"] for r in records]
        judged = [r for r in records if r.get("safety") is not None]  # unparsable guard answers excluded
        safety = [r["safety"] for r in judged]
        has_safety = bool(safety_status.get("computed") and judged)
        cats = [r.get("category") for r in records]
        per_cat = {k: {"refusal": v} for k, v in per_category(refusal, cats).items()}
        if has_safety:
            for k, v in per_category(safety, [r.get("category") for r in judged]).items():
                per_cat[k]["safety"] = v
        iv = condition_intervention(cond, Direction(torch.zeros(1), direction_meta["layer"],
                                                    direction_meta["position"]), c.actadd_coeff)
        conditions[cond] = {
            "dataset": run.dataset_name(dataset_key),
            "intervention": {k: v for k, v in iv.describe().items() if k != "direction_norm"},
            "n": len(records),
            "refusal_score": rate(refusal)["rate"],
            "refusal": rate(refusal),
            "safety_score": rate(safety)["rate"] if has_safety else None,
            "safety": rate(safety) if has_safety else None,
            "safety_status": "computed" if has_safety else f"not computed: {safety_status.get('reason', 'unknown')}",
            "per_category": per_cat,
            "mean_completion_tokens": sum(r["n_tokens"] for r in records) / max(1, len(records)),
            f"refusal_first_{c.refusal_first_n_tokens}_tokens": rate([r["refusal_first_n"] for r in records]),
            "stopped_fraction": sum(bool(r["stopped"]) for r in records) / max(1, len(records)),
            "safety_unparsed": len(records) - len(judged) if has_safety else None,
            "judge_agreement": agreement_table([r["refusal"] for r in judged], safety) if has_safety else None,
            "capability": capability.get(cond),
        }
    tests = {}
    for a, b in (("baseline", "ablation"), ("baseline", "actadd_negative"), ("harmless_baseline", "harmless_actadd")):
        if a in completions and b in completions:
            ra = [r["refusal"] for r in completions[a]]
            rb = [r["refusal"] for r in completions[b]]
            entry = {"refusal": mcnemar(ra, rb), "safety": None}
            if conditions[a]["safety"] and conditions[b]["safety"]:
                pairs = [(x["safety"], y["safety"]) for x, y in zip(completions[a], completions[b])
                         if x.get("safety") is not None and y.get("safety") is not None]
                entry["safety"] = mcnemar([x for x, _ in pairs], [y for _, y in pairs])
            tests[f"{b}_vs_{a}"] = entry
    timings_path = run.out / "timings.json"
    env_path = run.out / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    return {
        "model": display_name(c.model),
        "direction": {"layer": direction_meta["layer"], "position": direction_meta["position"],
                      "selected_by": direction_meta.get("selected_by", "fixed"), "norm": direction_meta.get("norm")},
        "settings": {"max_new_tokens": c.max_new_tokens, "stop_at_end_of_turn": c.stop_at_end_of_turn,
                     "dtype": env.get("dtype"), "device": env.get("device"), "n_train": c.n_train,
                     "n_eval": c.n_eval, "safety_model": c.safety_model if safety_status.get("computed") else None,
                     "safety_mode": c.safety_mode, "safety_short_is_safe": c.safety_short_is_safe,
                     "refusal_matching": "case-insensitive substring, the task's 12 substrings"},
        "conditions": conditions,
        "paired_tests": tests,
        "paper": PAPER,
        "timings": json.loads(timings_path.read_text()) if timings_path.is_file() else {},
    }
