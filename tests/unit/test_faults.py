"""Faults: CUDA out-of-memory backs off and says so; NaN activations stop with layer and batch named.
(A whole replicate under forced out-of-memory: tests/integration/test_oom_backoff.py.)"""

import logging

import pytest
import torch

from refusal_direction.core.activations import NonFiniteActivations, mean_resid_pre
from refusal_direction.core.batching import run_batched
from tests.helpers.prompts import PROMPTS


def test_run_batched_halves_on_oom_and_keeps_order(caplog):
    sizes = []

    def fn(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in batch]

    with caplog.at_level(logging.WARNING):
        out = run_batched(fn, list(range(7)), batch_size=8, desc="test")
    assert out == [x * 10 for x in range(7)]
    assert sizes[:3] == [7, 4, 2] and max(sizes[3:]) <= 2
    assert "out of memory; retrying with batch size 4" in caplog.text


def test_other_errors_are_not_swallowed():
    def fn(batch):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batched(fn, [1, 2, 3], batch_size=2)


def test_nan_activations_name_layer_and_batch(tiny_lm):
    def poison(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = x.clone()
        x[..., 0] = float("nan")
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handle = tiny_lm.blocks[2].block.register_forward_pre_hook(poison, with_kwargs=True)
    try:
        with pytest.raises(NonFiniteActivations, match=r"layer 2, batch 0"):
            mean_resid_pre(tiny_lm, PROMPTS, batch_size=3)
    finally:
        handle.remove()


def test_force_never_deletes_a_manifest_entry_outside_the_run_directory(tmp_path):
    """An edited or damaged run/manifest naming ../victim.txt, an absolute path or a link that leads out: `--force`
    (`outdir.clear_outputs`) deletes the run's own files only."""
    from refusal_direction.fileio import MANIFEST, manifest_entries
    from refusal_direction.run.outdir import clear_outputs

    run = tmp_path / "run"
    (run / "run").mkdir(parents=True)
    victim, absolute = tmp_path / "victim.txt", tmp_path / "elsewhere.txt"
    for p in (victim, absolute, run / "config.json", run / "summary.json"):
        p.write_text("keep" if p.parent == tmp_path else "{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text("keep")
    (run / "link").symlink_to(outside)
    (run / MANIFEST).write_text("config.json\nsummary.json\n../victim.txt\n" + f"{absolute}\nlink/data.txt\n")
    assert manifest_entries(run) == {"config.json", "summary.json"}
    clear_outputs(run)
    assert victim.read_text() == "keep" and absolute.read_text() == "keep" and (outside / "data.txt").is_file()
    assert not (run / "summary.json").exists() and not (run / "config.json").exists()


def test_local_paths_are_stored_resolved(tmp_path, monkeypatch):
    """A relative --model (or direction file, chat template, safety model) that names a local path is stored
    absolute: `export`/`verify-export` run from another folder open the same model, not whatever that relative path
    names there. A Hub id is kept as it is."""
    from refusal_direction.config import build_config

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "tmpl.jinja").write_text("{{ messages }}")
    monkeypatch.chdir(tmp_path)
    c = build_config({"model": "models/tiny", "chat_template": "tmpl.jinja", "safety_model": "meta-llama/Guard"})
    assert c.model == str(tmp_path / "models" / "tiny") and c.chat_template == str(tmp_path / "tmpl.jinja")
    assert c.safety_model == "meta-llama/Guard"
    assert build_config({"model": "google/gemma-2b-it"}).model == "google/gemma-2b-it"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert build_config({}, base=c.to_dict()).model == c.model  # reopened from another folder: the same path
