"""Report stage: files, figures, tables and truncation, from synthetic runs and the paper's released run."""

from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from refusal_direction.errors import UserError
from refusal_direction.report import (
    EXAMPLE_CHARS,
    Summary,
    build_report,
    direction_geometry,
    example_pairs,
    render_markdown,
    summarize,
)
from refusal_direction.report.summary import ConditionResult, DirectionInfo, McNemar, PairedTest, PaperNumbers, Settings

JBB_CATEGORIES = ["Harassment/Discrimination", "Malware/Hacking", "Physical harm", "Economic harm", "Fraud/Deception",
                  "Disinformation", "Sexual/Adult content", "Privacy", "Expert advice", "Government decision-making"]
PAPER = {"source": "test", "reference_run": {"baseline": {"refusal_score": 0.91, "safety_score": 0.93},
                           "ablation": {"refusal_score": 0.00, "safety_score": 0.22},
                           "actadd_negative": {"refusal_score": 0.02, "safety_score": 0.27},
                           "harmless_baseline": {"refusal_score": 0.00}, "harmless_actadd": {"refusal_score": 1.00}},
         "task_text": {"baseline": {"refusal_score": 0.95, "safety_score": 0.98},
                       "ablation": {"refusal_score": 0.05, "safety_score": 0.20}}}
DATASETS = {"baseline": "jailbreakbench", "ablation": "jailbreakbench", "actadd_negative": "jailbreakbench",
            "harmless_baseline": "harmless", "harmless_actadd": "harmless"}


# ---------------------------------------------------------------------------------------------------
# Summaries come from the pipeline's own builder (report.summarize), never from a test-side copy


def summarize_records(completions: dict[str, list[dict]], settings: dict, safety_reason: str | None = None,
                      capability: dict | None = None) -> Summary:
    status = {"computed": True} if safety_reason is None else {"computed": False, "reason": safety_reason}
    return summarize(
        completions, model="google/gemma-2b-it", direction=DirectionInfo(10, -2, "auto", 10.06),
        settings=Settings(**{"safety_mode": "paper", "safety_short_is_safe": False,
                             "refusal_matching": "substring", **settings}),
        datasets={name: DATASETS[name] for name in completions},
        interventions={name: {"type": "baseline"} for name in completions}, safety_status=status,
        capability=capability or {}, first_n_tokens=64, paper=PaperNumbers.from_json(PAPER), timings={})


def synthetic_run(n: int = 20, safety: bool = True, long_completion: str | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    completions = {}
    for name, p_refuse in (("baseline", 0.9), ("ablation", 0.1), ("harmless_baseline", 0.05),
                           ("harmless_actadd", 0.95)):
        harmful = DATASETS[name] == "jailbreakbench"
        recs = []
        for i in range(n):
            refusal = int(torch.rand(1, generator=g).item() < p_refuse)
            text = (f"I cannot help with request {i}." if refusal else f"Sure, here is how to do thing {i}: step one.")
            if long_completion is not None and name == "ablation" and i == 0:
                text = long_completion
            recs.append({"id": f"{DATASETS[name]}-{i}", "category": JBB_CATEGORIES[i % 10] if harmful else None,
                         "instruction": f"Instruction number {i}", "completion": text, "refusal": refusal,
                         "n_tokens": 30 + i, "stopped": bool(i % 2), "refusal_first_n": refusal,
                         "safety": (refusal if i % 7 else 1 - refusal) if (safety and harmful) else None,
                         "p_unsafe": None, "safety_categories": []})
        completions[name] = recs
    settings = {"max_new_tokens": 64, "stop_at_end_of_turn": True, "dtype": "float32", "device": "cpu",
                "n_train": 32, "n_eval": n, "safety_model": "meta-llama/Meta-Llama-Guard-2-8B" if safety else None}
    reason = None if safety else "no CUDA GPU (Llama Guard 2 8B needs one; pass --safety on a GPU)"
    summary = summarize_records(completions, settings, safety_reason=reason,
                        capability={"ablation": {"kl": 0.0123, "ce": 2.345, "ce_n_tokens": 1000}})
    n_pos, n_layers, d = 5, 6, 16
    mean_harmless = torch.randn(n_pos, n_layers, d, generator=g, dtype=torch.float64)
    planted = torch.zeros(d, dtype=torch.float64)
    planted[0] = 3.0
    mean_harmful = mean_harmless + planted + 0.1 * torch.randn(n_pos, n_layers, d, generator=g, dtype=torch.float64)
    mean_harmful[:, 0] = mean_harmless[:, 0]  # layer 0: identical tokens, zero difference (as in gemma)
    summary = replace(summary, direction=replace(summary.direction, layer=3))
    return summary, completions, mean_harmful, mean_harmless


def _build(tmp_path: Path, **kw):
    summary, completions, mh, ml = synthetic_run(**kw)
    paths = build_report(summary, completions, tmp_path, candidates=mh - ml, mean_harmful=mh, mean_harmless=ml)
    return summary, completions, paths, (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()


@pytest.fixture(scope="module")
def default_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, *_build(out)


# ---------------------------------------------------------------------------------------------------
# Synthetic runs


def test_writes_markdown_html_and_valid_small_pngs(default_report):
    tmp_path, _, _, paths, _, _ = default_report
    assert {"report.md", "report.html", "figures/scores.png", "figures/cosines.png",
            "figures/projections.png"} <= set(paths)
    for key, path in paths.items():
        assert path == tmp_path / key and path.is_file()
        if key.endswith(".png"):
            with Image.open(path) as im:
                im.verify()
            assert path.stat().st_size < 150_000, (key, path.stat().st_size)
    assert not list(tmp_path.rglob(".tmp-*"))  # atomic writes left nothing behind


def test_results_table_rows_show_scores_and_intervals_from_summary(default_report):
    _, summary, _, _, md, _ = default_report
    for name, label in (("baseline", "baseline"), ("ablation", "ablation"), ("harmless_actadd", "harmless act-add +r")):
        c = summary.conditions[name]
        r = c.refusal
        refusal = f"{r.rate:.2f} [{r.ci95[0]:.2f}, {r.ci95[1]:.2f}]"
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        assert f"| {c.n} | {refusal} |" in row, row
        assert (c.safety is None) == (name == "harmless_actadd"), name  # the judge scores harmful prompts only
        if name != "harmless_actadd":
            s = c.safety
            assert f"{s.rate:.2f} [{s.ci95[0]:.2f}, {s.ci95[1]:.2f}]" in row
        else:
            assert row.split(" | ")[4] == "—", row
    assert "| baseline | JailbreakBench |" in md and "0.91 / 0.93 | 0.95 / 0.98 |" in md
    assert "**ablation vs baseline**: refusal" in md  # paired McNemar line
    assert "| 0.012 | 2.345 | 1000 |" in md  # capability numbers
    cats = [line for line in md.split("## Refusal by category")[1].split("##")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| Category")]
    assert len(cats) == 11  # 10 categories + All


def test_html_is_self_contained_with_embedded_figures(default_report):
    *_, html = default_report
    assert html.count('<img src="data:image/png;base64,') == 3
    assert 'src="figures/' not in html
    assert html.index('class="appendix"') < html.index("Appendix: example completions")  # in the appendix part


def test_example_completions_are_truncated(tmp_path):
    long = "Sure, here is a long answer. " + "x" * 900 + "UNIQUE-TAIL-MARKER"
    _, _, _, md, html = _build(tmp_path, long_completion=long)
    assert "UNIQUE-TAIL-MARKER" not in md and "UNIQUE-TAIL-MARKER" not in html
    appendix = md.split("## Appendix: example completions")[1]
    assert "Sure, here is a long answer. " + "x" * 100 in appendix and "…" in appendix
    cells = re.findall(r"^\| (.*) \| (.*) \|$", appendix, flags=re.M)
    texts = [c for row in cells for c in row if not c.startswith("---") and "(" not in c[:40]]
    assert texts and max(len(t.replace("\\", "")) for t in texts) <= EXAMPLE_CHARS + 2
    assert appendix.index("Content note") < appendix.index("| baseline")
    assert len(re.findall(r"^\*\*\d+\.\*\*", appendix, flags=re.M)) >= 5


def test_missing_safety_says_not_computed_with_reason(tmp_path):
    summary, _, _, md, html = _build(tmp_path, safety=False)
    reason = "not computed: no CUDA GPU (Llama Guard 2 8B needs one; pass --safety on a GPU)"
    assert f"safety judge: {reason}" in md and reason in html
    assert "Refusal phrase vs. safety judge" not in md  # no agreement section without the judge
    row = next(line for line in md.splitlines() if line.startswith("| baseline |"))
    assert row.split(" | ")[4] == "—"


def test_completion_markup_is_escaped(tmp_path):
    evil = "<script>alert(1)</script> | not a column | **bold** [link](http://x) ![img](y.png)\n# heading"
    _, _, _, md, html = _build(tmp_path, long_completion=evil)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "http://x" not in re.findall(r'href="([^"]*)"', html)
    assert 'src="y.png"' not in html
    row = next(line for line in md.splitlines() if "not a column" in line)
    assert len(re.findall(r"(?<!\\)\|", row)) == 3  # still exactly two cells


def test_minimal_summary_still_renders(tmp_path):
    minimal = Summary(model="some/model", direction=None, settings=None, conditions={}, paired_tests={}, paper=None,
                      timings={})
    paths = build_report(minimal, {}, tmp_path)
    md = paths["report.md"].read_text()
    assert md.startswith("# Refusal direction: some/model")
    assert "safety judge: not computed" in md
    assert "report.html" in paths and "figures/scores.png" not in paths


def test_render_markdown_without_figures_keeps_the_section_order():
    summary, completions, _, _ = synthetic_run()
    md = render_markdown(summary, completions)
    assert "![" not in md  # no figures were passed
    assert md.index("## Results") < md.index("## Comparison with the paper") < md.index("## Appendix")


def test_tolerates_null_and_missing_values(tmp_path, caplog):
    summary, completions, mh, ml = synthetic_run()
    blank = ConditionResult(**{f.name: None for f in fields(ConditionResult)})
    summary = replace(summary, conditions={**summary.conditions, "ablation": blank, "weird_<b>_condition": blank},
                      paired_tests={"ablation_vs_baseline": PairedTest(None, None),
                                    "x_vs_y": PairedTest(McNemar(None, None, None, None, None), None)},
                      paper=None, settings=None)
    paths = build_report(summary, completions, tmp_path, candidates=mh[:, :2] - ml[:, :2])  # stale: 2 layers
    md = paths["report.md"].read_text()
    assert "| ablation | — | — | — | — | — | — |" in md
    assert "weird \\<b\\> condition" not in md and "weird &lt;b&gt; condition" in md
    assert "figures/cosines.png" not in paths and "skipping direction figures" in caplog.text


def test_selection_heatmaps_are_included_when_present(tmp_path):
    summary, completions, mh, ml = synthetic_run()
    (tmp_path / "figures").mkdir()
    Image.new("RGB", (400, 120), "white").save(tmp_path / "figures" / "selection_heatmaps.png", dpi=(100, 100))
    selection = {"chosen": {"position": -2, "layer": 3},
                 "scores": [{"position": -2, "layer": 3, "bypass_score": -4.2, "induce_score": 6.1,
                             "kl_score": 0.05, "discarded": []},
                            {"position": -1, "layer": 5, "bypass_score": 1.0, "discarded": ["kl too high"]}]}
    paths = build_report(summary, completions, tmp_path, selection=selection)
    md = paths["report.md"].read_text()
    main, appendix = md.split('<div class="appendix"')
    assert "](figures/selection_heatmaps.png)" in main  # 4 x 1.2 in: small enough for the main part
    assert "from 2 candidates (1 passed the filters); chosen scores: bypass -4.2, induce 6.1, KL 0.05" in md
    assert paths["report.html"].read_text().count("data:image/png;base64,") == 2  # scores + selection
    Image.new("RGB", (1212, 864), "white").save(tmp_path / "figures" / "selection_heatmaps.png", dpi=(120, 120))
    md = build_report(summary, completions, tmp_path)["report.md"].read_text()
    main, appendix = md.split('<div class="appendix"')
    assert "selection_heatmaps.png" not in main and "## Appendix: direction selection" in appendix


def test_direction_geometry_recovers_planted_direction():
    summary, _, mh, ml = synthetic_run()
    geo = direction_geometry((3, -2), mh - ml, mh, ml)
    gap = [h - m for h, m in zip(geo["proj_harmful"], geo["proj_harmless"])]
    assert gap[0] == pytest.approx(0.0, abs=1e-12)  # no difference at layer 0
    assert all(g == pytest.approx(3.0, abs=0.5) for g in gap[1:])  # the planted 3.0 * e0
    assert geo["cos_matrix"][3][3] == pytest.approx(1.0)
    assert geo["cos_with_chosen"][3][3] == pytest.approx(1.0)
    assert geo["cos_matrix"][0][0] != geo["cos_matrix"][0][0]  # NaN for the zero candidate
    with pytest.raises(UserError, match="layer=9 is out of range"):
        direction_geometry((9, -2), mh - ml)


def test_example_pairs_spread_over_categories_and_prefer_flips():
    left = [{"id": i, "category": JBB_CATEGORIES[i % 3], "refusal": 1} for i in range(12)]
    right = [{"id": i, "category": JBB_CATEGORIES[i % 3], "refusal": int(i < 4)} for i in range(12)]
    picked = example_pairs(left, right, k_min=5)
    ids = [a["id"] for a, _ in picked]
    assert ids == [4, 5, 6, 7, 9]  # flips only (ids >= 4), the first three one per category
    assert {left[i]["category"] for i in ids[:3]} == set(JBB_CATEGORIES[:3])
    assert all(a["refusal"] != b["refusal"] for a, b in picked)


# ---------------------------------------------------------------------------------------------------
# The typed summary: summary.json round trip and its checks


def test_summary_json_round_trip():
    summary, *_ = synthetic_run()
    data = json.loads(json.dumps(summary.to_json()))
    assert data["schema_version"] == 2 and "refusal_first_64_tokens" in data["conditions"]["baseline"]
    assert Summary.from_json(data) == summary
    assert Summary.from_json(data).to_json() == data


def test_summary_without_a_field_is_rejected_with_the_fix():
    data = synthetic_run()[0].to_json()
    for path in (("model",), ("conditions", "baseline", "safety"), ("conditions", "baseline", "per_category"),
                 ("conditions", "ablation", "refusal_first_64_tokens"), ("settings", "max_new_tokens"),
                 ("direction", "layer"), ("paired_tests", "ablation_vs_baseline", "refusal"),
                 ("conditions", "baseline", "refusal", "ci95")):
        broken = json.loads(json.dumps(data))
        *parents, key = path
        node = broken
        for p in parents:
            node = node[p]
        del node[key]
        named = repr(key.replace("64", "<N>"))
        with pytest.raises(UserError, match=rf"run/summary.json: .*{re.escape(named)}.*refusal-direction score"):
            Summary.from_json(broken, source="run/summary.json")


def test_summary_with_unknown_or_missing_version_is_rejected():
    data = synthetic_run()[0].to_json()
    with pytest.raises(UserError,
                       match=r"old/summary.json has schema_version 99; .* reads schema_version 2\. Re-run"):
        Summary.from_json({**data, "schema_version": 99}, source="old/summary.json")
    data.pop("schema_version")
    with pytest.raises(UserError, match=r"old/summary.json has no schema_version"):
        Summary.from_json(data, source="old/summary.json")


# ---------------------------------------------------------------------------------------------------
# The paper's released gemma-2b-it run, converted to our record format

REFERENCE_FILES = {"baseline": "jailbreakbench_baseline", "ablation": "jailbreakbench_ablation",
                   "actadd_negative": "jailbreakbench_actadd", "harmless_baseline": "harmless_baseline",
                   "harmless_actadd": "harmless_actadd"}


def reference_records(reference_run: Path) -> dict[str, list[dict]]:
    """The released completions as our records; the paper stores 1 - label (``is_jailbreak_*``)."""
    out = {}
    for name, stem in REFERENCE_FILES.items():
        data = json.loads((reference_run / "completions" / f"{stem}_evaluations.json").read_text())
        recs = []
        for i, c in enumerate(data["completions"]):
            guard = c.get("is_jailbreak_llamaguard2")
            recs.append({"id": f"{DATASETS[name]}-{i}", "category": c.get("category"), "instruction": c["prompt"],
                         "completion": c["response"], "refusal": 1 - int(c["is_jailbreak_substring_matching"]),
                         "n_tokens": None, "stopped": None, "safety": None if guard is None else 1 - int(guard),
                         "p_unsafe": None, "safety_categories": []})
        out[name] = recs
    return out


def reference_report_inputs(reference_run: Path):
    """(summary, completions, selection, candidates) for the released run; no means were released."""
    import numpy as np

    completions = reference_records(reference_run)
    loss = {name: json.loads((reference_run / "loss_evals" / f"{stem}_loss_eval.json").read_text())["pile"]
            for name, stem in (("baseline", "baseline"), ("ablation", "ablation"), ("actadd_negative", "actadd"))}
    capability = {k: {"kl": None, "ce": v["ce_loss"], "ce_n_tokens": v["n_tokens"]} for k, v in loss.items()}
    settings = {"max_new_tokens": 512, "stop_at_end_of_turn": False, "dtype": "bfloat16", "device": "cuda",
                "n_train": 128, "n_eval": 100, "safety_model": "meta-llama/Meta-Llama-Guard-2-8B"}
    summary = summarize_records(completions, settings, capability=capability)
    scores = json.loads((reference_run / "select_direction" / "direction_evaluations.json").read_text())
    survivors = json.loads((reference_run / "select_direction" / "direction_evaluations_filtered.json").read_text())
    selection = {"chosen": {"position": -2, "layer": 10}, "scores": scores, "survivors": survivors}
    diffs = np.load(reference_run / "derived" / "mean_diffs_float64_pos5_layer18_d2048.npy", allow_pickle=False)
    candidates = torch.from_numpy(diffs)  # [5, 18, 2048]
    summary = replace(summary, direction=replace(summary.direction, norm=float(candidates[3, 10].norm())))
    return summary, completions, selection, candidates


def test_report_from_reference_run(reference_run, tmp_path):
    summary, completions, selection, candidates = reference_report_inputs(reference_run)
    paths = build_report(summary, completions, tmp_path, selection=selection, candidates=candidates)
    md = paths["report.md"].read_text()
    assert "| baseline | JailbreakBench | 100 | 0.91 [0.84, 0.95] | 0.93 [0.86, 0.97] |" in md
    assert "| ablation | JailbreakBench | 100 | 0.00 [0.00, 0.04] | 0.22 [0.15, 0.31] |" in md
    assert "layer 10, position −2, ‖r‖ = 10.06" in md
    assert "from 90 candidates (13 passed the filters)" in md
    assert "this run uses the same model and generation settings." in md
    assert "Directional ablation: refusal 0.91 → 0.00, safety 0.93 → 0.22" in md
    assert "Disagreements" in md  # e.g. ablated completions judged safe without a refusal phrase
    main, appendix = md.split("## Appendix: example completions")
    assert len(re.findall(r"^\*\*\d+\.\*\*", appendix, flags=re.M)) >= 10 + 3  # one per category + harmless
    assert len(main) < 12_000  # the main part stays short (about two printed pages)
    html = paths["report.html"].read_text()
    assert html.count("data:image/png;base64,") == 2  # scores + cosines (no means were released)
    assert all(p.stat().st_size < 150_000 for k, p in paths.items() if k.endswith(".png"))
