#!/usr/bin/env bash
# tools/test.sh — set up, build, and run every test: C unit tests (ctest), the Python
# tests against independent references (pytest), then the unit tests again under
# AddressSanitizer + UndefinedBehaviorSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

tools/setup.sh
export MNEME_BUILD_DIR="$root/build"
export MNEME_SOURCE_DIR="$root"

echo "== unit tests (ctest)"
ctest --test-dir build --output-on-failure -j2 -L cpu

echo "== reference tests (pytest)"
python3 -m pytest -q tests/python

echo "== unit tests under ASan + UBSan"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="-O2 -g" -DMNEME_SANITIZE=ON -DMNEME_CUDA=OFF >/dev/null
ninja -C build-asan >build-asan.log 2>&1 || { tail -60 build-asan.log; echo "ASan build failed"; exit 1; }
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  MNEME_BUILD_DIR="$root/build-asan" ctest --test-dir build-asan --output-on-failure -j2 -L cpu

echo "== fuzz smoke: the GGUF reader under libFuzzer for ${MNEME_FUZZ_SECONDS:-20} s"
cmake -S . -B build-fuzz -G Ninja -DMNEME_FUZZ=ON -DCMAKE_C_COMPILER=clang -DMNEME_CUDA=OFF >/dev/null
ninja -C build-fuzz fuzz_gguf >build-fuzz.log 2>&1 || { tail -60 build-fuzz.log; echo "fuzz build failed"; exit 1; }
corpus=$(mktemp -d)
for t in F32 F16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1; do
  python3 tools/gen_gguf.py "$corpus/s_$t.gguf" --type "$t" --n-layer 1 --n-embd 64 --n-head 2 \
    --n-kv-head 1 --n-ff 64 --n-vocab 260 2>/dev/null
done
python3 tools/gen_gguf.py "$corpus/s_q4k.gguf" --type Q4_K --arch qwen2 --n-layer 1 --n-embd 256 --n-head 2 \
  --n-kv-head 1 --n-ff 256 --n-vocab 260 --untied 2>/dev/null
python3 tools/gen_gguf.py "$corpus/s_tok.gguf" --no-tensors --n-vocab 260 2>/dev/null
rc=0
build-fuzz/fuzz_gguf -max_total_time="${MNEME_FUZZ_SECONDS:-20}" -rss_limit_mb=1024 -print_final_stats=1 \
  "$corpus" >"$corpus/log" 2>&1 || rc=$?
grep -E "stat::number_of_executed_units|ERROR|SUMMARY" "$corpus/log" || true
if [ $rc -ne 0 ]; then tail -40 "$corpus/log"; echo "fuzz_gguf failed (exit $rc)"; exit 1; fi
rm -rf "$corpus"

echo "== fuzz smoke: the session file reader for ${MNEME_FUZZ_SECONDS:-20} s"
ninja -C build-fuzz fuzz_session_file >build-fuzz.log 2>&1 || { tail -60 build-fuzz.log; echo "fuzz build failed"; exit 1; }
corpus=$(mktemp -d)
MNEME_SESSION_SEED_DIR="$corpus" build/test_session_file >/dev/null
rc=0
build-fuzz/fuzz_session_file -max_total_time="${MNEME_FUZZ_SECONDS:-20}" -rss_limit_mb=1024 -print_final_stats=1 \
  "$corpus" >"$corpus/log" 2>&1 || rc=$?
grep -E "stat::number_of_executed_units|ERROR|SUMMARY" "$corpus/log" || true
if [ $rc -ne 0 ]; then tail -40 "$corpus/log"; echo "fuzz_session_file failed (exit $rc)"; exit 1; fi
rm -rf "$corpus"
echo "== fuzz smoke: the safetensors reader for ${MNEME_FUZZ_SECONDS:-20} s"
ninja -C build-fuzz fuzz_safetensors >/dev/null
corpus=$(mktemp -d)
for t in F32 F16 BF16; do
  python3 tools/gen_lora.py "$corpus/d_$t" --n-layer 1 --n-embd 8 --n-head 2 --n-kv-head 1 --n-ff 16 --r 2 \
    --targets q_proj,down_proj --dtype "$t" >/dev/null
  mv "$corpus/d_$t/adapter_model.safetensors" "$corpus/s_$t.safetensors"
  rm -rf "$corpus/d_$t"
done
rc=0
build-fuzz/fuzz_safetensors -max_total_time="${MNEME_FUZZ_SECONDS:-20}" -rss_limit_mb=1024 -print_final_stats=1 \
  "$corpus" >"$corpus/log" 2>&1 || rc=$?
grep -E "stat::number_of_executed_units|ERROR|SUMMARY" "$corpus/log" || true
if [ $rc -ne 0 ]; then tail -40 "$corpus/log"; echo "fuzz_safetensors failed (exit $rc)"; exit 1; fi
rm -rf "$corpus"
echo "== fuzz smoke: tokenize / detokenize on the default model's tokenizer for ${MNEME_FUZZ_SECONDS:-20} s"
ninja -C build-fuzz fuzz_tokenizer >/dev/null
corpus=$(mktemp -d)
printf '\000Hello, world! Caf\303\251 \346\227\245\346\234\254 \360\237\216\211\n\tcode(){}' >"$corpus/text"
printf '\001<|im_start|>assistant\nI think.<|im_end|>' >"$corpus/special"
printf '\002\377\300\355\240\200 \342\202' >"$corpus/bytes"
rc=0
build-fuzz/fuzz_tokenizer -max_total_time="${MNEME_FUZZ_SECONDS:-20}" -rss_limit_mb=2048 -print_final_stats=1 \
  "$corpus" >"$corpus/log" 2>&1 || rc=$?
grep -E "stat::number_of_executed_units|ERROR|SUMMARY|fuzz_tokenizer:" "$corpus/log" || true
if [ $rc -ne 0 ]; then tail -40 "$corpus/log"; echo "fuzz_tokenizer failed (exit $rc)"; exit 1; fi
rm -rf "$corpus"
echo "all test stages passed"
