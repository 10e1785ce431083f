"""Benchmark: the paper's generation (HF ``generate`` + hooks, batch 8) against the fast path, in one run.

Workload: synthetic prompts of random token ids with JailbreakBench-like instruction lengths (15-45
tokens) inside the model's chat prefix and suffix, two conditions (baseline and directional ablation
along a random direction), and exactly ``new_tokens`` greedy tokens per row (stop tokens ignored), so
every run does the same work. Models are given as token ids through `IdTokenizer` ("2 106 1645 108"),
so random-weight models of a real shape need no vocabulary, and every library function that takes
instruction strings runs unchanged.

Measured side by side: (a) the paper's approach, timed on ``paper_batches`` batches per condition and
scaled to all batches (the result says so); (b) `fast_generation.generate_fast_ids`, first and repeated
call; their ratio; the device's floor (bytes of weights and KV cache read per step over measured copy
bandwidth, FLOPs over measured matmul rate); token agreement between (a) and (b); (b) with and without
CUDA graphs; activation extraction for 128+128 prompts; and, when `selection.score_candidates` exists,
the candidate sweep. `run_benchmark` returns a dict (with a sha256 per condition of the fast path's tokens,
``token_digest``, so runs of two code versions can be compared); `format_report` renders it as text for the CLI.

Modules: `synthetic` (shapes, id tokenizer, random models, prompts), `timing` (ceilings and floors),
`generation` (the two generation paths), `stages` (activations, selection), `run` (the run and its report).
No pipeline stage imports this package, so its synthetic models stay outside the stages' import path.
"""

from ..accel import prompt_ids
from .generation import (
    agreement,
    fast_generate,
    fast_variants,
    no_stop_tokens,
    paper_generate,
    time_fast,
    time_paper,
    token_digests,
)
from .run import bench_conditions, bench_main, describe_environment, describe_workload, format_report, run_benchmark
from .stages import forward_log, selection_log, sweep_forward, sweep_inputs, time_activations, time_selection
from .synthetic import (
    INSTRUCTION_TOKENS,
    SHAPES,
    IdTokenizer,
    Shape,
    as_id_model,
    bench_model,
    gpu_script_problem,
    id_model,
    random_model,
    synthetic_instructions,
)
from .timing import generation_floor, measure_ceilings, median_seconds, selection_floor, sync

__all__ = ["INSTRUCTION_TOKENS", "SHAPES", "IdTokenizer", "Shape", "agreement", "as_id_model", "bench_conditions",
           "bench_main", "bench_model", "describe_environment", "describe_workload", "fast_generate", "fast_variants",
           "format_report", "generation_floor", "gpu_script_problem", "id_model", "measure_ceilings",
           "median_seconds", "no_stop_tokens", "paper_generate", "prompt_ids", "random_model", "run_benchmark",
           "selection_floor", "selection_log", "sweep_forward", "sweep_inputs", "forward_log",
           "sync", "synthetic_instructions", "time_activations", "time_fast", "time_paper", "time_selection",
           "token_digests"]
