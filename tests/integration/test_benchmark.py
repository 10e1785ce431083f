"""The benchmark end to end on CPU with the tiny model: both generation paths, agreement, digests, report."""

import json

from refusal_direction.bench import format_report, run_benchmark


def test_benchmark_runs_on_cpu_with_the_tiny_model():
    r = run_benchmark("tiny", n_prompts=8, new_tokens=16, paper_batches=1, activation_prompts=8,
                      selection_prompts=4, device="cpu")
    w = r["workload"]
    assert w["conditions"] == ["baseline", "ablation"] and w["n_prompts"] == 8 and w["new_tokens"] == 16
    assert w["tokens"] == 8 * 16 * 2 and w["forced"]
    assert r["fast"]["first"]["rows"] == r["fast"]["repeat"]["rows"] == 8 * 2  # one mixed batch of both
    assert r["paper"]["scaled"] is False and r["paper"]["batches_total"] == 1
    assert set(r["agreement"]) == {"baseline", "ablation"}
    for name, a in r["agreement"].items():  # float32 on CPU: the two paths agree exactly
        assert a["identical_rows"] == a["rows"] == 8 and a["token_agreement"] == 1.0, name
    assert r["fast_repeat_identical"]
    assert set(r["token_digest"]) == set(w["conditions"])  # sha256 per condition of the fast tokens
    assert all(len(d) == 64 for d in r["token_digest"].values())
    json.dumps(r)
    report = format_report(r)
    for name in ("baseline", "ablation"):
        assert f"agreement with (a) [{name}]: 8/8 rows identical, 100.0% of tokens" in report, report
    assert f"x 2 conditions x 16 forced new tokens = {8 * 16 * 2} tokens" in report
    sel = r["selection"]  # which forward the sweep ran is recorded (its own forward on the tiny Gemma)
    assert sel["forward"] == "own" and any("sweep forward (fast_forward)" in x for x in sel["log"]), sel["log"]
    assert "the sweep's own forward" in report
    own = r["own_step"]  # the own decode step, run beside HF's: float32 on CPU, the same tokens
    assert own["used"] and own["identical_to_hf_step"], own["notes"]
    assert "fast path on the own decode step" in report and "16/16 rows identical to HF's step" in report, report
