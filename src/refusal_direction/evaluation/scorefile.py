"""Score a saved completions file (ours or the paper's released files) without the chat model.

Accepted: a JSON list of records, a JSON object with a ``completions`` list (the paper's
``*_evaluations.json``), JSONL, or an XSTest completions CSV (``prompt``, ``completion``,
``final_label``, ``type`` as category). Each record needs ``prompt`` or ``instruction`` and
``response`` or ``completion``; ``category`` is optional.

``refusal`` is always the paper's substring score (the headline, for parity). ``judge=NAME`` (see
`judges.JUDGES`, or any object with ``name`` and ``judge(instructions, completions)``; default: a run's,
`RunConfig.judge`, the learned judge) adds the judge's verdicts under ``judged``; a file with human labels
(XSTest's ``final_label``) gets ``human_agreement`` of the chosen judge with them (rate, k, n, ci95, confusion counts).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import FIELDS
from ..data.xstest import is_xstest_completions, read_labelled_completions
from ..errors import UserError
from .judges import get_judge
from .refusal import is_refusal, per_category
from .stats import agreement_table, rate


def read_completions(path: Path) -> list[dict]:
    """Records ``{instruction, completion, category}`` (+ ``human_refusal`` for XSTest CSVs)."""
    path = Path(path)
    if is_xstest_completions(path):
        return [{"instruction": r.prompt, "completion": r.completion, "category": r.category,
                 "human_refusal": int(r.refusal)} for r in read_labelled_completions(path)]
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


def human_agreement(verdicts: list[bool | None], human: list[int]) -> dict:
    """Agreement of judge ``verdicts`` (None = unreadable, excluded and counted) with human labels."""
    pairs = [(int(bool(v)), h) for v, h in zip(verdicts, human) if v is not None]
    hits = [int(v == h) for v, h in pairs]
    confusion = {"tp": sum(v and h for v, h in pairs), "fp": sum(v and not h for v, h in pairs),
                 "fn": sum(h and not v for v, h in pairs), "tn": sum(not v and not h for v, h in pairs)}
    return {**rate(hits), "confusion": confusion, "unparsed": len(verdicts) - len(pairs)}


def apply_judge(judge, records: list[dict]) -> dict:
    """The ``judged`` block: the judge's refusal rate, per category, verdicts, unreadable count."""
    verdicts = judge.judge([r["instruction"] for r in records], [r["completion"] for r in records])
    if len(verdicts) != len(records):
        raise ValueError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(records)} completions")
    read = [(int(v), r["category"]) for v, r in zip(verdicts, records) if v is not None]
    return {"judge": judge.name, "description": getattr(judge, "description", ""),
            "refusal": rate([v for v, _ in read]), "per_category": per_category(*zip(*read)) if read else {},
            "unparsed": len(verdicts) - len(read), "verdicts": [None if v is None else int(v) for v in verdicts]}


def describe_result(result: dict, name: str) -> list[str]:
    """Human-readable lines for a `score_file` result."""
    r = result["refusal"]
    lines = [f"{name}: refusal score {r['rate']:.2f} ({r['k']}/{r['n']}, "
             f"95% CI [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}])"]
    if result.get("judged"):
        j = result["judged"]["refusal"]
        lines.append(f"{result['judged']['judge']} judge: refusal {j['rate']:.2f} ({j['k']}/{j['n']}, "
                     f"unparsed {result['judged']['unparsed']})")
    if result.get("human_agreement"):
        h = result["human_agreement"]
        lines.append(f"agreement with human labels ({h['judge']}): {h['rate']:.3f} ({h['k']}/{h['n']}, "
                     f"95% CI [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}]); confusion {h['confusion']}")
    if result.get("safety"):
        s = result["safety"]
        lines.append(f"safety score {s['rate']:.2f} ({s['k']}/{s['n']})")
    return lines


def score_file(path: Path, safety_model: str | None = None, require_safety: bool = False,
               safety_batch_size: int = FIELDS["safety_batch_size"].default,
               judge: str | object = FIELDS["judge"].default) -> dict:
    """Score ``path``: substring refusal (always), ``judge``'s verdicts, human agreement, Llama Guard 2."""
    records = read_completions(path)
    refusal = [is_refusal(r["completion"]) for r in records]
    result = {"file": str(path), "n": len(records), "refusal": rate(refusal),
              "per_category": per_category(refusal, [r["category"] for r in records]),
              "items": [{"instruction": r["instruction"], "refusal": f} for r, f in zip(records, refusal)],
              "safety": None, "safety_status": "not computed: no --safety-model given"}
    judge_obj = get_judge(judge) if isinstance(judge, str) else judge
    verdicts: list = refusal
    if judge_obj.name != "substring":
        judged = apply_judge(judge_obj, records)
        verdicts = judged.pop("verdicts")
        result["judged"] = judged
        for item, v in zip(result["items"], verdicts):
            item["judge_refusal"] = v
    if all("human_refusal" in r for r in records):
        human = [r["human_refusal"] for r in records]
        result["human_agreement"] = {"judge": judge_obj.name, **human_agreement(verdicts, human)}
        for item, h in zip(result["items"], human):
            item["human_refusal"] = h
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
