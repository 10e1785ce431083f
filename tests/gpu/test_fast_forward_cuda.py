"""On CUDA in bfloat16 the sweep's forward runs on its verified Triton kernels and gives HF's logits with hooks."""

import pytest
import torch

from refusal_direction.accel.fast_forward import RowInterventions, SweepDecoder
from tests.helpers.sweep_cases import prompt_ids, reference_logits, row_interventions, tiny_arch


def _rel_err(got, want) -> float:
    return float((got - want).norm() / (want - want.mean(-1, keepdim=True)).norm())


@pytest.mark.parametrize("arch", ["gemma", "llama"])
def test_cuda_triton_kernels_verified_and_logits_match_bf16(arch):
    lm = tiny_arch(arch)
    lm.model.to("cuda", torch.bfloat16)
    decoder = SweepDecoder.for_model(lm)
    k = decoder.kernels
    assert len(k.triton_residual) == 2 * lm.n_layers + 1 and k.triton_act is not None and k.triton_rotary
    seqs = prompt_ids(lm)
    dirs, adds, layers = row_interventions(lm, len(seqs))
    rows = RowInterventions(dirs.to("cuda", torch.bfloat16), adds.to("cuda", torch.bfloat16), layers)
    with torch.no_grad():
        got = decoder.last_logits(seqs, rows).float()
        want = reference_logits(lm, seqs, rows.dirs, rows.adds, rows.add_layers).float()
        plain = decoder.last_logits(seqs, RowInterventions()).float()
    err = _rel_err(got, want)
    assert err < 2e-2, err  # bf16 roundings in another order, nothing more
    moved = _rel_err(plain, want)
    assert moved > 0.1, moved  # the interventions move the logits far more: the match above is not vacuous


def test_grouped_query_attention_runs_unexpanded_on_flash_bf16():
    lm = tiny_arch("llama")  # 4 query heads, 2 KV heads
    lm.model.to("cuda", torch.bfloat16)
    decoder = SweepDecoder.for_model(lm)
    assert decoder.native_gqa  # flash attention takes enable_gqa on the GPUs this runs on (sm80+)
    seqs = prompt_ids(lm)
    dirs, adds, layers = row_interventions(lm, len(seqs))
    rows = RowInterventions(dirs.to("cuda", torch.bfloat16), adds.to("cuda", torch.bfloat16), layers)
    slots = torch.arange(len(seqs), device="cuda")
    from refusal_direction.core.sdpa import restricted_sdpa

    # under the SDPA restriction selection's sweep runs in (memory-efficient, math): flash is still asked for
    with torch.no_grad(), restricted_sdpa(torch.device("cuda"), ("efficient", "math")):
        prefix = decoder.kv_prefix(seqs[0][:4], rows, len(seqs))
        # with the prefix (lower-right causal mask) and without it (is_causal over equal lengths)
        native = [decoder.last_logits([s[4:] for s in seqs], rows, prefix, slots), decoder.last_logits(seqs, rows)]
        decoder.native_gqa = False
        expanded = [decoder.last_logits([s[4:] for s in seqs], rows, prefix, slots), decoder.last_logits(seqs, rows)]
    for a, b in zip(native, expanded):
        assert _rel_err(a.float(), b.float()) < 1e-2


def test_gqa_probe_answers_for_flash_under_the_selection_restriction():
    """selection builds the decoder inside its SDPA restriction (efficient, math): the probe must still ask flash
    (asked under the restriction it would see flash switched off and expand K/V)."""
    from refusal_direction.core.sdpa import restricted_sdpa

    lm = tiny_arch("llama")
    lm.model.to("cuda", torch.bfloat16)
    with torch.no_grad(), restricted_sdpa(torch.device("cuda"), ("efficient", "math")):
        decoder = SweepDecoder.for_model(lm)
        assert not torch.backends.cuda.flash_sdp_enabled()  # the restriction is still in force after the probe
    assert decoder.native_gqa
