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
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="-O1 -g" -DMNEME_SANITIZE=ON -DMNEME_CUDA=OFF >/dev/null
ninja -C build-asan >/dev/null
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  MNEME_BUILD_DIR="$root/build-asan" ctest --test-dir build-asan --output-on-failure -j2 -L cpu
