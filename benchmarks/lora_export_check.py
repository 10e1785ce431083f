"""Export one search edit of a finished run as merged weights and as a LoRA adapter, each verified against the hooks.

    python benchmarks/lora_export_check.py RUN_DIR OUT_DIR [--params JSON]

RUN_DIR is any run directory with candidate directions (after `replicate` or `optimize`); ``--params`` are the
search-space parameters of the edit (`edits.methods.composite`; default: the run's selected direction as a
subspace of k = 2, at its layer and position). Runs `run.optimize_final.export_chosen` with the LoRA option — the
code `optimize --lora` runs — and prints export.json (the merged export's and the adapter's verification). Exit 2
on a bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--params", help="search parameters as JSON, e.g. '{\"form\": \"subspace\", \"k\": 2, ...}'")
    a = p.parse_args(argv)
    if not (a.run_dir / "directions" / "candidates.safetensors").is_file():
        print(f"{a.run_dir} has no directions/candidates.safetensors; run `refusal-direction replicate --out "
              f"{a.run_dir}` first", file=sys.stderr)
        return 2
    try:
        params = json.loads(a.params) if a.params else None
    except json.JSONDecodeError as exc:
        print(f"--params is not JSON ({exc.msg}); pass e.g. '{{\"form\": \"subspace\", \"k\": 2, \"position\": -1, "
              "\"layer_index\": 12.5}'", file=sys.stderr)
        return 2

    from refusal_direction.run.extract import stage_extract, stage_samples
    from refusal_direction.run.optimize_final import export_chosen
    from refusal_direction.run.rundir import open_run

    run = open_run(a.run_dir)
    samples = stage_samples(run)
    candidates = stage_extract(run, samples)
    if params is None:
        d = run.saved_direction()
        params = {"position": d.position, "layer_index": float(d.layer), "form": "subspace", "k": 2}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    record = export_chosen(run, samples, candidates, {"number": -1, "params": params}, a.out_dir, lora=True)
    print(json.dumps({"params": params, **record}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
