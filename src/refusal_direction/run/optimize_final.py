"""The chosen trial's final evaluation on held-out prompts, beside DiM, and its verified export.

Final evaluation (``optimize/final.json``, ``final.md``): the chosen edit and the paper's DiM ablation (the
run's selected direction) on the run's JailbreakBench prompts at the run's ``max_new_tokens`` and on XSTest's
safe prompts, in one `generate_all` call; refusal verdicts by the run's judge (an unreadable verdict counts
as a refusal) and by the paper's substring match; Wilson 95 % intervals; an exact McNemar test of the
chosen edit's verdicts against DiM's on the same prompts; next-token KL on the harmless evaluation prompts
with a bootstrap 95 % interval. It is redone only when the chosen trial changes.

Export (``optimize/export``): the chosen edit's weight form (`export.export_edit`),
then `verify_method_export` (hooked source vs reloaded export; logits within the dtype's tolerance, the same
greedy tokens). With ``lora`` also ``optimize/lora``: the same edit as a peft LoRA adapter (`export.lora`: the
factors of what the merged export changed, rank k), loaded through peft onto a copy of the source and verified the
same way; the norm-preserving form (a full-rank change) and edits that change biases are not written, the reason
recorded in export.json.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from ..data.instructions import resolve_data_dir
from ..data.xstest import first_prompts
from ..edits import DirectionalAblation
from ..evaluation.bootstrap import bootstrap_ratio
from ..evaluation.capability import next_token_kl
from ..evaluation.refusal import is_refusal
from ..evaluation.stats import mcnemar, rate
from ..fileio import atomic_write_json, atomic_write_text, read_json
from .rundir import Run

log = logging.getLogger(__name__)


def _records(judge, prompts, gens) -> list[dict]:
    verdicts = judge.judge([p.text for p in prompts], [g.text for g in gens])
    return [{"id": p.id, "instruction": p.text, "completion": g.text, "refusal": int(v is not False),
             "refusal_substring": int(is_refusal(g.text)), "n_tokens": len(g.token_ids)}
            for p, g, v in zip(prompts, gens, verdicts, strict=True)]


def _final_rows(records: dict, kls: dict) -> list[dict]:
    rows = []
    for name, rec in records.items():
        jbb, xs = rec["jailbreakbench"], rec["xstest"]
        row = {"edit": name, "refusal": rate([r["refusal"] for r in jbb]),
               "refusal_substring": rate([r["refusal_substring"] for r in jbb]),
               "over_refusal": rate([r["refusal"] for r in xs]), "kl": bootstrap_ratio(kls[name])}
        if name != "dim":
            row["mcnemar_refusal_vs_dim"] = mcnemar([r["refusal"] for r in records["dim"]["jailbreakbench"]],
                                                    [r["refusal"] for r in jbb])
            row["mcnemar_over_refusal_vs_dim"] = mcnemar([r["refusal"] for r in records["dim"]["xstest"]],
                                                         [r["refusal"] for r in xs]) if xs else None
        rows.append(row)
    return rows


def final_evaluation(run: Run, samples, candidates, direction, chosen: dict, s) -> dict:
    """optimize/final.json's content for ``chosen`` (reused when it is the same trial with the same settings)."""
    from ..edits import build
    from ..evaluation.judges import get_judge
    from ..generation import generate_all
    from ..report.optimize import final_markdown
    from .compare_methods import edit_inputs

    c, lm = run.config, run.lm
    path = run.layout.optimize_final("json")
    key = {"trial": chosen["number"], "n_xstest": s.n_xstest, "max_new_tokens": c.max_new_tokens, "judge": c.judge}
    if path.is_file():
        saved = read_json(path, "run file")
        if saved.get("key") == key:
            return saved
    name = f"chosen_trial{chosen['number']}"
    ivs = {name: build(edit_inputs(run, samples, candidates, direction), chosen["params"], name),
           "dim": DirectionalAblation(direction.vector, name="dim")}
    xstest = first_prompts("xstest_safe", resolve_data_dir(c.data_dir), s.n_xstest)
    prompts = list(samples.eval) + list(xstest)
    gens = generate_all(lm, [p.text for p in prompts], list(ivs.values()), run.generation)
    judge = get_judge(c.judge)
    n_eval = len(samples.eval)
    records, kls, baseline = {}, {}, {}  # baseline: each KL batch's baseline distribution, computed once
    harmless = [i.text for i in samples.harmless_eval]
    for n, iv in ivs.items():
        rows = _records(judge, prompts, gens[n])
        records[n] = {"jailbreakbench": rows[:n_eval], "xstest": rows[n_eval:]}
        kls[n] = next_token_kl(lm, harmless, iv, batch_size=c.batch_size, baseline=baseline)["per_prompt"]
    result = {"schema_version": 1, "key": key, "judge": c.judge, "rows": _final_rows(records, kls),
              "chosen": chosen, "dim": {"layer": direction.layer, "position": direction.position},
              "records": records, "kl_per_prompt": kls}
    atomic_write_json(path, result)
    atomic_write_text(run.layout.optimize_final("md"), final_markdown(result["rows"], c.judge))
    return result


def export_chosen(run: Run, samples, candidates, chosen: dict, lora: bool = False) -> dict:
    """Export the chosen edit's weights to optimize/export (replacing a previous choice's) and verify them; with
    ``lora`` also the adapter in optimize/lora."""
    from ..edits import build
    from ..export import default_tol, export_edit, load_exported, verify_method_export
    from .compare_methods import edit_inputs

    c = run.config
    out = run.layout.optimize_export
    record_path = run.layout.optimize_export_record
    if record_path.is_file() and out.is_dir():
        saved = read_json(record_path, "run file")
        if saved.get("trial") == chosen["number"] and (not lora or saved.get("lora")):
            return saved
    src = _float32_source(run)
    inputs = replace(edit_inputs(run, samples, candidates, run.saved_direction()), lm=src)
    iv = build(inputs, chosen["params"], f"trial{chosen['number']}")
    export_edit(src, iv, out, run_info={"run_dir": str(run.out.resolve()), "optimize_trial": chosen}, force=True)
    exported = load_exported(out, device=src.device, dtype=src.dtype)
    tol = default_tol(src.dtype)
    prompts = [i.text for i in samples.eval[:8]]
    verify = verify_method_export(src, exported, iv, prompts, max_new_tokens=16, tol=tol)
    verify["dtype"] = str(src.dtype).removeprefix("torch.")
    log.info("optimize: exported trial %d to %s; verify: max |dlogit| %.3g, agreement %.3f, ok=%s", chosen["number"],
             out, verify["max_abs_logit_diff"], verify["agreement"], verify["ok"])
    record = {"trial": chosen["number"], "dir": str(out), "verify": verify}
    if lora:
        factors = _lora_factors(src, exported, iv)
        del exported  # before the verification's copy of the source: one float32 copy more, not two
        record["lora"] = factors if "skipped" in factors else _export_lora(src, factors["factors"], iv, prompts,
                                                                            run.layout.optimize_lora, tol, c.model)
    else:
        del exported
    del src
    atomic_write_json(record_path, record)
    return record


def _lora_factors(src, exported, edit) -> dict:
    """{"factors": ...} of what the merged export changed, or {"skipped": why} when there is no exact LoRA form
    (the edit's stated reason, a dtype whose rounding is not low-rank, or a change no adapter holds)."""
    import torch

    from ..export.lora import LoraUnsupported, lora_factors

    if src.dtype != torch.float32:
        dtype = str(src.dtype).removeprefix("torch.")
        why = (f"the export is {dtype} (a float32 copy of the model did not fit, or the model is dispatched over "
               "devices): its weight change carries that dtype's rounding, which is not low-rank; the LoRA factors "
               "are taken from a float32 export; use the merged export")
        log.warning("optimize: no LoRA adapter: %s", why)
        return {"skipped": why}
    if "lora" in edit.reasons:
        log.warning("optimize: no LoRA adapter: %s", edit.reasons["lora"])
        return {"skipped": f"{edit.method}: {edit.reasons['lora']}"}
    try:
        return {"factors": lora_factors(src.model, exported)}
    except LoraUnsupported as exc:
        log.warning("optimize: no LoRA adapter: %s", exc)
        return {"skipped": str(exc)}


def _export_lora(src, factors: dict, iv, prompts, out: Path, tol: float, base_name: str) -> dict:
    """Write the adapter of ``factors`` and verify it against the hooks (peft loads it onto a copy of the source)."""
    import shutil

    from ..export import verify_method_export
    from ..export.lora import load_lora, save_lora

    if out.exists():
        shutil.rmtree(out)
    info = save_lora(src.model, factors, out, base_name=base_name)
    adapted = load_lora(src.model, out)
    info["verify"] = verify_method_export(src, adapted, iv, prompts, max_new_tokens=16, tol=tol)
    del adapted
    log.info("optimize: LoRA adapter (rank %d) in %s; verify: max |dlogit| %.3g, agreement %.3f, ok=%s", info["rank"],
             out, info["verify"]["max_abs_logit_diff"], info["verify"]["agreement"], info["verify"]["ok"])
    return info


def _float32_source(run: Run):
    """The model to export from: the run's if it is float32; else a float32 load of the same model, so the
    export is saved in float32 and verified against its hooks at float32's tolerance (a bfloat16 export and its
    hooks round differently: on Qwen2.5-0.5B, max |Δlogit| 0.375 and 76 % greedy agreement over 16 tokens).
    Falls back to the run's model (and dtype) when a float32 copy would not fit in free memory."""
    import torch

    from ..core.model import load_model

    lm, c = run.lm, run.config
    if lm.dtype == torch.float32 or lm.placement:
        return lm
    need = 4 * sum(p.numel() for p in lm.model.parameters())
    free = torch.cuda.mem_get_info(lm.device)[0] if lm.device.type == "cuda" else None
    if free is not None and need > 0.8 * free:
        log.warning("optimize: a float32 copy (%.1f GB) does not fit in free GPU memory; exporting in %s",
                    need / 1e9, lm.dtype)
        return lm
    log.info("optimize: exporting from a float32 load of %s (the search ran in %s)", c.model, lm.dtype)
    return load_model(c.model, device=str(lm.device), dtype="float32", revision=c.revision,
                      chat_template=Path(c.chat_template).read_text() if c.chat_template else None)


__all__ = ["final_evaluation", "export_chosen"]
