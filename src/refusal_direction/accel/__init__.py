"""Faster implementations of the pipeline's hot paths, each checked against the reference path it replaces.

- fast generation (`generate_fast`, `generate_fast_ids`): every condition in one batch, a static KV cache and
  a CUDA graph per decode step, for the same greedy tokens as HF ``generate`` with hooks;
- the selection sweep's forward (`SweepDecoder`, `RowInterventions`, `KVPrefix`): last-position logits of
  many rows, each with its own intervention, for standard pre-norm decoders;
- resumable fast-path rows (`PartialResults`);
- fused kernels: RMSNorm and rotary embedding swaps verified on the model's own shapes (`fused_kernels`),
  SDPA backend restriction (`restricted_sdpa`), and the sweep's Triton kernels (`sweep_kernels`).

Callers outside this package import from here. Nothing here is needed for correctness: every path has a
reference fallback in the stage that uses it.
"""

from .fast_forward import (
    BUILT_DECODER,
    KVPrefix,
    RowInterventions,
    SweepDecoder,
    cat_interventions,
    shared_decoder,
    weights_key,
)
from .fast_generation import (
    FastPathUnsupported,
    FastResult,
    FastStats,
    generate_fast,
    generate_fast_ids,
    generate_fast_sets,
    kv_bytes_per_token,
    prompt_ids,
)
from .fusion import fused_kernels, restricted_sdpa
from .partial import PartialResults

__all__ = ["BUILT_DECODER", "FastPathUnsupported", "FastResult", "FastStats", "KVPrefix", "PartialResults",
           "RowInterventions", "SweepDecoder", "cat_interventions", "fused_kernels", "generate_fast",
           "generate_fast_ids", "generate_fast_sets", "kv_bytes_per_token", "prompt_ids", "restricted_sdpa",
           "shared_decoder", "weights_key"]
