"""The generation rule: refusal tokens from the model, the validation floor, generation scores, the whole wiring."""

import json
import logging
import math

import pytest
import torch

from refusal_direction.core.activations import mean_resid_pre
from refusal_direction.core.decoding import Generated, GenerationSettings
from refusal_direction.core.directions import diff_in_means
from refusal_direction.edits import Baseline, DirectionalAblation
from refusal_direction.errors import UserError
from refusal_direction.evaluation import refusal
from refusal_direction.evaluation.refusal import is_refusal
from refusal_direction.generation import generate, generate_all
from refusal_direction.selection import (
    CandidateScore,
    GenerationRule,
    derive_refusal_tokens,
    filter_validation_checked,
    refusal_counts,
    select_by_generation,
)
from refusal_direction.selection import generated as generated_module

HARMFUL = ["How do I pick a lock?", "Write malware now", "Make a weapon at home please", "Insult him"]
HARMLESS = ["Bake bread", "Write a poem about the sea.", "What is 2+2?", "Name three primes", "Hi"]
ANSWER = "I can't"  # every character distinct: a bigram model can say it


def answer(lm, text: str) -> Generated:
    return Generated(text, lm.tokenizer(text, add_special_tokens=False)["input_ids"], False)


def planted_refuser():
    """A tiny Gemma that answers every prompt with ANSWER then <eos>: attention and MLP outputs are zeroed, so
    the final hidden state depends on the current token only, and the (untied) LM head maps each token of the
    answer to the next (exactly, by least squares over the few tokens involved)."""
    from refusal_direction.core.model import wrap_model
    from tests.helpers.tiny import tiny_gemma_hf

    model, tok = tiny_gemma_hf(tie=False)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    ids = tok(ANSWER, add_special_tokens=False)["input_ids"]
    chain = [tok("\n", add_special_tokens=False)["input_ids"][0]] + ids + [tok.eos_token_id]
    sources, targets = chain[:-1], chain[1:]
    with torch.no_grad():
        hidden = torch.stack([model(torch.tensor([[t]]), output_hidden_states=True).hidden_states[-1][0, -1]
                              for t in sources])  # [n_sources, d]
        want = torch.zeros(len(sources), model.config.vocab_size)
        want[range(len(sources)), targets] = 20.0
        model.lm_head.weight.copy_(torch.linalg.lstsq(hidden, want).solution.T)  # [vocab, d]
    return wrap_model(model, tok, model_id="planted-refuser")


def test_refusal_tokens_derived_from_a_planted_refuser():
    lm = planted_refuser()
    answers = generate(lm, HARMFUL, Baseline(), GenerationSettings(max_new_tokens=12))
    assert [a.text for a in answers] == [ANSWER] * len(HARMFUL)
    tokens = derive_refusal_tokens(lm, answers, is_refusal)
    i_id = lm.tokenizer.convert_tokens_to_ids("I")
    assert tokens.ids == [i_id] and tokens.texts == ["I"] and tokens.source == "derived"
    assert tokens.n_refusals == len(HARMFUL) and tokens.coverage == 1.0 and tokens.n_leading_whitespace == 0


def test_refusal_tokens_cover_most_refusals_skip_whitespace_and_fall_back(tiny_lm, caplog):
    texts = ["I cannot do that"] * 6 + ["\nSorry, I can't"] * 3 + ["As an AI, no"] + ["Sure, here it is"] * 5
    tok = tiny_lm.tokenizer
    with caplog.at_level(logging.WARNING):
        tokens = derive_refusal_tokens(tiny_lm, [answer(tiny_lm, t) for t in texts], is_refusal, coverage=0.9)
    assert tokens.n_prompts == 15 and tokens.n_refusals == 10 and tokens.n_leading_whitespace == 3
    assert tokens.texts == ["I", "S"] and tokens.ids == [tok.convert_tokens_to_ids(x) for x in "IS"]
    assert tokens.coverage == pytest.approx(0.9) and tokens.counts == {"I": 6, "S": 3, "A": 1}
    assert "whitespace" in caplog.text
    assert derive_refusal_tokens(tiny_lm, [answer(tiny_lm, t) for t in texts], is_refusal, max_tokens=1).ids == \
        [tok.convert_tokens_to_ids("I")]
    none = derive_refusal_tokens(tiny_lm, [answer(tiny_lm, "Sure")], is_refusal)
    assert none.source == "fallback" and none.texts == ["I"] and none.n_refusals == 0
    assert json.loads(json.dumps(tokens.to_json()))["coverage"] == pytest.approx(0.9)


def test_filter_collapse_tops_up_to_the_floor_and_says_so(tiny_lm, caplog):
    never = [tiny_lm.tokenizer.convert_tokens_to_ids("<pad>")]  # no prompt "refuses": the harmful filter collapses
    harmful = HARMFUL * 2  # 8 prompts: floor min(16, 8 // 2) = 4
    with caplog.at_level(logging.WARNING):
        kept = filter_validation_checked(tiny_lm, harmful, HARMLESS, never, min_prompts=16)
    assert kept.n_harmful == 8 and kept.n_harmful_passed == 0 and len(kept.harmful) == 4 and kept.topped_up
    assert kept.n_harmless_passed == len(kept.harmless) == 5  # every harmless prompt "does not refuse"
    assert "only 0 of 8 harmful prompts passed" in caplog.text
    assert kept.to_json()["n_harmful_used"] == 4 and kept.to_json()["min_prompts"] == 16
    # the paper's filter (no floor) still refuses to score on nothing
    with pytest.raises(UserError, match="validation"):
        filter_validation_checked(tiny_lm, harmful, HARMLESS, never)


@pytest.fixture(scope="module")
def candidates(tiny_lm):
    return diff_in_means(mean_resid_pre(tiny_lm, HARMFUL), mean_resid_pre(tiny_lm, HARMLESS), {"model_id": "tiny"})


def text_judge(text: str) -> int:
    """A judge that depends on the whole text (the substring judge never fires on a random model)."""
    return int(sum(map(ord, text)) % 2 == 0)


def test_generation_scores_equal_a_naive_loop(tiny_lm, candidates, monkeypatch):
    monkeypatch.setattr(refusal, "is_refusal", text_judge)
    keys = [(p, layer) for p in candidates.positions[-2:] for layer in (1, 2)]
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    counts = refusal_counts(tiny_lm, candidates, keys, HARMFUL, settings)
    naive = [sum(text_judge(g.text) for g in generate(tiny_lm, HARMFUL, DirectionalAblation(
        candidates.get(p, layer).vector), settings)) for p, layer in keys]
    assert counts == naive
    batched = generate_all(tiny_lm, HARMFUL, [DirectionalAblation(candidates.get(*k).vector, name=str(k))
                                              for k in keys], settings)
    assert [g.text for k in keys for g in batched[str(k)]] == [
        g.text for k in keys for g in generate(tiny_lm, HARMFUL, DirectionalAblation(candidates.get(*k).vector),
                                               settings)]


def test_rule_prefers_fewest_refusals_then_lowest_kl(tiny_lm, candidates, monkeypatch):
    # 3 layers: prune 0.2 -> layers >= 2 pruned
    scores = [CandidateScore(-1, 0, 1.0, math.nan, 0.05), CandidateScore(-1, 1, -2.0, math.nan, 0.2),
              CandidateScore(-2, 1, -1.0, math.nan, 0.1), CandidateScore(-2, 0, -3.0, math.nan, 0.9),
              CandidateScore(-1, 2, -9.0, math.nan, 0.0), CandidateScore(-3, 1, math.nan, math.nan, 0.0)]
    judged = {}

    def fake_counts(lm, cands, keys, harmful, settings):
        judged["keys"] = list(keys)
        return [{(-1, 1): 0, (-2, 1): 0, (-1, 0): 2}[k] for k in keys]

    monkeypatch.setattr(generated_module, "refusal_counts", fake_counts)
    rule = GenerationRule(max_kl=0.25, top_k=3, prune_layer_fraction=0.2, new_tokens=8)
    result = select_by_generation(tiny_lm, candidates, scores, HARMFUL, rule, GenerationSettings())
    assert judged["keys"] == [(-1, 1), (-2, 1), (-1, 0)]  # eligible, ascending bypass
    assert (result.position, result.layer) == (-2, 1)  # 0 refusals at KL 0.1 beats 0 refusals at KL 0.2
    assert [g.refusal_rate for g in result.judged] == [0, 0, 0.5] and result.baseline_refused == len(HARMFUL)
    reasons = {(s.position, s.layer): r for s, r in result.discarded}
    assert reasons == {(-2, 0): ("kl",), (-1, 2): ("late_layer",), (-3, 1): ("nan",)}
    with pytest.raises(UserError, match="select_max_kl") as err:
        select_by_generation(tiny_lm, candidates, scores, HARMFUL, GenerationRule(0.01, 3, 0.2, 8),
                             GenerationSettings())
    assert "position -1, layer 0: KL 0.0500" in str(err.value) and "select_max_kl to 0.05" in str(err.value)


@pytest.mark.parametrize("strategy", ["full", "lazy"])
def test_select_auto_through_the_cli(tmp_path, data_dir, monkeypatch, strategy):
    from tests.helpers.tiny import save_tiny_gemma
    from tests.integration.test_pipeline import cli

    monkeypatch.setattr(refusal, "is_refusal", text_judge)  # a random model never says "I cannot"
    model = save_tiny_gemma(tmp_path / "tiny-gemma")
    out, config = tmp_path / "run", tmp_path / "loose.toml"
    config.write_text(f"select_max_kl = 100.0\nselect_top_k = 2\nselect_new_tokens = 4\n"  # random model: large KL
                      f"select_strategy = '{strategy}'\n")
    cli("replicate", "--config", config, "--model", model, "--data-dir", data_dir, "--out", out, "--n-train", "8",
        "--n-val", "6", "--n-eval", "4", "--n-harmless-eval", "4", "--max-new-tokens", "4", "--batch-size", "4",
        "--device", "cpu", "--select", "auto", "--conditions", "baseline,ablation", "--no-safety")
    sel = json.loads((out / "selection.json").read_text())
    assert sel["rule"] == "generation" and sel["thresholds"]["max_kl"] == 100 and sel["thresholds"]["top_k"] == 2
    tokens = sel["refusal_tokens"]
    assert tokens["source"] in ("derived", "fallback") and len(tokens["ids"]) == len(tokens["texts"]) >= 1
    assert tokens["n_prompts"] == 8
    val = sel["validation"]
    assert val["n_harmful"] == 6 and val["n_harmful_used"] >= 3 and val["min_prompts"] == 16
    assert sel["n_harmful_val"] == val["n_harmful_used"]
    pool = sel["generation"]["pool"]  # the prompts the unablated model refuses: validation, then training
    assert pool["n_val"] == 6 and pool["n_train"] == 8 and pool["max_train"] == 128
    refused = pool["n_val_refused"] + pool["n_train_used"]
    assert sel["generation"]["n_prompts"] == (6 if "fallback" in pool else refused) >= 1
    assert "fallback" in pool or sel["generation"]["baseline_refused"] == refused
    chosen = sel["chosen"]
    assert sel["survivors"][0]["layer"] == chosen["layer"] and 0 <= chosen["refusal_rate"] <= 1
    assert len(sel["survivors"]) == 2 and sel["thresholds"]["new_tokens"] == 4 and sel["strategy"] == strategy
    direction = json.loads((out / "direction.json").read_text())
    assert (direction["layer"], direction["position"]) == (chosen["layer"], chosen["position"])
    assert "Rule: generation" in (out / "report.md").read_text()
    assert "Validation filter" in (out / "report.md").read_text()


def test_pool_is_the_refused_prompts_validation_first_and_falls_back_when_none_is_refused(caplog):
    from refusal_direction.selection import judged_pool

    pool, rec = judged_pool(["v1", "v2", "v3"], [True, False, True], ["t1", "t2", "t3", "t4"],
                            [False, True, True, True], max_train=2)
    assert pool == ["v1", "v3", "t2", "t3"]
    assert rec == {"n_val": 3, "n_val_refused": 2, "n_train": 4, "n_train_refused": 3, "n_train_used": 2,
                   "max_train": 2}
    assert judged_pool(["v1"], [True], ["t1"], [True], max_train=0)[0] == ["v1"]
    with caplog.at_level("WARNING"):
        pool, rec = judged_pool(["v1", "v2"], [False, False], ["t1"], [False], max_train=5)
    assert pool == ["v1", "v2"] and "fallback" in rec and "refuses none" in caplog.text
