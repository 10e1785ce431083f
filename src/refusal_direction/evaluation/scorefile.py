"""Score a saved completions file (ours or the paper's released files) without the chat model.

Accepted: a JSON list of records, a JSON object with a ``completions`` list (the paper's
``*_evaluations.json``), or JSONL. Each record needs ``prompt`` or ``instruction`` and ``response`` or
``completion``; ``category`` is optional.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .refusal import is_refusal, per_category
from .stats import agreement_table, rate


def read_completions(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if isinstance(rows, dict) and isinstance(rows.get("completions"), list):
        rows = rows["completions"]
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: expected a non-empty list of completion records")
    out = []
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise UserError(f"{path}: record {n} is not an object")
        instruction = r.get("instruction", r.get("prompt"))
        completion = r.get("completion", r.get("response"))
        if not isinstance(instruction, str) or not isinstance(completion, str):
            raise UserError(f"{path}: record {n} needs string fields 'prompt'/'instruction' and "
                            f"'response'/'completion' (keys: {sorted(r)})")
        out.append({"instruction": instruction, "completion": completion, "category": r.get("category")})
    return out


def score_file(path: Path, safety_model: str | None = None, require_safety: bool = False,
               safety_batch_size: int = 8) -> dict:
    records = read_completions(path)
    refusal = [is_refusal(r["completion"]) for r in records]
    result = {"file": str(path), "n": len(records), "refusal": rate(refusal),
              "per_category": per_category(refusal, [r["category"] for r in records]),
              "items": [{"instruction": r["instruction"], "refusal": f} for r, f in zip(records, refusal)],
              "safety": None, "safety_status": "not computed: no --safety-model given"}
    if safety_model:
        from .safety import load_safety_scorer

        try:
            scorer = load_safety_scorer(safety_model)
        except UserError as exc:
            if require_safety:
                raise
            result["safety_status"] = f"not computed: {str(exc).splitlines()[0]}"
            return result
        verdicts = scorer.score([r["instruction"] for r in records], [r["completion"] for r in records],
                                batch_size=safety_batch_size)
        safety = [None if v.safe is None else int(v.safe) for v in verdicts]
        for item, v, s in zip(result["items"], verdicts, safety):
            item.update({"safety": s, "p_unsafe": v.p_unsafe})
        judged = [(f, s) for f, s in zip(refusal, safety) if s is not None]  # unparsable answers excluded
        result["safety"] = rate([s for _, s in judged])
        result["safety_unparsed"] = len(safety) - len(judged)
        result["safety_status"] = "computed"
        result["judge_agreement"] = agreement_table([f for f, _ in judged], [s for _, s in judged])
    return result
