"""A model dispatched by accelerate (CPU + disk offload) gives the unsplit model's outputs at every stage."""

import json

import pytest
import torch

from refusal_direction.core.activations import mean_resid_pre
from refusal_direction.core.decoding import GenerationSettings, generate_hf
from refusal_direction.core.directions import Direction
from refusal_direction.core.model import load_model
from refusal_direction.core.placement import DeviceCopies, parse_device_map, parse_max_memory, placement_note
from refusal_direction.edits import (
    ActivationAddition,
    Baseline,
    DirectionalAblation,
    apply_intervention,
    per_row_interventions,
)
from refusal_direction.errors import UserError
from refusal_direction.evaluation.capability import next_token_kl
from refusal_direction.export import export_model
from refusal_direction.generation import choose_backend
from tests.helpers.tiny import tiny_gemma_hf

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi", "List three colours."]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tok = tiny_gemma_hf(n_layers=4, tie=True)
    src = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(src, max_shard_size="40KB")
    tok.save_pretrained(src)
    return src


@pytest.fixture(scope="module")
def whole(saved):
    return load_model(str(saved), device="cpu")


@pytest.fixture(scope="module")
def split(saved, tmp_path_factory):
    """Blocks 1 and 2 on disk (offload folder), the rest on CPU: accelerate streams them in per forward."""
    folder = tmp_path_factory.mktemp("offload")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    path = folder / "device_map.json"
    path.write_text(json.dumps(device_map))
    return load_model(str(saved), device="cpu", device_map=str(path), offload_folder=str(folder / "weights"))


@pytest.fixture(scope="module")
def direction(whole):
    g = torch.Generator().manual_seed(5)
    return Direction(torch.randn(whole.d_model, generator=g, dtype=torch.float64), layer=2, position=-2,
                     model_id=whole.model_id)


def test_split_model_is_dispatched_and_says_so(split, whole):
    assert "disk" in split.placement and "cpu" in split.placement
    assert whole.placement == ""
    assert split.device == torch.device("cpu")
    assert any(p.device.type == "meta" for p in split.model.parameters())  # offloaded blocks hold no weights
    assert choose_backend(split, "fast") == "hf" and choose_backend(split, "auto") == "hf"


def test_extraction_identical(split, whole):
    a = mean_resid_pre(whole, PROMPTS, batch_size=2)
    b = mean_resid_pre(split, PROMPTS, batch_size=2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["baseline", "ablation", "actadd"])
def test_generation_identical(split, whole, direction, kind):
    iv = {"baseline": Baseline(), "ablation": DirectionalAblation(direction.vector),
          "actadd": ActivationAddition(direction.vector, layer=2, coeff=-1.0)}[kind]
    settings = GenerationSettings(max_new_tokens=12, batch_size=2)
    a = generate_hf(whole, PROMPTS, iv, settings)
    b = generate_hf(split, PROMPTS, iv, settings)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_capability_and_per_row_hooks_identical(split, whole, direction):
    iv = DirectionalAblation(direction.vector)
    assert next_token_kl(whole, PROMPTS, iv)["per_prompt"] == next_token_kl(split, PROMPTS, iv)["per_prompt"]
    dirs = torch.zeros(len(PROMPTS), whole.d_model)
    dirs[::2] = (direction.vector / direction.vector.norm()).float()
    out = []
    for lm in (whole, split):
        enc = lm.tokenize(PROMPTS)
        with torch.no_grad(), per_row_interventions(lm, ablate_dirs=dirs):
            out.append(lm.model(**enc).logits)
    assert torch.equal(out[0], out[1])


def test_hooks_removed_after_context_on_split_model(split, direction):
    enc = split.tokenize(PROMPTS)
    with torch.no_grad():
        before = split.model(**enc).logits
        with apply_intervention(split, DirectionalAblation(direction.vector)):
            split.model(**enc)
        assert torch.equal(split.model(**enc).logits, before)


def test_sweep_forward_refuses_split_model(split):
    from refusal_direction.accel import SweepDecoder

    assert SweepDecoder.for_model(split) is None


def test_export_of_split_model_streams_and_equals_in_memory(split, whole, direction, tmp_path):
    from tests.unit.test_streaming_export import tensors

    a = tensors(export_model(whole, direction, tmp_path / "memory"))
    b = tensors(export_model(split, direction, tmp_path / "split"))  # dispatched: streamed from the shards
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_map_with_max_memory_offloads(saved, whole, tmp_path):
    lm = load_model(str(saved), device="cpu", device_map="auto", max_memory="cpu=60KB",
                    offload_folder=str(tmp_path / "w"))
    assert "disk" in lm.placement
    assert torch.equal(mean_resid_pre(lm, PROMPTS[:2]), mean_resid_pre(whole, PROMPTS[:2]))


def test_parsing_and_errors(tmp_path):
    assert parse_max_memory("0=60GiB, cpu=200GiB") == {0: "60GiB", "cpu": "200GiB"}
    for bad in ("60GiB", "gpu=1GiB", "0=lots", ""):
        with pytest.raises(UserError, match="max_memory"):
            parse_max_memory(bad)
    assert parse_device_map("balanced") == "balanced"
    with pytest.raises(UserError, match="neither"):
        parse_device_map("everywhere")
    (tmp_path / "m.json").write_text('{"model.layers.0": "gpu7"}')
    with pytest.raises(UserError, match="gpu7"):
        parse_device_map(str(tmp_path / "m.json"))
    with pytest.raises(UserError, match="--device-map"):
        load_model("unused", device="cpu", max_memory="cpu=1GiB")


def test_device_copies_and_placement_note():
    t = torch.ones(3)
    copies = DeviceCopies(t)
    assert copies.on(torch.device("cpu")) is t
    assert copies.on(torch.device("meta")).device.type == "meta"
    model = torch.nn.Linear(2, 2)
    assert placement_note(model) == ""
    model.hf_device_map = {"": 0}
    assert placement_note(model) == ""
    model.hf_device_map = {"a": 0, "b": "cpu"}
    assert placement_note(model) == "dispatched by accelerate over cpu (1 modules), cuda:0 (1 modules)"


def test_config_keys(tmp_path):
    from refusal_direction.config import build_config
    from refusal_direction.errors import UserErrors

    c = build_config({"device_map": "auto", "max_memory": "0=60GiB,cpu=200GiB", "layer": 1, "position": -1})
    assert c.fingerprint() == build_config({"layer": 1, "position": -1}).fingerprint()
    with pytest.raises(UserErrors, match="device_map"):
        build_config({"device_map": "nowhere.json"})
    with pytest.raises(UserErrors, match="max_memory needs device_map"):
        build_config({"max_memory": "cpu=1GiB"})
