"""Activation extraction's first call with torch's attention pick vs memory-efficient SDPA (gemma-2b shape, bf16).

Usage (GPU machine): PYTHONPATH=src python3 benchmarks/extraction_gpu.py. Times `activations.mean_resid_pre` over
128 + 128 synthetic prompts in one fresh process: twice with memory-efficient SDPA (the default), twice with torch's
pick (cuDNN on an H200, which builds an execution plan for every new padded batch shape), then on new prompts after
a full fast generation run. Prints one line per measurement.
"""

from __future__ import annotations

import time

import torch

from refusal_direction.accel.fast_generation import generate_fast_ids
from refusal_direction.bench import prompt_ids, random_model, synthetic_instructions
from refusal_direction.core.activations import mean_resid_pre
from refusal_direction.core.interventions import Baseline, DirectionalAblation


def main() -> None:
    lm = random_model("gemma-2b-shape", device="cuda")
    sets = {"harmful": synthetic_instructions(lm, 128, 1), "harmless": synthetic_instructions(lm, 128, 2)}

    def timed(**kw) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for prompts in sets.values():
            mean_resid_pre(lm, prompts, **kw)
        torch.cuda.synchronize()
        return round(time.perf_counter() - t0, 3)

    print("fresh process: efficient", timed(), timed(), "| torch's pick", timed(sdpa=None), timed(sdpa=None))
    ivs = [Baseline(), DirectionalAblation(torch.randn(lm.d_model))]
    generate_fast_ids(lm, prompt_ids(lm, synthetic_instructions(lm, 100, 0)), ivs, 512, [], force_tokens=True)
    sets = {"harmful": synthetic_instructions(lm, 128, 11), "harmless": synthetic_instructions(lm, 128, 12)}
    print("after generation, new prompts: torch's pick", timed(sdpa=None), timed(sdpa=None))
    sets = {"harmful": synthetic_instructions(lm, 128, 21), "harmless": synthetic_instructions(lm, 128, 22)}
    print("after generation, new prompts: efficient", timed(), timed())


if __name__ == "__main__":
    main()
