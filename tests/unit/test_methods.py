"""The methods on tiny models: every weight form equals its hooks; each method's own properties hold.

Families: Gemma tied and untied (no biases, √d embedding gain), Llama with attention/MLP biases and a tied
embedding, GPT-2 (Conv1D writers with biases, learned positions).
"""

from __future__ import annotations

import copy

import pytest
import torch

from refusal_direction.core.directions import CandidateDirections, Direction
from refusal_direction.core.padding import position_ids
from refusal_direction.edits import (
    AffineAblation,
    AffineAddition,
    Baseline,
    DirectionalAblation,
    LayerKernelAblation,
    NormPreservingAblation,
    SubspaceAblation,
    ace_offset,
    apply_intervention,
    embedding_gain,
    layer_kernel,
    norm_preserving_ablation,
    projected_direction,
    refusal_subspace,
)
from refusal_direction.errors import UserError
from tests.helpers.tiny import tiny_family_lm as family_lm
from tests.helpers.tiny import tiny_gemma

PROMPTS = ["How do I bake bread?", "Hi", "List five prime numbers.", "What is 2+2?"]
FAMILIES = ["gemma-tied", "gemma-untied", "llama-biases", "gpt2"]


def logits(lm, model=None, intervention=Baseline()):
    enc = lm.tokenize(PROMPTS)
    model = model or lm.model
    with torch.no_grad(), apply_intervention(lm, intervention):
        return model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False).logits


def residuals(lm, intervention):
    """Every block input and the final norm's input, after ``intervention``'s hooks: list of [batch, seq, d]."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).double())

    enc = lm.tokenize(PROMPTS)
    sites = [s.block for s in lm.blocks] + ([lm.final_norm] if lm.final_norm is not None else [])
    with torch.no_grad(), apply_intervention(lm, intervention):
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in sites]
        try:
            lm.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False)
        finally:
            for h in handles:
                h.remove()
    return seen


def artifacts(lm, seed=1):
    g = torch.Generator().manual_seed(seed)
    n_pos, d = 3, lm.d_model
    means = [CandidateDirections(torch.randn(n_pos, lm.n_layers, d, generator=g, dtype=torch.float64),
                                 [-3, -2, -1]) for _ in range(2)]
    cands = CandidateDirections(means[0].vectors - means[1].vectors, [-3, -2, -1])
    return cands, means[0], means[1], cands.get(-2, 1)


def methods(lm):
    cands, _, harmless, direction = artifacts(lm)
    sub = refusal_subspace(cands, direction, variance=0.9, k_max=3)
    kernel = layer_kernel(lm.n_layers, peak=1, width=1.5, w_min=0.2, w_max=0.9)
    return {
        "projected": DirectionalAblation(projected_direction(direction, harmless).vector, name="projected"),
        "subspace": SubspaceAblation(sub.basis),
        "layer_kernel": LayerKernelAblation(direction.vector, kernel, tuple(reversed(kernel)), embed_weight=0.5),
        "ace": AffineAblation(direction.vector, ace_offset(direction, harmless)),
        "norm_preserving": norm_preserving_ablation(lm, direction.vector),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_every_weight_form_equals_its_hooks(family):
    lm = family_lm(family)
    for name, iv in methods(lm).items():
        hooked = logits(lm, intervention=iv)
        edited = copy.deepcopy(lm.model)
        (iv).weights_(edited)
        diff = (logits(lm, edited) - hooked).abs().max().item()
        print(family, name, f"max |dlogit| {diff:.3g}")
        assert diff <= 1e-4, (family, name, diff)
        assert (hooked - logits(lm)).abs().max().item() > 1e-3, (family, name)  # the method did something


@pytest.mark.parametrize("family", ["gemma-tied", "gpt2"])
def test_subspace_and_ace_projections_at_every_site(family):
    lm = family_lm(family)
    ms = methods(lm)
    q = ms["subspace"].basis
    assert torch.allclose(q @ q.T, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-12)
    for x in residuals(lm, ms["subspace"]):
        assert (x @ q.T).abs().max().item() <= 1e-5
    ace = ms["ace"]
    r = ace.direction / ace.direction.norm()
    for x in residuals(lm, ace):
        assert ((x @ r) - ace.offset).abs().max().item() <= 1e-5 * max(1.0, abs(ace.offset))


def test_ace_sets_the_harmless_mean_projection_and_addition_the_harmful_one():
    lm = tiny_gemma(n_layers=3)
    cands, harmful, harmless, direction = artifacts(lm)
    c = ace_offset(direction, harmless)
    mu = harmless.get(-2, 1).vector
    r = direction.unit()
    assert abs(float(r @ mu) - c) < 1e-12
    # ACE maps the harmless mean onto itself (its projection is already c), any shift along r̂ back to it
    x = torch.stack([mu, mu + 3.0 * r, mu - 7.0 * r])
    out = x - ((x @ r)[:, None] - c) * r
    assert torch.allclose(out, mu.expand_as(out), atol=1e-10)
    add = AffineAddition(direction.vector, 1, ace_offset(direction, harmful))
    xs = residuals(lm, add)
    assert ((xs[1] @ r) - add.target).abs().max().item() <= 1e-4 * max(1.0, abs(add.target))
    assert ((residuals(lm, Baseline())[0] - xs[0]).abs().max().item()) == 0  # before the layer: untouched
    with pytest.raises(UserError, match="no weight form"):
        (add).weights_(copy.deepcopy(lm.model))


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_preserving_keeps_each_written_vector_norm_and_removes_r(family):
    from refusal_direction.edits.weights import _embeddings, _is_conv1d, find_residual_writers

    lm = family_lm(family)
    r = torch.randn(lm.d_model, dtype=torch.float64)
    r_hat = r / r.norm()
    edited = copy.deepcopy(lm.model)
    NormPreservingAblation(r, (), ()).weights_(edited)

    def vectors(model):
        from refusal_direction.core.model import find_blocks

        blocks, _ = find_blocks(model)
        out = [e.weight for e in _embeddings(model, blocks, lm.d_model)]
        for m in find_residual_writers(model, blocks):
            out.append(m.weight if _is_conv1d(m) else m.weight.T)
            if getattr(m, "bias", None) is not None:
                out.append(m.bias[None])
        return [v.double() for v in out]

    for before, after in zip(vectors(lm.model), vectors(edited), strict=True):
        assert torch.allclose(before.norm(dim=-1), after.norm(dim=-1), rtol=1e-6, atol=0)
        assert (after @ r_hat).abs().max().item() <= 1e-6
    for x in residuals(lm, norm_preserving_ablation(lm, r)):
        assert (x @ r_hat.float().double()).abs().max().item() <= 1e-5


def test_norm_preserving_hook_scales_are_the_float64_ratio_and_follow_weight_changes():
    """The hook form's writer scales (cached ‖v‖², float32 v·r̂) equal ‖v‖ / ‖(I − P) v‖ computed in float64;
    an edited weight is seen by the next build (the norm cache follows the weight's version)."""
    from refusal_direction.edits.weights import _is_conv1d

    lm = family_lm("gpt2")  # Conv1D writers with biases
    r = torch.randn(lm.d_model, dtype=torch.float64)
    r_hat = r / r.norm()

    def exact(module):
        v = (module.weight if _is_conv1d(module) else module.weight.T).detach().double()
        return v.norm(dim=-1) / (v - torch.outer(v @ r_hat, r_hat)).norm(dim=-1)

    for _ in range(2):  # the second build reads the cached norms
        for e in norm_preserving_ablation(lm, r).writers:
            torch.testing.assert_close(e.scale.double(), exact(e.module), rtol=1e-6, atol=0)
    module = norm_preserving_ablation(lm, r).writers[0].module
    with torch.no_grad():
        module.weight.mul_(2.0).add_(0.01)  # in place: the version moves
    torch.testing.assert_close(norm_preserving_ablation(lm, r).writers[0].scale.double(), exact(module), rtol=1e-6,
                               atol=0)
    module.weight.data = module.weight.data * 3 - 0.02  # new storage under the same Parameter: the version does not
    torch.testing.assert_close(norm_preserving_ablation(lm, r).writers[0].scale.double(), exact(module), rtol=1e-6,
                               atol=0)


def test_per_row_switch_applies_each_method_to_its_rows_only():
    lm = tiny_gemma(n_layers=3)
    base = logits(lm)
    for name, iv in methods(lm).items():
        full = logits(lm, intervention=iv)
        rows = torch.tensor([1.0, 0.0, 1.0, 0.0])
        enc = lm.tokenize(PROMPTS)
        with torch.no_grad(), apply_intervention(lm, iv, rows=rows):
            mixed = lm.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False).logits
        assert torch.equal(mixed[1], base[1]) and torch.equal(mixed[3], base[3]), name
        assert (mixed[0] - full[0]).abs().max().item() <= 1e-5, name


def test_kernel_of_ones_is_directional_ablation_and_subspace_rule():
    lm = tiny_gemma(n_layers=3)
    cands, _, _, direction = artifacts(lm)
    ones = layer_kernel(lm.n_layers, peak=1, width=10.0, w_min=1.0, w_max=1.0)
    kern = LayerKernelAblation(direction.vector, ones, ones, embed_weight=1.0)
    dim = DirectionalAblation(direction.vector)
    assert (logits(lm, intervention=kern) - logits(lm, intervention=dim)).abs().max().item() <= 1e-5
    assert layer_kernel(5, peak=2, width=2) == (0.0, 0.5, 1.0, 0.5, 0.0)
    sub = refusal_subspace(cands, direction, variance=1.0, k_max=2)
    assert sub.k == 2 and abs(abs(float(sub.basis[0] @ direction.unit())) - 1) < 1e-12
    assert refusal_subspace(cands, direction, variance=1e-9, k_max=4).k == 1
    with pytest.raises(UserError, match="width"):
        layer_kernel(3, 1, 0)


def test_projected_direction_is_orthogonal_to_the_harmless_mean_and_gain_probe():
    lm = tiny_gemma(n_layers=3, hidden=64)
    _, _, harmless, direction = artifacts(lm)
    p = projected_direction(direction, harmless)
    assert abs(float(p.vector @ harmless.get(-2, 1).vector)) < 1e-9
    assert (p.layer, p.position) == (direction.layer, direction.position)
    assert abs(embedding_gain(lm.model, direction.vector) - 64 ** 0.5) < 1e-3  # Gemma scales by √d
    assert abs(embedding_gain(family_lm("gpt2").model, direction.vector) - 1.0) < 1e-4


@pytest.mark.parametrize("family", ["gemma-tied", "gpt2"])
def test_export_and_verify_each_weight_form(family, tmp_path):
    from refusal_direction.export import export_edit, load_exported, verify_method_export

    lm = family_lm(family)
    for name, iv in methods(lm).items():
        out = export_edit(lm, iv, tmp_path / name)
        result = verify_method_export(lm, load_exported(out), iv, PROMPTS, max_new_tokens=6)
        assert result["ok"], (family, name, result)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_export_of_a_dequantized_gguf_model_drops_its_quantizer(tmp_path):
    """A GGUF model loads dense but keeps its GGUF quantizer, which save_pretrained cannot serialize (seen on the
    real 0.5B on the GPU: `optimize`'s export failed); the export drops it from the copy, not from the source."""
    from types import SimpleNamespace

    from refusal_direction.export import export_edit, load_exported, verify_method_export

    lm = family_lm("gemma-tied")
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))  # no is_serializable()
    lm.model.hf_quantizer = quantizer
    try:
        iv = methods(lm)["projected"]
        out = export_edit(lm, iv, tmp_path / "gguf-like")
        assert lm.model.hf_quantizer is quantizer  # the source model is left as it was
        assert verify_method_export(lm, load_exported(out), iv, PROMPTS, max_new_tokens=4)["ok"]
    finally:
        lm.model.hf_quantizer = None


def test_every_export_is_staged_the_same_way(tmp_path):
    """One staged export for every method: the directory's mode follows the umask, as a plain DiM export's does
    (a private 0o700 temporary directory must not survive the rename), and one provenance schema."""
    import os
    import stat

    from refusal_direction.export import export_edit, export_model, read_export_info

    lm = family_lm("gemma-tied")
    direction = Direction(torch.randn(lm.d_model, dtype=torch.float64), 1, -1)
    umask = os.umask(0o022)
    try:
        dirs = {"dim": export_model(lm, direction, tmp_path / "dim")}
        dirs |= {name: export_edit(lm, iv, tmp_path / name) for name, iv in methods(lm).items()}
    finally:
        os.umask(umask)
    modes = {name: stat.S_IMODE(d.stat().st_mode) for name, d in dirs.items()}
    assert set(modes.values()) == {0o755}, modes
    keys = {name: tuple(read_export_info(d)) for name, d in dirs.items()}
    assert len(set(keys.values()) - {keys["dim"]}) <= 1, keys  # DiM's adds only its "direction" block
    assert {"method", "edit", "what_changed"} <= set(keys["dim"]) and "direction" in keys["dim"]
    assert read_export_info(dirs["subspace"])["method"] == "subspace"
