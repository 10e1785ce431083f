"""Run by tests/gpu/test_triton_interpret.py in a fresh process, as ``python -m tests.helpers.own_step_interpret_check``
from the repository root: the own decode step (`accel.own_step`) with every Triton kernel a GPU would use — residual
+ norm, act·up, rotary (the batch's rows as the kernel's sequence axis, each at its own position) and the decode
attention kernel — under Triton's interpreter in float32, against HF's step on the same batch.

Prints one JSON object per architecture: tokens equal, the largest logit difference over the decode steps, the logit
scale, and how many attention calls the kernel served (so the comparison is not vacuous)."""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from refusal_direction.accel import own_step, static_decode  # noqa: E402
from refusal_direction.accel.decode_attention import decode_attention  # noqa: E402
from refusal_direction.accel.fast_generation import generate_fast_ids, prompt_ids  # noqa: E402
from tests.helpers import triton_interpret_check as tic  # noqa: E402 - the libdevice stand-ins, the kernel set
from tests.helpers.generation_cases import INSTRUCTIONS, conditions  # noqa: E402
from tests.helpers.sweep_cases import tiny_arch  # noqa: E402

ACTS = {"gemma": tic.tk.GELU_TANH, "llama": tic.tk.SILU, "qwen2": tic.tk.SILU}
NEW_TOKENS = 6


def run(lm, step: str, act: int) -> tuple[dict, list, int]:
    """(tokens, every decode step's logits, attention calls on the kernel) of one forced run."""
    seen, calls = [], [0]
    real_forward, real_for, real_kernel = static_decode._Decoder.forward, own_step.decoder_for, \
        own_step.decode_kernel_for

    def recording(self):
        logits = real_forward(self)
        seen.append(logits.clone())
        return logits

    def with_triton(lm_, fuse):
        dec = real_for(lm_, fuse)
        dec.kernels = tic.triton_kernels(lm_, dec, act)
        return dec

    def counted(*args, **kwargs):
        calls[0] += 1
        return decode_attention(*args, **kwargs)

    static_decode._Decoder.forward = recording
    own_step.decoder_for = with_triton
    own_step.decode_kernel_for = lambda *a, **k: counted  # float32 on CPU: not offered, so forced here
    try:
        res = generate_fast_ids(lm, prompt_ids(lm, INSTRUCTIONS), conditions(lm), NEW_TOKENS, [], force_tokens=True,
                                step=step)
    finally:
        static_decode._Decoder.forward, own_step.decoder_for, own_step.decode_kernel_for = (real_forward, real_for,
                                                                                            real_kernel)
    assert step == "hf" or any("own decode step with the decode attention kernel" in n for n in res.stats.notes)
    return res.tokens, seen, calls[0]


def main() -> None:
    result = {}
    for arch, act in ACTS.items():
        lm = tiny_arch(arch)
        want, ref, _ = run(lm, "hf", act)
        got, logits, calls = run(lm, "own", act)
        result[arch] = {"tokens_equal": got == want, "tokens": sum(len(r) for rows in got.values() for r in rows),
                        # the own run's first decode step is its check (both steps, outside `forward`)
                        "logits": max(float((a - b).abs().max()) for a, b in zip(ref[1:], logits, strict=True)),
                        "scale": max(float(t.abs().max()) for t in ref), "kernel_calls": calls,
                        "ablation_moves": want["ablation"] != want["baseline"]}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    with torch.no_grad():
        main()
