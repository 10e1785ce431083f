"""The benchmark scripts answer a bad input with exit 2 and one line that names it and the fix (CPU, no model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

# the tiny bench shape over the CPU and the disk (block 1 offloaded): a dry run of a multi-GPU map on CPU
TINY_MAP = json.dumps({"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                       "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})

CASES = [
    (["profile_kernels.py", "--model", "/no/such/model"], "--model /no/such/model"),
    (["decode_ab.py", "--model", "nope"], "--model nope"),
    (["decode_ab.py", "--model", "tiny"], "needs a CUDA device"),  # CI and this machine have no GPU
    (["lora_export_check.py", "RUN_WITH_CANDIDATES", "/tmp/x", "--params", "{form"], "--params is not JSON"),
    (["optimize_profile.py", "/no/such/run"], "optimize/study.journal"),
    (["optimize_profile.py", "RUN_WITH_STUDY", "--batch", "0"], "--batch 0"),
    (["lora_export_check.py", "/no/such/run", "/tmp/x"], "candidates.safetensors"),
    (["sweep_forward_check.py", "--model", "nope"], "--model 'nope'"),
    (["sweep_forward_check.py", "--model", "tiny", "--layers", "0"], "--layers and --prompts"),
    (["check_noise.py", "--model", "nope"], "--model 'nope'"),
    (["compare_completions.py", "/no/such/run", "/no/such/other"], "no completions file in both /no/such/run"),
    (["check_noise.py", "--model", "tiny", "--prompts", "1"], "--prompts 1"),
    (["multi_gpu.py", "--model", "nope"], "--model 'nope'"),
    (["multi_gpu.py", "--model", "tiny", "--n-prompts", "0"], "--n-prompts 0"),
    (["multi_gpu.py", "--model", "tiny", "--sweep-layers", "a,b"], "--sweep-layers 'a,b'"),
    (["multi_gpu.py", "--model", "tiny", "--device-map", "/no/map.json"], "device_map='/no/map.json'"),
    (["multi_gpu.py", "--model", "tiny", "--max-memory", "lots"], "max_memory='lots'"),
    (["multi_gpu.py", "--model", "tiny", "--device-map", "MAP_WITH_DISK"], "pass offload_folder"),
]


@pytest.mark.parametrize("args,says", CASES, ids=[c[0][0] + "-" + c[0][-1] for c in CASES])
def test_bad_input_exits_2_with_one_line(args, says, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    if "MAP_WITH_DISK" in args:
        (tmp_path / "map.json").write_text(TINY_MAP)
        args = [str(tmp_path / "map.json") if a == "MAP_WITH_DISK" else a for a in args]
    for marker, needed in (("RUN_WITH_STUDY", "optimize/study.journal"),
                           ("RUN_WITH_CANDIDATES", "directions/candidates.safetensors")):
        if marker in args:  # past the run-directory check, to reach the option's own
            (tmp_path / "run" / needed).parent.mkdir(parents=True)
            (tmp_path / "run" / needed).write_text("")
            args = [str(tmp_path / "run") if a == marker else a for a in args]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / args[0]), *args[1:]], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], proc.stderr


def test_multi_gpu_script_dry_run_on_cpu_and_disk(tmp_path):
    """benchmarks/multi_gpu.py end to end with the tiny shape dispatched over the CPU and the disk: every stage runs
    on the device-map paths (HF forward with hooks, HF generate), and the export writes an edited checkpoint."""
    (tmp_path / "map.json").write_text(TINY_MAP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(REPO / "benchmarks" / "multi_gpu.py"), "--model", "tiny", "--device-map",
           str(tmp_path / "map.json"), "--offload-folder", str(tmp_path / "off"), "--dtype", "float32",
           "--n-extract", "4", "--sweep-prompts", "2", "--sweep-layers", "0,2", "--n-prompts", "3", "--new-tokens",
           "5", "--export-dir", str(tmp_path / "exp"), "--out", str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert set(out["stages"]) == {"build", "extraction", "sweep", "generation", "export"}
    assert out["placement"] == "dispatched by accelerate over cpu (6 modules), disk (1 modules)"
    assert out["device_map"]["model.layers.1"] == "disk"
    sweep = out["stages"]["sweep"]["detail"]
    assert sweep["forward"] == "hf" and sweep["candidates"] == 2 * 5  # 2 layers x 5 positions
    assert out["stages"]["generation"]["tokens"] == {"baseline": 15, "ablation": 15}  # forced: 3 prompts x 5
    assert out["stages"]["export"]["detail"]["shards"] >= 1
    assert (tmp_path / "exp" / "edited" / "config.json").is_file()
    assert all(s["seconds"] > 0 and s["peak_GiB"] == {} for s in out["stages"].values())  # no GPU here


def test_check_noise_reports_the_forward_against_itself_and_float32():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "check_noise.py"), "--model", "tiny",
                           "--prompts", "3", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    for measure in ("row", "batch"):
        assert 0 <= out["bf16 one-at-a-time vs bf16 batch"][measure] < 0.05
        assert 0 < out["bf16 batch vs fp32"][measure] < 0.05  # bf16 rounding, seen against float32
        assert out["fp32 one-at-a-time vs fp32 batch"][measure] < 1e-4  # the control: float32 agrees with itself
    assert out["bf16 batch vs fp32"]["row"] >= out["bf16 batch vs fp32"]["batch"] * 0.99  # largest row >= overall
