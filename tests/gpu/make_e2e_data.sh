#!/usr/bin/env bash
# tests/gpu/make_e2e_data.sh DIR — the inputs of the end-to-end LoRA check
# (tests/gpu/test_cuda_lora_e2e.c): DIR/model.gguf, a small synthetic llama model with F32
# weights, and three PEFT adapters DIR/a0, DIR/a1, DIR/a2 of different ranks, targets and
# storage types. Needs python3 with numpy and gguf (tools/gen_gguf.py, tools/gen_lora.py).
# run.sh calls it when the GPU machine has them; otherwise make DIR = .gpu-data here and
# carry it (tests/gpu/README.md).
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
SRC=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$1
mkdir -p "$OUT"
python3 "$SRC/tools/gen_gguf.py" "$OUT/model.gguf" --type F32 --n-layer 2 --n-embd 128 --n-head 4 --n-kv-head 2 \
  --head-dim 32 --n-ff 256 --n-vocab 300 --seed 9 >/dev/null
M="$OUT/model.gguf"
python3 "$SRC/tools/gen_lora.py" "$OUT/a0" --model "$M" --r 4 --alpha 100 --seed 31 >/dev/null
python3 "$SRC/tools/gen_lora.py" "$OUT/a1" --model "$M" --r 8 --alpha 128 --dtype F16 --seed 32 \
  --targets q_proj,v_proj,o_proj,up_proj,down_proj >/dev/null
python3 "$SRC/tools/gen_lora.py" "$OUT/a2" --model "$M" --r 16 --alpha 400 --dtype BF16 --seed 33 \
  --targets k_proj,gate_proj,down_proj >/dev/null
echo "e2e data in $OUT"
