"""The fast generation path gives the reference path's tokens.

On CPU in float32 the fast path (one mixed batch, static cache, folded GQA attention, eager decode)
must give exactly the tokens of `generate_hf` (HF generate + hooks, one condition at a time). The CUDA-graph
decode is tested in tests/gpu/test_fast_generation_cuda.py, the benchmark in tests/integration/test_benchmark.py.
"""

import logging

import pytest
import torch

from refusal_direction.accel import fast_generation
from refusal_direction.accel.fast_generation import (
    FastPathUnsupported,
    folded_gqa_attention,
    generate_fast,
    generate_fast_ids,
    prompt_ids,
)
from refusal_direction.bench import IdTokenizer
from refusal_direction.core.decoding import GenerationSettings, generate_hf, greedy_config
from refusal_direction.edits import Baseline, apply_intervention
from tests.helpers.generation_cases import INSTRUCTIONS, conditions
from tests.helpers.tiny import tiny_gemma


@pytest.fixture(scope="module")
def lm():
    return tiny_gemma(n_layers=3, hidden=64, seed=0)


def hf_reference(lm, prompts, intervention, new_tokens, stop):
    """HF generate with hooks on token ids, stopping at ``stop`` (cut after the first stop token)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with apply_intervention(lm, intervention):
        seq = lm.model.generate(input_ids=ids, attention_mask=mask,
                                generation_config=greedy_config(lm, new_tokens, list(stop)))
    out = []
    for row in seq[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop), None)
        out.append(row if end is None else row[:end])
    return out


@pytest.mark.parametrize("stop_at_end_of_turn", [False, True])
def test_fast_path_gives_the_tokens_of_hf_generate_fp32(lm, stop_at_end_of_turn):
    settings = GenerationSettings(max_new_tokens=20, batch_size=4, stop_at_end_of_turn=stop_at_end_of_turn)
    ivs = conditions(lm)
    fast = generate_fast(lm, INSTRUCTIONS, ivs, settings)
    assert set(fast) == {iv.name for iv in ivs}
    for iv in ivs:
        ref = generate_hf(lm, INSTRUCTIONS, iv, settings)
        assert [g.token_ids for g in fast[iv.name]] == [g.token_ids for g in ref], iv.name
        assert [g.stopped for g in fast[iv.name]] == [g.stopped for g in ref]
        assert [g.text for g in fast[iv.name]] == [g.text for g in ref]
    # the conditions really differ, so the per-row switches were applied
    assert [g.token_ids for g in fast["baseline"]] != [g.token_ids for g in fast["ablation"]]


def test_stopping_matches_hf_and_ends_the_loop_early(lm):
    prompts = prompt_ids(lm, INSTRUCTIONS)
    ivs = conditions(lm)[:2]
    free = generate_fast_ids(lm, prompts, ivs, 24, [], force_tokens=True)
    # stop on tokens the model actually produces, so rows end at different steps
    counts = torch.bincount(torch.tensor([t for rows in free.tokens.values() for r in rows for t in r[:12]]))
    stop = counts.topk(3).indices.tolist()
    res = generate_fast_ids(lm, prompts, ivs, 40, stop)
    assert res.stats.decode == "eager"
    for iv in ivs:
        assert res.tokens[iv.name] == hf_reference(lm, prompts, iv, 40, stop), iv.name
    lengths = [len(r) for rows in res.tokens.values() for r in rows]
    assert len(set(lengths)) > 1 and all(res.stopped[n][i] == (res.tokens[n][i][-1] in stop)
                                         for n in res.tokens for i in range(len(prompts)))
    # the host checks every CHECK_EVERY steps whether every row has stopped, and then ends decoding
    every = fast_generation.CHECK_EVERY
    assert res.stats.steps == min(40, -(-max(lengths) // every) * every)


def test_forced_tokens_ignore_stops(lm):
    prompts, ivs = prompt_ids(lm, INSTRUCTIONS[:3]), conditions(lm)[:2]
    free = generate_fast_ids(lm, prompts, ivs, 17, [], force_tokens=True)
    stop = [free.tokens["baseline"][0][3]]  # a token the model does produce (at step 4 of row 0)
    unforced = generate_fast_ids(lm, prompts, ivs, 17, stop)
    assert any(len(r) < 17 for rows in unforced.tokens.values() for r in rows)  # the stop token does stop rows
    assert any(s for v in unforced.stopped.values() for s in v)
    forced = generate_fast_ids(lm, prompts, ivs, 17, stop, force_tokens=True)
    assert all(len(r) == 17 for rows in forced.tokens.values() for r in rows)
    assert not any(s for v in forced.stopped.values() for s in v)
    assert forced.tokens == free.tokens  # forcing only ignores the stops; the tokens are the free run's


def test_split_batches_give_the_same_tokens(lm):
    prompts = prompt_ids(lm, INSTRUCTIONS)
    ivs = conditions(lm)
    whole = generate_fast_ids(lm, prompts, ivs, 16, [1])
    split = generate_fast_ids(lm, prompts, ivs, 16, [1], max_rows=2 * len(ivs))
    assert split.stats.chunks == 3 and whole.stats.chunks == 1
    assert split.tokens == whole.tokens


def test_prompt_sets_in_one_batch_give_each_sets_own_tokens(lm):
    """Three sets with their own prompts and conditions, some conditions shared (the same objects): one decode
    loop, the tokens of each set decoded alone (float32), rows only for the pairs asked for; names that collide
    across sets without being the same object are refused."""
    from refusal_direction.accel.fast_generation import generate_fast_sets
    from refusal_direction.edits import ActivationAddition

    settings = GenerationSettings(max_new_tokens=12, batch_size=4, stop_at_end_of_turn=True)
    base, ablation, add = conditions(lm)
    minus = ActivationAddition(add.direction, layer=1, coeff=-2.0, name="actadd_negative")
    sets = [(INSTRUCTIONS[:3], [base, ablation, minus]), (INSTRUCTIONS[3:], [base, add]),
            (INSTRUCTIONS[1:5], [ablation])]
    calls = []
    real = fast_generation.generate_chunk

    def counted(lm_, rows, *args, **kwargs):
        calls.append(len(rows))
        return real(lm_, rows, *args, **kwargs)

    fast_generation.generate_chunk = counted
    try:
        together = generate_fast_sets(lm, sets, settings)
    finally:
        fast_generation.generate_chunk = real
    assert calls == [3 * 3 + 3 * 2 + 4]  # one batch, one row per (prompt, condition) pair asked for
    for (instructions, ivs), got in zip(sets, together, strict=True):
        alone = generate_fast(lm, instructions, ivs, settings)
        assert set(got) == {iv.name for iv in ivs}
        for iv in ivs:
            assert [g.token_ids for g in got[iv.name]] == [g.token_ids for g in alone[iv.name]], iv.name
            assert [g.stopped for g in got[iv.name]] == [g.stopped for g in alone[iv.name]]
    assert together[0]["baseline"][0].token_ids != together[0]["ablation"][0].token_ids
    other = ActivationAddition(add.direction, layer=0, coeff=1.0)  # named "actadd" like ``add``, another object
    with pytest.raises(ValueError, match="same intervention object"):
        generate_fast_sets(lm, [(INSTRUCTIONS[:2], [add]), (INSTRUCTIONS[2:], [other])], settings)


def test_model_is_left_as_it_was(lm):
    enc = lm.tokenize(INSTRUCTIONS)
    before = lm.model(**enc).logits
    attn = lm.model.config._attn_implementation
    generate_fast(lm, INSTRUCTIONS[:2], conditions(lm), GenerationSettings(max_new_tokens=4))
    assert lm.model.config._attn_implementation == attn
    for site in lm.blocks:
        assert not site.block._forward_pre_hooks and not site.attn_out._forward_hooks
        assert not site.mlp_out._forward_hooks
    assert torch.equal(lm.model(**enc).logits, before)


def test_folded_gqa_attention_matches_sdpa(lm):
    enc = lm.tokenize(INSTRUCTIONS)
    ref = lm.model(**enc).logits
    with folded_gqa_attention(lm.model) as folded:
        out = lm.model(**enc).logits
    assert folded  # tiny Gemma has 4 query heads per KV head
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(out[mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_unsupported_model_falls_back_to_hf(lm, monkeypatch, caplog):
    def refuse(_lm):
        raise FastPathUnsupported("test says no")

    monkeypatch.setattr(fast_generation, "check_supported", refuse)
    settings = GenerationSettings(max_new_tokens=6)
    with caplog.at_level(logging.WARNING, logger="refusal_direction.accel.fast_generation"):
        out = generate_fast(lm, INSTRUCTIONS[:2], [Baseline()], settings)
    assert "test says no" in caplog.text
    assert [g.token_ids for g in out["baseline"]] == [g.token_ids for g in generate_hf(lm, INSTRUCTIONS[:2],
                                                                                       Baseline(), settings)]


def test_duplicate_names_are_rejected(lm):
    with pytest.raises(ValueError, match="unique"):
        generate_fast_ids(lm, [[2, 3]], [Baseline(), Baseline()], 2, [1])


def test_id_tokenizer_round_trip():
    tok = IdTokenizer(pad_token_id=0, bos_token_id=2, eos_token_id=1, special_ids=[107])
    enc = tok(["2 5 6", "7"], padding=True, return_tensors="pt")
    assert enc["input_ids"].tolist() == [[2, 5, 6], [0, 0, 7]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert tok.decode([2, 5, 107, 6], skip_special_tokens=True) == "5 6"
