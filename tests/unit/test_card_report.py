"""The report card rendered: the main table's cells, the failed row, missing measures, the schema's checks, the
Pareto front, the plots and the five files, from a synthetic `Card` built of the evaluation modules' own dicts."""

from __future__ import annotations

import json

import pytest

from refusal_direction.errors import UserError
from refusal_direction.evaluation.damage import DamageResult, Estimate
from refusal_direction.evaluation.stats import agreement_table, mcnemar, rate
from refusal_direction.evaluation.substance import substance
from refusal_direction.report.card import (
    CONTENT_NOTE,
    FIGURES,
    card_html,
    card_markdown,
    main_table,
    pareto_front,
    pareto_png,
    write_card_outputs,
)
from refusal_direction.report.card_schema import CARD_SCHEMA_VERSION, Card, CardRow

PNG = b"\x89PNG\r\n\x1a\n"
N = 40  # JailbreakBench prompts of the synthetic card
BASE_REFUSED = [1] * 36 + [0] * 4
EDIT_REFUSED = [1] * 3 + [0] * 37
GGUF_REFUSED = [1] * 30 + [0] * 10
COMPLETE = "Here is a clear answer that covers the question in some detail."


def _substring(values: list[int]) -> list[int]:
    """The substring judge's verdicts: the learned judge's, with refusals on the last two prompts (both complied)."""
    return values[:-2] + [1, 1]


def _judged(values: list[int]) -> dict:
    """judge -> rate: the learned and rules judges agree, the substring judge differs on two prompts."""
    return {"learned": rate(values), "substring": rate(_substring(values)), "rules": rate(values)}


def _damage(kl: list[float]) -> dict:
    est = Estimate.ratio(kl)
    ce = Estimate.ratio([2.0 * x + 10 for x in kl], [10] * len(kl))
    base_ce = Estimate.ratio([10.0] * len(kl), [10] * len(kl))
    return DamageResult(base="tiny/base", model="tiny/base + ablation", chat_format="tokenizer",
                        first_token_kl=est, multi_token_kl=Estimate.ratio([x / 2 for x in kl]), ce=ce,
                        base_ce=base_ce, ce_increase=Estimate.ratio([2.0 * x for x in kl], [10] * len(kl)),
                        n_prompts=len(kl), n_answers=len(kl), n_tokens=10 * len(kl)).to_json()


def _substance(refused: list[int]) -> dict:
    records = [{"id": i, "instruction": "Explain how it works.", "refusal": bool(r), "n_tokens": 64,
                "completion": "" if i == 5 else COMPLETE if i % 2 else "cut off in the middle of"}
               for i, r in enumerate(refused)]
    return substance(records, max_new_tokens=64).to_json()


def _humaneval(passed: int) -> dict:
    return {"pass_at_1": rate([1] * passed + [0] * (164 - passed)), "n": 164,
            "statuses": {"passed": passed, "failed": 164 - passed - 2, "timeout": 2}, "prompt_style": "x"}


def _row(name: str, kind: str, refused: list[int] | None = None, **kw) -> CardRow:
    fields = dict(source=f"/models/{name}", edit=None, status="ok", reason=None, refusal=None, judge_disagreement=None,
                  over_refusal=None, unsafe_compliance=None, damage=None, humaneval=None, substance=None,
                  paired_vs_base=None, seconds={"load": 2.5, "generate": 30.25})
    if refused is not None:
        fields.update(refusal=_judged(refused), over_refusal={"learned": rate([1] * 5 + [0] * 45)},
                      unsafe_compliance={"learned": rate([0] * 20 + [1] * 5)},
                      judge_disagreement={"substring_vs_learned": agreement_table(_substring(refused), refused)},
                      substance=_substance(refused))
    fields.update(kw)
    return CardRow(name=name, kind=kind, **fields)


def make_card() -> Card:
    rows = (
        _row("base", "base", BASE_REFUSED, humaneval=_humaneval(100)),
        _row("ablation", "edit", EDIT_REFUSED, edit={"method": "dim", "layer": 10}, damage=_damage([0.1, 0.2, 0.3]),
             humaneval=_humaneval(90), paired_vs_base={"refusal": mcnemar(BASE_REFUSED, EDIT_REFUSED)}),
        _row("broken", "hf", status="failed", reason="out of memory on cuda:0 while loading", seconds={"load": 1.0}),
        _row("gguf-q4", "gguf", GGUF_REFUSED, damage=_damage([0.5, 0.7, 0.9]),
             paired_vs_base={"refusal": mcnemar(BASE_REFUSED, GGUF_REFUSED)}),
    )
    pairwise = {"refusal": {"base|ablation": mcnemar(BASE_REFUSED, EDIT_REFUSED),
                            "base|gguf-q4": mcnemar(BASE_REFUSED, GGUF_REFUSED),
                            "ablation|gguf-q4": mcnemar(EDIT_REFUSED, GGUF_REFUSED)}}
    settings = {"dtype": "bfloat16", "device": "cpu", "prompts": {"jailbreakbench": N, "xstest_safe": 50},
                "max_new_tokens": 64, "judges": ["substring", "rules", "learned"]}
    return Card(base="tiny/base", settings=settings, rows=rows, pairwise=pairwise,
                timings={"total": 123.4, "rows": {"base": 32.75}}, tool={"name": "refusal-direction", "version": "0.1"})


def _table_rows(markdown: str, header: str) -> list[list[str]]:
    """The cells of each body line of the table whose header line starts with ``header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip()[1:-1].split(" | ")])
    return body


def _ci(block: dict, digits: int = 2, key: str = "rate") -> str:
    lo, hi = block["ci95"]
    return f"{block[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def test_main_table_has_one_line_per_row_with_the_numbers_in_their_columns():
    card = make_card()
    table = _table_rows(main_table(card), "| model | kind |")
    assert [r[0] for r in table] == ["base", "ablation", "broken", "gguf-q4"]
    assert all(len(r) == 12 for r in table)
    ablation = card.row("ablation")
    cells = dict(zip(["model", "kind", "jbb", "substring", "rules", "over", "unsafe", "kl1", "klm", "ce", "he", "p"],
                     table[1]))
    assert cells["kind"] == "edit"
    assert cells["jbb"] == _ci(ablation.refusal["learned"]) and cells["jbb"].startswith("0.07 [")
    assert cells["substring"] == "0.12" and cells["rules"] == "0.07"  # 5/40 and 3/40, no interval
    assert cells["over"] == _ci(ablation.over_refusal["learned"]) and cells["unsafe"] == "0.20"
    assert cells["kl1"] == _ci(ablation.damage["first_token_kl"], 3, "value") and cells["kl1"].startswith("0.200 [")
    assert cells["klm"].startswith("0.100 [") and cells["ce"] == f"{ablation.damage['ce']['value']:.3f}"
    assert cells["he"] == _ci(ablation.humaneval["pass_at_1"]) and cells["he"].startswith("0.55 [")
    test = ablation.paired_vs_base["refusal"]
    assert cells["p"] == f"{test['p_value']:.2g} ({test['n01']}/{test['n10']})" and cells["p"].endswith(" (0/33)")


def test_the_failed_row_shows_its_reason_and_missing_measures_a_dash():
    table = _table_rows(main_table(make_card()), "| model | kind |")
    base, broken, gguf = table[0], table[2], table[3]
    assert broken[2] == "failed: out of memory on cuda:0 while loading" and set(broken[3:]) == {""}
    assert base[7:10] == ["–", "–", "–"] and base[11] == "–"  # BASE: no damage block, no test against itself
    assert gguf[10] == "–" and gguf[7].startswith("0.700 [")  # no HumanEval


def test_card_markdown_has_the_header_note_and_every_section():
    md = card_markdown(make_card())
    assert md.startswith("# Report card: tiny/base\n")
    assert "- **dtype**: bfloat16" in md and "jailbreakbench=40, xstest\\_safe=50" in md
    assert CONTENT_NOTE in md and COMPLETE not in md  # no completion quoted
    for heading in ("## Substance of compliant answers", "## HumanEval outcomes", "## Judges disagree",
                    "## Paired tests between rows", "## Timings"):
        assert heading in md
    substance_rows = _table_rows(md, "| model | compliant answers |")
    assert [r[0] for r in substance_rows] == ["base", "ablation", "gguf-q4"]  # the failed row has nothing to show
    assert substance_rows[1][1] == "37" and substance_rows[1][2] == "0.03 (1/37)"  # record 5 is empty
    disagree = _table_rows(md, "| model | n |")
    assert disagree[1] == ["ablation", "40", "2", "0"]  # substring-yes/learned-no on the two flipped prompts
    matrix = _table_rows(md, "|  | base | ablation | gguf-q4 |")
    p_base, p_gguf = (f"{mcnemar(EDIT_REFUSED, x)['p_value']:.2g}" for x in (BASE_REFUSED, GGUF_REFUSED))
    assert matrix[1] == ["ablation", p_base, "·", p_gguf] and matrix[0][2] == p_base  # symmetric
    assert [m[0] for m in matrix] == ["base", "ablation", "gguf-q4"] and matrix[2][3] == "·"
    timings = _table_rows(md, "| model | load | generate | row |")
    assert timings[0] == ["base", "2.5", "30.2", "32.8"] and timings[2] == ["broken", "1.0", "–", "1.0"]
    assert "total: 123" in md and "![" not in md  # no figures unless asked for


def test_card_html_inlines_the_plots_from_a_directory(tmp_path):
    card = make_card()
    assert "<table>" in card_html(card) and "data:image/png" not in card_html(card)
    for x, name in FIGURES.items():
        (tmp_path / name).write_bytes(pareto_png(card, x))
    page = card_html(card, tmp_path)
    assert page.count("data:image/png;base64,") == 2 and "missing figure" not in page


def test_card_json_round_trips_and_rejects_bad_input():
    data = json.loads(json.dumps(make_card().to_json()))
    assert data["schema_version"] == CARD_SCHEMA_VERSION
    assert Card.from_json(data).to_json() == data
    with pytest.raises(UserError, match="schema_version 99"):
        Card.from_json({**data, "schema_version": 99})
    with pytest.raises(UserError, match="no timings"):
        Card.from_json({k: v for k, v in data.items() if k != "timings"})
    broken_row = {k: v for k, v in data["rows"][1].items() if k != "damage"}
    with pytest.raises(UserError, match="'ablation' has no damage"):
        Card.from_json({**data, "rows": [data["rows"][0], broken_row]})


def test_pareto_front_keeps_ties_and_drops_dominated_points():
    points = [(0.1, 0.5), (0.2, 0.3), (0.3, 0.6), (0.1, 0.5), (0.05, 0.9)]
    assert pareto_front(points) == [0, 1, 3, 4]  # (0.3, 0.6) is dominated by (0.2, 0.3); the equal pair stays
    assert pareto_front([(0.1, 0.5), (0.1, 0.4)]) == [1]  # equal in one coordinate, better in the other
    assert pareto_front([(0.4, 0.2), (0.5, 0.2), (0.6, 0.5), (0.3, 0.1)], minimize=(False, True)) == [1, 2, 3]
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0)]) == [0]
    with pytest.raises(ValueError, match="2 coordinates"):
        pareto_front([(1.0, 2.0)], minimize=(True, True, True))


def test_pareto_pngs_render_also_for_an_all_failed_card():
    card = make_card()
    failed = Card(base="tiny/base", settings={}, rows=(card.row("broken"),), pairwise={}, timings={}, tool={})
    for c in (card, failed):
        for x in FIGURES:
            assert pareto_png(c, x).startswith(PNG)
    md = card_markdown(failed)
    assert "failed: out of memory" in md and "## Substance" not in md and "## Paired tests" not in md
    with pytest.raises(ValueError, match="first_token_kl, humaneval"):
        pareto_png(card, "ce")


def test_write_card_outputs_writes_the_five_files(tmp_path):
    card = make_card()
    paths = write_card_outputs(tmp_path / "card", card)
    assert sorted(paths) == sorted(["card.json", "card.md", "card.html", "pareto_kl.png", "pareto_humaneval.png"])
    assert all(p.is_file() and p.parent == tmp_path / "card" for p in paths.values())
    assert Card.from_json(json.loads(paths["card.json"].read_text())).row("ablation").kind == "edit"
    assert "](pareto_kl.png)" in paths["card.md"].read_text()
    assert paths["card.html"].read_text().count("data:image/png;base64,") == 2
    assert paths["pareto_humaneval.png"].read_bytes().startswith(PNG)
