"""The sweep's own forward pass equals HF's forward with selection's per-row hooks (float32, CPU), for Gemma,
Llama and Qwen2 blocks: plain, per-row ablation, per-row addition, with a key/value prefix, and replayed from
captured block inputs; unsupported blocks are refused with a reason."""

import logging

import pytest
import torch

from refusal_direction.accel.fast_forward import RowInterventions, SweepDecoder
from refusal_direction.core.model import wrap_model
from refusal_direction.edits import per_row_interventions
from refusal_direction.selection.logits import opening_cache
from tests.helpers.sweep_cases import prompt_ids, reference_logits, row_interventions, tiny_arch
from tests.helpers.tiny import tiny_gemma_tokenizer


@pytest.fixture(scope="module", params=["gemma", "llama", "qwen2", "qwen3"])
def lm(request):
    return tiny_arch(request.param)


def _close(a, b):
    return torch.allclose(a, b, atol=2e-5, rtol=1e-4), float((a - b).abs().max())


def test_equals_hf_forward_with_hooks(lm):
    decoder = SweepDecoder.for_model(lm)
    assert decoder is not None
    seqs = prompt_ids(lm)
    dirs, adds, layers = row_interventions(lm, len(seqs))
    with torch.no_grad():
        for rows in (RowInterventions(), RowInterventions(dirs), RowInterventions(None, adds, layers),
                     RowInterventions(dirs, adds, layers)):
            got = decoder.last_logits(seqs, rows)
            want = reference_logits(lm, seqs, rows.dirs, rows.adds, rows.add_layers)
            assert _close(got, want)[0], (rows, _close(got, want))
        # the interventions change the logits (so the equality above is not vacuous)
        assert (decoder.last_logits(seqs, RowInterventions(dirs)) - decoder.last_logits(seqs, RowInterventions())
                ).abs().max() > 1e-2


def test_prefix_rows_and_replay_equal_full_passes(lm):
    decoder = SweepDecoder.for_model(lm)
    seqs = prompt_ids(lm)
    n_open = 4  # "<bos><start_of_turn>user\n"
    assert all(s[:n_open] == seqs[0][:n_open] for s in seqs)
    dirs, adds, layers = row_interventions(lm, len(seqs), seed=1)
    rows = RowInterventions(dirs, adds, layers)
    with torch.no_grad():
        want = reference_logits(lm, seqs, dirs, adds, layers)
        # every row's own opening: prefix row i under intervention i
        prefix = decoder.kv_prefix(seqs[0][:n_open], rows, len(seqs))
        slots = torch.arange(len(seqs))
        got = decoder.last_logits([s[n_open:] for s in seqs], rows, prefix, slots)
        assert _close(got, want)[0], _close(got, want)
        # the prefix's keys and values equal HF's cache of the opening under the same hooks
        with per_row_interventions(lm, dirs, adds, layers):
            cache = opening_cache(lm, seqs[0][:n_open], len(seqs))
        assert len(prefix.keys) == len(prefix.values) == len(cache.layers) == lm.n_layers
        for layer, (keys, values) in enumerate(zip(prefix.keys, prefix.values, strict=True)):
            assert torch.allclose(keys, cache.layers[layer].keys, atol=1e-5), layer
            assert torch.allclose(values, cache.layers[layer].values, atol=1e-5), layer
        # a capture of the baseline, replayed from block `start` with an addition there
        base_prefix = decoder.kv_prefix(seqs[0][:n_open], RowInterventions(), 1)
        zero = torch.zeros(len(seqs), dtype=torch.long)
        logits, resid, last = decoder.capture([s[n_open:] for s in seqs], base_prefix, zero)
        assert _close(logits, reference_logits(lm, seqs))[0]
        prompts, starts = [0, 3, 1, 4, 2], [2, 0, 1, 2, 1]
        vecs = adds[:5]
        add_prefix = decoder.kv_prefix(seqs[0][:n_open], RowInterventions(None, vecs, tuple(starts)), 5)
        got = decoder.replay(resid, last, prompts, starts, vecs, add_prefix, torch.arange(5))
        want = reference_logits(lm, [seqs[p] for p in prompts], None, vecs, tuple(starts))
        assert _close(got, want)[0], _close(got, want)


def test_unsupported_blocks_are_refused_with_a_reason(caplog):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = tiny_gemma_tokenizer()
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                           attn_logit_softcapping=None)).eval()
    caplog.set_level(logging.INFO, logger="refusal_direction.accel.fast_forward")
    assert SweepDecoder.for_model(wrap_model(model, tok, model_id="tiny-gemma2")) is None
    assert "sweep forward unavailable for tiny-gemma2" in caplog.text and "block children" in caplog.text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_unexpanded_grouped_query_attention_equals_the_expanded(arch):
    """``native_gqa`` (SDPA's enable_gqa, chosen on CUDA where flash attention takes it) gives the logits of the
    expanded K/V, with and without the prefix's lower-right causal mask (here on the CPU's own attention kernels)."""
    lm = tiny_arch(arch)
    decoder = SweepDecoder.for_model(lm)
    assert decoder.n_kv < decoder.n_heads and not decoder.native_gqa  # CPU: expanded by default
    seqs = prompt_ids(lm)
    dirs, adds, layers = row_interventions(lm, len(seqs), seed=2)
    rows = RowInterventions(dirs, adds, layers)
    with torch.no_grad():
        want = reference_logits(lm, seqs, dirs, adds, layers)
        prefix = decoder.kv_prefix(seqs[0][:4], rows, len(seqs))
        expanded = decoder.last_logits([s[4:] for s in seqs], rows, prefix, torch.arange(len(seqs)))
        decoder.native_gqa = True
        assert _close(decoder.last_logits(seqs, rows), want)[0]
        native = decoder.last_logits([s[4:] for s in seqs], rows, prefix, torch.arange(len(seqs)))
    assert _close(native, want)[0] and _close(native, expanded)[0], _close(native, expanded)
