"""The shortcut checks' tolerance: 5 % in float32, twice HF's own bf16 noise (capped) in 16-bit dtypes."""

import logging
import types

import pytest
import torch

from refusal_direction.selection import logits as L
from refusal_direction.selection import passes
from tests.helpers.tiny import tiny_gemma

SEQS = [[0], [1], [2], [3]]


def _fake_last_logits(noise: float):
    """last_logits as HF's forward would give it if one prompt at a time differed from the batch by ``noise``."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(len(SEQS), 50, generator=g)
    delta = torch.randn(ref.shape, generator=g)
    delta *= noise * (ref - ref.mean(-1, keepdim=True)).norm() / delta.norm()

    def fake(lm, seqs, *args):
        rows = [s[0] for s in seqs]
        return (ref if len(rows) > 1 else ref + delta)[rows]
    return fake


@pytest.mark.parametrize(("noise", "expected"), [(0.01, 0.05), (0.066, 0.132), (0.2, 0.25)])
def test_bf16_tolerance_is_twice_the_forward_noise_within_bounds(monkeypatch, noise, expected):
    monkeypatch.setattr(L, "last_logits", _fake_last_logits(noise))
    lm = types.SimpleNamespace(dtype=torch.bfloat16, model_id="fake")
    assert L.check_tolerance(lm, SEQS) == pytest.approx(expected, rel=1e-4)


def test_float32_keeps_five_percent_without_extra_passes(monkeypatch):
    def no_pass(*args):
        raise AssertionError("no forward pass is needed in float32")
    monkeypatch.setattr(L, "last_logits", no_pass)
    assert L.check_tolerance(types.SimpleNamespace(dtype=torch.float32, model_id="fake"), SEQS) == L.CHECK_TOLERANCE


def test_reproduces_logits_honours_the_tolerance_and_refuses_nan(caplog):
    caplog.set_level(logging.INFO, logger="refusal_direction.selection")
    lm = types.SimpleNamespace(model_id="fake")
    ref = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    centred = (ref - ref.mean(-1, keepdim=True)).norm()
    bump = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    got = ref + bump * (0.08 * centred / bump.norm())  # 8 % off
    assert L.relative_error(got, ref) == pytest.approx(0.08, rel=1e-4)
    assert not L.reproduces_logits(lm, "shortcut", lambda: got, ref)
    assert "relative error 0.08 > 0.05" in caplog.text
    assert L.reproduces_logits(lm, "shortcut", lambda: got, ref, tolerance=0.132)
    assert not L.reproduces_logits(lm, "shortcut", lambda: ref * 0.5, ref, tolerance=L.MAX_TOLERANCE)  # halved
    assert not L.reproduces_logits(lm, "shortcut", lambda: got * float("nan"), ref, tolerance=L.MAX_TOLERANCE)


def test_bf16_sweep_runs_its_own_forward_and_still_refuses_a_planted_bug(monkeypatch, caplog):
    """A real bf16 model on CPU: the measured noise is small, the own forward passes its checks; halved logits from
    the own forward are refused even so."""
    from refusal_direction.bench import sweep_inputs
    from refusal_direction.selection import score_candidates

    lm = tiny_gemma(n_layers=3)
    lm.model.to(torch.bfloat16)
    candidates, harmful, harmless, ids = sweep_inputs(lm, 4, 0)
    caplog.set_level(logging.DEBUG, logger="refusal_direction.selection")
    score_candidates(lm, candidates, harmful, harmless, refusal_ids=ids)
    assert "own forward in bfloat16: one prompt at a time vs one batch differ by" in caplog.text
    assert "sweep forward (fast_forward)" in caplog.text
    caplog.clear()
    lm.extra.clear()
    rows = passes.FastPasses.rows
    monkeypatch.setattr(passes.FastPasses, "rows", lambda self, *a: rows(self, *a) * 0.5)
    score_candidates(lm, candidates, harmful, harmless, refusal_ids=ids)
    assert "sweep forward does not reproduce" in caplog.text
    assert "HF forward with per-row hooks" in caplog.text
