"""The shortcut checks' bound: 5 % per row, or in bf16/fp16 twice HF's own one-at-a-time vs batch difference."""

import logging
import types

import pytest
import torch

from refusal_direction.selection import logits as L
from refusal_direction.selection import passes
from tests.helpers.tiny import tiny_gemma

G = torch.Generator().manual_seed(0)
REF = torch.randn(8, 50, generator=G)


def _off_by(error: float, rows=None, seed: int = 1) -> torch.Tensor:
    """REF with the given rows (default: all) moved by exactly ``error`` relative to each row's spread."""
    out = REF.clone()
    bump = torch.randn(REF.shape, generator=torch.Generator().manual_seed(seed))
    for r in range(len(REF)) if rows is None else rows:
        spread = (REF[r] - REF[r].mean()).norm()
        out[r] = REF[r] + bump[r] * (error * spread / bump[r].norm())
    return out


def _lm(dtype=torch.bfloat16, rotary=True):
    decoder = types.SimpleNamespace(rotary_emb=torch.nn.Identity() if rotary else None)
    return types.SimpleNamespace(dtype=dtype, model_id="fake", model=types.SimpleNamespace(get_decoder=lambda: decoder))


def test_relative_error_is_per_row():
    assert L.relative_error(_off_by(0.08), REF) == pytest.approx(0.08, rel=1e-4)
    one_row = _off_by(0.5, rows=[3])  # one row 50 % off among 8 counts in full
    assert L.relative_error(one_row, REF) == pytest.approx(0.5, rel=1e-4)
    spreads = (REF - REF.mean(-1, keepdim=True)).norm(dim=-1)
    diluted = 0.5 * float(spreads[3] / spreads.norm())  # ~0.5 / sqrt(8): what one norm over the batch would see
    assert L.relative_error(one_row, REF, per_row=False) == pytest.approx(diluted, rel=1e-4) and diluted < 0.25


@pytest.mark.parametrize(("noise", "passes_at"), [(0.01, False), (0.05, True), (0.2, True)])
def test_bf16_bound_is_twice_the_forward_noise(noise, passes_at, caplog):
    """A shortcut 8 % off: refused at 5 %, accepted where HF's forward differs from itself by 5 % (bound 10 %)
    or 20 % (bound 25 %, the cap)."""
    caplog.set_level(logging.INFO, logger="refusal_direction.selection")
    assert L.reproduces_logits(_lm(), "shortcut", lambda: _off_by(0.08), REF, lambda: _off_by(noise, seed=2)) \
        == passes_at
    bound = min(max(0.05, 2 * noise), 0.25)
    assert f"differ from one batch by {noise:.3g} (largest row); the shortcut check allows {bound:.3g}" in caplog.text


def test_the_bound_never_lets_one_wrong_row_through():
    noisy = lambda: _off_by(0.3, seed=2)  # noqa: E731 - HF's forward as noisy as it gets: the 25 % cap
    assert not L.reproduces_logits(_lm(), "shortcut", lambda: _off_by(0.5, rows=[5]), REF, noisy)
    assert not L.reproduces_logits(_lm(), "shortcut", lambda: REF * float("nan"), REF, noisy)
    inf_noise = lambda: REF + float("inf")  # noqa: E731 - overflowing noise gives the fixed bound, not the cap
    assert not L.reproduces_logits(_lm(), "shortcut", lambda: _off_by(0.08), REF, inf_noise)


@pytest.mark.parametrize("lm", [_lm(torch.float32), _lm(rotary=False)], ids=["float32", "absolute-positions"])
def test_no_noise_allowance_in_float32_or_without_rotary_positions(lm):
    def never():
        raise AssertionError("the one-at-a-time passes are not run here")
    assert not L.reproduces_logits(lm, "shortcut", lambda: _off_by(0.08), REF, never)
    assert L.reproduces_logits(lm, "shortcut", lambda: _off_by(0.04), REF, never)


def test_one_at_a_time_runs_only_when_the_shortcut_misses_five_percent():
    calls = []
    assert L.reproduces_logits(_lm(), "shortcut", lambda: _off_by(0.04), REF, lambda: calls.append(1))
    assert calls == []


def test_bf16_sweep_runs_its_own_forward_and_still_refuses_a_planted_bug(monkeypatch, caplog):
    """A real bf16 model on CPU: the own forward passes its checks; own-forward logits 10 % too large on the
    addition rows (a bug in half the rows) are refused, measured per row against full passes."""
    from refusal_direction.bench import sweep_inputs
    from refusal_direction.selection import score_candidates

    lm = tiny_gemma(n_layers=3)
    lm.model.to(torch.bfloat16)
    candidates, harmful, harmless, ids = sweep_inputs(lm, 4, 0)
    caplog.set_level(logging.DEBUG, logger="refusal_direction.selection")
    score_candidates(lm, candidates, harmful, harmless, refusal_ids=ids)
    assert "sweep forward (fast_forward)" in caplog.text
    caplog.clear()
    lm.extra.clear()
    rows = passes.FastPasses.rows

    def addition_rows_off(self, seqs, cands, induce):
        out = rows(self, seqs, cands, induce)
        scale = torch.tensor([1.1 if i else 1.0 for i in induce], dtype=out.dtype, device=out.device)
        return out * scale[:, None]
    monkeypatch.setattr(passes.FastPasses, "rows", addition_rows_off)
    score_candidates(lm, candidates, harmful, harmless, refusal_ids=ids)
    assert "sweep forward does not reproduce" in caplog.text
    assert "HF forward with per-row hooks" in caplog.text
