#!/usr/bin/env bash
# tests/gpu/lease.sh [keep|real] — the command of a device call (the device tool's `run`),
# so a short lease spends its seconds on the GPU and not on typing. What it needs on the
# build machine first: tests/gpu/README.md, "The recipe that fits a short lease".
#
#   (no argument)  every check group but `real` at once, then bench_gpu; the summary, the
#                  op profile lines and the attention / GEMV timing lines are printed, all
#                  logs packed into $OUT/logs.tgz. carry: .gpu-bin .gpu-data .gpu-debs
#   keep           the same, after copying .gpu-bin and .gpu-model-a into build-gpu/keep/
#                  (a later call on the warm machine keeps what a command wrote, not what
#                  an earlier carry brought). carry: .gpu-bin .gpu-data .gpu-debs .gpu-model-a
#   real           the `real` group (SmolLM2 end to end) and the gemv group's timing run
#                  alone, with the binaries and the first model piece from build-gpu/keep/;
#                  call it right after `keep` (the machine goes back after ~30 s idle).
#                  carry: .gpu-model-b
# Measured: the no-argument and `keep` calls take 45-60 s of run time (plus ~35 s to start
# a machine), `real` about 5 s on the warm machine.
set -uo pipefail
SRC=$(cd "$(dirname "$0")/../.." && pwd)
cd "$SRC"
OUT=${OUT:-/tmp/lease-out}
mkdir -p "$OUT"
mode=${1:-all}
export MNEME_GPU_GROUP_TIMEOUT=${MNEME_GPU_GROUP_TIMEOUT:-150} MNEME_GPU_BENCH_TIMEOUT=${MNEME_GPU_BENCH_TIMEOUT:-200}
# run.sh with its logs in /tmp/$1 (packed into $OUT/$2), a wall limit of $3 s; the last $4 lines shown
run_packed() {
  export MNEME_GPU_LOG_DIR=/tmp/$1
  timeout "$3" tests/gpu/run.sh >"/tmp/$1-run.log" 2>&1
  echo "run.sh exit $?"
  mkdir -p "/tmp/$1" && cp "/tmp/$1-run.log" "/tmp/$1/run.log"
  tar czf "$OUT/$2" -C /tmp "$1"
  tail -"$4" "/tmp/$1/run.log" | cut -c1-300
}
case $mode in
  all|keep)
    if [[ $mode == keep ]]; then
      mkdir -p build-gpu/keep && cp -r .gpu-bin .gpu-model-a build-gpu/keep/ && echo "kept .gpu-bin and .gpu-model-a in build-gpu/keep/"
    fi
    export MNEME_GPU_PREBUILT=$SRC/.gpu-bin MNEME_GPU_PARALLEL=1
    export MNEME_GPU_GROUPS=${MNEME_GPU_GROUPS:-"ops gemv sample attn backend lora session session_sample tp session_tp"}
    run_packed gl logs.tgz 400 22
    grep -h "^profile" /tmp/gl/bench_gpu.log 2>/dev/null | cut -c1-700
    grep -h "FAIL" /tmp/gl/group-*.log 2>/dev/null | head -20
    grep -h "attn-decode\|gemv-multi\|gemv-time Q4_0" /tmp/gl/group-attn.log /tmp/gl/group-gemv.log 2>/dev/null | cut -c1-220
    ;;
  real)
    [[ -d build-gpu/keep/.gpu-bin ]] || { echo "no build-gpu/keep/ here: the machine went back after the keep call"; exit 3; }
    export MNEME_GPU_PREBUILT=$SRC/build-gpu/keep/.gpu-bin MNEME_GPU_NO_BENCH=1
    export MNEME_GPU_GROUPS=${MNEME_GPU_GROUPS:-"real gemv"}
    run_packed gl2 logs2.tgz 300 6
    grep -h "^real" /tmp/gl2/group-real.log 2>/dev/null | cut -c1-300
    grep -h "gemv-multi\|gemv-time Q4_0\|gemv-time Q8_0" /tmp/gl2/group-gemv.log 2>/dev/null | cut -c1-220
    ;;
  *) echo "usage: tests/gpu/lease.sh [keep|real]"; exit 2 ;;
esac
