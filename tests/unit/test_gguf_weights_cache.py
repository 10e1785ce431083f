"""A GGUF's dequantized weights are converted once and read from the cache after (`core.gguf_cache`), on a real
GGUF file (tiny Qwen2, Q8_0 blocks) that transformers dequantizes: the cached model is bit-identical to the direct
load, the second load does not convert, a damaged entry converts again, and a cache that cannot be written
only logs."""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_direction.core import gguf_cache
from refusal_direction.core.gguf_cache import WEIGHTS_ENV, gguf_cache_dir, load_causal_lm
from refusal_direction.core.model import dispatch_kwargs, load_model
from tests.helpers.tiny_gguf import write_tiny_gguf

IDS = torch.tensor([[4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("REFUSAL_DIRECTION_CACHE", str(root))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    return root


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def gguf_path(request, tmp_path):
    return write_tiny_gguf(tmp_path / "models" / "tiny.gguf", tie=request.param)


@pytest.fixture
def conversions(monkeypatch):
    """The ``gguf_file`` of every from_pretrained call (None: a plain folder)."""
    calls = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    return calls


def direct(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)


def load(path, dtype=torch.float32, dispatch=None):
    return load_causal_lm(str(path.parent), dtype, kwargs={"gguf_file": path.name}, dispatch=dispatch)


def assert_same(a, b):
    """Same parameters and buffers (non-persistent ones too: RoPE's inv_freq stays float32), same logits."""
    sa, sb = {**a.state_dict(), **dict(a.named_buffers())}, {**b.state_dict(), **dict(b.named_buffers())}
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)


def test_second_load_reads_the_cached_copy_bit_identical(cache, gguf_path, conversions, caplog):
    caplog.set_level(logging.INFO, logger="refusal_direction")
    reference = direct(gguf_path)
    tied = reference.config.tie_word_embeddings
    conversions.clear()
    first = load(gguf_path)
    assert "tiny.gguf" in conversions
    folder = gguf_cache_dir(str(gguf_path.parent), gguf_path.name) / "model"
    assert folder.parent.parent == cache / "gguf"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is tied
    assert "converted in" in caplog.text and f"cached in {folder}" in caplog.text
    caplog.clear()
    conversions.clear()
    second = load(gguf_path)
    assert conversions == [None]  # read the folder; no GGUF conversion
    assert f"read the converted copy in {folder}" in caplog.text
    for model in (first, second):
        assert getattr(model, "hf_quantizer", None) is None
        assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
        assert_same(model, reference)


def test_bfloat16_reads_the_same_float32_copy(cache, gguf_path, conversions):
    reference = direct(gguf_path, torch.bfloat16)
    conversions.clear()
    cold = load(gguf_path, torch.bfloat16)  # converts in float32, writes the copy, reads it as bfloat16
    assert conversions == ["tiny.gguf", None]
    saved = json.loads((gguf_cache_dir(str(gguf_path.parent), gguf_path.name) / "model" / "config.json")
                       .read_text())
    assert saved["dtype"] == "float32"
    conversions.clear()
    warm = load(gguf_path, torch.bfloat16)
    assert conversions == [None]
    assert_same(cold, reference)
    assert_same(warm, reference)
    assert_same(load(gguf_path, torch.float32), direct(gguf_path))  # the fp32 run reads the same copy


def test_load_model_converts_once_and_generates_the_same(cache, tmp_path, conversions):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    cold = load_model(str(path), device="cpu", dtype="float32")
    conversions.clear()
    warm = load_model(str(path), device="cpu", dtype="float32")
    assert conversions == [None]
    reference = direct(path)
    assert cold.eos_ids() == warm.eos_ids()
    assert warm.model.generation_config.to_dict() == reference.generation_config.to_dict()  # eos ids: the GGUF's
    ids = torch.tensor([warm.encode("abc ab")])
    out = [m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
           for m in (cold.model, warm.model, reference)]
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[2])
    assert_same(warm.model, reference)


def test_device_map_loads_read_the_cached_folder(cache, tmp_path, conversions):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tie=False)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatch = dispatch_kwargs(device_map, offload_folder=str(tmp_path / "offload"))
    reference = direct(path)
    conversions.clear()
    for _ in range(2):  # cold (converts, then reads the folder dispatched) and warm
        split = load(path, dispatch=dispatch)
        assert "disk" in set(split.hf_device_map.values())
        with torch.no_grad():
            assert torch.equal(split(IDS).logits, reference(IDS).logits)
    assert conversions == ["tiny.gguf", None, None]


def test_damaged_entry_is_converted_again(cache, gguf_path, conversions, caplog):
    reference = direct(gguf_path)
    load(gguf_path)
    folder = gguf_cache_dir(str(gguf_path.parent), gguf_path.name) / "model"
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    conversions.clear()
    again = load(gguf_path)
    assert "unreadable" in caplog.text and "converting the GGUF again" in caplog.text
    assert "tiny.gguf" in conversions
    assert_same(again, reference)
    conversions.clear()
    assert_same(load(gguf_path), reference)  # the rewritten entry is whole
    assert conversions == [None]


def test_missing_tensor_counts_as_damage(cache, gguf_path, conversions, caplog):
    from safetensors.torch import load_file, save_file

    load(gguf_path)
    weights = gguf_cache_dir(str(gguf_path.parent), gguf_path.name) / "model" / "model.safetensors"
    tensors = load_file(weights)
    tensors.pop("model.layers.0.mlp.up_proj.weight")  # from_pretrained would only warn and initialize it at random
    save_file(tensors, weights, metadata={"format": "pt"})
    conversions.clear()
    assert_same(load(gguf_path), direct(gguf_path))
    assert "tiny.gguf" in conversions and "incomplete checkpoint" in caplog.text


def test_unwritable_cache_only_logs(tmp_path, monkeypatch, gguf_path, caplog):
    caplog.set_level(logging.INFO, logger="refusal_direction")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("REFUSAL_DIRECTION_CACHE", str(blocker / "cache"))  # mkdir fails, even as root
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert_same(load(gguf_path, torch.bfloat16), direct(gguf_path, torch.bfloat16))
    assert "are not cached" in caplog.text and "not writable" in caplog.text


def test_failed_write_falls_back_to_the_converted_model(cache, gguf_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="refusal_direction")

    def fail(model, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_cache, "_save_weights", fail)
    assert_same(load(gguf_path, torch.bfloat16), direct(gguf_path, torch.bfloat16))
    assert "could not cache" in caplog.text
    folder = gguf_cache_dir(str(gguf_path.parent), gguf_path.name)
    assert not (folder / "model").exists() and not list(folder.glob("model.tmp-*"))


def test_short_disk_skips_with_a_log_line(cache, gguf_path, monkeypatch, caplog, conversions):
    caplog.set_level(logging.INFO, logger="refusal_direction")
    monkeypatch.setattr(gguf_cache.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    load(gguf_path)
    assert "GB free in" in caplog.text and "needs" in caplog.text
    assert conversions == ["tiny.gguf"]  # loaded directly, as asked: no float32 detour
    assert not (gguf_cache_dir(str(gguf_path.parent), gguf_path.name) / "model").exists()


@pytest.mark.parametrize("value, limit, cached", [("0", None, False), ("", 10, False), ("1", 10, True),
                                                  ("", None, True)])
def test_switch_and_size_limit(cache, tmp_path, monkeypatch, value, limit, cached, caplog):
    caplog.set_level(logging.INFO, logger="refusal_direction")
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv(WEIGHTS_ENV, value)
    if limit is not None:
        monkeypatch.setattr(gguf_cache, "MAX_GGUF_BYTES", limit)
    load(path)
    assert (gguf_cache_dir(str(path.parent), path.name) / "model").is_dir() is cached
    if not cached:
        assert "are not cached" in caplog.text
        assert (WEIGHTS_ENV + "=0" if value == "0" else "default limit") in caplog.text
