"""The report card (`refusal-direction card`): BASE and any edited models scored on one harness (docs/CARD.md).

Every row is measured on the same prompts, chat template, dtype, judges and metrics:

- refusal on the harmful evaluation set (JailbreakBench, greedy ``max_new_tokens``) by the substring, rules and
  learned judges, and where they disagree; over-refusal on XSTest's safe prompts, compliance on its unsafe ones;
- damage against BASE (`evaluation.damage`): first-token KL as heretic computes it, multi-token KL teacher-forced
  on BASE's own greedy answers to the harmless prompts, and cross-entropy on those answers;
- capability: HumanEval pass@1, the generated programs run in a sandbox (`evaluation.humaneval`);
- substance of the compliant answers (`evaluation.substance`);
- paired tests (exact McNemar) of each row against BASE and between any two rows.

BASE loads once; its edit rows (runs' edits as hooks) share its generation batches: on a GPU all their prompts
decode in one fast batch. Other rows (HF directories, GGUF files, LoRA adapters) load one at a time, each once.
A row that cannot be loaded, or whose tokenizer differs from BASE's, is shown failed with its reason. The
completions of every row are written under ``OUT/completions/`` (never committed: they answer harmful requests).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

from ..data.instructions import load_instructions, resolve_data_dir
from ..data.xstest import first_prompts
from ..edits import Baseline
from ..errors import UserError
from ..evaluation.stats import agreement_table, mcnemar, rate
from ..fileio import atomic_write_jsonl
from ..report.card_schema import JUDGES, Card, CardRow
from .card_rows import ModelSpec, Row, check_specs, load_row, parse_model_spec
from .card_settings import CardSettings

log = logging.getLogger(__name__)

SETS = ("harmful", "xstest_safe", "xstest_unsafe", "humaneval")  # the generated prompt sets of every row


@dataclasses.dataclass(frozen=True)
class CardPrompts:
    """The card's prompts: its generated sets (instructions) and the harmless prompts of the damage measures."""

    sets: dict  # set name -> list of `Instruction`-like objects with ``id`` and ``text``
    harmless: list[str]
    problems: list  # HumanEval `Problem`s (empty when HumanEval is off)


def load_prompts(base: str, s: CardSettings) -> CardPrompts:
    from ..evaluation import humaneval

    data_dir = resolve_data_dir(s.data_dir)
    harmful = load_instructions(s.eval, data_dir)[:s.n_eval]
    problems = humaneval.load_problems()[:s.n_humaneval] if s.humaneval_on(base) else []
    sets = {"harmful": harmful,
            "xstest_safe": first_prompts("xstest_safe", data_dir, s.n_xstest),
            "xstest_unsafe": first_prompts("xstest_unsafe", data_dir, s.n_xstest),
            "humaneval": [_Prompt(p.task_id, humaneval.instruction(p)) for p in problems]}
    harmless = [i.text for i in load_instructions("harmless_val", data_dir)[:s.n_harmless]]
    return CardPrompts({k: v for k, v in sets.items() if v}, harmless, problems)


@dataclasses.dataclass(frozen=True)
class _Prompt:
    id: str
    text: str


def card(base: str, models: Sequence[str | ModelSpec], out: str | Path, settings: CardSettings | None = None, *,
         progress: bool = False) -> Card:
    """Score BASE and every model of ``models`` (``NAME=PATH`` specs, `card_rows`) and write the card to ``out``."""
    from ..core.model import load_model
    from ..report.card import write_card_outputs

    t0 = time.perf_counter()
    s = settings or CardSettings()
    specs = [parse_model_spec(m) if isinstance(m, str) else m for m in models]
    check_specs(specs)
    out = _check_out(Path(out))
    prompts = load_prompts(base, s)
    base_lm = load_model(base, device=s.device, dtype=s.dtype)
    shared: dict = {}  # BASE's harmless answers and first-token log-probabilities, made once for every row
    rows = [Row(ModelSpec("base", base), "base", base_lm)]
    rows += [load_row(spec, base_lm, base, s.device, s.dtype) for spec in specs if _is_edit(spec)]
    measured, seconds = _measure_base_rows(rows, prompts, s, out, progress, shared)
    for spec in (sp for sp in specs if not _is_edit(sp)):
        t1 = time.perf_counter()
        log.info("card: loading row %s (%s)", spec.name, spec.path)
        row = load_row(spec, base_lm, base, s.device, s.dtype)
        rows.append(row)
        measured[row.spec.name] = _measure_other(row, base_lm, prompts, s, out, progress, shared)
        seconds[row.spec.name] = {"total_s": round(time.perf_counter() - t1, 2)}
        row.lm = None  # free the model before the next one loads
    order = ["base", *(sp.name for sp in specs)]
    rows.sort(key=lambda r: order.index(r.spec.name))
    result = _assemble(base, rows, measured, seconds, prompts, s, base_lm, time.perf_counter() - t0,
                       shared.get("first_token_template"))
    write_card_outputs(out, result)
    log.info("card: %d rows in %.1f s; %s", len(rows), time.perf_counter() - t0, out / "card.md")
    return result


def _is_edit(spec: ModelSpec) -> bool:
    from .card_rows import kind_of

    try:
        return kind_of(spec) == "edit"
    except UserError:
        return False


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is a file; pass a directory path")
    if out.is_dir() and any(p.name != "run.log" for p in out.iterdir()) and not (out / "card.json").is_file():
        raise UserError(f"--out {out} is not empty and holds no card; choose a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _settings(s: CardSettings):
    from ..core.decoding import GenerationSettings

    return GenerationSettings(s.max_new_tokens, s.batch_size, s.stop_at_end_of_turn, s.generation_backend,
                              s.decode_step)


def _measure_base_rows(rows: list[Row], prompts: CardPrompts, s: CardSettings, out: Path, progress: bool,
                       shared: dict):
    """BASE and its edit rows: one generation of every set under every row's edit, then each row's measures."""
    from ..generation import generate, generate_sets

    t0 = time.perf_counter()
    base = rows[0].lm
    live = [r for r in rows if r.ok]
    edits = {r.spec.name: (Baseline(name="base") if r.kind == "base" else dataclasses.replace(r.edit, name=r.spec.name))
             for r in live}
    gen = _settings(s).replace(progress=progress)
    sets = list(prompts.sets)
    log.info("card: generating %d sets for %d rows on BASE (%s)", len(sets), len(edits), ", ".join(edits))
    outs = generate_sets(base, [([p.text for p in prompts.sets[k]], list(edits.values())) for k in sets], gen)
    answers = generate(base, prompts.harmless, Baseline(name="base"), gen.replace(max_new_tokens=s.harmless_tokens))
    shared.update(answers=[list(a.token_ids) for a in answers], base_first=None)
    gen_s = time.perf_counter() - t0
    measured, seconds = {}, {}
    for r in live:
        t1 = time.perf_counter()
        gens = {k: outs[i][r.spec.name] for i, k in enumerate(sets)}
        measured[r.spec.name] = _measures(r, base, gens, prompts, s, out, progress, shared)
        seconds[r.spec.name] = {"generate_shared_s": round(gen_s, 2), "measure_s": round(time.perf_counter() - t1, 2)}
    return measured, seconds


def _measure_other(row: Row, base, prompts: CardPrompts, s: CardSettings, out: Path, progress: bool,
                   shared: dict) -> dict | None:
    """A separately loaded model: the tokenizer check, its own generation, its measures."""
    from ..evaluation.damage import shared_prompt_ids
    from ..generation import generate_sets

    if not row.ok:
        return None
    try:
        shared_prompt_ids(base, row.lm, prompts.harmless[:8] + [p.text for p in prompts.sets["harmful"][:8]])
    except UserError as exc:
        row.reason, row.kind = str(exc), "failed"
        return None
    sets = list(prompts.sets)
    gen = _settings(s).replace(progress=progress)
    outs = generate_sets(row.lm, [([p.text for p in prompts.sets[k]], [Baseline(name=row.spec.name)]) for k in sets],
                         gen)
    gens = {k: outs[i][row.spec.name] for i, k in enumerate(sets)}
    return _measures(row, base, gens, prompts, s, out, progress, shared)


def _verdicts(prompts, gens) -> dict[str, list[int]]:
    """judge -> refusal verdict per answer (1 = refusal; an unreadable verdict counts as a refusal)."""
    from ..evaluation.judges import get_judge

    texts, completions = [p.text for p in prompts], [g.text for g in gens]
    return {j: [int(v is not False) for v in get_judge(j).judge(texts, completions)] for j in JUDGES}


def _measures(row: Row, base, gens: dict, prompts: CardPrompts, s: CardSettings, out: Path, progress: bool,
              shared: dict) -> dict:
    """Every measure of one row from its generations (the dict `_assemble` turns into a `CardRow`)."""
    from ..evaluation.damage import damage, first_token_logprobs, with_system_prompt
    from ..evaluation.substance import substance
    from .summary import display_name

    verdicts = {k: _verdicts(prompts.sets[k], gens[k]) for k in ("harmful", "xstest_safe", "xstest_unsafe")
                if k in gens}
    _write_completions(out, row.spec.name, prompts, gens, verdicts)
    if shared["base_first"] is None:
        shared["system"] = _system_prompt(base, s, shared)
        view = base if shared["system"] is None else with_system_prompt(base, shared["system"])
        shared["base_first"] = first_token_logprobs(view, prompts.harmless, batch_size=s.batch_size)
    system = shared["system"]
    harm = damage(base, row.lm, prompts.harmless, shared["answers"], edit=None if row.kind == "base" else row.edit,
                  base_first_logprobs=shared["base_first"], batch_size=min(s.batch_size, 8), progress=progress,
                  system_prompt=system)
    records = [{"id": p.id, "instruction": p.text, "completion": g.text, "n_tokens": len(g.token_ids),
                "stopped": g.stopped, "refusal": bool(v)}
               for p, g, v in zip(prompts.sets["harmful"], gens["harmful"], verdicts["harmful"]["learned"],
                                  strict=True)]
    named = harm.to_json()
    for key in ("base", "model"):  # model ids as the card shows them: a local file or folder by its name
        for lm_id in {str(base.model_id), str(row.lm.model_id)}:
            named[key] = named[key].replace(lm_id, display_name(lm_id))
    return {"verdicts": verdicts, "damage": named, "humaneval": _humaneval(gens, prompts, s),
            "substance": substance(records, s.max_new_tokens).to_json()}


def _system_prompt(base, s: CardSettings, shared: dict) -> str | None:
    """heretic's system turn for the first-token KL prompts when asked for and BASE's template takes one; else None,
    with the reason kept for the card's settings."""
    from ..evaluation.damage import HERETIC_SYSTEM_PROMPT, with_system_prompt

    if not s.heretic_system_prompt:
        shared["first_token_template"] = "the model's own chat template (--no-heretic-system-prompt)"
        return None
    try:
        with_system_prompt(base, HERETIC_SYSTEM_PROMPT)
    except UserError as exc:
        from .summary import display_name

        why = str(exc).replace(str(base.model_id), display_name(str(base.model_id)))  # no machine paths in the card
        shared["first_token_template"] = f"the model's own chat template: {why}"
        log.warning("card: first-token KL without heretic's system prompt: %s", exc)
        return None
    shared["first_token_template"] = f"the model's chat template with heretic's system turn {HERETIC_SYSTEM_PROMPT!r}"
    return HERETIC_SYSTEM_PROMPT


def _humaneval(gens: dict, prompts: CardPrompts, s: CardSettings) -> dict | None:
    from ..evaluation import humaneval

    if not prompts.problems:
        return None
    result = humaneval.evaluate(prompts.problems, [g.text for g in gens["humaneval"]], timeout_s=s.humaneval_timeout)
    return result.to_json()


def _write_completions(out: Path, name: str, prompts: CardPrompts, gens: dict, verdicts: dict) -> None:
    for k, rows in gens.items():
        records = [{"id": p.id, "instruction": p.text, "completion": g.text, "n_tokens": len(g.token_ids),
                    "stopped": g.stopped, **{f"refusal_{j}": verdicts[k][j][i] for j in JUDGES if k in verdicts}}
                   for i, (p, g) in enumerate(zip(prompts.sets[k], rows, strict=True))]
        atomic_write_jsonl(out / "completions" / name / f"{k}.jsonl", records)


def _row(row: Row, m: dict | None, base_m: dict | None, seconds: dict) -> CardRow:
    if m is None or not row.ok:
        return CardRow(row.spec.name, "failed", _source(row), None, "failed", row.reason or "not measured", None,
                       None, None, None, None, None, None, None, seconds)
    v = m["verdicts"]
    sets = [k for k in ("harmful", "xstest_safe", "xstest_unsafe") if k in v]
    refusal = {j: rate(v["harmful"][j]) for j in JUDGES}
    disagree = {f"{a}_vs_{b}": agreement_table(v["harmful"][a], v["harmful"][b])
                for a, b in (("substring", "learned"), ("rules", "learned"), ("substring", "rules"))}
    over = {j: rate(v["xstest_safe"][j]) for j in JUDGES} if "xstest_safe" in sets else None
    unsafe = ({j: rate([1 - x for x in v["xstest_unsafe"][j]]) for j in JUDGES} if "xstest_unsafe" in sets else None)
    paired = None if row.kind == "base" or base_m is None else _paired(m, base_m)
    edit = row.edit.describe() if row.edit is not None else None
    return CardRow(row.spec.name, row.kind, _source(row), edit, "ok", None, refusal, disagree, over, unsafe,
                   m["damage"], m["humaneval"], m["substance"], paired, seconds)


def _source(row: Row) -> str:
    p = Path(row.spec.path)
    name = p.name if (p.is_absolute() or p.exists()) else row.spec.path
    return name + (f"@{row.spec.method}" if row.spec.method else "")


def _outcomes(m: dict) -> dict[str, list[int]]:
    """Per-prompt outcomes of the paired measures: learned-judge refusal, over-refusal, HumanEval pass."""
    v = m["verdicts"]
    out = {"refusal": v["harmful"]["learned"]}
    if "xstest_safe" in v:
        out["over_refusal"] = v["xstest_safe"]["learned"]
    if m["humaneval"] is not None:
        out["humaneval"] = [int(t["passed"]) for t in m["humaneval"]["tasks"]]
    return out


def _paired(m: dict, base_m: dict) -> dict:
    a, b = _outcomes(base_m), _outcomes(m)
    return {k: mcnemar(a[k], b[k]) for k in a if k in b}


def _assemble(base: str, rows: list[Row], measured: dict, seconds: dict, prompts: CardPrompts, s: CardSettings,
              base_lm, total_s: float, first_token_template: str | None) -> Card:
    from .. import __version__
    from .summary import display_name

    base_m = measured.get("base")
    card_rows = tuple(_row(r, measured.get(r.spec.name), base_m, seconds.get(r.spec.name, {})) for r in rows)
    ok = [(r.spec.name, measured[r.spec.name]) for r in rows if r.ok and measured.get(r.spec.name)]
    pairwise: dict = {}
    for i, (na, ma) in enumerate(ok):
        for nb, mb in ok[i + 1:]:
            for k, test in _paired(mb, ma).items():
                pairwise.setdefault(k, {})[f"{na}|{nb}"] = test
    settings = {**dataclasses.asdict(s), "dtype_resolved": str(base_lm.dtype).removeprefix("torch."),
                "device_resolved": str(base_lm.device), "chat_format": base_lm.chat.source,
                "sets": {k: len(v) for k, v in prompts.sets.items()}, "harmless_prompts": "harmless_val, first "
                f"{len(prompts.harmless)}", "first_token_template": first_token_template, "judges": list(JUDGES),
                "headline_judge": "learned"}
    settings.pop("data_dir", None)
    return Card(display_name(base), settings, card_rows, pairwise, {"total_s": round(total_s, 2), "rows": seconds},
                {"name": "refusal-direction", "version": __version__})


__all__ = ["CardPrompts", "card", "load_prompts"]
