#!/usr/bin/env bash
# Behaviour unchanged between two versions of the code, on one GPU: `compare` and `optimize` on the real
# Qwen2.5-Coder-0.5B (same methods, prompts and seed) and the bench's token digest at gemma-2b shape.
#
#   bash benchmarks/parity_gpu.sh NAME SRC STEP...    STEP in: setup compare optimize digest
#
# NAME labels the outputs ($OUT/NAME-*.json, run directories under /tmp/parity/NAME); SRC is the `src` folder of the
# version to run (this checkout's `src`, or `git archive OLD src | tar -x -C old` → `old/src`). The GGUF parts, the
# wheels (.whl: gguf, optuna, colorlog) and the data (.data) are staged as for benchmarks/real_model_gpu.sh.
# Compare two outputs with `python benchmarks/parity_diff.py A B` (tables, fronts, every trial, digests).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1; SRC=$(cd "$2" && pwd); shift 2
GGUF=/tmp/q05.gguf
RUNS=/tmp/parity/$NAME
OUT=${OUT:-/tmp/parity/out}
METHODS=baseline,dim,projected,norm_preserving,layer_kernel,subspace,ace,cosmic  # the rows both versions have
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 REFUSAL_DIRECTION_DATA=$PWD/.data PYTHONPATH=/tmp/site:$SRC
mkdir -p "$RUNS" "$OUT"
rd() { python -m refusal_direction "$@"; }
for step in "$@"; do
  echo "== $NAME $step $(date +%T)"
  case $step in
    setup) bash benchmarks/real_model_gpu.sh setup;;
    compare)
      time rd compare --model $GGUF --out "$RUNS/compare" --methods $METHODS --n-xstest 250
      cp "$RUNS/compare/compare/table.json" "$OUT/$NAME-compare-table.json";;
    optimize)
      time rd optimize --model $GGUF --out "$RUNS/optimize" --trials 200 --batch-trials 50 \
        --seed 0 --n-xstest 250
      cp "$RUNS/optimize/optimize/front.json" "$OUT/$NAME-optimize-front.json"
      cp "$RUNS/optimize/optimize/summary.json" "$OUT/$NAME-optimize-summary.json"
      python - "$RUNS/optimize/optimize/study.journal" "$OUT/$NAME-optimize-trials.json" <<'PY'
import json, sys
import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
storage = JournalStorage(JournalFileBackend(sys.argv[1]))
study = optuna.load_study(study_name=storage.get_all_studies()[0].study_name, storage=storage)
json.dump([{"number": t.number, "params": t.params, "values": t.values, "state": t.state.name} for t in study.trials],
          open(sys.argv[2], "w"), indent=1)
PY
      ;;
    digest)
      python benchmarks/token_digest.py --model gemma-2b-shape --n-prompts 100 --new-tokens 512 \
        --initializer-range 0.08 --json "$OUT/$NAME-digest.json";;
    *) echo "unknown step $step"; exit 2;;
  esac
done
