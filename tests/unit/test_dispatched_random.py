"""Random bench models built empty and filled on the devices of an accelerate device map (`bench.dispatched`): the
same weights wherever the map puts them, placed where it says, refused with the fix where it cannot be built."""

import pytest
import torch

from refusal_direction.bench.dispatched import device_of, random_dispatched_model
from refusal_direction.errors import UserError

ALL_CPU = {"": "cpu"}
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
         "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _logits(lm):
    ids = torch.tensor([[2, 3, 40, 41, 42, 4, 5, 3, 7, 5]])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def test_the_same_weights_wherever_the_map_puts_them(tmp_path):
    whole = random_dispatched_model("tiny", ALL_CPU, dtype="float32", seed=3)
    split = random_dispatched_model("tiny", SPLIT, dtype="float32", offload_folder=tmp_path, seed=3)
    assert whole.placement == "" and split.placement.startswith("dispatched by accelerate over cpu")
    assert torch.equal(_logits(whole), _logits(split))
    other = random_dispatched_model("tiny", ALL_CPU, dtype="float32", seed=4)
    assert not torch.equal(_logits(whole), _logits(other))  # the seed matters: the equality is not vacuous
    w = whole.model.model.layers[0].self_attn.q_proj.weight
    assert 0.015 < float(w.std()) < 0.025  # the model class's own initialisation (initializer_range 0.02)
    assert torch.equal(whole.model.model.norm.weight, torch.zeros_like(whole.model.model.norm.weight))  # Gemma: 1 + w
    assert whole.model.lm_head.weight.data_ptr() == whole.model.model.embed_tokens.weight.data_ptr()  # tied


def test_strategies_and_refusals(tmp_path):
    lm = random_dispatched_model("tiny", "sequential", max_memory={"cpu": "1GiB"}, dtype="float32")
    assert set(lm.model.hf_device_map.values()) == {"cpu"}
    with pytest.raises(UserError, match="pass offload_folder"):
        random_dispatched_model("tiny", SPLIT, dtype="float32")
    with pytest.raises(UserError, match="device_map='everywhere'"):
        random_dispatched_model("tiny", "everywhere", dtype="float32")
    with pytest.raises(UserError, match="unknown model shape 'huge'"):
        random_dispatched_model("huge")
    with pytest.raises(UserError, match="places no module holding model.layers.5.mlp"):
        device_of({"model.layers.0": 0}, "model.layers.5.mlp.up_proj.weight")
    assert device_of({"model.layers.1": "disk", "": 0}, "model.layers.1.mlp.up_proj.weight") == "disk"
    assert device_of({"model.layers.1": "disk", "": 0}, "model.layers.10.mlp.up_proj.weight") == 0


def test_a_tied_embedding_split_from_its_unembedding_is_refused(tmp_path):
    split_tied = {**SPLIT, "lm_head": "disk"}
    with pytest.raises(UserError, match="tied model.embed_tokens on 'cpu' and lm_head on 'disk'"):
        random_dispatched_model("tiny", split_tied, dtype="float32", offload_folder=tmp_path)


def test_a_shape_too_big_for_the_gpu_is_refused_with_the_command(monkeypatch):
    from refusal_direction.bench.synthetic import SHAPES, build_model, check_fits

    meta = build_model("llama", SHAPES["llama-3-70b-shape"].config, torch.bfloat16, "meta")
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (139 * gib, 141 * gib))  # an H200, empty
    says = r"needs 131\.4 GiB .* 139\.0 GiB free .*benchmarks/multi_gpu\.py --model llama-3-70b"
    with pytest.raises(UserError, match=says):
        check_fits("llama-3-70b-shape", meta, torch.device("cuda", 0))
    small = build_model("llama", SHAPES["llama-3-8b-shape"].config, torch.bfloat16, "meta")
    check_fits("llama-3-8b-shape", small, torch.device("cuda", 0))  # 15 GiB: fits
    check_fits("llama-3-70b-shape", meta, torch.device("cpu"))  # no check off the GPU
