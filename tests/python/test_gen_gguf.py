"""tests/python/test_gen_gguf.py — the synthetic model generator, checked with the gguf
package's own reader and dequantizer (independent of mneme's C code).

Checks: tensor names/shapes/types per option set, metadata keys, the sizes of the
dequantized weights (matrices ~N(0, 0.02), embeddings ~N(0, 1), norms ~1), the llama3
rope factors against the published formula evaluated here in closed form, and that the
toy BPE vocabulary is consistent (unique tokens, every merge's halves are tokens) and
tokenizes like a real byte-level BPE when loaded into HF `tokenizers`.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gen_gguf  # noqa: E402

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def read(path):
    r = GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def field(r, key):
    return r.fields[key].contents()


@pytest.mark.parametrize("qtype", TYPES)
def test_weight_sizes(tmp_path, qtype):
    p = str(tmp_path / "m.gguf")
    gen_gguf.generate(p, type=qtype, n_layer=1, untied=True, seed=5)
    r, t = read(p)
    assert t["blk.0.attn_q.weight"].tensor_type.name == qtype
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "output.weight"):
        w = dequantize(t[name].data, t[name].tensor_type)
        assert np.isfinite(w).all()
        assert 0.015 < w.std() < 0.03, (name, w.std())
        assert abs(w.mean()) < 0.003, (name, w.mean())
    e = dequantize(t["token_embd.weight"].data, t["token_embd.weight"].tensor_type)
    assert e.shape == (384, 256)
    assert 0.8 < e.std() < 1.3 and abs(e.mean()) < 0.05
    n = t["blk.0.attn_norm.weight"].data
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert abs(n.mean() - 1) < 0.05 and 0.05 < n.std() < 0.15


def test_llama_shapes_and_keys(tmp_path):
    p = str(tmp_path / "m.gguf")
    gen_gguf.generate(p, n_layer=3, n_embd=128, n_head=4, n_kv_head=2, n_ff=384, n_vocab=300, ctx=4096,
                      rope_base=500000.0)
    r, t = read(p)
    assert field(r, "general.architecture") == "llama"
    assert field(r, "llama.block_count") == 3
    assert field(r, "llama.context_length") == 4096
    assert field(r, "llama.embedding_length") == 128
    assert field(r, "llama.feed_forward_length") == 384
    assert field(r, "llama.attention.head_count") == 4
    assert field(r, "llama.attention.head_count_kv") == 2
    assert field(r, "llama.rope.dimension_count") == 32
    assert field(r, "llama.rope.freq_base") == 500000.0
    assert field(r, "llama.vocab_size") == 300
    assert "llama.attention.key_length" not in r.fields
    assert len(t) == 2 + 3 * 9  # tied: no output.weight
    assert "output.weight" not in t and "rope_freqs.weight" not in t
    # numpy shape is [rows, row length] = reversed GGUF ne
    assert list(t["blk.2.attn_k.weight"].shape) == [128, 64]
    assert list(t["blk.2.attn_output.weight"].shape) == [128, 128]
    assert list(t["blk.2.ffn_down.weight"].shape) == [384, 128]
    assert list(t["token_embd.weight"].shape) == [128, 300]
    assert all(t[f"blk.{i}.ffn_norm.weight"].tensor_type.name == "F32" for i in range(3))


def test_qwen2_head_dim_llama3(tmp_path):
    p = str(tmp_path / "m.gguf")
    gen_gguf.generate(p, arch="qwen2", n_layer=1, n_embd=256, n_head=2, n_kv_head=1, head_dim=64,
                      type="Q8_0", untied=True, rope_scaling="llama3", rope_base=500000.0)
    r, t = read(p)
    assert field(r, "qwen2.attention.key_length") == 64
    assert field(r, "qwen2.attention.value_length") == 64
    assert list(t["blk.0.attn_q.weight"].shape) == [256, 128]
    assert list(t["blk.0.attn_output.weight"].shape) == [128, 256]
    for b, n in (("q", 128), ("k", 64), ("v", 64)):
        bias = t[f"blk.0.attn_{b}.bias"]
        assert bias.tensor_type.name == "F32" and list(bias.shape) == [n]
    f = t["rope_freqs.weight"].data
    assert f.shape == (32,)
    # the published llama3 rule: wavelength < 8192/4 -> 1, > 8192/1 -> 8, else a blend
    for i, got in enumerate(f):
        wl = 2 * math.pi * 500000.0 ** (2 * i / 64)
        if wl < 2048:
            want = 1.0
        elif wl > 8192:
            want = 8.0
        else:
            s = (8192 / wl - 1) / 3
            want = 1 / ((1 - s) / 8 + s)
        assert abs(got - want) < 1e-5 * want, (i, got, want)
    assert f[0] == 1.0 and f[-1] == 8.0 and any(1.0 < x < 8.0 for x in f)


def test_k_quant_fallback(tmp_path):
    p = str(tmp_path / "m.gguf")
    o = gen_gguf.generate(p, type="Q4_K", n_embd=96, n_head=3, n_kv_head=1, n_ff=512, n_layer=1)
    assert o["embd_type"] == "Q8_0"
    _, t = read(p)
    assert t["token_embd.weight"].tensor_type.name == "Q8_0"
    assert t["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"       # row 96
    assert t["blk.0.ffn_down.weight"].tensor_type.name == "Q4_K"     # row 512


def test_tokenizer(tmp_path):
    p = str(tmp_path / "m.gguf")
    gen_gguf.generate(p, no_tensors=True, n_vocab=400)
    r, t = read(p)
    assert not t
    toks = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    assert len(toks) == 400 == len(types) and len(set(toks)) == 400
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "smollm"
    eos = field(r, "tokenizer.ggml.eos_token_id")
    assert toks[eos] == "<|endoftext|>" and field(r, "tokenizer.ggml.bos_token_id") == eos
    assert toks[-2:] == ["<|im_start|>", "<|im_end|>"]
    assert types[-3:] == [3, 3, 3] and set(types[:-3]) <= {1, 5}
    # GPT-2's byte map: printable ASCII is itself, space is U+0120, newline U+010A
    assert toks[ord("a")] == "a" and toks[32] == "\u0120" and toks[10] == "\u010a"
    vocab = set(toks)
    for m in merges:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab
    tmpl = field(r, "tokenizer.chat_template")
    assert "<|im_start|>" in tmpl and "add_generation_prompt" in tmpl

    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={s: i for i, s in enumerate(toks)},
                                                    merges=[tuple(m.split(" ")) for m in merges]))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    text = "The keeper walked up the stairs."
    enc = hf.encode(text)
    assert hf.decode(enc.ids) == text
    assert len(enc.ids) < len(text) // 2  # the merges learned real English pieces


def test_cli_and_errors(tmp_path):
    p = str(tmp_path / "c.gguf")
    tool = os.path.join(ROOT, "tools", "gen_gguf.py")
    subprocess.run([sys.executable, tool, p, "--type", "Q5_K", "--n-layer", "1", "--untied"], check=True)
    _, t = read(p)
    assert t["output.weight"].tensor_type.name == "Q5_K"
    bad = subprocess.run([sys.executable, tool, p, "--n-vocab", "100"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--n-vocab 100" in bad.stderr
    bad = subprocess.run([sys.executable, tool, p, "--type", "Q4_0", "--n-embd", "48", "--n-head", "3", "--n-kv-head", "1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a multiple of the Q4_0 block size" in bad.stderr
    with pytest.raises(TypeError):
        gen_gguf.generate(p, n_layers=2)


def test_deterministic(tmp_path):
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    gen_gguf.generate(a, n_layer=1, seed=9)
    gen_gguf.generate(b, n_layer=1, seed=9)
    assert open(a, "rb").read() == open(b, "rb").read()
