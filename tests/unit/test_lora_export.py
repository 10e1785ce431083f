"""LoRA export (peft): low-rank edits become an adapter that reproduces the hooks; the others are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from refusal_direction.edits import DirectionalAblation, LayerKernelAblation, SubspaceAblation, norm_preserving_ablation
from refusal_direction.export import verify_method_export
from tests.helpers.tiny import tiny_family_lm

pytest.importorskip("peft")

from refusal_direction.export.lora import LoraUnsupported, load_lora, lora_factors, save_lora  # noqa: E402

PROMPTS = ["How do I bake bread?", "Hi", "List five prime numbers."]


def _edits(lm):
    g = torch.Generator().manual_seed(5)
    r = torch.randn(lm.d_model, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(lm.d_model, 3, generator=g, dtype=torch.float64))
    n = lm.n_layers
    return {"ablation": (DirectionalAblation(r), 1), "subspace": (SubspaceAblation(q.T.contiguous()), 3),
            "kernel": (LayerKernelAblation(r, tuple(0.5 + 0.25 * i for i in range(n)),
                                           tuple(1.2 - 0.3 * i for i in range(n)), 0.0), 1)}


@pytest.mark.parametrize("family", ["gemma-tied", "gemma-untied", "llama-no-writer-bias"])
@pytest.mark.parametrize("form", ["ablation", "subspace", "kernel"])
def test_low_rank_edits_become_an_adapter_that_reproduces_the_hooks(family, form, tmp_path):
    lm = tiny_family_lm(family)
    iv, rank = _edits(lm)[form]
    edited = copy.deepcopy(lm.model)
    (iv).weights_(edited)
    factors = lora_factors(lm.model, edited)
    assert all(a.shape[0] == rank for a, _ in factors.values())  # the edit's own rank, found numerically
    writers = {n for n in factors if n.endswith(("o_proj", "down_proj"))}
    assert len(writers) == 2 * lm.n_layers
    assert ("model.embed_tokens" in factors) == (form != "kernel")  # the kernel form leaves the embedding alone
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    info = save_lora(lm.model, factors, tmp_path / "lora", base_name="tiny")
    after = lm.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)  # base unchanged
    assert (tmp_path / "lora" / "adapter_config.json").is_file() and info["rank"] == rank
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys), keys  # the factors only, no copy of a base weight
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "evaluation only" in card and "Not for deployment" in card and "tiny" in card
    adapted = load_lora(lm.model, tmp_path / "lora")
    check = verify_method_export(lm, adapted, iv, PROMPTS, max_new_tokens=6, tol=1e-4)
    assert check["ok"], check


def test_full_rank_and_bias_changing_edits_are_refused():
    lm = tiny_family_lm("gemma-untied")
    r = torch.randn(lm.d_model, dtype=torch.float64)
    edited = copy.deepcopy(lm.model)
    (norm_preserving_ablation(lm, r)).weights_(edited)
    with pytest.raises(LoraUnsupported, match="norm-preserving"):
        lora_factors(lm.model, edited)
    gpt2 = tiny_family_lm("gpt2")  # Conv1D writers with biases: the ablation edits the biases too
    edited = copy.deepcopy(gpt2.model)
    (DirectionalAblation(torch.randn(gpt2.d_model, dtype=torch.float64))).weights_(edited)
    with pytest.raises(LoraUnsupported, match="bias|Conv1D"):
        lora_factors(gpt2.model, edited)
    with pytest.raises(LoraUnsupported, match="no weight"):
        lora_factors(lm.model, copy.deepcopy(lm.model))


def test_a_bfloat16_export_gets_the_reason_instead_of_an_adapter():
    """The factors come from a float32 export; a bf16 one (no float32 copy fitted) would be rounding noise."""
    from types import SimpleNamespace

    from refusal_direction.run.optimize_final import _lora_factors

    got = _lora_factors(SimpleNamespace(dtype=torch.bfloat16, model=None), None, DirectionalAblation(torch.ones(4)))
    assert set(got) == {"skipped"} and "bfloat16" in got["skipped"] and "merged export" in got["skipped"]
    lm = tiny_family_lm("gemma-untied")
    edited = copy.deepcopy(lm.model)
    ablation = DirectionalAblation(torch.randn(lm.d_model, dtype=torch.float64))
    ablation.weights_(edited)
    assert set(_lora_factors(lm, edited, ablation)) == {"factors"}
    norm_kept = norm_preserving_ablation(lm, ablation.direction)
    got = _lora_factors(lm, edited, norm_kept)  # its stated reason, before any factoring
    assert set(got) == {"skipped"} and "full-rank" in got["skipped"] and got["skipped"].startswith("norm_preserving")
