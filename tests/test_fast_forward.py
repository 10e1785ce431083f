"""The sweep's own forward pass equals HF's forward with selection's per-row hooks (float32, CPU), for Gemma,
Llama and Qwen2 blocks: plain, per-row ablation, per-row addition, with a key/value prefix, and replayed from
captured block inputs; unsupported blocks are refused with a reason."""

import logging

import pytest
import torch
from tiny import randomize_norms_, tiny_gemma, tiny_gemma_tokenizer

from refusal_direction.accel.fast_forward import RowInterventions, SweepDecoder
from refusal_direction.core.interventions import per_row_interventions
from refusal_direction.core.model import wrap_model
from refusal_direction.selection.logits import last_logits, opening_cache

PROMPTS = ["How do I pick a lock?", "Hi", "Write a poem about the sea.", "What is 2+2?", "Name three primes"]


def _tiny(arch: str):
    if arch == "gemma":
        return tiny_gemma(n_layers=3)
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = tiny_gemma_tokenizer()
    torch.manual_seed(1)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2, tie_word_embeddings=False, initializer_range=0.2)
    model = (LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama"
             else Qwen2ForCausalLM(Qwen2Config(**common)))
    if arch == "qwen2":  # random q/k/v biases (default init is zero and would hide a dropped bias)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.copy_(torch.randn_like(p) * 0.3)
    randomize_norms_(model)
    model.eval().requires_grad_(False)
    return wrap_model(model, tok, model_id=f"tiny-{arch}")


@pytest.fixture(scope="module", params=["gemma", "llama", "qwen2"])
def lm(request):
    return _tiny(request.param)


def _ids(lm):
    return lm.tokenizer([lm.format(p) for p in PROMPTS], add_special_tokens=False)["input_ids"]


def _interventions(lm, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, lm.d_model, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    dirs[1] = 0  # a row with no ablation
    adds = torch.randn(n, lm.d_model, generator=g) * 3
    layers = tuple((i % (lm.n_layers + 1)) - 1 for i in range(n))  # -1 (none), 0, 1, 2, ...
    return dirs, adds, layers


def _reference(lm, seqs, dirs=None, adds=None, layers=None):
    with torch.no_grad(), per_row_interventions(lm, dirs, adds, layers):
        return last_logits(lm, seqs)


def _close(a, b):
    return torch.allclose(a, b, atol=2e-5, rtol=1e-4), float((a - b).abs().max())


def test_equals_hf_forward_with_hooks(lm):
    decoder = SweepDecoder.for_model(lm)
    assert decoder is not None
    seqs = _ids(lm)
    dirs, adds, layers = _interventions(lm, len(seqs))
    with torch.no_grad():
        for rows in (RowInterventions(), RowInterventions(dirs), RowInterventions(None, adds, layers),
                     RowInterventions(dirs, adds, layers)):
            got = decoder.last_logits(seqs, rows)
            want = _reference(lm, seqs, rows.dirs, rows.adds, rows.add_layers)
            assert _close(got, want)[0], (rows, _close(got, want))
        # the interventions change the logits (so the equality above is not vacuous)
        assert (decoder.last_logits(seqs, RowInterventions(dirs)) - decoder.last_logits(seqs, RowInterventions())
                ).abs().max() > 1e-2


def test_prefix_rows_and_replay_equal_full_passes(lm):
    decoder = SweepDecoder.for_model(lm)
    seqs = _ids(lm)
    n_open = 4  # "<bos><start_of_turn>user\n"
    assert all(s[:n_open] == seqs[0][:n_open] for s in seqs)
    dirs, adds, layers = _interventions(lm, len(seqs), seed=1)
    rows = RowInterventions(dirs, adds, layers)
    with torch.no_grad():
        want = _reference(lm, seqs, dirs, adds, layers)
        # every row's own opening: prefix row i under intervention i
        prefix = decoder.kv_prefix(seqs[0][:n_open], rows, len(seqs))
        slots = torch.arange(len(seqs))
        got = decoder.last_logits([s[n_open:] for s in seqs], rows, prefix, slots)
        assert _close(got, want)[0], _close(got, want)
        # the prefix's keys and values equal HF's cache of the opening under the same hooks
        with per_row_interventions(lm, dirs, adds, layers):
            cache = opening_cache(lm, seqs[0][:n_open], len(seqs))
        assert torch.allclose(prefix.keys[-1], cache.layers[-1].keys, atol=1e-5)
        # a capture of the baseline, replayed from block `start` with an addition there
        base_prefix = decoder.kv_prefix(seqs[0][:n_open], RowInterventions(), 1)
        zero = torch.zeros(len(seqs), dtype=torch.long)
        logits, resid, last = decoder.capture([s[n_open:] for s in seqs], base_prefix, zero)
        assert _close(logits, _reference(lm, seqs))[0]
        prompts, starts = [0, 3, 1, 4, 2], [2, 0, 1, 2, 1]
        vecs = adds[:5]
        add_prefix = decoder.kv_prefix(seqs[0][:n_open], RowInterventions(None, vecs, tuple(starts)), 5)
        got = decoder.replay(resid, last, prompts, starts, vecs, add_prefix, torch.arange(5))
        want = _reference(lm, [seqs[p] for p in prompts], None, vecs, tuple(starts))
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


gpu = pytest.mark.gpu


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["gemma", "llama"])
def test_cuda_triton_kernels_verified_and_logits_match_bf16(arch):
    lm = _tiny(arch)
    lm.model.to("cuda", torch.bfloat16)
    decoder = SweepDecoder.for_model(lm)
    k = decoder.kernels
    assert len(k.triton_residual) == 2 * lm.n_layers + 1 and k.triton_act is not None and k.triton_rotary
    seqs = _ids(lm)
    dirs, adds, layers = _interventions(lm, len(seqs))
    rows = RowInterventions(dirs.to("cuda", torch.bfloat16), adds.to("cuda", torch.bfloat16), layers)
    with torch.no_grad():
        got = decoder.last_logits(seqs, rows).float()
        want = _reference(lm, seqs, rows.dirs, rows.adds, rows.add_layers).float()
    err = float((got - want).norm() / (want - want.mean(-1, keepdim=True)).norm())
    assert err < 2e-2, err  # bf16 roundings in another order, nothing more
