#!/usr/bin/env bash
# tests/gpu/run.sh — build mneme with CUDA and check every CUDA op against the reference.
#
#   tests/gpu/run.sh              # on a machine with an NVIDIA GPU (a few minutes)
#   MNEME_GPU_BUILD=1 tests/gpu/run.sh   # build even without a GPU (the test then skips)
#
# Env: MNEME_GPU_NO_CMOCKA=1 (configure as if libcmocka were absent), MNEME_CUDA_ARCHS (default 90), MNEME_GPU_BUILD_DIR (default <repo>/build-gpu),
#      MNEME_GPU_JOBS (default: all cores), MNEME_GPU_E2E_DIR (inputs of the LoRA e2e check; default: made
#      by tests/gpu/make_e2e_data.sh into the build directory, or .gpu-data/).
#      MNEME_GPU_REAL_MODEL (the SmolLM2 gguf of the "real" group; default: joined from
#        .gpu-model-a/part + .gpu-model-b/part, made by tests/gpu/split_model.sh, when both are here).
#      MNEME_GPU_PREBUILT=DIR: DIR/test_cuda_ops, DIR/bench_gpu and DIR/lib/*.so* built on another
#        machine (tests/gpu/prebuild.sh); used when they start here, else the script builds.
#      MNEME_GPU_GROUPS="ops gemv ..." (default: all), MNEME_GPU_GROUP_TIMEOUT (s, default 300),
#      MNEME_GPU_PARALLEL=1 (run the check groups at once: faster, but their timing lines share
#        the GPU), MNEME_GPU_LOG_DIR (default: the build directory).
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

# NCCL: the toolkit may not carry it; PyTorch's wheel (nvidia-nccl-cu13) does
NCCL_DIR=""
for d in /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, s, "lib") for p in nvidia.__path__ for s in ("nccl", "cu13")))' 2>/dev/null); do
  if [[ -f "$d/libnccl.so.2" ]]; then NCCL_DIR=$d; break; fi
done
[[ -n "$NCCL_DIR" ]] && export LD_LIBRARY_PATH="$NCCL_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

BIN=""
if [[ -n "${MNEME_GPU_PREBUILT:-}" ]]; then
  export LD_LIBRARY_PATH="$MNEME_GPU_PREBUILT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # cudart and cuBLAS: the toolkit's own folder, wherever this machine keeps it
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d $d ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
  done
  # an unknown group makes test_cuda_ops list its groups and exit 2: proof that it loads
  probe=$("$MNEME_GPU_PREBUILT/test_cuda_ops" no-such-group 2>&1 || true)
  if [[ $probe == *"unknown group"* ]]; then
    BIN=$MNEME_GPU_PREBUILT
    echo "using the prebuilt binaries in $BIN (NCCL: ${NCCL_DIR:-none})"
  else
    echo "prebuilt binaries do not start here: $(echo "$probe" | head -n2 | tr '\n' ' ')"
  fi
fi
if [[ -z "$BIN" ]]; then
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
if [[ -n "$NCCL_DIR" && -f "$NCCL_DIR/../include/nccl.h" ]]; then
  EXTRA+=(-DNCCL_LIB="$NCCL_DIR/libnccl.so.2" -DNCCL_INCLUDE="$NCCL_DIR/../include")
fi
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
BIN=$BUILD
fi
t1=$(date +%s)

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

# the real model of the "real" group (tests/gpu/test_cuda_real_model.c): 98 MB, more than one
# device call carries, so tests/gpu/split_model.sh cuts it in two and two calls bring the
# pieces (tests/gpu/README.md); joined here next to the build (not into the log folder, which
# a device script may pack up and send back), checked against the whole file's sha256
# (the first piece may also sit in build-gpu/keep/, where the first call's command copied it:
# a later call's carry removes carried paths it does not name, but keeps what commands wrote)
PART_A=$SRC/.gpu-model-a/part
[[ -f $PART_A ]] || PART_A=$SRC/build-gpu/keep/.gpu-model-a/part
if [[ -z "${MNEME_GPU_REAL_MODEL:-}" && -f "$PART_A" && -f "$SRC/.gpu-model-b/part" ]]; then
  if [[ -d "$BUILD" ]]; then REAL_DIR=$BUILD; else REAL_DIR=${TMPDIR:-/tmp}/mneme-gpu-real; mkdir -p "$REAL_DIR"; fi
  cat "$PART_A" "$SRC/.gpu-model-b/part" >"$REAL_DIR/smollm2.gguf"
  want=$(cat "$SRC/.gpu-model-b/sha256" 2>/dev/null || echo "(no .gpu-model-b/sha256)")
  got=$(sha256sum "$REAL_DIR/smollm2.gguf" | cut -d' ' -f1)
  if [[ $got == "$want" ]]; then
    export MNEME_GPU_REAL_MODEL="$REAL_DIR/smollm2.gguf"
    echo "real model: $MNEME_GPU_REAL_MODEL (joined from .gpu-model-a/ and .gpu-model-b/, sha256 ok)"
  else
    echo "note: .gpu-model-a/part + .gpu-model-b/part have sha256 $got, not $want (parts of different splits?): the real group will be skipped"
    rm -f "$REAL_DIR/smollm2.gguf"
  fi
elif [[ -z "${MNEME_GPU_REAL_MODEL:-}" ]]; then
  echo "note: no real model (MNEME_GPU_REAL_MODEL unset, not both .gpu-model-a/part and .gpu-model-b/part): the real group will be skipped"
fi

# (2) the check groups of test_cuda_ops, each in its own process with a timeout (a kernel
# fault poisons a CUDA context; a hang must not eat a short lease), then a summary
GROUPS_ALL="ops gemv sample attn backend lora session session_sample tp session_tp real"
GROUPS_RUN=${MNEME_GPU_GROUPS:-$GROUPS_ALL}
LOGS=${MNEME_GPU_LOG_DIR:-$BUILD}
GT=${MNEME_GPU_GROUP_TIMEOUT:-300}
mkdir -p "$LOGS"
rc=0
run_group() { timeout "$GT" "$BIN/test_cuda_ops" "$1" >"$LOGS/group-$1.log" 2>&1; echo $? >"$LOGS/group-$1.rc"; }
if [[ -n "${MNEME_GPU_PARALLEL:-}" ]]; then
  for g in $GROUPS_RUN; do run_group "$g" & done
  wait
else
  for g in $GROUPS_RUN; do run_group "$g"; cat "$LOGS/group-$g.log"; done
fi
t2=$(date +%s)
skipped=0
for g in $GROUPS_RUN; do grep -q '^skipped: no CUDA device' "$LOGS/group-$g.log" && skipped=1; done
if [[ $skipped -eq 1 ]]; then head -n1 "$LOGS/group-${GROUPS_RUN%% *}.log"; MNEME_GPU_NO_BENCH=1; fi
echo "check groups finished in $((t2 - t1)) s"

# the speed numbers (Llama-3-8B shape, random weights made on the spot): bench/bench_gpu.c
brc=0
if [[ -z "${MNEME_GPU_NO_BENCH:-}" ]]; then
  timeout "${MNEME_GPU_BENCH_TIMEOUT:-300}" "$BIN/bench_gpu" --device cuda ${MNEME_GPU_BENCH_ARGS:-} >"$LOGS/bench_gpu.log" 2>&1 || brc=$?
  echo "bench_gpu finished in $(( $(date +%s) - t2 )) s (exit $brc; log $LOGS/bench_gpu.log)"
fi

# summary last: every group's verdict and its failing lines, then the bench table
echo
echo "== tests/gpu summary"
for g in $GROUPS_RUN; do
  grc=$(cat "$LOGS/group-$g.rc" 2>/dev/null || echo "?")
  case $grc in
    0) v="passed" ;; 124) v="TIMEOUT after ${GT} s" ;; 1) v="FAILED" ;; *) v="FAILED (exit $grc)" ;;
  esac
  [[ $grc == 0 ]] || rc=1
  printf '%-15s %s\n' "$g" "$v"
  if [[ $grc != 0 ]]; then grep -E 'FAIL|error|Error|failed' "$LOGS/group-$g.log" | head -n 12 | sed 's/^/    /'; tail -n 3 "$LOGS/group-$g.log" | sed 's/^/    | /'; fi
done
if [[ -n "${MNEME_GPU_NO_BENCH:-}" ]]; then :
elif [[ $brc -eq 0 ]]; then sed -n '/== bench_gpu summary/,$p' "$LOGS/bench_gpu.log"
else echo "bench_gpu FAILED (exit $brc):"; tail -8 "$LOGS/bench_gpu.log"; rc=1
fi
exit $rc
