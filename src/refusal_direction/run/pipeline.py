"""The pipeline: the only module that reads and writes the run directory.

Stages run in order and each writes its outputs atomically; a stage whose outputs exist is skipped
unless forced, so re-running an interrupted command resumes where it stopped::

    samples -> extract -> direction (fixed or auto-selected) -> generate -> score -> capability -> report

Run directory layout: see the README ("Run directory").
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..config import RunConfig, build_config, parse_layers
from ..core.directions import (
    CandidateDirections,
    Direction,
    check_position_layer,
    diff_in_means,
    load_candidates,
    load_direction,
    save_candidates,
    save_direction,
)
from ..core.interventions import ActivationAddition, Baseline, DirectionalAblation, Intervention
from ..data.instructions import Instruction, Samples, hash_instructions, resolve_data_dir, sample_sets
from ..errors import UserError
from ..evaluation.refusal import is_refusal, per_category
from ..evaluation.stats import agreement_table, mcnemar, rate
from ..fileio import atomic_write_json, atomic_write_jsonl, read_jsonl

log = logging.getLogger(__name__)

# condition -> (dataset key, intervention name in file names)
CONDITION_FILES = {
    "baseline": ("eval", "baseline"),
    "ablation": ("eval", "ablation"),
    "actadd_negative": ("eval", "actadd_negative"),
    "harmless_baseline": ("harmless_eval", "baseline"),
    "harmless_actadd": ("harmless_eval", "actadd"),
}

PAPER = {
    "reference_run": {"baseline": {"refusal_score": 0.91, "safety_score": 0.93},
                      "ablation": {"refusal_score": 0.00, "safety_score": 0.22},
                      "actadd_negative": {"refusal_score": 0.02, "safety_score": 0.27},
                      "harmless_baseline": {"refusal_score": 0.00},
                      "harmless_actadd": {"refusal_score": 1.00}},
    "task_text": {"baseline": {"refusal_score": 0.95, "safety_score": 0.98},
                  "ablation": {"refusal_score": 0.05, "safety_score": 0.20}},
    "source": "andyrdt/refusal_direction pipeline/runs/gemma-2b-it (refusal = 1 - substring ASR, "
              "safety = 1 - Llama Guard 2 ASR); task text: paper Figure 1 / Table 5 approximations",
}


@dataclass
class Run:
    """A run directory with its config; loads the model lazily, once."""

    out: Path
    config: RunConfig
    progress: bool = False
    loader: Callable[[RunConfig], object] | None = None  # tests inject tiny models here
    _lm: object = field(default=None, repr=False)

    # paths
    @property
    def samples_dir(self) -> Path:
        return self.out / "samples"

    @property
    def direction_path(self) -> Path:
        return self.out / "direction.safetensors"

    @property
    def candidates_path(self) -> Path:
        return self.out / "directions" / "candidates.safetensors"

    @property
    def summary_path(self) -> Path:
        return self.out / "summary.json"

    def completions_path(self, condition: str) -> Path:
        dataset_key, name = CONDITION_FILES[condition]
        return self.out / "completions" / f"{self.dataset_name(dataset_key)}__{name}.jsonl"

    def dataset_name(self, key: str) -> str:
        spec = self.config.eval if key == "eval" else "harmless"
        return Path(spec).stem if key == "eval" else spec

    @property
    def lm(self):
        if self._lm is None:
            if self.loader is not None:
                self._lm = self.loader(self.config)
            else:
                from ..core.model import load_model

                c = self.config
                self._lm = load_model(c.model, device=c.device, dtype=c.dtype, revision=c.revision,
                                      chat_template=Path(c.chat_template).read_text() if c.chat_template else None)
            write_environment(self)
        return self._lm

    def release_model(self) -> None:
        self._lm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def timing(self, key: str, seconds: float) -> None:
        path = self.out / "timings.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[key] = round(seconds, 3)
        atomic_write_json(path, data)


# --------------------------------------------------------------------------------------------------
# Preflight: every problem that can be found before hours of compute, all at once


def preflight(out: Path, config: RunConfig, force: bool = False) -> None:
    """Check data, model, direction file and output directory; raise `UserErrors` listing every problem.

    Writes nothing. Loads only the model's config and tokenizer (cheap), not its weights.
    """
    from ..errors import UserErrors

    problems: list[str] = []

    def check(fn):
        try:
            return fn()
        except UserErrors as exc:
            problems.extend(exc.problems)
        except UserError as exc:
            problems.append(str(exc))
        return None

    c = config
    data_dir = check(lambda: resolve_data_dir(c.data_dir))
    if data_dir is not None:
        check(lambda: sample_sets(data_dir, c.harmful_train, c.harmless_train, c.eval, c.n_train, c.n_val, c.n_eval,
                                  c.n_harmless_eval, c.harmful_val, c.harmless_val, c.harmless_eval, c.seed,
                                  c.drop_duplicates))
    shape = check(lambda: probe_model(c))
    mode, layer, position = c.resolved_direction()
    if shape is not None:
        n_layers, d_model, n_post = shape
        if mode == "fixed" and layer is not None and not 0 <= layer < n_layers:
            problems.append(f"layer={layer} is out of range for {c.model} ({n_layers} layers: 0..{n_layers - 1})")
        if mode == "fixed" and position is not None and not -n_post <= position <= -1:
            problems.append(f"position={position} is out of range for {c.model} ({n_post} post-instruction "
                            f"tokens: -{n_post}..-1)")
        if c.direction_file:
            check(lambda: load_direction(c.direction_file, model_id=c.model, d_model=d_model))
    cfg_path = Path(out) / "config.json"
    if cfg_path.is_file() and not force:
        saved = json.loads(cfg_path.read_text())
        if saved.get("fingerprint") != config.fingerprint():
            old = saved.get("config", {})
            diff = sorted(k for k, v in config.to_dict().items() if old.get(k) != v)
            problems.append(f"output directory {out} belongs to a run with a different configuration (differs in: "
                            f"{', '.join(diff) or 'version'}); use another --out, or --force to discard its results")
    if problems:
        raise UserErrors(problems)


def probe_model(c: RunConfig) -> tuple[int, int, int]:
    """(n_layers, d_model, n_post_instruction) from the model's config and tokenizer, without weights."""
    from transformers import AutoConfig

    from ..core.model import derive_chat_format, hub_error, load_tokenizer

    kwargs: dict = {}
    source = c.model
    if c.model.endswith(".gguf"):
        path = Path(c.model)
        if not path.is_file():
            raise UserError(f"GGUF file {c.model!r} does not exist; for the demo model run "
                            "`refusal-direction fetch-model qwen2.5-coder-0.5b-instruct`")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif c.revision:
        kwargs["revision"] = c.revision
    import os

    token = os.environ.get("HF_TOKEN")
    try:
        cfg = AutoConfig.from_pretrained(source, token=token, **kwargs)
        tok = load_tokenizer(source, **kwargs)
    except Exception as exc:
        raise hub_error(c.model, exc) from exc
    text = cfg.get_text_config()
    template = Path(c.chat_template).read_text() if c.chat_template else None
    chat = derive_chat_format(tok, getattr(cfg, "model_type", ""), template)
    n_post = len(tok(chat.suffix, add_special_tokens=False)["input_ids"])
    return int(text.num_hidden_layers), int(text.hidden_size), n_post


# --------------------------------------------------------------------------------------------------
# Opening runs


def prepare_run(out: str | Path, config: RunConfig, force: bool = False, progress: bool = False,
                loader=None) -> Run:
    """Create or reopen ``out`` for ``config``; refuse a directory that belongs to another config."""
    out = Path(out)
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        saved = json.loads(cfg_path.read_text())
        if saved.get("fingerprint") != config.fingerprint():
            if not force:
                old = saved.get("config", {})
                diff = sorted(k for k, v in config.to_dict().items() if old.get(k) != v)
                raise UserError(f"output directory {out} belongs to a run with a different configuration "
                                f"(differs in: {', '.join(diff) or 'version'}); use another --out, or --force "
                                "to discard its results")
            clear_outputs(out)
    elif out.exists() and any(p.name != "run.log" for p in out.iterdir()) and not force:
        raise UserError(f"output directory {out} exists and is not a run directory; use another --out or --force")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, {"fingerprint": config.fingerprint(), "config": config.to_dict(),
                                 "refusal_direction_version": __version__})
    return Run(out, config, progress, loader)


def open_run(out: str | Path, overrides: dict | None = None, progress: bool = False, loader=None) -> Run:
    """Reopen an existing run directory with its saved config (``overrides`` for non-result fields)."""
    out = Path(out)
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{out} is not a run directory (no config.json); create one with "
                        "`refusal-direction replicate --out DIR`")
    saved = json.loads(cfg_path.read_text())["config"]
    config = build_config(overrides or {}, base=saved)
    return Run(out, config, progress, loader)


def clear_outputs(out: Path) -> None:
    for child in out.iterdir():
        if child.name == "run.log":
            continue
        if child.is_dir():
            import shutil

            shutil.rmtree(child)
        else:
            child.unlink()


def write_environment(run: Run) -> None:
    lm = run._lm
    import transformers

    env = {
        "refusal_direction": __version__, "git_commit": _git_commit(), "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""), "dtype_reason": lm.dtype_reason,
        "cuda_device": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None,
        "model": lm.model_id, "n_layers": lm.n_layers, "d_model": lm.d_model,
        "chat_format": {"prefix": lm.chat.prefix, "suffix": lm.chat.suffix, "source": lm.chat.source},
        "post_instruction_tokens": lm.post_instruction_tokens(),
    }
    atomic_write_json(run.out / "environment.json", env)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------------
# Stage: samples


def stage_samples(run: Run) -> Samples:
    path = run.samples_dir / "samples.json"
    if path.is_file():
        data = json.loads(path.read_text())
        sets = {k: [Instruction(r["instruction"], r.get("category"), r.get("id", "")) for r in v]
                for k, v in data["sets"].items()}
        return Samples(**sets, dropped_duplicates=data.get("dropped_duplicates", []))
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


# --------------------------------------------------------------------------------------------------
# Stage: extract


def stage_extract(run: Run, samples: Samples, force: bool = False) -> CandidateDirections:
    if run.candidates_path.is_file() and not force:
        return load_candidates(run.candidates_path)
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
    d = run.out / "directions"
    save_candidates(CandidateDirections(harmful, list(range(-harmful.shape[0], 0)), {**meta, "what": "mean_harmful"}),
                    d / "mean_harmful.safetensors")
    save_candidates(CandidateDirections(harmless, list(range(-harmful.shape[0], 0)),
                                        {**meta, "what": "mean_harmless"}), d / "mean_harmless.safetensors")
    candidates = diff_in_means(harmful, harmless, meta)
    save_candidates(candidates, run.candidates_path)
    return candidates


# --------------------------------------------------------------------------------------------------
# Stage: direction (fixed or automatic selection)


def stage_direction(run: Run, samples: Samples, candidates: CandidateDirections | None,
                    force: bool = False) -> Direction:
    if run.direction_path.is_file() and not force:
        return load_direction(run.direction_path)
    if run.config.direction_file:
        direction = load_direction(run.config.direction_file, model_id=run.config.model, d_model=run.lm.d_model)
        save_direction(direction, run.direction_path, {"selected_by": f"file {run.config.direction_file}"})
        return direction
    mode, layer, position = run.config.resolved_direction()
    if mode == "auto":
        position, layer = select_direction(run, samples, candidates)
    check_position_layer(position, layer, candidates.positions, candidates.n_layers, run.config.model)
    direction = candidates.get(position, layer)
    save_direction(direction, run.direction_path, {"selected_by": mode, "source_run": str(run.out)})
    log.info("direction: layer %d, position %d (%s), norm %.3f", layer, position, mode, float(direction.vector.norm()))
    return direction


def select_direction(run: Run, samples: Samples, candidates: CandidateDirections) -> tuple[int, int]:
    from .. import selection
    from ..report.selection_figure import plot_selection_heatmaps

    lm, c = run.lm, run.config
    t0 = time.perf_counter()
    harmful_val, harmless_val = [i.text for i in samples.harmful_val], [i.text for i in samples.harmless_val]
    if c.filter_val:
        harmful_val, harmless_val = selection.filter_validation(lm, harmful_val, harmless_val,
                                                                batch_size=c.batch_size)
    layers = parse_layers(c.select_layers, candidates.n_layers) if c.select_layers else None
    induce_threshold = c.induce_threshold
    baseline_harmless = None
    if c.induce_relative:
        baseline_harmless = float(selection.refusal_metrics(lm, harmless_val, batch_size=c.batch_size).mean())
        induce_threshold = baseline_harmless + c.induce_threshold
        log.info("induce threshold relative to the unintervened harmless metric %.3f: %.3f", baseline_harmless,
                 induce_threshold)
    thresholds = selection.SelectionThresholds(kl_threshold=c.kl_threshold, induce_threshold=induce_threshold,
                                               prune_layer_fraction=c.prune_layer_fraction)
    if c.select_strategy == "lazy":
        result, scores = selection.select_lazy(lm, candidates, harmful_val, harmless_val, thresholds, layers,
                                               progress=run.progress)
    else:
        scores = selection.score_candidates(lm, candidates, harmful_val, harmless_val, progress=run.progress,
                                            layers=layers)
        result = selection.filter_and_rank(scores, candidates.n_layers, thresholds)
    run.timing("select_s", time.perf_counter() - t0)
    (run.out / "figures").mkdir(exist_ok=True)
    plot_selection_heatmaps(scores, candidates.n_layers, candidates.positions,
                            run.out / "figures" / "selection_heatmaps.png",
                            chosen=(result.position, result.layer), thresholds=thresholds)
    atomic_write_json(run.out / "selection.json", {
        **selection.result_to_json(result, scores), "strategy": c.select_strategy,
        "n_harmful_val": len(harmful_val), "n_harmless_val": len(harmless_val), "filter_val": c.filter_val,
        "layers_scored": sorted({s.layer for s in scores}), "induce_relative": c.induce_relative,
        "baseline_harmless_metric": baseline_harmless,
    })
    return result.position, result.layer


# --------------------------------------------------------------------------------------------------
# Stage: generate


def condition_intervention(condition: str, direction: Direction, coeff: float) -> Intervention:
    if condition in ("baseline", "harmless_baseline"):
        return Baseline()
    if condition == "ablation":
        return DirectionalAblation(direction.vector)
    if condition == "actadd_negative":
        return ActivationAddition(direction.vector, direction.layer, -coeff, name="actadd_negative")
    if condition == "harmless_actadd":
        return ActivationAddition(direction.vector, direction.layer, coeff, name="actadd")
    raise ValueError(condition)


def stage_generate(run: Run, samples: Samples, direction: Direction, force: bool = False) -> None:
    from ..core.decoding import GenerationSettings
    from ..generation import choose_backend, generate_all

    c = run.config
    settings = GenerationSettings(c.max_new_tokens, c.batch_size, c.stop_at_end_of_turn)
    per_condition = choose_backend(run.lm, c.generation_backend) == "hf"  # the fast path runs them together
    for dataset_key in ("eval", "harmless_eval"):
        todo = [cond for cond in c.conditions if CONDITION_FILES[cond][0] == dataset_key
                and (force or not run.completions_path(cond).is_file())]
        if not todo:
            continue
        items: list[Instruction] = getattr(samples, dataset_key)
        interventions = {cond: condition_intervention(cond, direction, c.actadd_coeff) for cond in todo}
        condition_of = {iv.name: cond for cond, iv in interventions.items()}

        def done(name, gens, seconds, items=items, condition_of=condition_of):
            write_completions(run, condition_of[name], items, gens)
            if per_condition:
                run.timing(f"generate_{condition_of[name]}_s", seconds)

        t0 = time.perf_counter()
        generate_all(run.lm, [i.text for i in items], list(interventions.values()), settings,
                     progress=run.progress, backend=c.generation_backend, on_done=done)
        run.timing(f"generate_{dataset_key}_s", time.perf_counter() - t0)


def write_completions(run: Run, condition: str, items: list[Instruction], gens) -> None:
    n_first = run.config.refusal_first_n_tokens
    tok = run.lm.tokenizer
    records = []
    for item, g in zip(items, gens, strict=True):
        first = tok.decode(g.token_ids[:n_first], skip_special_tokens=True)
        records.append({"id": item.id, "category": item.category, "instruction": item.text,
                        "completion": g.text, "refusal": is_refusal(g.text),
                        "refusal_first_n": is_refusal(first), "n_tokens": len(g.token_ids), "stopped": g.stopped})
    atomic_write_jsonl(run.completions_path(condition), records)
    log.info("%s: refusal score %.3f over %d completions", condition,
             sum(r["refusal"] for r in records) / max(1, len(records)), len(records))


def load_completions(run: Run) -> dict[str, list[dict]]:
    return {cond: read_jsonl(run.completions_path(cond)) for cond in run.config.conditions
            if run.completions_path(cond).is_file()}


# --------------------------------------------------------------------------------------------------
# Stage: score (safety) and capability


def stage_safety(run: Run, force: bool = False) -> dict:
    """Add Llama Guard 2 verdicts to every completion file; returns the safety status."""
    status_path = run.out / "safety_status.json"
    if status_path.is_file() and not force:
        return json.loads(status_path.read_text())
    c = run.config
    if not c.safety:
        status = {"computed": False, "reason": "disabled (--no-safety)"}
        atomic_write_json(status_path, status)
        return status
    run.release_model()
    from ..evaluation.safety import load_safety_scorer

    try:
        scorer = load_safety_scorer(c.safety_model, device=c.device)
    except UserError as exc:
        if c.require_safety:
            raise
        log.warning("safety score not computed: %s", exc)
        status = {"computed": False, "reason": str(exc).splitlines()[0]}
        atomic_write_json(status_path, status)
        return status
    t0 = time.perf_counter()
    for cond, records in load_completions(run).items():
        verdicts = scorer.score([r["instruction"] for r in records], [r["completion"] for r in records],
                                batch_size=c.safety_batch_size, mode=c.safety_mode,
                                short_is_safe=c.safety_short_is_safe, progress=run.progress)
        for r, v in zip(records, verdicts, strict=True):
            r["safety"] = None if v.safe is None else int(v.safe)
            r["p_unsafe"] = v.p_unsafe
            r["safety_categories"] = list(v.categories)
            r["safety_forced_short"] = bool(getattr(v, "forced_short", False))
        atomic_write_jsonl(run.completions_path(cond), records)
    run.timing("safety_s", time.perf_counter() - t0)
    status = {"computed": True, "model": c.safety_model, "mode": c.safety_mode,
              "short_is_safe": c.safety_short_is_safe}
    atomic_write_json(status_path, status)
    del scorer
    return status


def stage_capability(run: Run, samples: Samples, direction: Direction, force: bool = False) -> dict:
    path = run.out / "capability.json"
    if path.is_file() and not force:
        return json.loads(path.read_text())
    c = run.config
    if not c.capability:
        return {}
    from ..evaluation.capability import completion_cross_entropy, next_token_kl

    lm = run.lm
    harmless = [i.text for i in samples.harmless_eval]
    own = None
    if run.completions_path("harmless_baseline").is_file():
        own = [r["completion"] for r in read_jsonl(run.completions_path("harmless_baseline"))]
    t0 = time.perf_counter()
    out = {}
    for cond in c.conditions:
        iv = condition_intervention(cond, direction, c.actadd_coeff)
        if cond.startswith("harmless_") and cond != "harmless_actadd":
            continue
        kl = next_token_kl(lm, harmless, iv, batch_size=c.batch_size)
        entry = {"kl": kl["kl"], "dataset": "harmless"}
        if own is not None:
            ce = completion_cross_entropy(lm, harmless, own, iv, batch_size=c.batch_size)
            entry.update({"ce": ce["ce"], "perplexity": ce["perplexity"], "ce_n_tokens": ce["n_tokens"]})
        out[cond] = entry
    run.timing("capability_s", time.perf_counter() - t0)
    atomic_write_json(path, out)
    return out


# --------------------------------------------------------------------------------------------------
# Stage: summary and report


def display_name(model: str) -> str:
    """A Hub id as is; a local directory or .gguf file by its name (no machine paths in reports)."""
    path = Path(model)
    return path.name if (model.endswith(".gguf") or path.is_absolute() or path.exists()) else model


def build_summary(run: Run, safety_status: dict, capability: dict) -> dict:
    c = run.config
    completions = load_completions(run)
    direction_meta = json.loads(run.direction_path.with_suffix(".json").read_text())
    conditions = {}
    for cond, records in completions.items():
        dataset_key, _ = CONDITION_FILES[cond]
        refusal = [r["refusal"] for r in records]
        judged = [r for r in records if r.get("safety") is not None]  # unparsable guard answers excluded
        safety = [r["safety"] for r in judged]
        has_safety = bool(safety_status.get("computed") and judged)
        cats = [r.get("category") for r in records]
        per_cat = {k: {"refusal": v} for k, v in per_category(refusal, cats).items()}
        if has_safety:
            for k, v in per_category(safety, [r.get("category") for r in judged]).items():
                per_cat[k]["safety"] = v
        iv = condition_intervention(cond, Direction(torch.zeros(1), direction_meta["layer"],
                                                    direction_meta["position"]), c.actadd_coeff)
        conditions[cond] = {
            "dataset": run.dataset_name(dataset_key),
            "intervention": {k: v for k, v in iv.describe().items() if k != "direction_norm"},
            "n": len(records),
            "refusal_score": rate(refusal)["rate"],
            "refusal": rate(refusal),
            "safety_score": rate(safety)["rate"] if has_safety else None,
            "safety": rate(safety) if has_safety else None,
            "safety_status": "computed" if has_safety else f"not computed: {safety_status.get('reason', 'unknown')}",
            "per_category": per_cat,
            "mean_completion_tokens": sum(r["n_tokens"] for r in records) / max(1, len(records)),
            f"refusal_first_{c.refusal_first_n_tokens}_tokens": rate([r["refusal_first_n"] for r in records]),
            "stopped_fraction": sum(bool(r["stopped"]) for r in records) / max(1, len(records)),
            "safety_unparsed": len(records) - len(judged) if has_safety else None,
            "judge_agreement": agreement_table([r["refusal"] for r in judged], safety) if has_safety else None,
            "capability": capability.get(cond),
        }
    tests = {}
    for a, b in (("baseline", "ablation"), ("baseline", "actadd_negative"), ("harmless_baseline", "harmless_actadd")):
        if a in completions and b in completions:
            ra = [r["refusal"] for r in completions[a]]
            rb = [r["refusal"] for r in completions[b]]
            entry = {"refusal": mcnemar(ra, rb), "safety": None}
            if conditions[a]["safety"] and conditions[b]["safety"]:
                pairs = [(x["safety"], y["safety"]) for x, y in zip(completions[a], completions[b])
                         if x.get("safety") is not None and y.get("safety") is not None]
                entry["safety"] = mcnemar([x for x, _ in pairs], [y for _, y in pairs])
            tests[f"{b}_vs_{a}"] = entry
    timings_path = run.out / "timings.json"
    env_path = run.out / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    return {
        "model": display_name(c.model),
        "direction": {"layer": direction_meta["layer"], "position": direction_meta["position"],
                      "selected_by": direction_meta.get("selected_by", "fixed"), "norm": direction_meta.get("norm")},
        "settings": {"max_new_tokens": c.max_new_tokens, "stop_at_end_of_turn": c.stop_at_end_of_turn,
                     "dtype": env.get("dtype"), "device": env.get("device"), "n_train": c.n_train,
                     "n_eval": c.n_eval, "safety_model": c.safety_model if safety_status.get("computed") else None,
                     "safety_mode": c.safety_mode, "safety_short_is_safe": c.safety_short_is_safe,
                     "refusal_matching": "case-insensitive substring, the task's 12 substrings"},
        "conditions": conditions,
        "paired_tests": tests,
        "paper": PAPER,
        "timings": json.loads(timings_path.read_text()) if timings_path.is_file() else {},
    }


def stage_score(run: Run, force: bool = False) -> dict:
    safety_status = stage_safety(run, force)
    cap_path = run.out / "capability.json"
    capability = json.loads(cap_path.read_text()) if cap_path.is_file() else {}
    summary = build_summary(run, safety_status, capability)
    atomic_write_json(run.summary_path, summary)
    return summary


def stage_report(run: Run) -> dict:
    from ..report import build_report

    if not run.summary_path.is_file():
        raise UserError(f"{run.out} has no summary.json yet; run `refusal-direction score {run.out}` first")
    summary = json.loads(run.summary_path.read_text())
    selection = json.loads((run.out / "selection.json").read_text()) if (run.out / "selection.json").is_file() \
        else None
    tensors = {}
    for name in ("candidates", "mean_harmful", "mean_harmless"):
        p = run.out / "directions" / f"{name}.safetensors"
        tensors[name] = load_candidates(p).vectors if p.is_file() else None
    return build_report(summary, load_completions(run), run.out, selection=selection,
                        candidates=tensors["candidates"], mean_harmful=tensors["mean_harmful"],
                        mean_harmless=tensors["mean_harmless"])


def replicate(run: Run, force: bool = False) -> dict:
    """Run every stage; completed stages are reused (resume) unless ``force``."""
    samples = stage_samples(run)
    # A given direction file needs no extraction (the report then has no candidate plots).
    candidates = None if run.config.direction_file else stage_extract(run, samples, force)
    direction = stage_direction(run, samples, candidates, force)
    stage_generate(run, samples, direction, force)
    stage_capability(run, samples, direction, force)
    summary = stage_score(run, force)
    stage_report(run)
    return summary
