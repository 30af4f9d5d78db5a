#!/usr/bin/env bash
# tests/gpu/prebuild.sh DIR — build the GPU checks on a machine without a GPU and put what
# the GPU machine needs to run them in DIR (default .gpu-bin/): test_cuda_ops, bench_gpu and
# the runtime libraries the GPU machine lacks (lz4, xxhash, jansson) in DIR/lib.
#
# Why: a lease of the GPU machine is minutes long, and building there spends a few of them
# (the AVX-512 matmul files alone take minutes in gcc). Then, on the GPU machine:
#   MNEME_GPU_PREBUILT=.gpu-bin tests/gpu/run.sh
# which falls back to building there when the binaries do not start (other system
# libraries). cuBLAS, cudart and NCCL are taken from the GPU machine (NCCL from PyTorch's
# wheel when the toolkit has none). Name DIR in the device tool's `carry` list; it is about
# 20-40 MB.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/../.." && pwd)
OUTDIR=${1:-$SRC/.gpu-bin}
BUILD=${MNEME_GPU_BUILD_DIR:-$SRC/build-gpu}
MNEME_GPU_BUILD=1 MNEME_GPU_BUILD_DIR="$BUILD" MNEME_GPU_NO_BENCH=1 MNEME_GPU_GROUPS=ops \
  "$SRC/tests/gpu/run.sh" | grep -E 'built|FAILED|skipped' || true
[[ -x "$BUILD/test_cuda_ops" && -x "$BUILD/bench_gpu" ]] || { echo "prebuild: the build failed"; exit 1; }
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR/lib"
cp "$BUILD/test_cuda_ops" "$BUILD/bench_gpu" "$OUTDIR/"
strip --strip-debug "$OUTDIR/test_cuda_ops" "$OUTDIR/bench_gpu" 2>/dev/null || true
# every shared library they need that is not CUDA's, glibc's or NCCL's
for lib in $(ldd "$BUILD/test_cuda_ops" "$BUILD/bench_gpu" | awk '/=> \// {print $3}' | sort -u); do
  case $(basename "$lib") in
    libcuda*|libcublas*|libcudart*|libnccl*|libc.so*|libm.so*|libpthread*|libdl*|librt*|libgcc_s*|libstdc++*|ld-linux*) ;;
    *) cp -L "$lib" "$OUTDIR/lib/" ;;
  esac
done
ls "$OUTDIR/lib"
du -sh "$OUTDIR"
