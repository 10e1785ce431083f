"""Faults: CUDA out-of-memory backs off and says so; NaN activations stop with layer and batch named.
(A whole replicate under forced out-of-memory: tests/integration/test_oom_backoff.py.)"""

import logging

import pytest
import torch

from refusal_direction.core.activations import NonFiniteActivations, mean_resid_pre
from refusal_direction.core.batching import run_batched
from tests.helpers.prompts import PROMPTS


def test_run_batched_halves_on_oom_and_keeps_order(caplog):
    sizes = []

    def fn(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in batch]

    with caplog.at_level(logging.WARNING):
        out = run_batched(fn, list(range(7)), batch_size=8, desc="test")
    assert out == [x * 10 for x in range(7)]
    assert sizes[:3] == [7, 4, 2] and max(sizes[3:]) <= 2
    assert "out of memory; retrying with batch size 4" in caplog.text


def test_other_errors_are_not_swallowed():
    def fn(batch):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batched(fn, [1, 2, 3], batch_size=2)


def test_nan_activations_name_layer_and_batch(tiny_lm):
    def poison(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = x.clone()
        x[..., 0] = float("nan")
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handle = tiny_lm.blocks[2].block.register_forward_pre_hook(poison, with_kwargs=True)
    try:
        with pytest.raises(NonFiniteActivations, match=r"layer 2, batch 0"):
            mean_resid_pre(tiny_lm, PROMPTS, batch_size=3)
    finally:
        handle.remove()
