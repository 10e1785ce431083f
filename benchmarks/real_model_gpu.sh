#!/usr/bin/env bash
# Real-model runs on one GPU machine without internet (../shared/MODELS.md §4): the Qwen2.5-Coder-0.5B-Instruct
# GGUF assembled from parts copied to /tmp/blob beforehand, wheels the machine lacks carried in .whl/, the data
# in .data/ (a copy of the shared datasets: splits, processed, jailbreakbench, xstest prompts).
#
#   bash benchmarks/real_model_gpu.sh STEP [STEP ...]     with STEP in: setup study auto compare offload optimize optfresh optprofile optkill card bench8b
#                                                          gputests fwdcheck noise ownreal bench2b ab2b ab8b prof2b prof8b multi70b multidry
#
# Each step writes its run directory under $RUNS (default /tmp/runs); the small result files of the steps go into
# one archive, $OUT/results-STEPS.tgz, when $OUT (the device tool's return folder) is set. Wall times: `time`.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/tmp/runs}
GGUF=/tmp/q05.gguf
SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 REFUSAL_DIRECTION_DATA=$PWD/.data
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p "$RUNS"

KEEP=$RUNS/keep
rm -rf "$KEEP"
keep() {  # keep NAME FILE...: the small result files of a step, archived at the end
    local name=$1; shift
    mkdir -p "$KEEP/$name"
    for f in "$@"; do [ -f "$f" ] && cp "$f" "$KEEP/$name/"; done
    return 0
}
STEPS=$(IFS=-; echo "$*")
archive() { [ -n "${OUT:-}" ] && [ -d "$KEEP" ] && tar czf "$OUT/results-$STEPS.tgz" -C "$KEEP" .; return 0; }
trap archive EXIT

rd() { python -m refusal_direction "$@"; }

for step in "$@"; do
  echo "== $step $(date +%T)"
  case $step in
    setup)
      python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      # byte-compile what this image leaves uncompiled (it sets PYTHONDONTWRITEBYTECODE=1, so no process would
      # write the .pyc files that a pip install or a first run writes elsewhere): the wheels above and src/
      python -m compileall -q -j 0 /tmp/site src > /dev/null
      if [ -f $GGUF ] || ls /tmp/blob/q05.part* > /dev/null 2>&1; then  # the random-weight steps need no GGUF
        [ -f $GGUF ] || cat /tmp/blob/q05.part* > $GGUF
        echo "$SHA  $GGUF" | sha256sum -c
      else echo "no GGUF parts in /tmp/blob: only the random-weight steps can run"; fi
      nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
      python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)";;
    auto)  # #14/#15: automatic selection with no config, the paper's protocol, XSTest conditions
      time rd replicate --model $GGUF --select auto --out $RUNS/auto
      keep auto $RUNS/auto/figures/selection_heatmaps.png $RUNS/auto/summary.json $RUNS/auto/selection.json $RUNS/auto/timings.json $RUNS/auto/capability.json \
           $RUNS/auto/report.md $RUNS/auto/direction.json $RUNS/auto/run.log
      keep auto-completions $RUNS/auto/completions/*.jsonl;;  # for re-judging here; never committed
    study)  # #14: every candidate direction judged by what it does (benchmarks/selection_study.py)
      time python benchmarks/selection_study.py --model $GGUF --out $RUNS/study --json $RUNS/study.json
      keep study $RUNS/study.json $RUNS/study/selection.json;;
    compare)  # #16: every method on one harness
      time rd compare --model $GGUF --out $RUNS/compare
      keep compare $RUNS/compare/compare/table.json $RUNS/compare/compare/table.md $RUNS/compare/compare/pareto.png \
           $RUNS/compare/compare/report.md $RUNS/compare/timings.json;;
    offload)  # #18: the model does not fit on the GPU (CPU offload); a fixed direction and a reduced budget
      time rd replicate --model $GGUF --out $RUNS/offload --device-map auto --max-memory "${OFFLOAD_MAX_MEMORY:-0=600MiB,cpu=64GiB}" \
          --layer "${OFFLOAD_LAYER:-13}" --position "${OFFLOAD_POSITION:--4}" --no-safety --no-xstest --n-eval 20 \
          --max-new-tokens 64 --conditions baseline,ablation
      keep offload $RUNS/offload/summary.json $RUNS/offload/timings.json $RUNS/offload/environment.json \
           $RUNS/offload/run.log;;
    optimize)  # #17: the search, batched (200 trials), then 20 more one at a time for the speed ratio
      time rd optimize --model $GGUF --out $RUNS/optimize --trials 200 --batch-trials 50 --seed 0
      time rd optimize --model $GGUF --out $RUNS/optimize --trials 220 --one-at-a-time --no-export
      keep optimize $RUNS/optimize/optimize/summary.json $RUNS/optimize/optimize/front.md \
           $RUNS/optimize/optimize/front.json $RUNS/optimize/optimize/front.png $RUNS/optimize/optimize/final.json \
           $RUNS/optimize/optimize/final.md $RUNS/optimize/optimize/export.json $RUNS/optimize/timings.json \
           $RUNS/optimize/run.log;;
    optfresh)  # #17: 200 trials end to end in a new run directory (run after a step that converted the GGUF)
      time rd optimize --model $GGUF --out $RUNS/optfresh --trials 200 --batch-trials 50 --seed 0
      keep optfresh $RUNS/optfresh/optimize/summary.json $RUNS/optfresh/timings.json $RUNS/optfresh/run.log;;
    optprofile)  # #17: where one batch of 50 trials goes (after optimize): build, generation, judge, KL
      time python benchmarks/optimize_profile.py $RUNS/optimize --batch 50 --json $RUNS/optprofile.json \
          --cpu-table $RUNS/optprofile-cpu.txt
      keep optprofile $RUNS/optprofile.json $RUNS/optprofile-cpu.txt;;
    optkill)  # #17: kill -9 during the search, re-run: the study continues (trial count and best values kept)
      timeout -s KILL "${KILL_AFTER:-45}" python -m refusal_direction optimize --model $GGUF --out $RUNS/optkill \
          --trials 200 --batch-trials 25 --seed 1 --no-export --n-xstest 0 > $RUNS/optkill-1.log 2>&1 || echo "killed: rc $?"
      python benchmarks/study_state.py $RUNS/optkill/optimize/study.journal | tee $RUNS/study-when-killed.txt
      time rd optimize --model $GGUF --out $RUNS/optkill --trials 200 --batch-trials 25 --seed 1 --no-export --n-xstest 0
      python benchmarks/study_state.py $RUNS/optkill/optimize/study.journal | tee $RUNS/study-after-rerun.txt
      keep optkill $RUNS/study-when-killed.txt $RUNS/study-after-rerun.txt $RUNS/optkill/optimize/summary.json;;
    bench8b)  # #18: Llama-3-8B's shape with random weights
      time rd bench --model llama-3-8b-shape --n-prompts 100 --new-tokens 512 --paper-batches 1 \
          --json $RUNS/bench8b.json
      keep bench8b $RUNS/bench8b.json;;
    gputests)  # the GPU tier (tiny models on CUDA: graphs, Triton kernels, the own step, unexpanded GQA)
      python -m pytest -q -p no:cacheprovider -rf tests/gpu > $RUNS/gputests.txt 2>&1 || true  # later steps run on
      tail -25 $RUNS/gputests.txt
      keep gputests $RUNS/gputests.txt;;
    ownreal)  # #18: HF's decode step vs the own one on the real 0.5B: one replicate each (fixed direction, bf16)
      for s in hf own; do  # each step named explicitly in a config file (the default is the own step)
        printf 'decode_step = "%s"\n' $s > $RUNS/$s-step.toml
        time rd replicate --model $GGUF --out $RUNS/step-$s --layer 14 --position -1 --no-safety --config $RUNS/$s-step.toml
        keep ownreal-$s $RUNS/step-$s/summary.json $RUNS/step-$s/timings.json $RUNS/step-$s/run.log
      done
      python benchmarks/compare_completions.py $RUNS/step-hf $RUNS/step-own --json $RUNS/ownreal.json
      grep -h -i "own decode step\|own step\|decode step" $RUNS/step-own/run.log | head -5 || true
      keep ownreal $RUNS/ownreal.json;;
    bench2b)  # #18: gemma-2b's shape with random weights (HF's and the own decode step, the sweep)
      time rd bench --model gemma-2b-shape --n-prompts 100 --new-tokens 512 --paper-batches 1 \
          --json $RUNS/bench2b.json
      keep bench2b $RUNS/bench2b.json;;
    ab2b|ab8b)  # fused / unfused / own decode step on one shape, and the attention kernel alone
      m=$([ $step = ab2b ] && echo gemma-2b-shape || echo llama-3-8b-shape)
      python benchmarks/decode_ab.py --model $m --out $RUNS/$step.json > /dev/null
      keep $step $RUNS/$step.json;;
    prof2b|prof8b)  # kernel tables of a decode step (HF's and the own step) and of the sweep
      m=$([ $step = prof2b ] && echo gemma-2b-shape || echo llama-3-8b-shape)
      python benchmarks/profile_kernels.py --model $m --out $RUNS/$step.json > $RUNS/$step.txt
      keep $step $RUNS/$step.json $RUNS/$step.txt;;
    fwdcheck)  # does the sweep run its own forward at full depth (bench init and profile_kernels' 0.08)?
      for m in gemma-2b-shape llama-3-8b-shape; do
        python benchmarks/sweep_forward_check.py --model $m > $RUNS/fwdcheck-$m.json
        python benchmarks/sweep_forward_check.py --model $m --init 0.08 > $RUNS/fwdcheck-$m-0.08.json
      done
      tail -n 12 $RUNS/fwdcheck-*.json
      keep fwdcheck $RUNS/fwdcheck-*.json;;
    noise)  # how far HF's bf16 forward moves from itself and from float32 (the floor under the 5 % checks)
      for m in gemma-2b-shape llama-3-8b-shape; do
        python benchmarks/check_noise.py --model $m > $RUNS/noise-$m.json
        python benchmarks/sweep_forward_check.py --model $m --dtype float32 > $RUNS/fwdcheck32-$m.json
      done
      tail -n 8 $RUNS/noise-*.json; grep -h '"forward"\|error' $RUNS/fwdcheck32-*.json
      keep noise $RUNS/noise-*.json $RUNS/fwdcheck32-*.json;;
    card)  # #31: the report card of BASE and the edits of the auto, optfresh and compare steps' run directories
      time rd card --base $GGUF --model dim=$RUNS/auto --model optimize=$RUNS/optfresh@optimize \
          --model cosmic=$RUNS/compare@cosmic --model layer_kernel=$RUNS/compare@layer_kernel --out $RUNS/card
      keep card $RUNS/card/card.json $RUNS/card/card.md $RUNS/card/card.html $RUNS/card/pareto_kl.png \
           $RUNS/card/pareto_humaneval.png $RUNS/card/run.log;;
    multi70b)  # issue 19 (2+ GPUs): Llama-3-70B's shape across the GPUs; every 8th layer swept, one batch each
      python benchmarks/multi_gpu.py --model llama-3-70b-shape --device-map auto --sweep-layers 0,8,16,24,32,40,48,56,64,72,79 \
          --batch-size 100 --out $RUNS/multi70b.json 2>&1 | tail -40
      keep multi70b $RUNS/multi70b.json;;
    multidry)  # the same script on one GPU with the 8B shape, split over the GPU and the CPU (a dry run of #19)
      python benchmarks/multi_gpu.py --model llama-3-8b-shape --device-map auto --max-memory 0=12GiB,cpu=100GiB \
          --n-extract 16 --sweep-prompts 4 --sweep-layers 0,31 --n-prompts 8 --new-tokens 32 --batch-size 8 \
          --out $RUNS/multidry.json 2>&1 | tail -40
      keep multidry $RUNS/multidry.json;;
    *) echo "unknown step $step" >&2; exit 2;;
  esac
done
