#!/usr/bin/env bash
# bench/compare/run_llamacpp_resume.sh — mneme's session resume next to llama.cpp's slot
# restore, same model, same threads, same machine, runs interleaved.
#
#   bench/compare/run_llamacpp_resume.sh MNEME_BUILD_DIR [-t "1 2"] [-n RUNS] [-L "512 2048 8000"]
#
# MNEME_BUILD_DIR holds bench_session, built with
#   cmake -S . -B build-lcpp && cmake --build build-lcpp -j2 --target bench_session
# (add -DMNEME_CUDA=OFF -DMNEME_SERVER=OFF to skip nvcc and the server on a CPU box; the CPU
# numbers are the same).
#
# llama.cpp: LLAMA_CPP_DIR is a llama.cpp source tree; its libllama is built in
# $LLAMA_CPP_DIR/build unless one is there already. Without LLAMA_CPP_DIR the vendored copy in
# the llama-cpp-python 0.3.36 sdist (from PyPI) is used, unpacked under LCPP_WORK (default
# /tmp/lcpp), reused when present:
#   pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d $LCPP_WORK
#   tar xzf $LCPP_WORK/llama_cpp_python-0.3.36.tar.gz -C $LCPP_WORK
#   D=$LCPP_WORK/llama_cpp_python-0.3.36/vendor/llama.cpp
#   cmake -S $D -B $D/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON \
#         -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
#   cmake --build $D/build -j2 --target llama
#
# Each run (RUNS per thread count, default 3) runs llamacpp_resume (-r 3) and
# bench_session (best of 3 inside) one after the other, alternating which goes first, with
# `uptime` before each. Per run each side gives its best of 3; the table shows, over the runs,
# the median and (in brackets) the minimum of those, and the ratios are taken within a run
# (llama.cpp's number over mneme's number of the same run), then their median (min).
# Raw output goes to $OUT_DIR (default a new /tmp/mneme-lcpp-XXXXXX). LCPP_FA=auto|on|off sets
# llama.cpp's flash attention (default auto, llama-server's default, which resolves to on here; off
# is faster for these small turns on this CPU).
# Not part of CI: CI has no llama.cpp.
#
# LCPP_CMAKE_FLAGS replaces -DGGML_NATIVE=ON when llama.cpp is built. Where llama.cpp's AMX
# kernels die with SIGILL (the 2026-11-29 Xeon VM, in tinygemm_kernel_amx at a tileloadd,
# although a small program that asks for tile permission with arch_prctl runs tiles there),
# give the ISA without AMX:
#   LCPP_CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
#     -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 1 ]; then
    sed -n '2,5p' "$0" >&2
    exit 2
fi
mneme_build=$(cd "$1" && pwd)
shift
threads="1 2"
runs=3
lens="512 2048 8000"
while [ $# -gt 0 ]; do
    case "$1" in
        -t) threads=$2; shift 2 ;;
        -n) runs=$2; shift 2 ;;
        -L) lens=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
model=${MNEME_MODEL:-$HOME/.cache/mneme/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$model" ] || { echo "no model at $model (tools/setup fetches it)" >&2; exit 1; }
[ -x "$mneme_build/bench_session" ] || {
    echo "no $mneme_build/bench_session: cmake --build $mneme_build -j2 --target bench_session" >&2; exit 1; }

# ---- (a) llama.cpp's libllama ----------------------------------------------------------------
if [ -z "${LLAMA_CPP_DIR:-}" ]; then
    work=${LCPP_WORK:-/tmp/lcpp}
    LLAMA_CPP_DIR=$work/llama_cpp_python-0.3.36/vendor/llama.cpp
    if [ ! -f "$LLAMA_CPP_DIR/include/llama.h" ]; then
        mkdir -p "$work"
        python3 -m pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d "$work"
        tar xzf "$work/llama_cpp_python-0.3.36.tar.gz" -C "$work"
    fi
fi
lib=$(find "$LLAMA_CPP_DIR/build" -name libllama.so -print -quit 2>/dev/null || true)
if [ -z "$lib" ]; then
    nice -n 10 cmake -S "$LLAMA_CPP_DIR" -B "$LLAMA_CPP_DIR/build" -DCMAKE_BUILD_TYPE=Release ${LCPP_CMAKE_FLAGS:--DGGML_NATIVE=ON} \
        -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
    nice -n 10 cmake --build "$LLAMA_CPP_DIR/build" -j2 --target llama
    lib=$(find "$LLAMA_CPP_DIR/build" -name libllama.so -print -quit)
fi
libdir=$(dirname "$lib")

# ---- (b) the compare program -----------------------------------------------------------------
mkdir -p "$mneme_build/compare"
prog=$mneme_build/compare/llamacpp_resume
nice -n 10 cc -O2 -std=c11 -Wall -Wextra -Werror -I"$LLAMA_CPP_DIR/include" -I"$LLAMA_CPP_DIR/ggml/include" \
    "$here/llamacpp_resume.c" -o "$prog" -L"$libdir" -lllama -lggml -lggml-base -Wl,-rpath,"$libdir"

# ---- (c) interleaved runs --------------------------------------------------------------------
out=${OUT_DIR:-$(mktemp -d /tmp/mneme-lcpp-XXXXXX)}
mkdir -p "$out"
echo "raw output in $out"
echo "llama.cpp: $LLAMA_CPP_DIR ($(git -C "$LLAMA_CPP_DIR" describe --always 2>/dev/null || echo 'sdist llama-cpp-python 0.3.36'))"
echo "llama.cpp flash attention: ${LCPP_FA:-auto}"
echo "mneme: $mneme_build ($(git -C "$here" rev-parse --short HEAD))"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores"
for t in $threads; do
    for r in $(seq 1 "$runs"); do
        lf=$out/lcpp-t$t-r$r.txt
        mf=$out/mneme-t$t-r$r.txt
        run_l() { { echo "load: $(uptime | sed 's/.*load average: //')"; "$prog" -m "$model" -t "$t" -r 3 --fa "${LCPP_FA:-auto}" $lens; } > "$lf"; }
        run_m() { { echo "load: $(uptime | sed 's/.*load average: //')"; "$mneme_build/bench_session" -m "$model" -t "$t" $lens; } > "$mf"; }
        if [ $((r % 2)) -eq 1 ]; then run_l; run_m; else run_m; run_l; fi
        echo "threads $t run $r: llama.cpp load $(head -1 "$lf" | cut -d' ' -f2-), mneme load $(head -1 "$mf" | cut -d' ' -f2-)"
    done
done

# ---- (d) the table ---------------------------------------------------------------------------
python3 - "$out" "$threads" "$runs" <<'EOF'
import sys, statistics as st
out, threads, runs = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])

def lcpp(path):
    rows, load = {}, None
    cols = None
    for line in open(path):
        f = line.split()
        if line.startswith("load:"): load = line.split(":", 1)[1].strip()
        elif f and f[0] == "tag": cols = f
        elif f and f[0] == "lcpp": rows[int(f[1])] = dict(zip(cols, f))
    return rows, load

def mneme(path):
    rows, load = {}, None
    for line in open(path):
        f = line.split()
        if line.startswith("load:"): load = line.split(":", 1)[1].strip()
        elif line.startswith("append 5 tokens"): break
        elif len(f) == 15 and f[0].isdigit():
            rows[int(f[0])] = dict(res=float(f[1]), T1=float(f[2]), T2=float(f[3]), T3=float(f[4]), recomp=float(f[6]))
    return rows, load

def cell(v):
    return "%.1f (%.1f)" % (st.median(v), min(v))

def rcell(v):
    return "%.2f (%.2f)" % (st.median(v), min(v))

for t in threads:
    L_all, data, loads = None, [], []
    for r in range(1, runs + 1):
        l, ll = lcpp(f"{out}/lcpp-t{t}-r{r}.txt")
        m, ml = mneme(f"{out}/mneme-t{t}-r{r}.txt")
        data.append((l, m))
        loads += [ll, ml]
        L_all = sorted(set(l) & set(m)) if L_all is None else [x for x in L_all if x in l and x in m]
    print(f"\n== {t} thread(s), {runs} runs; ms, median over runs (min); each run's number is its best of 3 ==")
    print("load averages (1/5/15 min) before each program: " + "; ".join(loads))
    hdr = ["L", "lcpp rst", "lcpp rst+gen", "lcpp res", "lcpp res+gen", "lcpp load", "mn res", "mn T1", "mn T2",
           "mn T3", "rst/T3", "rst/T1", "rst+gen/T3", "rst+gen/T1", "lcpp prefill", "mn recomp"]
    rows = []
    for L in L_all:
        g = lambda key: [float(l[L][key]) for l, m in data]
        h = lambda key: [m[L][key] for l, m in data]
        ratio = lambda a, b: [float(l[L][a]) / m[L][b] for l, m in data]
        rows.append([str(L), cell(g("rst_min")), cell(g("rstg_min")), cell(g("res_min")), cell(g("resg_min")),
                     cell(g("load_min")), cell(h("res")), cell(h("T1")), cell(h("T2")), cell(h("T3")),
                     rcell(ratio("rst_min", "T3")), rcell(ratio("rst_min", "T1")), rcell(ratio("rstg_min", "T3")),
                     rcell(ratio("rstg_min", "T1")), "%.0f" % st.median(g("prefill")), "%.0f" % st.median(h("recomp"))])
    w = [max(len(x[i]) for x in rows + [hdr]) for i in range(len(hdr))]
    print("  ".join(hdr[i].rjust(w[i]) for i in range(len(hdr))))
    for x in rows:
        print("  ".join(x[i].rjust(w[i]) for i in range(len(hdr))))
print("""
lcpp rst     = llama_state_seq_load_file (x2, as llama-server's slot restore) + decode 5 tokens + greedy first token
lcpp rst+gen = the same + decoding the generated token (bench_session's turn computes that token's KV too)
lcpp res(+gen) = the same turn with the KV resident; lcpp load = the load alone
mn res / T1 / T2 / T3 = bench_session's turn (append 5 + generate 1) resident / from a host image / lz4 host bytes / file
rst/T3 etc. = llama.cpp over mneme within one run (> 1: mneme faster), median (min) over runs
prefill / recomp = the whole history recomputed (+ first token), once per run, median""")
EOF
