"""Compare two `benchmarks/parity_gpu.sh` outputs: compare's table, optimize's front and every trial, token digests.

    python benchmarks/parity_diff.py DIR NAME_A NAME_B

Timings, paths, creation times and the code layout's name are left out; the search form ``kernel`` (before the
edits' registry) and ``layer_kernel`` (its registry name) count as one. Exit 0 when everything else is identical.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SKIP = re.compile(r"time|_s$|seconds|created|speed|phases|last_call|dir$|path|report|module|layout|^export$")


def normal(value):
    if isinstance(value, dict):
        return {k: normal(v) for k, v in value.items() if not SKIP.search(k)}
    if isinstance(value, list):
        return [normal(v) for v in value]
    return "layer_kernel" if value == "kernel" else value


def main(argv=None) -> int:
    folder, a, b = (argv or sys.argv[1:])[:3]
    same = True
    for part in ("compare-table", "optimize-front", "optimize-trials", "digest"):
        pa, pb = Path(folder) / f"{a}-{part}.json", Path(folder) / f"{b}-{part}.json"
        if not (pa.is_file() and pb.is_file()):
            print(f"MISSING {part}")
            same = False
            continue
        x, y = normal(json.loads(pa.read_text())), normal(json.loads(pb.read_text()))
        print(("SAME    " if x == y else "DIFFERS ") + part)
        same &= x == y
    print("identical" if same else "different")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
