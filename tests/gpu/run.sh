#!/usr/bin/env bash
# tests/gpu/run.sh — build mneme with CUDA and check every CUDA op against the reference.
#
#   tests/gpu/run.sh              # on a machine with an NVIDIA GPU (a few minutes)
#   MNEME_GPU_BUILD=1 tests/gpu/run.sh   # build even without a GPU (the test then skips)
#
# Env: MNEME_GPU_NO_CMOCKA=1 (configure as if libcmocka were absent), MNEME_CUDA_ARCHS (default 90), MNEME_GPU_BUILD_DIR (default <repo>/build-gpu),
#      MNEME_GPU_JOBS (default: all cores), MNEME_GPU_E2E_DIR (inputs of the LoRA e2e check; default: made
#      by tests/gpu/make_e2e_data.sh into the build directory, or .gpu-data/).
# Exit 0: everything passed, or no CUDA device ("skipped: no CUDA device (reason)").
set -euo pipefail

SRC=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${MNEME_GPU_BUILD_DIR:-$SRC/build-gpu}
ARCHS=${MNEME_CUDA_ARCHS:-90}
JOBS=${MNEME_GPU_JOBS:-$(nproc 2>/dev/null || echo 4)}

skip() { echo "skipped: no CUDA device ($1)"; exit 0; }

# (3) no device: say so and succeed, before spending minutes in nvcc
if [[ -z "${MNEME_GPU_BUILD:-}" ]]; then
  command -v nvidia-smi >/dev/null 2>&1 || skip "nvidia-smi not found"
  nvidia-smi -L >/dev/null 2>&1 || skip "nvidia-smi: $(nvidia-smi -L 2>&1 | head -n1)"
fi

NVCC=$(command -v nvcc || true)
[[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
[[ -n "$NVCC" ]] || skip "no CUDA toolkit: nvcc not found"

# (1) configure + build. The GPU machine has no Debian -dev packages: the unit tests'
# libcmocka may be missing, so point CMOCKA_LIB at a placeholder and build only the GPU
# test target (the cmocka tests are never built here).
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); else GEN=(-G "Unix Makefiles"); fi
EXTRA=()
if [[ -n "${MNEME_GPU_NO_CMOCKA:-}" ]] || ! ldconfig -p 2>/dev/null | grep -q libcmocka; then
  EXTRA+=(-DCMOCKA_LIB="$BUILD/no-cmocka-here")
fi
mkdir -p "$BUILD"
# lz4 and xxhash headers: the GPU machine has no -dev packages, so .deb files downloaded
# on a build machine travel in .gpu-debs/ (tests/gpu/README.md) and are unpacked here.
if [[ ! -f /usr/include/lz4.h || ! -f /usr/include/xxhash.h || ! -f /usr/include/jansson.h ]] && compgen -G "$SRC/.gpu-debs/*.deb" >/dev/null; then
  for d in "$SRC"/.gpu-debs/*.deb; do dpkg -x "$d" "$BUILD/deps"; done
  # the -dev symlinks point at the runtime sonames, which the runtime debs provide
  EXTRA+=(-DCMAKE_PREFIX_PATH="$BUILD/deps/usr")
  export LIBRARY_PATH="$BUILD/deps/usr/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$BUILD/deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
t0=$(date +%s)
cmake -S "$SRC" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DMNEME_CUDA=ON -DMNEME_SERVER=OFF \
  -DMNEME_CUDA_ARCHS="$ARCHS" -DCMAKE_CUDA_COMPILER="$NVCC" ${EXTRA[@]+"${EXTRA[@]}"} >"$BUILD/configure.log" 2>&1 ||
  { cat "$BUILD/configure.log"; echo "FAILED: cmake configure"; exit 1; }
cmake --build "$BUILD" --target test_cuda_ops bench_gpu -j "$JOBS" ||
  { echo "FAILED: build"; exit 1; }
t1=$(date +%s)
echo "built test_cuda_ops in $((t1 - t0)) s ($BUILD)"

# inputs of the end-to-end LoRA check (tests/gpu/test_cuda_lora_e2e.c): made here when
# python3 has numpy and gguf, else taken from .gpu-data/ carried with the working tree
if [[ -z "${MNEME_GPU_E2E_DIR:-}" ]]; then
  if python3 -c 'import numpy, gguf' >/dev/null 2>&1 && "$SRC/tests/gpu/make_e2e_data.sh" "$BUILD/e2e" >/dev/null; then
    export MNEME_GPU_E2E_DIR="$BUILD/e2e"
  elif [[ -f "$SRC/.gpu-data/model.gguf" ]]; then
    export MNEME_GPU_E2E_DIR="$SRC/.gpu-data"
  else
    echo "note: no inputs for the lora e2e check (no python3 numpy/gguf, no .gpu-data/): it will be skipped"
  fi
fi

# (2) every op against the reference, then the backend smoke test and the end-to-end
# LoRA check; prints a table
rc=0
set +e
"$BUILD/test_cuda_ops" | tee "$BUILD/test_cuda_ops.log"
rc=${PIPESTATUS[0]}
set -e
t2=$(date +%s)
grep -q '^skipped:' "$BUILD/test_cuda_ops.log" && MNEME_GPU_NO_BENCH=1 # no device: nothing to time
echo "test_cuda_ops finished in $((t2 - t1)) s"

# the speed numbers (Llama-3-8B shape, random weights made on the spot): bench/bench_gpu.c
brc=0
if [[ -z "${MNEME_GPU_NO_BENCH:-}" ]]; then
  timeout "${MNEME_GPU_BENCH_TIMEOUT:-300}" "$BUILD/bench_gpu" --device cuda ${MNEME_GPU_BENCH_ARGS:-} >"$BUILD/bench_gpu.log" 2>&1 || brc=$?
  sed -n '1,/== bench_gpu summary/p' "$BUILD/bench_gpu.log" | grep -v "== bench_gpu summary" || true
  echo "bench_gpu finished in $(( $(date +%s) - t2 )) s (exit $brc; log $BUILD/bench_gpu.log)"
fi
echo
if [[ -n "${MNEME_GPU_NO_BENCH:-}" ]]; then :
elif [[ $brc -eq 0 ]]; then sed -n '/== bench_gpu summary/,$p' "$BUILD/bench_gpu.log"
else echo "bench_gpu FAILED (exit $brc):"; tail -5 "$BUILD/bench_gpu.log"; rc=1
fi
exit $rc
