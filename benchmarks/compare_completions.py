"""Two run directories of the same run, generated two ways (e.g. HF's decode step vs the own one): how far apart?

    PYTHONPATH=src python benchmarks/compare_completions.py RUN_A RUN_B [--json OUT]

Per completions file present in both (same instructions, same order — else exit 2): identical completions, the
first differing character on average where they differ, substring-judge refusals in each, and the rows where the
judge's verdict differs; plus each run's generate-stage seconds (timings.json) where present. Prints JSON; no
completion text is printed (they may be harmful and stay in the run directories).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def compare_file(a: list[dict], b: list[dict]) -> dict:
    """Agreement of two completion lists of the same instructions."""
    differing = [(x, y) for x, y in zip(a, b) if x["completion"] != y["completion"]]
    return {"rows": len(a), "identical": len(a) - len(differing),
            "mean_first_difference_chars": (round(sum(_first_difference(x["completion"], y["completion"])
                                                      for x, y in differing) / len(differing), 1)
                                            if differing else None),
            "refusals": [sum(bool(x["refusal"]) for x in a), sum(bool(y["refusal"]) for y in b)],
            "verdict_changes": sum(bool(x["refusal"]) != bool(y["refusal"]) for x, y in zip(a, b))}


def _generate_seconds(run: Path) -> float | None:
    """Seconds of the run's generate stage: timings.json's ``generate_s`` (the whole stage), else its per-set
    ``generate_*_s`` keys summed (older runs); None without either."""
    path = run / "timings.json"
    if not path.is_file():
        return None
    timings = json.loads(path.read_text(encoding="utf-8"))
    if "generate_s" in timings:
        return timings["generate_s"]
    parts = [v for k, v in timings.items() if k.startswith("generate_") and k.endswith("_s")]
    return round(sum(parts), 3) if parts else None


def compare_runs(run_a: Path, run_b: Path) -> dict:
    from refusal_direction.fileio import read_jsonl

    files = sorted({p.name for p in (run_a / "completions").glob("*.jsonl")}
                   & {p.name for p in (run_b / "completions").glob("*.jsonl")})
    if not files:
        raise ValueError(f"no completions file in both {run_a}/completions and {run_b}/completions")
    out: dict = {"runs": [run_a.name, run_b.name], "files": {},
                 "generate_seconds": [_generate_seconds(run_a), _generate_seconds(run_b)]}
    for name in files:
        a, b = (read_jsonl(run / "completions" / name, "completions file") for run in (run_a, run_b))
        if [r["instruction"] for r in a] != [r["instruction"] for r in b]:
            raise ValueError(f"{name}: the two runs completed different instructions (or in another order)")
        out["files"][name] = compare_file(a, b)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    from refusal_direction.errors import UserError

    try:
        result = compare_runs(args.run_a, args.run_b)
    except (UserError, ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
        print(f"compare_completions: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
