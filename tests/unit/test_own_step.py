"""The fast path's own decode step (`accel.own_step`) gives HF's step's tokens and logits.

CPU, float32, PyTorch kernels (the Triton kernels under the interpreter: tests/gpu/test_triton_interpret.py).
Rows of one batch run baseline, directional ablation and activation addition on left-padded prompts of different
lengths, for Gemma (tied embedding, GELU, (1 + w) norms), Llama (GQA) and Qwen2 (q/k/v biases) blocks."""

import logging

import pytest
import torch

from refusal_direction.accel.fast_forward import BUILT_DECODER
from refusal_direction.accel.fast_generation import generate_fast, generate_fast_ids, prompt_ids
from refusal_direction.accel.own_step import decoder_for, row_interventions
from refusal_direction.core.decoding import GenerationSettings
from refusal_direction.edits import ActivationAddition, Baseline, DirectionalAblation, SubspaceAblation
from tests.helpers.generation_cases import INSTRUCTIONS, conditions
from tests.helpers.sweep_cases import tiny_arch
from tests.helpers.tiny import tiny_family_lm


@pytest.fixture(scope="module", params=["gemma", "llama", "qwen2", "qwen3"])
def lm(request):
    return tiny_arch(request.param)


def _tokens(lm, conds, step, n=24, **kw):
    res = generate_fast_ids(lm, prompt_ids(lm, INSTRUCTIONS), conds, n, [], force_tokens=True, step=step, **kw)
    return res.tokens, res.stats


def test_own_step_gives_hf_steps_tokens(lm):
    conds = conditions(lm)
    want, _ = _tokens(lm, conds, "hf")
    got, stats = _tokens(lm, conds, "own")
    assert "own decode step with SDPA" in stats.notes, stats.notes
    assert got == want
    # not vacuous: each intervention changes the tokens, so each row's own form was applied
    assert want["ablation"] != want["baseline"] and want["actadd"] != want["baseline"]


def test_own_step_logits_match_hf_step(lm, monkeypatch):
    """Every decode step's logits within float32 rounding of HF's (tokens alone could hide small errors)."""
    from refusal_direction.accel import static_decode

    seen: dict[str, list] = {"hf": [], "own": []}
    real = static_decode._Decoder.forward

    def recording(self):
        logits = real(self)
        seen["own" if self.own is not None else "hf"].append(logits.clone())
        return logits

    monkeypatch.setattr(static_decode._Decoder, "forward", recording)
    conds = conditions(lm)
    for name in ("hf", "own"):
        _, stats = _tokens(lm, conds, name, n=8)
        assert (name == "own") == ("own decode step with SDPA" in stats.notes), stats.notes
    # 7 decode steps; on the own step the first is the check (both steps, outside `forward`)
    assert len(seen["hf"]) == 7 and len(seen["own"]) == 6
    scale = max(float(t.abs().max()) for t in seen["hf"])
    worst = max(float((a - b).abs().max()) for a, b in zip(seen["hf"][1:], seen["own"]))
    assert worst < 1e-5 * scale, (worst, scale)


def test_own_step_stops_like_hf_generate(monkeypatch):
    from refusal_direction.accel import static_decode

    kept = []
    real = static_decode._check_own_step

    def spy(dec, notes):
        made = real(dec, notes)
        kept.append(dec.own is not None)
        return made

    monkeypatch.setattr(static_decode, "_check_own_step", spy)
    lm = tiny_arch("gemma")
    settings = GenerationSettings(max_new_tokens=20, stop_at_end_of_turn=True)
    ivs = conditions(lm)
    want = generate_fast(lm, INSTRUCTIONS, ivs, settings)
    got = generate_fast(lm, INSTRUCTIONS, ivs, settings, step="own")
    for iv in ivs:
        assert [g.token_ids for g in got[iv.name]] == [g.token_ids for g in want[iv.name]]
        assert [g.stopped for g in got[iv.name]] == [g.stopped for g in want[iv.name]]
    assert kept == [True]  # the own step decoded the second call's batch
    assert any(g.stopped for iv in ivs for g in got[iv.name])  # and some rows did stop early


def test_other_interventions_keep_hf_step_with_the_reason():
    lm = tiny_arch("llama")
    r = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3))
    q = torch.linalg.qr(torch.randn(lm.d_model, 2, generator=torch.Generator().manual_seed(4)))[0].T
    conds = [Baseline(), DirectionalAblation(r), SubspaceAblation(q.contiguous())]
    want, _ = _tokens(lm, conds, "hf", n=10)
    got, stats = _tokens(lm, conds, "own", n=10)
    assert got == want
    assert any("own decode step unavailable" in n and "'subspace'" in n for n in stats.notes), stats.notes


def test_unrecognised_blocks_keep_hf_step(caplog):
    lm = tiny_family_lm("gpt2")
    conds = conditions(lm)
    with caplog.at_level(logging.INFO):
        got, stats = _tokens(lm, conds, "own", n=6)
    want, _ = _tokens(lm, conds, "hf", n=6)
    assert got == want
    assert any("not a standard pre-norm decoder" in n for n in stats.notes), stats.notes
    assert "sweep forward unavailable for gpt2" in caplog.text


def test_models_with_hooks_of_their_own_keep_hf_step():
    lm = tiny_arch("qwen2")
    conds = conditions(lm)
    seen = []
    handle = lm.blocks[1].block.mlp.register_forward_hook(lambda m, a, out: seen.append(1))
    try:
        got, stats = _tokens(lm, conds, "own", n=5)
    finally:
        handle.remove()
    assert any("own decode step unavailable (the model's own hooks on mlp)" in n for n in stats.notes), stats.notes
    assert len(seen) == 5  # the prefill and every decode step ran the hooked module
    want, _ = _tokens(lm, conds, "hf", n=5)
    assert got == want


def test_bad_step_is_refused():
    lm = tiny_arch("gemma")
    with pytest.raises(ValueError, match="step='fused'.*hf, own"):
        _tokens(lm, [Baseline()], "fused", n=2)


def test_row_interventions_follow_the_hooks_forms():
    lm = tiny_arch("qwen2")
    r = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(5)) * 7
    conds = [Baseline(), DirectionalAblation(r), ActivationAddition(r, layer=2, coeff=-1.5)]
    rows = row_interventions(lm, conds, torch.tensor([2, 0, 1, 1]))
    assert torch.equal(rows.dirs[0], torch.zeros(lm.d_model)) and torch.equal(rows.dirs[1], rows.dirs[0])
    torch.testing.assert_close(rows.dirs[2], r / r.norm())
    assert rows.add_layers == (2, -1, -1, -1)
    torch.testing.assert_close(rows.adds[0], -1.5 * r)
    assert rows.added_at(1) is None and torch.equal(rows.added_at(2)[1:], torch.zeros(3, lm.d_model))
    with pytest.raises(ValueError, match="layer=9 out of range"):
        row_interventions(lm, [ActivationAddition(r, layer=9)], torch.tensor([0]))


def test_decoder_is_kept_until_a_weight_changes():
    lm = tiny_arch("gemma")
    first = decoder_for(lm, fuse=True)
    assert decoder_for(lm, fuse=True) is first and lm.extra[BUILT_DECODER][2] is first
    with torch.no_grad():
        lm.model.get_decoder().layers[0].mlp.down_proj.weight.mul_(1.5)
    assert decoder_for(lm, fuse=True) is not first


def test_a_wrong_own_step_is_caught_on_the_first_step(monkeypatch):
    """Each batch's first decode step runs on both steps: an own step whose logits differ is dropped for HF's."""
    from refusal_direction.accel.own_step import OwnStep

    lm = tiny_arch("llama")
    conds = conditions(lm)
    want, _ = _tokens(lm, conds, "hf", n=10)
    real = OwnStep.__call__
    monkeypatch.setattr(OwnStep, "__call__", lambda self: real(self) * 0.5)  # a planted bug: halved logits
    got, stats = _tokens(lm, conds, "own", n=10)
    assert got == want  # HF's step decoded the batch, from the checked step on
    assert any(n.startswith("own decode step unavailable (first step") for n in stats.notes), stats.notes
    assert not any(n.startswith("own decode step with") for n in stats.notes)


def test_pipeline_generation_takes_the_configured_step(caplog):
    """`generation.generate_all` hands ``settings.step`` to the fast path (a run's settings carry
    `RunConfig.decode_step`, whose default is the own step), and the fast path's log line says which step decoded."""
    from refusal_direction.config import RunConfig
    from refusal_direction.generation import generate_all

    assert RunConfig().decode_step == "own"
    lm = tiny_arch("llama")
    settings = GenerationSettings(max_new_tokens=6)
    logged = {}
    for step in ("own", "hf"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="refusal_direction.accel.fast_generation"):
            generate_all(lm, INSTRUCTIONS[:2], [Baseline()], settings.replace(backend="fast", step=step))
        logged[step] = " ".join(r.getMessage() for r in caplog.records if "fast generation:" in r.getMessage())
    assert "own decode step with SDPA" in logged["own"], logged
    assert logged["hf"] and "own decode step" not in logged["hf"], logged
