"""Stages safety and capability: Llama Guard 2 verdicts on every completion; KL and CE on harmless prompts."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from ..core.directions import Direction
from ..data.instructions import Samples
from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from .generate import condition_intervention, load_completions
from .rundir import Run

log = logging.getLogger(__name__)


def stage_safety(run: Run, force: bool = False) -> dict:
    """Add Llama Guard 2 verdicts to every completion file; returns the safety status."""
    status_path = run.layout.safety_status
    if status_path.is_file() and not force:
        return read_json(status_path, "run file")
    c = run.config
    if not c.safety:
        status = {"computed": False, "reason": "disabled (--no-safety)"}
        atomic_write_json(status_path, status)
        return status
    run.release_model()
    from ..evaluation.safety import load_safety_scorer

    try:
        unreachable = hub_unreachable(c.safety_model)
        if unreachable:
            raise UserError(unreachable)
        scorer = load_safety_scorer(c.safety_model, device=c.device, device_map=c.device_map, max_memory=c.max_memory)
    except UserError as exc:
        if c.require_safety:
            raise
        log.warning("safety score not computed: %s", exc)
        status = {"computed": False, "reason": one_line(str(exc))}
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


def one_line(text: str, limit: int = 200) -> str:
    """The first line of a message, at most ``limit`` characters (it is shown in every row of a table)."""
    first = (text.strip().splitlines() or [""])[0]
    return first if len(first) <= limit else first[:limit - 3] + "..."


def hub_unreachable(model: str) -> str | None:
    """Why a Hub model cannot be loaded here, found without hub retries (offline, not cached), or None."""
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return None
    except Exception:  # noqa: BLE001 (a malformed id: let the loader say what is wrong)
        return None
    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE",
                                                                                    "TRANSFORMERS_OFFLINE"))
    if not offline:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
            return None
        except OSError:
            pass
    why = "HF_HUB_OFFLINE is set" if offline else "huggingface.co is unreachable"
    return (f"safety model {model} is not in the local Hugging Face cache and {why}; pass a local directory with "
            "--safety-model, or --no-safety")


def stage_capability(run: Run, samples: Samples, direction: Direction, force: bool = False) -> dict:
    path = run.layout.capability
    if path.is_file() and not force:
        return read_json(path, "run file")
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
    out, baseline = {}, {}  # baseline: each batch's baseline distribution, shared by the conditions
    for cond in c.conditions:
        iv = condition_intervention(cond, direction, c.actadd_coeff)
        if cond.startswith("harmless_") and cond != "harmless_actadd":
            continue
        if cond.startswith("xstest_"):  # capability is measured on the harmless set only
            continue
        kl = next_token_kl(lm, harmless, iv, batch_size=c.batch_size, baseline=baseline)
        entry = {"kl": kl["kl"], "dataset": "harmless"}
        if own is not None:
            ce = completion_cross_entropy(lm, harmless, own, iv, batch_size=c.batch_size)
            entry.update({"ce": ce["ce"], "perplexity": ce["perplexity"], "ce_n_tokens": ce["n_tokens"]})
        out[cond] = entry
    run.timing("capability_s", time.perf_counter() - t0)
    atomic_write_json(path, out)
    return out
