#!/usr/bin/env bash
# bench/compare/run_llamacpp_bench.sh — prompt and decode throughput of `mneme bench` next to
# llama.cpp's `llama-bench`: same model file, same thread count, runs interleaved.
#
#   bench/compare/run_llamacpp_bench.sh MNEME [-t "1 2"] [-n RUNS] [-p 512] [-g 128]
#
# MNEME is the mneme binary (e.g. build/mneme). llama-bench comes from LLAMA_CPP_DIR/build/bin
# (a llama.cpp source tree, built there with its tools when missing), or else from the copy
# vendored in the llama-cpp-python 0.3.36 sdist on PyPI, unpacked under LCPP_WORK (default
# /tmp/lcpp) as bench/compare/run_llamacpp_resume.sh does. Flash attention: LCPP_FA (default 1).
# Per thread count, RUNS rounds (default 3), each running llama-bench and mneme bench
# (-r 3 each, ppP and tgG) one after the other, alternating which goes first, with `uptime`
# before each. Printed per test: each side's best round (mean t/s over its 3 repetitions)
# and the ratio mneme / llama.cpp of those best rounds.
# Not part of CI: CI has no llama.cpp.
#
# LCPP_CMAKE_FLAGS replaces -DGGML_NATIVE=ON when llama.cpp is built. Where llama.cpp's AMX
# kernels die with SIGILL (the 2026-11-29 Xeon VM, in tinygemm_kernel_amx at a tileloadd,
# although a small program that asks for tile permission with arch_prctl runs tiles there),
# give the ISA without AMX:
#   LCPP_CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
#     -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
set -euo pipefail

[ $# -ge 1 ] || { sed -n '2,6p' "$0" >&2; exit 2; }
mneme=$(readlink -f "$1")
shift
threads="1 2"; runs=3; pp=512; tg=128
while [ $# -gt 0 ]; do
    case "$1" in
        -t) threads=$2; shift 2 ;;
        -n) runs=$2; shift 2 ;;
        -p) pp=$2; shift 2 ;;
        -g) tg=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
model=${MNEME_MODEL:-$HOME/.cache/mneme/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$model" ] || { echo "no model at $model (tools/setup.sh fetches it)" >&2; exit 1; }
[ -x "$mneme" ] || { echo "no mneme binary at $mneme" >&2; exit 1; }

if [ -z "${LLAMA_CPP_DIR:-}" ]; then
    work=${LCPP_WORK:-/tmp/lcpp}
    LLAMA_CPP_DIR=$work/llama_cpp_python-0.3.36/vendor/llama.cpp
    if [ ! -f "$LLAMA_CPP_DIR/include/llama.h" ]; then
        mkdir -p "$work"
        python3 -m pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d "$work"
        tar xzf "$work/llama_cpp_python-0.3.36.tar.gz" -C "$work"
    fi
fi
lb=$LLAMA_CPP_DIR/build/bin/llama-bench
if [ ! -x "$lb" ]; then
    nice -n 10 cmake -S "$LLAMA_CPP_DIR" -B "$LLAMA_CPP_DIR/build" -DCMAKE_BUILD_TYPE=Release ${LCPP_CMAKE_FLAGS:--DGGML_NATIVE=ON} \
        -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
    nice -n 10 cmake --build "$LLAMA_CPP_DIR/build" -j2 --target llama-bench
fi

out=$(mktemp -d /tmp/mneme-lcpp-bench-XXXXXX)
# t/s of test $2 in llama-bench's or mneme bench's markdown table in file $1 (the column
# before the last one: "mean ± sd")
tps() { grep -E "\| +$2 +\|" "$1" | awk -F'|' '{print $(NF-1)}' | awk '{print $1}'; }
for t in $threads; do
    for r in $(seq "$runs"); do
        for side in $( [ $((r % 2)) = 1 ] && echo "lcpp mneme" || echo "mneme lcpp"); do
            f=$out/$side.t$t.r$r
            uptime >"$f.uptime"
            if [ "$side" = lcpp ]; then
                "$lb" -m "$model" -t "$t" -p "$pp" -n "$tg" -r 3 -fa "${LCPP_FA:-1}" >"$f" 2>/dev/null
            else
                "$mneme" bench -m "$model" -t "$t" -p "$pp" -n "$tg" -r 3 >"$f" 2>/dev/null
            fi
        done
    done
    for test in "pp$pp" "tg$tg"; do
        best_l=0; best_m=0
        for r in $(seq "$runs"); do
            l=$(tps "$out/lcpp.t$t.r$r" "$test"); m=$(tps "$out/mneme.t$t.r$r" "$test")
            best_l=$(awk -v a="$best_l" -v b="$l" 'BEGIN{print (b > a ? b : a)}')
            best_m=$(awk -v a="$best_m" -v b="$m" 'BEGIN{print (b > a ? b : a)}')
        done
        awk -v t="$t" -v test="$test" -v l="$best_l" -v m="$best_m" \
            'BEGIN{printf "threads %s %-7s llama.cpp %9.2f t/s  mneme %9.2f t/s  mneme/llama.cpp %5.2fx\n", t, test, l, m, m / l}'
    done
done
echo "raw output and uptime: $out"
