"""The sweep's Triton kernels (residual+norm, act·up, rotary) and the decoder running on all of them, checked on CPU
with Triton's interpreter in float32 against the PyTorch chains and HF's forward with hooks. Needs triton installed
(every CUDA build of PyTorch on Linux brings it; CI's CPU build does not, so it is skipped there — the kernels are
then covered by tests/gpu/test_fast_forward_cuda.py and by the run-time verification on probes)."""

import importlib.util

import pytest

from tests.helpers.interpret import run_interpreted

# CPU only (the interpreter): the gpu tier's CUDA skip does not apply to tests marked triton
pytestmark = [pytest.mark.slow, pytest.mark.triton,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (CUDA PyTorch)")]


@pytest.fixture(scope="module")
def measured() -> dict:
    return run_interpreted("tests.helpers.triton_interpret_check")


@pytest.mark.parametrize("arch", ["gemma", "llama", "qwen2"])
def test_kernels_match_their_pytorch_chains(measured, arch):
    m = measured[arch]
    assert m["residual"] < 1e-5, m  # float32: only the reductions' summation order differs
    assert m["gelu_tanh"] < 1e-5 and m["silu"] < 1e-5, m  # tanh/exp stand-ins round differently in the last bits
    assert m["rotary"] == 0.0, m  # same products, same order
    assert m["rotary_split"] == 0.0, m  # heads over two programs per token, one partly masked:
    assert 4 < m["rotary_heads"] < 8, m  # more heads than one program of four holds, fewer than two fill


@pytest.mark.parametrize("arch", ["gemma", "llama", "qwen2"])
def test_decoder_on_triton_kernels_equals_hf_forward_with_hooks(measured, arch):
    m = measured[arch]
    assert m["logits"] < 1e-4 * m["scale"], m
    assert m["interventions_move"] > 1e-2, m  # the interventions matter, so the equality is not vacuous


@pytest.fixture(scope="module")
def own_step_measured() -> dict:
    return run_interpreted("tests.helpers.own_step_interpret_check", decode_kernel=True)


@pytest.mark.parametrize("arch", ["gemma", "llama", "qwen2"])
def test_own_decode_step_on_triton_kernels_equals_hf_step(own_step_measured, arch):
    m = own_step_measured[arch]
    assert m["tokens_equal"] and m["tokens"] == 108, m
    assert m["logits"] < 1e-5 * m["scale"] + 1e-6, m  # float32: summation order only
    assert m["kernel_calls"] == 15 and m["ablation_moves"], m  # 5 decode steps x 3 blocks on the attention kernel
