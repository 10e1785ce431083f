"""Where one optimize batch's time goes: building the trials' edits, generation, the judge, the KL passes.

    python benchmarks/optimize_profile.py RUN_DIR [--batch 50] [--json out.json]

RUN_DIR is a run directory after `refusal-direction optimize` (its samples, candidates and study are reused). The
parameters of ``--batch`` complete trials of the study (the first ones, in trial order) are built into edits
and evaluated as one batch, as the search does, twice (the second call warm); every part is timed with the
device synchronised around it, per form for the build. Then torch.profiler records one warm evaluation and
reports CUDA kernel seconds against wall seconds per part (a part far above its kernel time is bound by the
host: Python, launches, copies). Prints a table; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args):
    _sync()
    t0 = time.perf_counter()
    out = fn(*args)
    _sync()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--json", type=Path)
    p.add_argument("--cpu-table", type=Path, help="append the profiler's top CPU ops per part to this text file")
    a = p.parse_args(argv)
    if not (a.run_dir / "optimize" / "study.journal").is_file():
        print(f"{a.run_dir} has no optimize/study.journal; run `refusal-direction optimize --out {a.run_dir}` first",
              file=sys.stderr)
        return 2
    if a.batch < 1:
        print(f"--batch {a.batch}: use at least 1", file=sys.stderr)
        return 2

    from refusal_direction.edits import EditInputs, build
    from refusal_direction.run.direction import stage_direction
    from refusal_direction.run.extract import stage_extract, stage_samples
    from refusal_direction.run.optimize import OptimizeSettings, _evaluator
    from refusal_direction.run.rundir import open_run
    from refusal_direction.search import complete_trials, open_study

    run = open_run(a.run_dir)
    samples = stage_samples(run)
    candidates = stage_extract(run, samples)
    stage_direction(run, samples, candidates)
    lm = run.lm
    trials = complete_trials(open_study(run.layout.optimize_study, 0))[:a.batch]
    build_s: dict[str, list[float]] = defaultdict(list)
    ivs = []
    for t in trials:
        inputs = EditInputs(lm, candidates, prune_layer_fraction=run.config.prune_layer_fraction)
        iv, s = timed(build, inputs, dict(t.params), f"trial{t.number}")
        build_s[t.params["form"]].append(s)
        ivs.append(iv)
    result = {"trials": len(ivs), "build_ms_per_trial": {k: round(1000 * sum(v) / len(v), 2) for k, v in
                                                        build_s.items()},
              "build_counts": {k: len(v) for k, v in build_s.items()}, "calls": []}
    for call in range(2):
        ev = _evaluator(run, samples, OptimizeSettings())
        ev.baseline()
        _, refusal_s = timed(ev.refusals, ivs)
        _, kl_s = timed(ev.kl, ivs)
        parts = {k: round(v, 3) for k, v in ev.timings.items() if k != "kl_s"}  # kl_s: only inside evaluate()
        result["calls"].append({"refusals_s": round(refusal_s, 3), "kl_call_s": round(kl_s, 3), **parts})
        print(f"call {call}: refusals {refusal_s:.3f} s (generate {ev.timings['generate_s']:.3f}, judge "
              f"{ev.timings['judge_s']:.3f}, {ev.timings['judged']} texts), kl {kl_s:.3f} s")
    result["profile"] = profile_parts(ev, ivs, a.cpu_table)
    print("build ms per trial:", result["build_ms_per_trial"], result["build_counts"])
    for part, row in result["profile"].items():
        print(f"profiled {part}: wall {row['wall_s']:.3f} s, CUDA kernels {row['kernel_s']:.3f} s "
              f"({row['kernels']} kernels)")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


def profile_parts(ev, ivs, tables: Path | None = None) -> dict:
    """Wall and CUDA-kernel seconds of one warm generation and one warm KL call under torch.profiler (kernel
    seconds by kind and the top kernels, `profile_kernels.kernel_table`; the top CPU ops by self time go to
    ``tables``)."""
    import torch
    from profile_kernels import kernel_table
    from torch.profiler import ProfilerActivity, profile

    from refusal_direction.generation import generate_all

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    parts = {"generate": lambda: generate_all(ev.lm, list(ev.harmful), list(ivs), ev.settings),
             "kl": lambda: ev.kl(ivs)}
    out = {}
    for name, fn in parts.items():
        with profile(activities=activities) as prof:
            _, wall = timed(fn)
        kernels = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA") and e.device_time]
        out[name] = {"wall_s": round(wall, 3), "kernel_s": round(sum(e.device_time for e in kernels) / 1e6, 3),
                     "kernels": len(kernels), "table": kernel_table(prof)}
        if tables is not None:
            with tables.open("a") as f:
                f.write(f"== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
                        + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
