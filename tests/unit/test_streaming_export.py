"""Streaming export (shard by shard, no model in memory) equals the in-memory export, tensor for tensor."""

import json

import pytest
import torch
from safetensors import safe_open

from refusal_direction.core.directions import Direction
from refusal_direction.core.model import wrap_model
from refusal_direction.errors import UserError
from refusal_direction.export import export_model, load_exported
from refusal_direction.export.stream import INDEX, export_streaming, residual_roles
from tests.helpers.tiny import tiny_gemma_hf

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi"]


def tensors(directory):
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def logits(model, lm, prompts=PROMPTS):
    enc = lm.tokenize(prompts)
    with torch.no_grad():
        return model(**enc).logits


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def sharded(request, tmp_path_factory):
    """A tiny Gemma saved in several shards, its LoadedModel and a direction."""
    model, tok = tiny_gemma_hf(n_layers=3, tie=request.param)
    src = tmp_path_factory.mktemp("src")
    model.save_pretrained(src, max_shard_size="40KB")
    tok.save_pretrained(src)
    lm = wrap_model(model, tok, model_id=str(src))
    g = torch.Generator().manual_seed(3)
    direction = Direction(torch.randn(lm.d_model, generator=g, dtype=torch.float64), layer=1, position=-2,
                          model_id=str(src))
    return src, lm, direction


def test_source_really_has_several_shards(sharded):
    src, _, _ = sharded
    assert (src / INDEX).is_file() and len(list(src.glob("*.safetensors"))) >= 3


def test_streaming_equals_in_memory_export(sharded, tmp_path):
    src, lm, direction = sharded
    memory = export_model(lm, direction, tmp_path / "memory")
    stream = export_streaming(str(src), direction, tmp_path / "stream")
    a, b = tensors(memory), tensors(stream)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert (a[name].double() - b[name].double()).abs().max() <= 1e-6, name
    assert json.loads((stream / "config.json").read_text())["tie_word_embeddings"] is False
    assert (stream / "tokenizer.json").is_file() and (stream / "README.md").is_file()
    ma, mb = load_exported(memory), load_exported(stream)
    assert torch.equal(logits(ma, lm), logits(mb, lm))


def test_streaming_edits_what_the_in_memory_edit_edits(sharded, tmp_path):
    src, lm, direction = sharded
    stream = export_streaming(str(src), direction, tmp_path / "stream")
    info = json.loads((stream / "refusal_direction_export.json").read_text())
    before = tensors(src)
    after = tensors(stream)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(info["edited_parameters"])
    assert len(changed) == 1 + 2 * lm.n_layers  # embedding + o_proj + down_proj per block
    r = direction.vector / direction.vector.norm()
    for k in changed:  # r̂ is gone from the residual side of every edited tensor
        w = after[k].double()
        proj = (w @ r) if "embed" in k else (r @ w)
        assert proj.abs().max() < 1e-5, k
    if lm.model.config.tie_word_embeddings:
        assert torch.equal(after["lm_head.weight"], before["model.embed_tokens.weight"])
        index = json.loads((stream / INDEX).read_text())
        assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]


def test_roles_come_from_a_weightless_model(sharded):
    from transformers import AutoConfig

    src, lm, _ = sharded
    roles = residual_roles(AutoConfig.from_pretrained(str(src)))
    assert roles.embedding == "model.embed_tokens.weight"
    assert roles.columns == tuple(f"model.layers.{i}.{m}.weight" for i in range(lm.n_layers)
                                  for m in ("self_attn.o_proj", "mlp.down_proj"))
    assert (roles.tied_head == "lm_head.weight") == bool(lm.model.config.tie_word_embeddings)


def test_streaming_refuses_gguf_and_weightless_dirs(tmp_path, sharded):
    _, _, direction = sharded
    with pytest.raises(UserError, match="GGUF"):
        export_streaming(str(tmp_path / "m.gguf"), direction, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="safetensors"):
        export_streaming(str(tmp_path / "empty"), direction, tmp_path / "out2")
