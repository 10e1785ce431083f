"""A whole replicate completes when every forward pass over more than 2 prompts runs out of CUDA memory."""

import torch
from typer.testing import CliRunner

from refusal_direction.cli import app
from tests.helpers.tiny import save_tiny_gemma


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
