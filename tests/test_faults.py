"""Faults: CUDA out-of-memory backs off and says so; NaN activations stop with layer and batch named."""

import logging

import pytest
import torch
from conftest import PROMPTS
from tiny import save_tiny_gemma
from typer.testing import CliRunner

from refusal_direction.cli import app
from refusal_direction.core.activations import NonFiniteActivations, mean_resid_pre
from refusal_direction.core.batching import run_batched


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


def test_replicate_completes_under_forced_oom(tmp_path, data_dir, monkeypatch):
    """A test double raises the CUDA OOM error for any forward pass over more than 2 prompts."""
    from transformers import GemmaForCausalLM

    real_forward = GemmaForCausalLM.forward

    def forward(self, input_ids=None, *args, **kwargs):
        if input_ids is not None and input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test double)")
        return real_forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(GemmaForCausalLM, "forward", forward)
    model_dir = save_tiny_gemma(tmp_path / "tiny")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, [str(a) for a in [
        "replicate", "--model", model_dir, "--data-dir", data_dir, "--out", out, "--n-train", "6", "--n-eval", "5",
        "--n-harmless-eval", "3", "--max-new-tokens", "4", "--batch-size", "8", "--layer", "1", "--position", "-2",
        "--device", "cpu", "--no-safety", "--conditions", "baseline,ablation"]])
    assert r.exit_code == 0, r.output
    assert (out / "summary.json").is_file()
    log = (out / "run.log").read_text()
    assert "out of memory; retrying with batch size 4" in log and "retrying with batch size 2" in log


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
