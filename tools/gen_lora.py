#!/usr/bin/env python3
"""tools/gen_lora.py — write a synthetic PEFT LoRA adapter (random A and B) for a model shape.

An adapter directory holds adapter_config.json and adapter_model.safetensors, the layout
Hugging Face PEFT saves: per layer i and targeted module
    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight
with A [r, in] and B [out, r], in the Hugging Face row order (no llama rope permutation).
The safetensors file is written by hand (8-byte little-endian header length, JSON header
padded with spaces to a multiple of 8, then the tensor bytes), so only numpy is needed.

Broken adapters for tests (--break KIND): truncate (file cut inside the last tensor),
header-past-eof (header length beyond the file), overlap (two tensors share bytes),
wrong-size (data_offsets disagree with shape x dtype), bad-dtype (unknown dtype),
missing-tensor (one lora_B left out), wrong-shape (A of layer 0 has rank r+1),
rank0 (r = 0 in the config), hidden (adapter made for another hidden size),
extra-layer (tensors for a layer the model does not have), no-config.

--gguf FILE also writes it as a llama.cpp GGUF LoRA (Q/K rows of B permuted as llama.cpp's
converter does); Python: to_gguf(values, shape, path, alpha).

Python API: generate(out_dir, shape, **opts) -> dict name -> float32 array (the values as
stored, i.e. after rounding to the file's dtype), plus "__scales__": {module: scale}.
shape: dict(n_layer, n_embd, n_head, n_kv_head, head_dim, n_ff), or model_shape(gguf path).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys

import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BREAKS = ("truncate", "header-past-eof", "overlap", "wrong-size", "bad-dtype", "missing-tensor",
          "wrong-shape", "rank0", "hidden", "extra-layer", "no-config")


def model_shape(gguf_path: str) -> dict:
    """n_layer, n_embd, n_head, n_kv_head, head_dim, n_ff of a GGUF model."""
    from gguf import GGUFReader
    r = GGUFReader(gguf_path)

    def field(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        part = f.parts[f.data[0]]
        return bytes(part).decode() if f.types[0].name == "STRING" else part.tolist()[0]

    arch = field("general.architecture")
    n_embd, n_head = int(field(f"{arch}.embedding_length")), int(field(f"{arch}.attention.head_count"))
    return dict(n_layer=int(field(f"{arch}.block_count")), n_embd=n_embd, n_head=n_head,
                n_kv_head=int(field(f"{arch}.attention.head_count_kv", n_head)),
                head_dim=int(field(f"{arch}.attention.key_length", n_embd // n_head)),
                n_ff=int(field(f"{arch}.feed_forward_length")))


def dims(shape: dict, target: str) -> tuple[int, int]:
    """(in, out) features of a target module."""
    E, F = shape["n_embd"], shape["n_ff"]
    Q, KV = shape["n_head"] * shape["head_dim"], shape["n_kv_head"] * shape["head_dim"]
    return {"q_proj": (E, Q), "k_proj": (E, KV), "v_proj": (E, KV), "o_proj": (Q, E),
            "gate_proj": (E, F), "up_proj": (E, F), "down_proj": (F, E)}[target]


def module_name(layer: int, target: str) -> str:
    block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{target}"


def _pattern(pattern: dict, module: str):
    """PEFT-style lookup, as mneme documents it: the longest key matching at a dot boundary."""
    best = None
    for k in pattern:
        if (module == k or module.endswith("." + k)) and (best is None or len(k) > len(best)):
            best = k
    return pattern[best] if best is not None else None


def _to_bytes(a: np.ndarray, dtype: str) -> tuple[bytes, np.ndarray]:
    """Raw little-endian bytes of a in dtype, and the float32 values they hold."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "F32":
        return a.astype("<f4").tobytes(), a
    if dtype == "F16":
        h = a.astype("<f2")
        return h.tobytes(), h.astype(np.float32)
    if dtype == "BF16":
        u = a.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")   # round to nearest even
        return r.tobytes(), (r.astype(np.uint32) << 16).view(np.float32).reshape(a.shape)
    raise ValueError(f"dtype {dtype}: expected F32, F16 or BF16")


def write_safetensors(path: str, tensors: list, metadata: dict | None = None, brk: str | None = None) -> None:
    """tensors: list of (name, dtype string, shape, raw bytes)."""
    header, off, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = metadata
    for name, dt, shape, raw in tensors:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    names = [t[0] for t in tensors]
    if brk == "overlap" and len(names) >= 2:
        b0, _ = header[names[1]]["data_offsets"]
        n = header[names[1]]["data_offsets"][1] - b0
        header[names[1]]["data_offsets"] = [b0 - 4, b0 - 4 + n]
    elif brk == "wrong-size":
        b0, e0 = header[names[0]]["data_offsets"]
        header[names[0]]["data_offsets"] = [b0, e0 - 2]
    elif brk == "bad-dtype":
        header[names[0]]["dtype"] = "Q7"
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    data = b"".join(blobs)
    hl = len(hj) + (1 << 20 if brk == "header-past-eof" else 0)
    body = struct.pack("<Q", hl) + hj + data
    if brk == "truncate":
        body = body[:-5]
    with open(path, "wb") as f:
        f.write(body)


def generate(out_dir: str, shape: dict, r: int = 8, alpha: float | None = None, targets=TARGETS,
             dtype: str = "F32", rslora: bool = False, rank_pattern: dict | None = None,
             alpha_pattern: dict | None = None, seed: int = 0, std_a: float = 0.05, std_b: float = 0.02,
             brk: str | None = None) -> dict:
    if brk is not None and brk not in BREAKS:
        raise ValueError(f"--break {brk}: expected one of {BREAKS}")
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"target {t}: expected one of {TARGETS}")
    os.makedirs(out_dir, exist_ok=True)
    alpha = float(2 * r if alpha is None else alpha)
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "synthetic",
           "r": 0 if brk == "rank0" else r, "lora_alpha": alpha, "use_rslora": rslora,
           "target_modules": list(targets), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True}
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    if brk == "no-config":
        if os.path.exists(cfg_path):
            os.remove(cfg_path)
    else:
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)

    rng = np.random.default_rng(seed)
    in_shape = dict(shape)
    if brk == "hidden":
        in_shape["n_embd"] = shape["n_embd"] + 32
    n_layer = shape["n_layer"] + (1 if brk == "extra-layer" else 0)
    tensors, values, scales = [], {}, {}
    for li in range(n_layer):
        for t in targets:
            mod = module_name(li, t)
            rk = _pattern(rank_pattern, mod)
            rk = r if rk is None else int(rk)
            al = _pattern(alpha_pattern, mod)
            al = alpha if al is None else float(al)
            scales[mod] = al / math.sqrt(rk) if rslora else al / rk
            fin, fout = dims(in_shape, t)
            ra = rk + 1 if brk == "wrong-shape" and li == 0 and t == targets[0] else rk
            a = rng.standard_normal((ra, fin)) * std_a
            b = rng.standard_normal((fout, rk)) * std_b
            pre = f"base_model.model.{mod}"
            for suffix, m in (("lora_A.weight", a), ("lora_B.weight", b)):
                if brk == "missing-tensor" and li == shape["n_layer"] - 1 and t == targets[-1] and suffix == "lora_B.weight":
                    continue
                raw, vals = _to_bytes(m, dtype)
                tensors.append((f"{pre}.{suffix}", dtype, m.shape, raw))
                values[f"{pre}.{suffix}"] = vals
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors, {"format": "pt"}, brk)
    values["__scales__"] = scales
    return values


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's Q/K row permutation (per head, the two halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(values: dict, shape: dict, path: str, alpha: float, dtype=np.float32, extra: dict | None = None) -> None:
    """Write the adapter `values` (from generate(); one alpha for every module, no rslora)
    as a llama.cpp GGUF LoRA: blk.{i}.{attn_q,...}.weight.lora_{a,b}, Q/K rows of B permuted
    as llama.cpp's converter does. extra: {tensor name: array} added as is (broken files)."""
    import gguf
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    for name, v in values.items():
        if name.startswith("__"):
            continue
        parts = name.split(".")   # base_model.model.model.layers.{i}.{block}.{t}.lora_{A,B}.weight
        li, t, ab = int(parts[4]), parts[6], parts[7][-1].lower()
        if ab == "b" and t == "q_proj":
            v = llama_permute(v, shape["n_head"])
        elif ab == "b" and t == "k_proj":
            v = llama_permute(v, shape["n_kv_head"])
        w.add_tensor(f"blk.{li}.{GGUF_NAMES[t]}.weight.lora_{ab}", np.ascontiguousarray(v, dtype=dtype))
    for name, v in (extra or {}).items():
        w.add_tensor(name, np.ascontiguousarray(v, dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a synthetic PEFT LoRA adapter directory.")
    ap.add_argument("out_dir")
    ap.add_argument("--model", help="GGUF model whose shape to use")
    for k in ("n-layer", "n-embd", "n-head", "n-kv-head", "head-dim", "n-ff"):
        ap.add_argument("--" + k, type=int)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float)
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, e.g. q_proj,v_proj")
    ap.add_argument("--dtype", default="F32", choices=["F32", "F16", "BF16"])
    ap.add_argument("--rslora", action="store_true")
    ap.add_argument("--rank-pattern", default="{}", help='JSON object, e.g. \'{"q_proj": 4}\'')
    ap.add_argument("--alpha-pattern", default="{}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--break", dest="brk", choices=BREAKS)
    ap.add_argument("--gguf", help="also write the adapter as a llama.cpp GGUF LoRA file here")
    a = ap.parse_args(argv)
    if a.model:
        shape = model_shape(a.model)
    else:
        shape = {k: getattr(a, k) for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "n_ff")}
        if shape["head_dim"] is None and shape["n_embd"] and shape["n_head"]:
            shape["head_dim"] = shape["n_embd"] // shape["n_head"]
        if shape["n_kv_head"] is None:
            shape["n_kv_head"] = shape["n_head"]
        missing = [k for k, v in shape.items() if v is None]
        if missing:
            ap.error(f"give --model or the model shape (missing: {', '.join(missing)})")
    vals = generate(a.out_dir, shape, r=a.r, alpha=a.alpha, targets=a.targets.split(","), dtype=a.dtype,
             rslora=a.rslora, rank_pattern=json.loads(a.rank_pattern), alpha_pattern=json.loads(a.alpha_pattern),
             seed=a.seed, brk=a.brk)
    if a.gguf:
        if a.rslora or json.loads(a.alpha_pattern):
            ap.error("--gguf: a GGUF LoRA has one alpha and no rslora")
        to_gguf(vals, shape, a.gguf, a.alpha if a.alpha is not None else 2 * a.r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
