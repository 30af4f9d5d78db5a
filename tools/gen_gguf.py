#!/usr/bin/env python3
"""tools/gen_gguf.py — write small synthetic llama/qwen2 GGUF models with random weights.

Tests need models that load in milliseconds, in every tensor type and shape the engine
supports (GQA, tied or untied embeddings, qwen2 attention biases, llama3 RoPE scaling),
without downloading anything. This tool writes them with the `gguf` package's GGUFWriter,
using the tensor names, shapes and metadata keys of llama.cpp's own llama/qwen2 files.

Weights are random but sized like a trained model's: dequantized matrix weights are
about N(0, 0.02), norm weights about 1, embeddings about N(0, 1). Quantized tensors are
random quant bytes with block scales chosen so that those sizes come out; no dequant or
quant math lives here.

The tokenizer is a small GPT-2 style byte-level BPE: the 256 byte tokens, merges learned
from an English sample text, and the ChatML special tokens.

    python3 tools/gen_gguf.py OUT.gguf [--arch llama|qwen2] [--n-layer 2] [--n-embd 256]
        [--n-head 8] [--n-kv-head 2] [--head-dim N] [--n-ff 512] [--n-vocab 384]
        [--type Q4_1] [--embd-type T] [--untied] [--ctx 2048] [--rope-base 10000]
        [--rope-scaling none|llama3] [--seed 1] [--no-tensors]

Matrices are written in --type, except that rows which are not whole K-quant
super-blocks (256) fall back to Q8_0 (as llama.cpp's quantizer does); rows must be whole
blocks of 32 for the other quantized types. Norms, biases and rope_freqs are F32.

From Python: generate(path, n_layer=2, type="Q8_0", ...) with the same option names.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter

import numpy as np

try:
    import gguf
    from gguf import GGMLQuantizationType as QT
except ImportError:  # a clear message instead of a traceback
    sys.exit("gen_gguf.py needs the `gguf` package: pip install gguf")

# Elements per block and bytes per block of the types we write (GGUF on-disk layouts).
BLOCK = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp's general.file_type for a model whose matrices are mostly this type
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 11, "Q4_K": 15, "Q5_K": 17,
             "Q6_K": 18, "BF16": 32}

WEIGHT_STD = 0.02

DEFAULTS = dict(arch="llama", n_layer=2, n_embd=256, n_head=8, n_kv_head=2, head_dim=None,
                n_ff=512, n_vocab=384, type="Q4_1", embd_type=None, untied=False, ctx=2048,
                rope_base=10000.0, rope_scaling="none", seed=1, no_tensors=False)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the toy BPE merges (plain English, written for this tool).
SAMPLE_TEXT = """
The lighthouse keeper walked up the stairs every evening before the sun went down. He
counted the steps as he climbed, one hundred and twelve of them, and at the top he
cleaned the glass and lit the lamp. Ships that passed the rocks at night could see the
light from far away, and the sailors were thankful for the man they had never met.
In the morning he wrote the weather in a small book: the wind, the clouds, the height
of the waves, and the names of the ships that he had seen. Some days there were none.
On those days he read the letters his sister sent from the city, where the streets were
full of people and the trains were always late. She asked him when he would come home,
and he answered that the sea was his home now, and that the light needed him.
Years later, when the lamp was replaced by a machine that turned itself on and off, the
keeper moved into a house near the harbour. He still walked to the end of the pier each
evening to watch the light come on, and he still wrote the weather in his book, because
he thought that someone, some day, might want to know what the sea had been like.
A model reads text as tokens. The tokenizer splits the text into pieces, and each piece
has a number. Common words become one token; rare words are built from smaller parts.
What is the answer? It is forty-two, or maybe it is 1024, or 3.14159 if you ask a circle.
"""


# ---- tokenizer ---------------------------------------------------------------------------

def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes
    map to themselves, the others to code points from 256 upward, in byte order."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


# A simplified GPT-2 pre-split for ASCII text: contractions, words with a leading
# space, single digits (as smollm does), punctuation runs, whitespace.
_PRESPLIT = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def build_vocab(n_vocab: int, text: str = SAMPLE_TEXT):
    """Return (tokens, token_types, merges, special ids) for a byte-level BPE of n_vocab."""
    # GGUFWriter cannot write an empty array, and a gpt2 tokenizer needs its merges key
    if n_vocab < 260:
        raise ValueError(f"--n-vocab {n_vocab}: need at least 260 (256 bytes, 1 merge, 3 special tokens)")
    b2u = byte_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    known = set(tokens)
    words = Counter("".join(b2u[b] for b in w.encode("utf-8")) for w in _PRESPLIT.findall(text))
    seqs = {w: list(w) for w in words}
    merges = []
    target = n_vocab - 3
    while len(tokens) < target:
        pairs = Counter()
        for w, n in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        # most frequent pair; ties broken by the pair itself so the result is deterministic
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append(f"{a} {b}")
        if a + b not in known:
            known.add(a + b)
            tokens.append(a + b)
        for w, s in seqs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    while len(tokens) < target:  # the sample text ran out of pairs: unused filler tokens
        tokens.append(f"<|unused_{len(tokens)}|>")
        types.append(int(gguf.TokenType.UNUSED))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    ids = {s: len(tokens) + i for i, s in enumerate(specials)}
    tokens += specials
    types += [int(gguf.TokenType.CONTROL)] * 3
    return tokens, types, merges, ids


# ---- random tensors ----------------------------------------------------------------------

def _f16(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).view(np.uint16)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins per block (shape [nb, 8]) into the
    12-byte K-quant layout: bytes 0-3 low 6 bits of scales 0-3 (top 2 bits carry bits 4-5
    of scales 4-7), bytes 4-7 the same for mins, bytes 8-11 low nibbles of scales 4-7
    and mins 4-7."""
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    q = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    q[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    q[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    q[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return q


def _pack_q3_scales(sc: np.ndarray) -> np.ndarray:
    """Pack 16 six-bit values per block (shape [nb, 16], 0..63) into Q3_K's 12 bytes: low
    nibbles of values 0-7 and high nibbles of 8-15 in bytes 0-7, the top 2 bits of value s
    in byte 8 + s % 4 at bit 2*(s // 4)."""
    sc = sc.astype(np.uint8)
    q = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    q[:, 0:8] = (sc[:, 0:8] & 0xF) | ((sc[:, 8:16] & 0xF) << 4)
    for s in range(16):
        q[:, 8 + s % 4] |= (sc[:, s] >> 4) << (2 * (s // 4))
    return q


def quant_bytes(rng: np.random.Generator, qtype: str, n_blocks: int, std: float) -> np.ndarray:
    """n_blocks random blocks of qtype as bytes [n_blocks, block_bytes]; the scales make
    the dequantized values have mean ~0 and standard deviation ~std."""
    nb = n_blocks
    u8 = lambda n: rng.integers(0, 256, size=(nb, n), dtype=np.uint8)  # noqa: E731
    jitter = lambda: rng.uniform(0.8, 1.25, size=(nb, 1))  # noqa: E731
    if qtype == "Q8_0":  # x = d*q, q ~ round(N(0, 40))
        q = np.clip(np.rint(rng.normal(0, 40, size=(nb, 32))), -127, 127).astype(np.int8)
        d = _f16(std / 40 * jitter())
        return np.concatenate([d.view(np.uint8).reshape(nb, 2), q.view(np.uint8)], axis=1)
    if qtype == "Q4_0":  # x = d*(q-8); nibbles uniform in 1..15 are centred on 8, std ~4.3
        d = _f16(std / 4.3 * jitter())
        lo, hi = (rng.integers(1, 16, size=(nb, 16), dtype=np.uint8) for _ in range(2))
        return np.concatenate([d.view(np.uint8).reshape(nb, 2), lo | (hi << 4)], axis=1)
    if qtype == "Q4_1":  # x = d*q + m; m = -7.5*d centres it
        dd = std / 4.6 * jitter()
        d, m = _f16(dd), _f16(-7.5 * dd)
        return np.concatenate([d.view(np.uint8).reshape(nb, 2), m.view(np.uint8).reshape(nb, 2), u8(16)],
                              axis=1)
    if qtype == "Q5_0":  # x = d*(q-16); 5-bit q uniform in 1..31 is centred on 16, std ~8.9
        d = _f16(std / 8.9 * jitter())
        q = rng.integers(1, 32, size=(nb, 32), dtype=np.uint32)
        qh = ((q >> 4) << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)  # bit i: q[i]'s fifth
        qs = ((q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)).astype(np.uint8)
        return np.concatenate([d.view(np.uint8).reshape(nb, 2), qh.astype("<u4").view(np.uint8).reshape(nb, 4), qs],
                              axis=1)
    if qtype == "Q5_1":  # x = d*q + m, random bits: q uniform 0..31, std ~9.2; m = -15.5*d centres it
        dd = std / 9.2 * jitter()
        d, m = _f16(dd), _f16(-15.5 * dd)
        return np.concatenate([d.view(np.uint8).reshape(nb, 2), m.view(np.uint8).reshape(nb, 2), u8(4), u8(16)],
                              axis=1)
    if qtype in ("Q4_K", "Q5_K"):
        # x = d*sc*q - dmin*m per 32-element sub-block; with dmin = d and m = mean(q)*sc the
        # sub-block is centred. mean(q) is 7.5 (4 bits) or 15.5 (5 bits); m must fit 6 bits.
        mean_q, std_q, lo, hi = (7.5, 4.6, 4, 8) if qtype == "Q4_K" else (15.5, 9.2, 2, 4)
        sc = rng.integers(lo, hi + 1, size=(nb, 8))
        mn = np.rint(sc * mean_q)
        dd = std / (std_q * (lo + hi) / 2) * jitter()
        head = np.concatenate([_f16(dd).view(np.uint8).reshape(nb, 2), _f16(dd).view(np.uint8).reshape(nb, 2),
                               _pack_k_scales(sc, mn)], axis=1)
        body = [u8(128)] if qtype == "Q4_K" else [u8(32), u8(128)]  # Q5_K: qh[32] then qs[128]
        return np.concatenate([head] + body, axis=1)
    if qtype == "Q2_K":
        # x = d*sc*q - dmin*m per 16 elements, q in 0..3 from random bits (mean 1.5, std 1.12);
        # sc even in 4..10 and m = 1.5*sc (4 bits) with dmin = d centre it; scales, qs, d, dmin
        sc = 2 * rng.integers(2, 6, size=(nb, 16))
        dd = std / (1.12 * 7.35) * jitter()
        scales = (sc | ((sc * 3 // 2) << 4)).astype(np.uint8)
        return np.concatenate([scales, u8(64), _f16(dd).view(np.uint8).reshape(nb, 2),
                               _f16(dd).view(np.uint8).reshape(nb, 2)], axis=1)
    if qtype == "Q3_K":
        # x = d*sc*q, q in -4..3 from random bits (rms 2.35); sc = +-8..24 (rms ~16.7), random
        # signs centre it; hmask, qs, scales, d
        sc = rng.integers(8, 25, size=(nb, 16)) * rng.choice([-1, 1], size=(nb, 16))
        d = _f16(std / (2.35 * 16.7) * jitter())
        return np.concatenate([u8(32), u8(64), _pack_q3_scales(sc + 32), d.view(np.uint8).reshape(nb, 2)], axis=1)
    if qtype == "Q6_K":  # x = d*sc*(q-32), 6-bit q uniform: std ~18.5; ql, qh, scales, d
        sc = rng.integers(8, 25, size=(nb, 16)).astype(np.int8)
        d = _f16(std / (18.5 * 16) * jitter())
        return np.concatenate([u8(128), u8(64), sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
    raise ValueError(f"not a quantized type: {qtype}")


def matrix(rng, qtype: str, name: str, ne0: int, ne1: int, std: float):
    """(numpy array, raw_dtype) for GGUFWriter.add_tensor of a [ne0 x ne1] matrix (ne0 = row length)."""
    be, bb = BLOCK[qtype]
    if ne0 % be:
        raise ValueError(f"tensor {name}: row length {ne0} is not a multiple of the {qtype} block size {be}")
    if qtype in ("F32", "F16"):
        x = rng.normal(0, std, size=(ne1, ne0))
        return x.astype(np.float32 if qtype == "F32" else np.float16), None
    if qtype == "BF16":  # round-to-nearest-even on the top 16 bits of the float32
        b = rng.normal(0, std, size=(ne1, ne0)).astype(np.float32).view(np.uint32).astype(np.uint64)
        b16 = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
        return b16.view(np.uint8).reshape(ne1, ne0 * 2), QT.BF16
    blocks = quant_bytes(rng, qtype, ne1 * ne0 // be, std)
    return blocks.reshape(ne1, ne0 // be * bb), getattr(QT, qtype)


def llama3_rope_factors(head_dim: int, base: float, factor: float = 8.0, low: float = 1.0,
                        high: float = 4.0, orig_ctx: int = 8192) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's RoPE scaling: high frequencies (short
    wavelengths) unchanged, low ones divided by factor, a smooth blend between."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / base ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < orig_ctx / high:
            out.append(1.0)
        elif wavelen > orig_ctx / low:
            out.append(factor)
        else:
            smooth = (orig_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# ---- the model ------------------------------------------------------------------------------

def generate(path: str, **options) -> dict:
    """Write a synthetic model to path. Options are the CLI's (with underscores); unknown
    options raise TypeError. Returns the resolved options (head_dim, embd_type filled in)."""
    bad = set(options) - set(DEFAULTS)
    if bad:
        raise TypeError(f"unknown options: {sorted(bad)}")
    o = dict(DEFAULTS, **options)
    arch = o["arch"]
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"--arch {arch}: expected llama or qwen2")
    if o["type"] not in BLOCK:
        raise ValueError(f"--type {o['type']}: expected one of {sorted(BLOCK)}")
    if o["rope_scaling"] not in ("none", "llama3"):
        raise ValueError(f"--rope-scaling {o['rope_scaling']}: expected none or llama3")
    n_embd, n_head, n_kv = o["n_embd"], o["n_head"], o["n_kv_head"]
    if n_head <= 0 or n_kv <= 0 or n_head % n_kv:
        raise ValueError(f"--n-head {n_head} must be a positive multiple of --n-kv-head {n_kv}")
    if o["head_dim"] is None:
        if n_embd % n_head:
            raise ValueError(f"--n-embd {n_embd} is not a multiple of --n-head {n_head}; give --head-dim")
        o["head_dim"] = n_embd // n_head
    hd = o["head_dim"]
    if hd % 2:
        raise ValueError(f"head_dim {hd} must be even for RoPE")
    if o["embd_type"] is None:
        fits = n_embd % BLOCK[o["type"]][0] == 0
        o["embd_type"] = o["type"] if fits or o["type"] not in K_QUANTS else "Q8_0"
    if o["embd_type"] not in BLOCK:
        raise ValueError(f"--embd-type {o['embd_type']}: expected one of {sorted(BLOCK)}")

    rng = np.random.default_rng(o["seed"])
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"mneme synthetic {arch}")
    w.add_block_count(o["n_layer"])
    w.add_context_length(o["ctx"])
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(o["n_ff"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    if hd * n_head != n_embd:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_freq_base(float(o["rope_base"]))
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    w.add_vocab_size(o["n_vocab"])
    w.add_file_type(FILE_TYPE[o["type"]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types, merges, ids = build_vocab(o["n_vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_eos_token_id(ids["<|endoftext|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    if not o["no_tensors"]:
        add_tensors(w, rng, o)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return o


def add_tensors(w, rng, o) -> None:
    n_embd, hd, t = o["n_embd"], o["head_dim"], o["type"]
    q_dim, kv_dim, n_ff = o["n_head"] * hd, o["n_kv_head"] * hd, o["n_ff"]

    def mat(name, ne0, ne1, qtype=t, std=WEIGHT_STD):
        if qtype in K_QUANTS and ne0 % 256:
            # as llama.cpp's quantizer does: rows that are not whole super-blocks get Q8_0
            print(f"gen_gguf.py: {name}: row length {ne0} does not fit {qtype}, using Q8_0", file=sys.stderr)
            qtype = "Q8_0"
        arr, raw = matrix(rng, qtype, name, ne0, ne1, std)
        w.add_tensor(name, arr, raw_dtype=raw)

    def vec(name, n, mean, std):
        w.add_tensor(name, (mean + std * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", n_embd, o["n_vocab"], o["embd_type"], std=1.0)
    if o["rope_scaling"] == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(hd, float(o["rope_base"])))
    for i in range(o["n_layer"]):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", n_embd, 1.0, 0.1)
        mat(p + "attn_q.weight", n_embd, q_dim)
        mat(p + "attn_k.weight", n_embd, kv_dim)
        mat(p + "attn_v.weight", n_embd, kv_dim)
        if o["arch"] == "qwen2":
            vec(p + "attn_q.bias", q_dim, 0.0, WEIGHT_STD)
            vec(p + "attn_k.bias", kv_dim, 0.0, WEIGHT_STD)
            vec(p + "attn_v.bias", kv_dim, 0.0, WEIGHT_STD)
        mat(p + "attn_output.weight", q_dim, n_embd)
        vec(p + "ffn_norm.weight", n_embd, 1.0, 0.1)
        mat(p + "ffn_gate.weight", n_embd, n_ff)
        mat(p + "ffn_up.weight", n_embd, n_ff)
        mat(p + "ffn_down.weight", n_ff, n_embd)
    vec("output_norm.weight", n_embd, 1.0, 0.1)
    if o["untied"]:
        mat("output.weight", n_embd, o["n_vocab"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a synthetic llama/qwen2 GGUF model with random weights.")
    ap.add_argument("out")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    for name in ("n-layer", "n-embd", "n-head", "n-kv-head", "head-dim", "n-ff", "n-vocab", "ctx", "seed"):
        key = name.replace("-", "_")
        ap.add_argument("--" + name, type=int, default=DEFAULTS[key])
    ap.add_argument("--type", default="Q4_1", choices=sorted(BLOCK))
    ap.add_argument("--embd-type", default=None, choices=sorted(BLOCK))
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--rope-base", type=float, default=10000.0)
    ap.add_argument("--rope-scaling", default="none", choices=["none", "llama3"])
    ap.add_argument("--no-tensors", action="store_true")
    a = ap.parse_args(argv)
    opts = {k: v for k, v in vars(a).items() if k != "out"}
    try:
        generate(a.out, **opts)
    except ValueError as e:
        print(f"gen_gguf.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
