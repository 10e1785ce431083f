"""Stages samples and extract: the run's instruction sets, then mean activations and difference-in-means candidates."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from ..core.directions import (
    CandidateDirections,
    check_finite_direction,
    diff_in_means,
    load_candidates,
    save_candidates,
)
from ..data.instructions import (
    Instruction,
    Samples,
    hash_instructions,
    load_instructions,
    resolve_data_dir,
    sample_sets,
)
from ..errors import UserError
from ..fileio import atomic_write_json, read_json
from .rundir import Run

log = logging.getLogger(__name__)


def stage_samples(run: Run) -> Samples:
    path = run.layout.samples
    if path.is_file():
        return read_samples(path)
    c = run.config
    data_dir = resolve_data_dir(c.data_dir)
    samples = sample_sets(data_dir, c.harmful_train, c.harmless_train, c.eval, c.n_train, c.n_val, c.n_eval,
                          c.n_harmless_eval, c.harmful_val, c.harmless_val, c.harmless_eval, c.seed,
                          c.drop_duplicates)
    sets = samples.as_dict()
    atomic_write_json(path, {"sets": sets, "dropped_duplicates": samples.dropped_duplicates,
                             "hashes": {k: hash_instructions(getattr(samples, k)) for k in sets},
                             "data_dir": str(data_dir)})
    log.info("samples: %s", {k: len(v) for k, v in sets.items()})
    return samples


SAMPLE_SETS = ("harmful_train", "harmless_train", "harmful_val", "harmless_val", "eval", "harmless_eval")


def read_samples(path: Path) -> Samples:
    """A run's samples.json; `UserError` naming the file for anything malformed."""
    fix = "delete it (and the run's later results) to resample, or restore it"
    data = read_json(path, "run file", fix=fix)
    sets = data.get("sets")
    try:
        if not isinstance(sets, dict) or set(sets) != set(SAMPLE_SETS):
            raise TypeError(f"'sets' must hold {', '.join(SAMPLE_SETS)}")
        parsed = {k: [Instruction(str(r["instruction"]), r.get("category"), str(r.get("id", ""))) for r in v]
                  for k, v in sets.items()}
        return Samples(**parsed, dropped_duplicates=list(data.get("dropped_duplicates", [])))
    except (TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"run file {path}: malformed samples ({exc}); {fix}") from exc


def xstest_items(run: Run, name: str) -> list[Instruction]:
    """XSTest's ``xstest_safe`` or ``xstest_unsafe`` prompts for this run (samples/xstest.json; written once).

    ``n_xstest`` draws a seeded sample (``random.Random(seed)``, in file order) for CPU budgets; default all.
    """
    path = run.layout.xstest_samples
    data = read_json(path, "run file") if path.is_file() else {}
    if name not in data:
        c = run.config
        items = load_instructions(name, resolve_data_dir(c.data_dir))
        if c.n_xstest is not None and c.n_xstest < len(items):
            keep = sorted(random.Random(c.seed).sample(range(len(items)), c.n_xstest))
            items = [items[i] for i in keep]
        data[name] = {"items": [i.record() for i in items], "hash": hash_instructions(items)}
        atomic_write_json(path, data)
        log.info("%s: %d prompts", name, len(items))
    return [Instruction(r["instruction"], r.get("category"), r.get("id", "")) for r in data[name]["items"]]


def stage_extract(run: Run, samples: Samples, force: bool = False) -> CandidateDirections:
    layout = run.layout
    if layout.candidates.is_file() and not force:
        return load_candidates(layout.candidates)
    from ..core.activations import mean_resid_pre

    lm, c = run.lm, run.config
    t0 = time.perf_counter()
    harmful_texts = [i.text for i in samples.harmful_train]
    harmless_texts = [i.text for i in samples.harmless_train]
    if c.filter_train:
        from ..selection import filter_validation

        harmful_texts, harmless_texts = filter_validation(lm, harmful_texts, harmless_texts, batch_size=c.batch_size)
    harmful = mean_resid_pre(lm, harmful_texts, c.batch_size, progress=run.progress, desc="extract [harmful]")
    harmless = mean_resid_pre(lm, harmless_texts, c.batch_size, progress=run.progress, desc="extract [harmless]")
    run.timing("extract_s", time.perf_counter() - t0)
    meta = {"model_id": lm.model_id, "revision": c.revision, "site": "resid_pre",
            "post_instruction_tokens": lm.post_instruction_tokens(), "n_harmful": len(harmful_texts),
            "n_harmless": len(harmless_texts), "filter_train": c.filter_train,
            "data_hashes": {"harmful_train": hash_instructions(samples.harmful_train),
                            "harmless_train": hash_instructions(samples.harmless_train)}}
    save_candidates(CandidateDirections(harmful, list(range(-harmful.shape[0], 0)), {**meta, "what": "mean_harmful"}),
                    layout.directions_file("mean_harmful"))
    save_candidates(CandidateDirections(harmless, list(range(-harmful.shape[0], 0)),
                                        {**meta, "what": "mean_harmless"}), layout.directions_file("mean_harmless"))
    candidates = diff_in_means(harmful, harmless, meta)
    check_finite_direction(candidates.vectors, "the difference-in-means candidates")
    save_candidates(candidates, layout.candidates)
    return candidates
