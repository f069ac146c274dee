#!/usr/bin/env bash
# Compile-time targets of issue 11 on this CPU, in one run, each result kept the moment it
# is measured (meant for an idle machine: wall seconds are what the targets count).
#
#   benchmarks/compile_times.sh OUT_DIR [END_EPOCH_S]
#   SMOKE=1 benchmarks/compile_times.sh OUT_DIR        # the same sequence at tiny sizes
#
# Items, in order (each with its own time limit; none starts or runs past END_EPOCH_S):
#   pair       ../shared/reference/speed_pair.sh (or SPEED_PAIR), when SIMLA_REF is set: the
#              official PyTorch `small` step against ours, alternating, 2 rounds (our compile
#              from CACHE_SMALL when given: a cache already holding the `small` step)
#   first_*    the default run (`python run.py --config=configs/simla.py`) from launch to its
#              first finished step: empty compilation cache, then warm, then with the
#              candidate levers (LEVER_FLAGS: run.py flags), empty cache
#   small_*    `small` step lowering + XLA compile, layers scanned, as is / with the
#              candidate levers (LEVER_BENCH: bench_simla.py flags)
#   mvcom      MvCoM default meta step (and plain step) lowering + compile
#   base       `base` step (batch 8) lowering + XLA compile, layers scanned
#   first_*2   a second as-is / levers pair of the empty-cache default run, if time is left
#
#   ROUNDS=N BEFORE=DIR [VARIANTS="before after sync"] benchmarks/compile_times.sh OUT_DIR [END]
# runs only the default run's first step, as a before/after comparison in one run: N rounds
# (default 2) of empty-cache runs, alternating, of the variants: `before` the older checkout
# DIR (e.g. `git archive <commit>` unpacked; its own run.py), `after` this checkout, `sync`
# this checkout with the step compiled after start-up (`--config.compile_ahead=False`),
# `dropout` this checkout with BERT dropout 0.1; each variant's warm cache after round 2.
# OUT_DIR gets results.jsonl (JSON lines, benchmarks/report.py), log.txt and summary.txt
# (one line per item: how it ended and what it measured).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
OUT=${1:?OUT_DIR}
END=${2:-$(( $(date +%s) + 1020 ))}
mkdir -p "$OUT"
RES="$OUT/results.jsonl"; LOG="$OUT/log.txt"; SUM="$OUT/summary.txt"
# Candidate levers, measured beside the config as it is (they change numerics or random
# numbers, so they are not applied: benchmarks/README.md, "Compile time").
LEVER_FLAGS=${LEVER_FLAGS:---config.mlm_capacity.capacity=0 --config.rng_impl=unsafe_rbg}
LEVER_BENCH=${LEVER_BENCH:---override mlm_capacity.capacity=0 --override rng_impl=unsafe_rbg}

if [[ -n "${SMOKE:-}" ]]; then
  RUN=(--config=configs/simla.py:tiny --config.total_steps=2)
  SMALL=(--size tiny --scan); BASE=(--size tiny --scan --batch 8)
  MVCOM=(--size default --batch 16 --meta_batch 8 --rows plain,mvcom)
else
  RUN=(--config=configs/simla.py)
  SMALL=(--size small --scan); BASE=(--size base --scan --batch 8)
  MVCOM=(--size default --rows plain,mvcom)
fi

note() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$SUM" >> "$LOG"; }

# item NAME LIMIT_S CMD...: runs CMD with a time limit cut to the deadline, logs how it ended.
item() {
  local name=$1 limit=$2; shift 2
  local left=$(( END - $(date +%s) ))
  if (( left < 20 )); then note "$name skipped (deadline)"; return; fi
  (( limit > left )) && limit=$left
  note "$name start (limit ${limit} s; load $(cut -d' ' -f1-3 /proc/loadavg))"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  cat "$OUT/$name.txt" >> "$LOG"
  local how=ok; (( rc == 124 || rc == 137 )) && how=timeout; (( rc != 0 && rc != 124 && rc != 137 )) && how="failed rc=$rc"
  note "$name $how in $(( $(date +%s) - t0 )) s: $(grep -E 'first step done|lower s|compile s \(XLA|lower \+ compile|speed ratio|official s/step|^scan (True|False)' "$OUT/$name.txt" | tr -s ' ' | tr '\n' ';' | cut -c1-600)"
}

note "compile_times.sh at $(git rev-parse --short HEAD) ($(git status --porcelain | wc -l) uncommitted files), deadline $(date -u -d @"$END" +%H:%M:%S)"
FS=("$PY" benchmarks/first_step.py --out "$RES")
if [[ -n "${BEFORE:-}" ]]; then
  note "before: $BEFORE ($(cat "$BEFORE/COMMIT" 2>/dev/null || echo 'commit unknown'))"
  VARIANTS=(${VARIANTS:-before after sync})
  declare -A CACHE
  MADE=()
  for v in "${VARIANTS[@]}"; do CACHE[$v]=$(mktemp -d /tmp/compile_times_cache.XXXX); MADE+=("${CACHE[$v]}"); done
  variant() {   # variant NAME: the first_step.py flags of that variant (after its --cache)
    case $1 in
      before) echo "--root $BEFORE -- ${RUN[*]}" ;;
      after) echo "-- ${RUN[*]}" ;;
      sync) echo "-- ${RUN[*]} --config.compile_ahead=False" ;;
      dropout) echo "-- ${RUN[*]} --config.model.bert.dropout=0.1 --config.model.bert.attention_dropout=0.1" ;;
      *) echo "unknown variant $1" >&2; exit 2 ;;
    esac
  }
  warm() {
    for v in "${VARIANTS[@]}"; do
      item "warm_$v" 120 "${FS[@]}" --cache "${CACHE[$v]}" --label "warm_$v" $(variant $v)
    done
  }
  for (( r = 1; r <= ${ROUNDS:-2}; r++ )); do
    for v in "${VARIANTS[@]}"; do
      # Round 1 fills each variant's cache (read by the warm runs, after round 2); later
      # rounds start from a new, empty one.
      c=${CACHE[$v]}
      if (( r > 1 )); then c=$(mktemp -d /tmp/compile_times_cache.XXXX); MADE+=("$c"); fi
      item "cold_${v}_$r" 180 "${FS[@]}" --cache "$c" --label "cold_${v}_$r" $(variant $v)
    done
    (( r == 2 || (r == ${ROUNDS:-2} && r < 2) )) && warm
  done
  rm -rf "${MADE[@]}"
  note "done"
  exit 0
fi

WARM=$(mktemp -d /tmp/compile_times_cache.XXXX)
item first_cold 180 "${FS[@]}" --cache "$WARM" --label "default run, empty cache" -- "${RUN[@]}"
item first_warm 120 "${FS[@]}" --cache "$WARM" --label "default run, warm cache" -- "${RUN[@]}"
item first_levers 180 "${FS[@]}" --cold --label "default run, empty cache, levers" -- "${RUN[@]}" $LEVER_FLAGS
item small 240 "$PY" benchmarks/bench_simla.py "${SMALL[@]}" --memory_only --label "compile_times small" --out "$RES"
item small_levers 240 "$PY" benchmarks/bench_simla.py "${SMALL[@]}" --memory_only $LEVER_BENCH --label "compile_times small levers" --out "$RES"
item mvcom 180 "$PY" benchmarks/bench_mvcom.py "${MVCOM[@]}" --compile_only --out "$RES"
item base 300 "$PY" benchmarks/bench_simla.py "${BASE[@]}" --memory_only --label "compile_times base" --out "$RES"
item first_cold2 150 "${FS[@]}" --cold --label "default run, empty cache (2)" -- "${RUN[@]}"
item first_levers2 150 "${FS[@]}" --cold --label "default run, empty cache, levers (2)" -- "${RUN[@]}" $LEVER_FLAGS
rm -rf "$WARM"
note "done"
