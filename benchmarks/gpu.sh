#!/usr/bin/env bash
# The benchmarks at paper sizes on one GPU in under 8 minutes, every result kept the moment
# it exists.
#
#   benchmarks/gpu.sh [OUT_DIR] [SIMLA_REF]            # GPU
#   SMOKE=1 benchmarks/gpu.sh [OUT_DIR] [SIMLA_REF]    # any machine: tiny sizes (a CPU test)
#
# OUT_DIR (default benchmarks/gpu_run) receives results.jsonl (one JSON line per measurement,
# appended as soon as it is measured; one "item" line per command: ok / failed / timeout /
# skipped), log.txt (everything printed, unbuffered) and table.md (benchmarks/report.py).
# SIMLA_REF: a copy of the official SIMLA code set up as shared/reference/README.md says
# (run_ref.py and src/ in it; its interpreter venv/bin/python, or REF_PY); adds the official
# PyTorch step on the same device beside ours. Nothing is downloaded.
#
# Order: a tiny SIMLA step first (an API break shows in seconds; if cuDNN attention fails
# there, the SIMLA rows fall back to XLA attention), the matmul roofline (the MFU
# denominator), the base SIMLA step compiled alone (compile seconds and XLA's buffers are
# kept even if the step never runs) then run from the persistent cache (step s, examples/s,
# MFU, peak memory), the official step (bf16 autocast), MvCoM, the input pipelines, then
# alternatives while the budget lasts. Every item has a time limit; an item that would end
# past BUDGET_S (default 450 s) is skipped.
#
# Environment: PYTHON (default python), BUDGET_S, ONLY (comma-separated item names to run),
# DRY (print each item's command, run none),
# SCAN (default 1: model.scan_layers on in the SIMLA rows; 0: off), REF_PY, REF_PYTHONPATH (put first on PYTHONPATH for the official code only: the
# GPU image's transformers is too new for it, see shared/reference/README.md).
# Works with the jax the machine has (0.10.2 here, 0.11.x on accelerator images).
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
OUT=${1:-benchmarks/gpu_run}
REF=${2:-}
BUDGET_S=${BUDGET_S:-450}
ONLY=${ONLY:-}
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
LOG="$OUT/log.txt"
: > "$LOG"
START=$(date +%s)
# The base step is compiled once alone, then run from this cache.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:-0}

SCAN_FLAG=--scan
[[ "${SCAN:-1}" == 1 ]] || SCAN_FLAG=--no-scan

if [[ -n "${SMOKE:-}" ]]; then
  LABEL="gpu.sh smoke"
  DTYPE=float32; ATTENTION=xla         # cuDNN attention needs a GPU and 16-bit compute
  TINY=(--size tiny --batch 8 --steps 1 --warmup 1)
  MATMUL=(--sizes 256 --dtypes float32)
  BASE=(--size tiny --batch 8 --steps 2 --warmup 1)
  BASE_REMAT=(--remat --remat_policy dots_with_no_batch_dims_saveable)
  MORE_REMAT=("--remat --remat_policy nothing_saveable")
  MVCOM=(--size default --batch 16 --meta_batch 8 --steps 2 --warmup 1 --rows plain,mvcom)
  INPUT=(--pipelines simla_small,face_synthetic --seconds 1 --threads 1)
  REF_ARGS=(--mode time_base --device cpu --tiny_base --steps 1 --warmup 1)
  # A loaded 2-core CPU compiles the tiny step in one to four minutes.
  SMOKE_S=600; MATMUL_S=60; COMPILE_S=600; RUN_S=300; REF_S=120; MVCOM_S=300; INPUT_S=60
else
  LABEL="gpu.sh"
  DTYPE=bfloat16; ATTENTION=cudnn
  TINY=(--size tiny --batch 8 --steps 2 --warmup 1)
  MATMUL=(--sizes 4096,8192 --dtypes bfloat16,float32)
  # --model_gflop: the step's FLOPs without remat, traced on a CPU (benchmarks/README.md):
  # saves a second trace of the base step and counts the attention cuDNN hides from XLA.
  BASE=(--size base --batch 64 --steps 10 --mim_target dvae --model_gflop 57088.86)
  BASE_REMAT=(--remat --remat_policy dots_with_no_batch_dims_saveable)
  MORE_REMAT=("--remat --remat_policy nothing_saveable" "")
  MVCOM=(--size r50 --batch 128 --meta_batch 64 --classes 10000 --dtype bfloat16 --steps 10
         --rows plain,mvcom)
  INPUT=(--pipelines simla_base,face_rec --seconds 5 --threads 8)
  REF_ARGS=(--mode time_base --device cuda --batch 64)
  SMOKE_S=90; MATMUL_S=40; COMPILE_S=180; RUN_S=120; REF_S=110; MVCOM_S=100; INPUT_S=50
fi

# note KEY=VALUE...: one line in results.jsonl (date, host, load added), from the shell.
note() { "$PY" benchmarks/report.py "$RES" --add "$@" > /dev/null; }

# selected NAME: whether ONLY (if set) names this item (its first word).
selected() { [[ -z "$ONLY" || ",$ONLY," == *",${1%% *},"* ]]; }

# run NAME SECONDS CMD...: CMD under a time limit if the budget allows; its output goes to
# the log as it comes; an "item" line records how it ended.
run() {
  local name=$1 limit=$2
  shift 2
  local now=$(( $(date +%s) - START ))
  selected "$name" || return 0
  if (( now + limit > BUDGET_S )); then
    echo "== $name: skipped ($now s used, $limit s more would pass ${BUDGET_S} s)" | tee -a "$LOG"
    note bench=item "item=$name" status=skipped "at_s=$now" "limit_s=$limit" "label=$LABEL"
    return 1
  fi
  echo "== $name (limit $limit s, at $now s): $*" | tee -a "$LOG"
  [[ -n "${DRY:-}" ]] && return 0
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]} took=$(( $(date +%s) - START - now )) status=ok
  (( rc != 0 )) && status=failed
  (( rc == 124 || rc == 137 )) && status=timeout
  (( rc != 0 )) && echo "== $name: $status (exit status $rc after $took s)" | tee -a "$LOG"
  note bench=item "item=$name" "status=$status" "rc=$rc" "seconds=$took" "limit_s=$limit" \
    "label=$LABEL"
  return "$rc"
}

simla() {  # simla NAME SECONDS FLAGS...: one bench_simla.py run
  local name=$1 limit=$2
  shift 2
  run "$name" "$limit" "$PY" benchmarks/bench_simla.py --dtype "$DTYPE" --attention "$ATTENTION" \
    "$SCAN_FLAG" "$@" --out "$RES" --label "$LABEL"
}

official() {  # official NAME AMP: the official PyTorch step, its JSON line kept as a row
  local name=$1 amp=$2 ref_py=${REF_PY:-$REF/venv/bin/python}
  selected "$name" || return 0
  [[ -x "$ref_py" ]] || ref_py=$PY
  local out="$OUT/$name.json"
  local env=()
  [[ -n "${REF_PYTHONPATH:-}" ]] && env=(env "PYTHONPATH=$REF_PYTHONPATH${PYTHONPATH:+:$PYTHONPATH}")
  rm -f "$out"
  run "$name" "$REF_S" "${env[@]}" "$ref_py" "$REF/run_ref.py" "${REF_ARGS[@]}" --amp "$amp" \
    --out "$out" || return 0
  [[ -n "${DRY:-}" ]] && return 0
  "$PY" benchmarks/report.py "$RES" --add bench=simla_ref "label=$LABEL" "amp=$amp" \
    --json "$out" > /dev/null
}

{
  echo "gpu.sh $(date -Iseconds) on $(hostname); load $(cut -d' ' -f1-3 /proc/loadavg)"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
  "$PY" -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib',
jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee -a "$LOG"

# An API break (attention, sharding, scan) shows here in seconds, not after a base compile.
if selected smoke && ! simla smoke "$SMOKE_S" "${TINY[@]}" && [[ "$ATTENTION" == cudnn ]]; then
  echo "== the tiny step failed with cuDNN attention: the SIMLA rows use XLA attention" \
    | tee -a "$LOG"
  ATTENTION=xla
fi
run matmul "$MATMUL_S" "$PY" benchmarks/bench_matmul.py "${MATMUL[@]}" --out "$RES"
# Compiled alone first (abstract inputs, nothing run): its compile seconds and buffers are
# in results.jsonl even if the step then runs out of time; the run compiles from the cache.
# Both also lower the unrolled twin of the scanned step for its executed FLOPs (bench_simla:
# XLA counts a scan's body once): 28 CPU-seconds on this repository's CPU.
simla "simla compile" "$COMPILE_S" "${BASE[@]}" "${BASE_REMAT[@]}" --memory_only
simla "simla run" "$RUN_S" "${BASE[@]}" "${BASE_REMAT[@]}"
[[ -n "$REF" ]] && official "official_bf16" bf16
run mvcom "$MVCOM_S" "$PY" benchmarks/bench_mvcom.py "${MVCOM[@]}" --out "$RES" --label "$LABEL"
run input "$INPUT_S" "$PY" benchmarks/bench_input.py "${INPUT[@]}" --results "$RES" --out "$RES" \
  --label "$LABEL"
for extra in "${MORE_REMAT[@]}"; do
  # shellcheck disable=SC2086  # the flags are words
  simla "simla ${extra:-no remat}" $(( COMPILE_S + RUN_S / 2 )) "${BASE[@]}" $extra
done
[[ -n "$REF" ]] && official "official_fp32" none

if [[ -s "$RES" ]]; then
  "$PY" benchmarks/report.py "$RES" > "$OUT/table.md"
  tee -a "$LOG" < "$OUT/table.md"
else
  echo "no results" | tee "$OUT/table.md" -a "$LOG"
fi
echo "done in $(( $(date +%s) - START )) s: $OUT/table.md, $RES, $LOG" | tee -a "$LOG"
