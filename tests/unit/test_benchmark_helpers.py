"""Helpers of the benchmark scripts: compare_completions (two runs' completions) and profile_kernels' kernel kinds."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers.paths import REPO

spec = importlib.util.spec_from_file_location("compare_completions", REPO / "benchmarks" / "compare_completions.py")
cc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cc)


def _run(root, name, completions, generate_s=None, stage_s=None):
    run = root / name
    (run / "completions").mkdir(parents=True)
    rows = [{"instruction": f"q{i}", "completion": c, "refusal": c.startswith("I cannot")}
            for i, c in enumerate(completions)]
    (run / "completions" / "jbb__ablation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if generate_s is not None:
        stage = {} if stage_s is None else {"generate_s": stage_s}
        (run / "timings.json").write_text(json.dumps({"extract_s": 1.0, "generate_eval_s": generate_s,
                                                      "generate_xstest_safe_s": 1.5, **stage}))
    return run


def test_counts_identical_rows_first_difference_and_verdict_changes(tmp_path):
    a = _run(tmp_path, "hf", ["Sure, here", "I cannot help", "abcdef", "same"], generate_s=2.0)
    b = _run(tmp_path, "own", ["Sure, there", "I cannot help", "I cannot do", "same"], generate_s=1.0)
    r = cc.compare_runs(a, b)
    f = r["files"]["jbb__ablation.jsonl"]
    assert f["rows"] == 4 and f["identical"] == 2
    assert f["mean_first_difference_chars"] == (6 + 0) / 2  # "Sure, h|ere" vs "Sure, t|here"; "a" vs "I"
    assert f["refusals"] == [1, 2] and f["verdict_changes"] == 1
    assert r["generate_seconds"] == [3.5, 2.5]  # the generate_* stages summed, extraction left out
    c = _run(tmp_path, "hf-backend", ["x"] * 4, generate_s=2.0, stage_s=3.6)  # per set and the whole stage
    assert cc._generate_seconds(c) == 3.6


def test_refuses_runs_of_different_instructions(tmp_path):
    a = _run(tmp_path, "a", ["x", "y"])
    b = _run(tmp_path, "b", ["x"])
    with pytest.raises(ValueError, match="different instructions"):
        cc.compare_runs(a, b)
    empty = tmp_path / "empty"
    (empty / "completions").mkdir(parents=True)
    with pytest.raises(ValueError, match="no completions file"):
        cc.compare_runs(a, empty)
    assert cc.main([str(a), str(empty)]) == 2


def test_kernel_profile_counts_attention_kernels_as_attention():
    spec = importlib.util.spec_from_file_location("profile_kernels", REPO / "benchmarks" / "profile_kernels.py")
    pk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pk)
    assert pk.kind_of("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<") \
        == "attention"
    assert pk.kind_of("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
                      "cutlass::bfloat16_t>") == "attention"
    assert pk.kind_of("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN") == "matmul"
    assert pk.kind_of("cutlass3x_sm90_tensorop_gemm_bf16") == "matmul"
