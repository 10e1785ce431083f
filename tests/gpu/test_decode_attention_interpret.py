"""The decode-attention kernel (accel/decode_attention.py) on CPU under Triton's interpreter, float32: its probe
check passes for several head shapes and rejects a kernel 0.1 % off; with every decode step's attention on it, the
fast path gives the same tokens as on SDPA for a grouped-query and a multi-head tiny model. Needs triton installed
(CI installs it for this; the CUDA behaviour is covered by tests/gpu/test_decode_attention_cuda.py)."""

import importlib.util

import pytest

from tests.helpers.interpret import run_interpreted

pytestmark = [pytest.mark.slow, pytest.mark.triton,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")]


@pytest.fixture(scope="module")
def measured() -> dict:
    return run_interpreted("tests.helpers.decode_kernel_check", decode_kernel=True)


def test_probe_check_accepts_the_kernel_and_rejects_a_wrong_one(measured):
    assert all(measured["probes"].values()), measured["probes"]
    assert measured["wrong_kernel_passes"] is False


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_fast_path_tokens_on_the_kernel_equal_sdpa(measured, kind):
    m = measured[kind]
    assert m["identical"], m
    assert m["kernel_calls"] == 9 * m["layers"], m  # every decode step (10 tokens: 1 from the prefill) in every layer
    assert m["distinct_tokens"] > 5, m  # the model produces varied tokens, so equality is not vacuous
