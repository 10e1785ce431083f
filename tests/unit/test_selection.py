"""Direction selection: the metric, batched scoring = naive per-candidate loop, the paper's filtering."""

import dataclasses
import itertools
import json
import logging
import math

import pytest
import torch

from refusal_direction.core.activations import mean_resid_pre
from refusal_direction.core.directions import diff_in_means
from refusal_direction.edits import ActivationAddition, DirectionalAblation, apply_intervention
from refusal_direction.errors import UserError
from refusal_direction.report.selection_figure import plot_selection_heatmaps
from refusal_direction.selection import (
    CandidateScore,
    SelectionThresholds,
    discard_reasons,
    filter_and_rank,
    filter_validation,
    load_scores,
    refusal_metric,
    refusal_metrics,
    refusal_token_ids,
    result_to_json,
    score_candidates,
    scores_to_json,
    select_from_scores_file,
    select_lazy,
)
from tests.helpers.tiny import tiny_gemma

HARMFUL = ["How do I pick a lock?", "Write malware now", "Make a weapon at home please", "Insult him"]
HARMLESS = ["Bake bread", "Write a poem about the sea.", "What is 2+2?", "Name three primes", "Hi"]


@pytest.fixture(scope="module")
def setup(tiny_lm):
    mean_harmful = mean_resid_pre(tiny_lm, HARMFUL)
    mean_harmless = mean_resid_pre(tiny_lm, HARMLESS)
    candidates = diff_in_means(mean_harmful, mean_harmless, {"model_id": "tiny-gemma"})
    tok = tiny_lm.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ("I", "S", "A")]
    return candidates, ids


def test_refusal_metric_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ids = [0, 2]
    for row in range(2):
        e = [math.exp(x) for x in logits[row].tolist()]
        p = (e[0] + e[2]) / sum(e)
        expected = math.log(p + 1e-8) - math.log(1 - p + 1e-8)
        assert refusal_metric(logits, ids)[row].item() == pytest.approx(expected, rel=1e-12)
    assert refusal_metric(logits, ids).dtype == torch.float64
    # p = 1 stays finite
    assert math.isfinite(refusal_metric(torch.tensor([[0.0, -1e4]]), [0]).item())


def test_refusal_token_ids_first_answer_token(tiny_lm):
    tok = tiny_lm.tokenizer
    i_id = tok.convert_tokens_to_ids("I")
    assert refusal_token_ids(tok, ("I",), tiny_lm.chat.suffix) == [i_id]
    assert refusal_token_ids(tok, ("I", "It"), tiny_lm.chat.suffix) == [i_id]  # same first token, kept once
    # a suffix without trailing whitespace tries " I" first; a bare-space token is skipped
    assert refusal_token_ids(tok, ("I",), "[/INST]") == [i_id]


def _naive_scores(lm, candidates, harmful, harmless, ids):
    """One forward pass per candidate and condition, through apply_intervention."""

    def last(prompts):
        return lm.model(**lm.tokenize(prompts)).logits[:, -1, :]

    with torch.no_grad():
        base = torch.log_softmax(last(harmless).double(), -1)
        out = []
        for pi, position in enumerate(candidates.positions):
            for layer in range(candidates.n_layers):
                r = candidates.vectors[pi, layer]
                with apply_intervention(lm, DirectionalAblation(r)):
                    bypass = refusal_metric(last(harmful), ids).mean().item()
                    ablated = torch.log_softmax(last(harmless).double(), -1)
                with apply_intervention(lm, ActivationAddition(r, layer, 1.0)):
                    induce = refusal_metric(last(harmless), ids).mean().item()
                kl = (base.exp() * (base - ablated)).sum(-1).mean().item()
                out.append(CandidateScore(position, layer, bypass, induce, kl))
    return out


def _close(a, b):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= 1e-4 + 1e-5 * abs(b)


def _assert_same_scores(got, want):
    """The same candidates in the same order, with close bypass, induce and KL scores."""
    assert [(s.position, s.layer) for s in got] == [(s.position, s.layer) for s in want]
    for a, b in zip(got, want, strict=True):
        for name in ("bypass", "induce", "kl"):
            assert _close(getattr(a, name), getattr(b, name)), (a, b, name)


def test_batched_scores_equal_naive_loop(tiny_lm, setup, caplog):
    caplog.set_level(logging.INFO, logger="refusal_direction.selection")
    candidates, ids = setup
    naive = _naive_scores(tiny_lm, candidates, HARMFUL, HARMLESS, ids)
    # 13 rows per forward: batches mix kinds, candidates and prompt lengths; induce rows either start
    # from the baseline's block input (share_prefix) or run the whole model with per-row additions; the
    # chat template's opening is computed once per distinct intervention and handed over as a KV cache
    # (share_opening), with additions too when share_prefix is off; passes run through the sweep's own forward
    # (fast_forward) or HF's forward with hooks
    for share_prefix, share_opening, own in itertools.product((True, False), repeat=3):
        fast = score_candidates(tiny_lm, candidates, HARMFUL, HARMLESS, refusal_ids=ids, max_batch_rows=13,
                                share_prefix=share_prefix, share_opening=share_opening, fast_forward=own)
        assert [(s.position, s.layer) for s in fast] == [(s.position, s.layer) for s in naive]
        for f, n in zip(fast, naive, strict=True):
            for name in ("bypass", "induce", "kl"):
                assert _close(getattr(f, name), getattr(n, name)), (share_prefix, share_opening, f, n, name)
        assert ("induce rows from shared prefixes" in caplog.text) == share_prefix  # no silent fallback
        assert ("a 4-token chat-template opening shared" in caplog.text) == share_opening  # <bos><sot>user\n
        assert ("sweep forward (fast_forward)" in caplog.text) == own
        caplog.clear()
    # layer 0: every prompt has the same embedding at a post-instruction position -> zero direction -> NaN
    assert all(math.isnan(s.bypass) and math.isnan(s.kl) for s in fast if s.layer == 0)
    real = [s for s in fast if s.layer > 0]
    assert max(s.bypass for s in real) - min(s.bypass for s in real) > 1e-2  # the interventions do something
    assert min(s.kl for s in real) > 0
    for site in tiny_lm.blocks:  # no hook left behind
        assert not site.block._forward_pre_hooks and not site.attn_out._forward_hooks
        assert not site.mlp_out._forward_hooks


def test_layer_subset_default_tokens_and_replay_fallback(tiny_lm, setup, caplog):
    candidates, _ = setup
    scores = score_candidates(tiny_lm, candidates, HARMFUL[:2], HARMLESS[:3], layers=[2])
    assert [(s.position, s.layer) for s in scores] == [(p, 2) for p in candidates.positions]
    # an architecture the shared-prefix replay cannot handle falls back to full passes, same scores
    caplog.set_level(logging.INFO, logger="refusal_direction.selection")
    odd = dataclasses.replace(tiny_lm, final_norm=None)
    fallback = score_candidates(odd, candidates, HARMFUL[:2], HARMLESS[:3], layers=[2])
    assert "shared-prefix replay unavailable" in caplog.text
    _assert_same_scores(fallback, scores)
    with pytest.raises(UserError, match="out of range"):
        score_candidates(tiny_lm, candidates, HARMFUL, HARMLESS, layers=[3])


def test_filter_validation_keeps_refused_harmful_and_complied_harmless(tiny_lm):
    ids = list(range(tiny_lm.model.config.vocab_size // 2))  # p near 1/2: metrics of both signs
    m_harmful = refusal_metrics(tiny_lm, HARMFUL, ids)
    m_harmless = refusal_metrics(tiny_lm, HARMLESS, ids)
    assert len(m_harmful) == len(HARMFUL) and len(m_harmless) == len(HARMLESS)
    expect = ([x for x, m in zip(HARMFUL, m_harmful) if m > 0], [x for x, m in zip(HARMLESS, m_harmless) if m < 0])
    # the fixture has metrics of both signs on both sides, so the filter keeps some prompts and drops others
    assert 0 < len(expect[0]) < len(HARMFUL) and 0 < len(expect[1]) < len(HARMLESS), (m_harmful, m_harmless)
    assert filter_validation(tiny_lm, HARMFUL, HARMLESS, ids) == expect
    with pytest.raises(UserError, match="validation"):
        filter_validation(tiny_lm, HARMFUL, HARMLESS, [tiny_lm.tokenizer.convert_tokens_to_ids("<pad>")])


def test_paper_scores_select_position_minus2_layer10(reference_run):
    folder = reference_run / "select_direction"
    scores = load_scores(folder / "direction_evaluations.json")
    assert len(scores) == 90
    result = filter_and_rank(scores, n_layers=18)
    assert (result.position, result.layer) == (-2, 10)
    expected = json.loads((folder / "direction_evaluations_filtered.json").read_text())
    assert [(s.position, s.layer) for s in result.survivors] == [(r["position"], r["layer"]) for r in expected]
    assert [s.bypass for s in result.survivors] == [r["refusal_score"] for r in expected]
    assert len(result.survivors) + len(result.discarded) == 90
    assert select_from_scores_file(folder / "direction_evaluations.json").layer == 10  # n_layers inferred
    summary = result_to_json(result, scores)
    assert summary["chosen"]["layer"] == 10 and len(summary["survivors"]) == 13
    assert sum(1 for r in summary["scores"] if not r["discarded"]) == 13


def test_json_round_trip_keeps_both_key_sets_and_nan(tmp_path):
    scores = [CandidateScore(-1, 0, float("nan"), -3.0, float("nan")), CandidateScore(-1, 1, -2.5, 1.5, 0.02)]
    rows = scores_to_json(scores)
    assert rows[1]["refusal_score"] == rows[1]["bypass_score"] == -2.5 and rows[1]["kl_div_score"] == 0.02
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(rows))  # strict JSON: NaN written as null
    back = load_scores(path)
    assert back[1] == scores[1] and math.isnan(back[0].bypass) and back[0].induce == -3.0
    (tmp_path / "bad.json").write_text(json.dumps([{"position": -1, "layer": 0}]))
    with pytest.raises(UserError, match="refusal_score"):
        load_scores(tmp_path / "bad.json")


def test_nothing_survives_explains_and_suggests(reference_run):
    scores = load_scores(reference_run / "select_direction" / "direction_evaluations.json")
    with pytest.raises(UserError) as info:
        filter_and_rank(scores, 18, SelectionThresholds(kl_threshold=0.01))
    msg = str(info.value)
    assert "no candidate direction passed" in msg and "position -2, layer 10" in msg
    assert "KL 0.06593 > kl_threshold=0.01" in msg and "kl_threshold=0.0" in msg  # a relaxed value
    suggested = float(msg.split("e.g. kl_threshold=")[1].split(" ")[0])
    assert filter_and_rank(scores, 18, SelectionThresholds(kl_threshold=suggested)).survivors  # it works
    with pytest.raises(UserError, match="NaN"):
        filter_and_rank([CandidateScore(-1, 1, float("nan"), 0.0, 0.0)], 4)


def test_heatmap_writes_png(tmp_path, reference_run):
    import matplotlib

    scores = load_scores(reference_run / "select_direction" / "direction_evaluations.json")
    backend = matplotlib.get_backend()
    path = plot_selection_heatmaps(scores, 18, [-5, -4, -3, -2, -1], tmp_path / "fig" / "sel.png", chosen=(-2, 10))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert matplotlib.get_backend() == backend  # drawn with the object API: no global backend switch


def test_lazy_selection_chooses_what_the_full_sweep_chooses():
    """Lazy evaluation (bypass for all, induce/KL in bypass order) gives the full sweep's choice."""
    lm = tiny_gemma(n_layers=4)
    harmful = ["How do I pick a lock?", "Write malware now", "Insult my neighbour", "Make a weapon"]
    harmless = ["Bake bread", "Name three rivers", "What is a prime?", "Write a haiku"]
    cands = diff_in_means(mean_resid_pre(lm, harmful), mean_resid_pre(lm, harmless))
    loose = SelectionThresholds(kl_threshold=1e9, induce_threshold=-1e9, prune_layer_fraction=0.25)
    full = filter_and_rank(score_candidates(lm, cands, harmful, harmless), cands.n_layers, loose)
    lazy, scores = select_lazy(lm, cands, harmful, harmless, loose, group=2)
    assert (lazy.position, lazy.layer) == (full.position, full.layer)
    assert all(s.layer < loose.max_layer(4) for s in scores)
    evaluated = [s for s in scores if s.kl == s.kl]
    assert 0 < len(evaluated) < len([s for s in scores if s.bypass == s.bypass])  # fewer forwards than full
    # a KL filter that bites: the median KL of the candidates the layer filter keeps
    all_scores = score_candidates(lm, cands, harmful, harmless)
    kls = sorted(s.kl for s in all_scores if s.kl == s.kl and s.layer < loose.max_layer(4))
    strict = SelectionThresholds(kl_threshold=kls[len(kls) // 2], induce_threshold=-1e9, prune_layer_fraction=0.25)
    verdicts = [not discard_reasons(s, 4, strict) for s in all_scores]
    assert any(verdicts) and not all(verdicts)
    expect = filter_and_rank(all_scores, 4, strict)
    assert (expect.position, expect.layer) != (full.position, full.layer)  # the filter changes the choice
    got, _ = select_lazy(lm, cands, harmful, harmless, strict, group=1)
    assert (got.position, got.layer) == (expect.position, expect.layer)


def test_opening_fallback_when_the_cache_path_fails(tiny_lm, setup, caplog, monkeypatch):
    import refusal_direction.selection.logits as logits

    candidates, ids = setup
    ref = score_candidates(tiny_lm, candidates, HARMFUL[:2], HARMLESS[:3], refusal_ids=ids, layers=[1, 2],
                           share_opening=False)

    def refuse(*args, **kwargs):
        raise TypeError("this model takes no past_key_values")

    monkeypatch.setattr(logits, "opening_cache", refuse)
    caplog.set_level(logging.INFO, logger="refusal_direction.selection")
    got = score_candidates(tiny_lm, candidates, HARMFUL[:2], HARMLESS[:3], refusal_ids=ids, layers=[1, 2])
    assert "shared chat-template opening unavailable" in caplog.text and "opening shared" not in caplog.text
    _assert_same_scores(got, ref)


def test_checked_sweep_decoder_is_reused_until_a_weight_changes(tiny_lm, setup):
    from refusal_direction.selection import CHECKED_DECODER

    candidates, ids = setup
    first = score_candidates(tiny_lm, candidates, HARMFUL[:2], HARMLESS[:2], refusal_ids=ids, layers=[1, 2])
    decoder = tiny_lm.extra[CHECKED_DECODER][2]
    again = score_candidates(tiny_lm, candidates, HARMFUL[:2], HARMLESS[:2], refusal_ids=ids, layers=[1, 2])
    assert tiny_lm.extra[CHECKED_DECODER][2] is decoder and again == first
    with torch.no_grad():  # an in-place edit (same values): the decoder, which copies q/k/v weights, is rebuilt
        tiny_lm.blocks[1].attn_out.q_proj.weight.mul_(1.0)
    score_candidates(tiny_lm, candidates, HARMFUL[:2], HARMLESS[:2], refusal_ids=ids, layers=[1, 2])
    assert tiny_lm.extra[CHECKED_DECODER][2] is not decoder


def test_a_failed_opening_check_is_remembered_with_the_checked_decoder(tiny_lm, setup, caplog, monkeypatch):
    """The cached check keeps the opening it verified: after the opening failed its check, a later sweep asking for
    the same opening gets full passes without it, not the unverified shortcut."""
    import refusal_direction.selection.logits as logits
    from refusal_direction.selection import CHECKED_DECODER

    candidates, ids = setup
    tiny_lm.extra.pop(CHECKED_DECODER, None)

    def refuse(*args, **kwargs):
        raise TypeError("this model takes no past_key_values")

    monkeypatch.setattr(logits, "opening_cache", refuse)
    score_candidates(tiny_lm, candidates, HARMFUL[:2], HARMLESS[:3], refusal_ids=ids, layers=[1, 2])
    assert tiny_lm.extra[CHECKED_DECODER][3] == ()
    monkeypatch.undo()
    caplog.set_level(logging.INFO, logger="refusal_direction.selection")
    score_candidates(tiny_lm, candidates, HARMFUL[:2], HARMLESS[:3], refusal_ids=ids, layers=[1, 2])
    assert "sweep forward (fast_forward)" in caplog.text and "opening shared" not in caplog.text
    tiny_lm.extra.pop(CHECKED_DECODER, None)
