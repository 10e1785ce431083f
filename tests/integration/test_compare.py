"""`compare` on a tiny Gemma (CPU, a few prompts and tokens): every method gets a row; resume; the table's math."""

from __future__ import annotations

import json

import pytest

from refusal_direction.report.compare import compare_table, dominates_reference
from refusal_direction.run.compare_methods import compare_methods
from tests.helpers.cli import run_cli, tiny_run_toml
from tests.helpers.tiny import save_tiny_gemma

cli = run_cli


@pytest.fixture(scope="module")
def compared(tmp_path_factory, data_dir):
    model = save_tiny_gemma(tmp_path_factory.mktemp("tiny") / "tiny-gemma")
    out = tmp_path_factory.mktemp("cmp") / "run"
    toml = out.parent / "settings.toml"
    toml.write_text(tiny_run_toml(data_dir, n_eval=4, judge=None))
    cli("compare", "--model", model, "--out", out, "--config", toml, "--n-xstest", "3")
    return model, out


def test_compare_writes_one_row_per_method(compared):
    _, out = compared
    table = json.loads((out / "compare" / "table.json").read_text())
    names = [r["method"] for r in table["rows"]]
    assert names == compare_methods()  # every registered compare row, in table order
    assert names[:8] == ["baseline", "dim", "projected", "norm_preserving", "layer_kernel", "subspace", "ace", "cosmic"]
    for row in table["rows"]:
        assert row["refusal"]["n"] == 4 and row["over_refusal"]["n"] == 3
        assert row["kl"]["n"] == 3 and row["ce"]["value"] is not None
        assert (row["method"] == "dim") == ("mcnemar_refusal_vs_dim" not in row)
    base = next(r for r in table["rows"] if r["method"] == "baseline")
    assert abs(base["kl"]["value"]) < 1e-9
    for name in ("table.md", "pareto.png", "examples.md", "report.md", "cosmic.json", "harmless_baseline.jsonl"):
        assert (out / "compare" / name).is_file(), name
    assert (out / "compare" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "McNemar" in (out / "compare" / "report.md").read_text()


def test_compare_resumes_and_runs_only_missing_methods(compared, data_dir):
    model, out = compared
    kept = out / "compare" / "methods" / "ace.json"
    gone = out / "compare" / "methods" / "subspace.json"
    before = kept.stat().st_mtime_ns
    gone.unlink()
    cli("compare", "--model", model, "--out", out, "--config", out.parent / "settings.toml", "--n-xstest", "3",
        "--methods", "dim,ace,subspace")
    assert kept.stat().st_mtime_ns == before and gone.is_file()
    names = [r["method"] for r in json.loads((out / "compare" / "table.json").read_text())["rows"]]
    assert names == ["dim", "ace", "subspace"]


def test_table_intervals_and_pareto_rule():
    def rec(refusals, kl):
        rows = [{"refusal": r, "completion": "", "instruction": ""} for r in refusals]
        return {"jailbreakbench": rows, "xstest": rows[:2], "kl_per_prompt": [kl] * 4,
                "ce_nll": [2.0, 4.0], "ce_tokens": [1, 3]}

    records = {"dim": rec([1, 1, 0, 0], 0.5), "a": rec([0, 0, 0, 0], 0.1), "b": rec([0, 0, 0, 0], 0.9)}
    rows = compare_table(records)
    assert rows[0]["refusal"]["rate"] == 0.5 and rows[0]["refusal"]["ci95"][0] < 0.5 < rows[0]["refusal"]["ci95"][1]
    assert abs(rows[0]["ce"]["value"] - 1.5) < 1e-12  # token-weighted: 6 nats / 4 tokens
    assert rows[1]["mcnemar_refusal_vs_dim"]["n10"] == 2
    assert dominates_reference(rows) == ["a"]
