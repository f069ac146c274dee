#!/usr/bin/env bash
# The benchmarks at paper sizes on one GPU, in under 8 minutes; writes a results table.
#
#   benchmarks/gpu.sh [OUT_DIR]            # GPU: SIMLA base, MvCoM r50, the input pipelines
#   SMOKE=1 benchmarks/gpu.sh [OUT_DIR]    # any machine: the same sequence at tiny sizes
#
# OUT_DIR (default benchmarks/gpu_run) receives results.jsonl (one JSON line per
# measurement), log.txt (everything printed) and table.md (benchmarks/report.py of the
# results). Every item has its own time limit and the run skips what would end past the
# total budget (BUDGET_S, default 470 s), so a slow compile costs one row, not the table.
# PYTHON selects the interpreter (default: python).
#
# Rows (GPU):
#   matmul   bfloat16 / float32 roofline (the MFU denominator)
#   simla    base, batch 64, 256 px, bfloat16 compute (float32 params, softmax, losses),
#            cuDNN attention where no attention dropout/probabilities are needed, dVAE MIM
#            targets: remat nothing_saveable / dots_with_no_batch_dims_saveable / off
#   mvcom    IResNet-50, 112 px, batch 128 (+ meta 64), 10000 identities, bfloat16:
#            plain step vs meta step
#   input    configs/simla.py:paper's pipeline and the face .rec pipeline, 8 read threads
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-benchmarks/gpu_run}
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
LOG="$OUT/log.txt"
: > "$LOG"
START=$(date +%s)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/xla_cache}

if [[ -n "${SMOKE:-}" ]]; then
  LABEL="gpu.sh smoke"
  MATMUL=(--sizes 256 --dtypes float32)
  SIMLA=(--size tiny --batch 8 --steps 2 --warmup 1 --dtype float32 --attention xla)
  SIMLA_RUNS=("--remat --remat_policy nothing_saveable" "")
  MEMORY=(--size tiny --batch 16 --memory_only)
  MVCOM=(--size default --batch 16 --meta_batch 8 --steps 2 --warmup 1 --rows plain,mvcom)
  INPUT=(--pipelines simla_small,face_synthetic --seconds 1 --threads 1)
  LIMIT_S=300; MVCOM_S=300; MATMUL_S=60; INPUT_S=60
else
  LABEL="gpu.sh"
  MATMUL=(--sizes 4096,8192 --dtypes bfloat16,float32)
  # --model_gflop: the step's FLOPs without remat, traced on a CPU (README): saves a second
  # trace of the base step and counts the ViT attention that cuDNN hides from XLA.
  SIMLA=(--size base --batch 64 --steps 10 --dtype bfloat16 --attention cudnn --mim_target dvae
         --model_gflop 57088.86)
  SIMLA_RUNS=("--remat --remat_policy nothing_saveable"
              "--remat --remat_policy dots_with_no_batch_dims_saveable" "")
  MEMORY=()
  MVCOM=(--size r50 --batch 128 --meta_batch 64 --classes 10000 --dtype bfloat16 --steps 10
         --rows plain,mvcom)
  INPUT=(--pipelines simla_base,face_rec --seconds 5 --threads 8)
  # The base step is one large unrolled program: its compile dominates, so it gets the
  # most time; the remat-policy alternatives run only if the budget is left.
  LIMIT_S=240; MVCOM_S=120; MATMUL_S=40; INPUT_S=50
fi

# run NAME SECONDS CMD...: runs CMD with a time limit if the budget allows, logs it.
run() {
  local name=$1 limit=$2
  shift 2
  local now=$(( $(date +%s) - START ))
  if (( now + limit > BUDGET_S )); then
    echo "== $name: skipped ($now s used, $limit s more would pass ${BUDGET_S} s)" \
      | tee -a "$LOG"
    return 0
  fi
  echo "== $name (limit $limit s, at $now s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  (( rc != 0 )) && echo "== $name: exit status $rc" | tee -a "$LOG"
  return 0
}

echo "gpu.sh $(date -Iseconds) on $(hostname); load $(cut -d' ' -f1-3 /proc/loadavg)" \
  | tee -a "$LOG"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader | tee -a "$LOG"

simla() {  # simla FLAGS...: one bench_simla.py run of the SIMLA size above
  # shellcheck disable=SC2068  # the flags are words
  run "simla $*" "$LIMIT_S" "$PY" benchmarks/bench_simla.py "${SIMLA[@]}" $@ --out "$RES" \
    --label "$LABEL"
}

# In order of what the targets need, so a tight budget drops the least useful rows.
run matmul "$MATMUL_S" "$PY" benchmarks/bench_matmul.py "${MATMUL[@]}" --out "$RES"
simla ${SIMLA_RUNS[0]}
run mvcom "$MVCOM_S" "$PY" benchmarks/bench_mvcom.py "${MVCOM[@]}" --out "$RES" --label "$LABEL"
run input "$INPUT_S" "$PY" benchmarks/bench_input.py "${INPUT[@]}" --results "$RES" --out "$RES" \
  --label "$LABEL"
for extra in "${SIMLA_RUNS[@]:1}"; do
  simla $extra
done
if (( ${#MEMORY[@]} )); then
  run "simla memory" 120 "$PY" benchmarks/bench_simla.py "${MEMORY[@]}" --out "$RES" \
    --label "$LABEL"
fi

if [[ -s "$RES" ]]; then
  "$PY" benchmarks/report.py "$RES" > "$OUT/table.md"
  tee -a "$LOG" < "$OUT/table.md"
else
  echo "no results" | tee "$OUT/table.md" -a "$LOG"
fi
echo "done in $(( $(date +%s) - START )) s: $OUT/table.md, $RES, $LOG" | tee -a "$LOG"
