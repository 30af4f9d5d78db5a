"""tests/python/ref_forward.py — an independent numpy reference forward pass for GGUF models.

Why it exists: mneme's logits must be checked against something that shares none of its
code. This module is written from the published architecture descriptions, not from
mneme's C sources:

* Llama (Touvron et al. 2023; Llama 3 report for the "llama3" RoPE frequency scaling):
  pre-norm decoder, RMSNorm (x / sqrt(mean(x^2) + eps) * w), rotary position embedding on
  Q and K, grouped-query attention (n_head query heads share n_head_kv K/V heads), causal
  softmax attention scaled by 1/sqrt(head_dim), SwiGLU MLP down(silu(gate x) * up x), final
  RMSNorm and an output projection (tied to the token embedding when there is no
  `output.weight`).
* Qwen2: the same plus a bias on the Q, K and V projections, and "NEOX" RoPE.

RoPE pair layout: llama.cpp's converter permutes the rows of Q and K in llama GGUF files
so that each rotation acts on ADJACENT elements (x[2i], x[2i+1]) of a head ("NORM" mode).
qwen2 files keep the HF row order, where element i pairs with i + n_rot/2 ("NEOX" mode).
Frequencies: theta_i = pos * base^(-2i/n_rot) / freq_factor[i] (freq_factor = 1 unless a
`rope_freqs.weight` tensor is present, which is how llama3 scaling is stored).

Tensors are read with the `gguf` package's GGUFReader and dequantized with
gguf.quants.dequantize (the package's own numpy implementation of each block format).
Dequantized weights are cached per model path for the life of the process.

Activation rounding (act_quant=True, optional): an engine that multiplies quantized
weights with integer dot products first rounds the matmul INPUT to 8 bits per block.
mneme's matmul contract (kernels/ops.h) specifies it: each row of x is cut into blocks of
32 (weights Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) or 256 (Q2_K/Q3_K/Q4_K/Q5_K/Q6_K); per block d = max|x| / 127 in
float32, q = round-half-to-even(x / d) (all 0 when d == 0), and the dot sees q * d.
Inputs of float-weight (F32/F16/BF16) matmuls are left alone. The rounding is applied
per weight tensor, so a model mixing types gets each matmul's own block size. It is
written here from that description; everything else stays textbook float math.

API:
    forward(model_path, tokens, kv_f16=False, act_quant=False, deltas=None)
        -> np.ndarray [n_tokens, n_vocab] (float64); deltas merges extra weights (LoRA)
    greedy(model_path, tokens, n, kv_f16=False, act_quant=False) -> list[int]
        (argmax decoding with a KV cache)
    greedy_with_logits(model_path, tokens, n, kv_f16=False, act_quant=False)
        -> (ids, list of per-step logits)
    round_activations(x, block) -> x with the block-wise 8-bit rounding applied
    load(model_path) -> Model   (hyper-parameters + dequantized weights)
    tokenizer(model_path) -> tokenizers.Tokenizer built from the GGUF vocab/merges
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

# Single-threaded BLAS unless the caller chose otherwise: the one-row matrix-vector
# products of greedy decoding run ~6x slower when OpenBLAS threads fight over the two
# shared cores of the dev machine. Only effective if numpy is not imported yet.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

import gguf  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

# Models with fewer parameters than this are computed in float64; bigger ones in float32
# (the real 135M model in f64 would take ~1 GB and be slower, while f32 rounding, ~1e-6
# relative, is far below every tolerance the tests use for such models).
F64_MAX_PARAMS = 20_000_000

# Activation block length per weight type for act_quant (from the matmul contract);
# 0 = float weight, the input is used as is. Types missing here have no contract: asking
# for act_quant with them is an error rather than a guess.
_QT = gguf.GGMLQuantizationType
ACT_BLOCK = {_QT.F32: 0, _QT.F16: 0, _QT.BF16: 0,
             _QT.Q4_0: 32, _QT.Q4_1: 32, _QT.Q5_0: 32, _QT.Q5_1: 32, _QT.Q8_0: 32,
             _QT.Q2_K: 256, _QT.Q3_K: 256, _QT.Q4_K: 256, _QT.Q5_K: 256, _QT.Q6_K: 256}


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: np.ndarray          # [n_head*head_dim, n_embd]
    wk: np.ndarray          # [n_kv*head_dim, n_embd]
    wv: np.ndarray
    wo: np.ndarray          # [n_embd, n_head*head_dim]
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    ffn_norm: np.ndarray
    w_gate: np.ndarray      # [n_ff, n_embd]
    w_up: np.ndarray
    w_down: np.ndarray      # [n_embd, n_ff]
    # weight name ("wq", "wk", ...) -> GGML type, used by act_quant to pick the block
    wtype: dict = field(default_factory=dict)


@dataclass
class Model:
    path: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx: int
    n_rot: int
    rope_base: float
    rope_neox: bool
    freq_scale: float
    eps: float
    dtype: type
    tok_embd: np.ndarray    # [n_vocab, n_embd]
    out_norm: np.ndarray
    output: np.ndarray      # [n_vocab, n_embd] (tok_embd itself when tied)
    tied: bool
    freq_factors: np.ndarray | None
    layers: list = field(default_factory=list)
    output_type: object = None   # GGML type of output.weight (token_embd when tied)


_CACHE: dict[str, Model] = {}


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    # scalar fields: the value is the part indexed by data[0]
    part = f.parts[f.data[0]]
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0] if len(part) else default


def _tensor(tensors: dict, name: str, dtype) -> np.ndarray:
    t = tensors[name]
    # GGUF dims are innermost-first; dequantize returns numpy order (rows, cols) ==
    # (ne1, ne0), i.e. a matrix weight comes back as [out_features, in_features].
    a = dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))
    return np.ascontiguousarray(a.reshape(shape), dtype=dtype)


def load(model_path: str) -> Model:
    """Read hyper-parameters and dequantize every weight of a llama/qwen2 GGUF (cached)."""
    key = os.path.realpath(model_path)
    if key in _CACHE:
        return _CACHE[key]
    r = GGUFReader(model_path)
    arch = _field(r, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{model_path}: general.architecture={arch!r}, expected llama or qwen2")
    tensors = {t.name: t for t in r.tensors}
    n_params = sum(int(np.prod(t.shape)) for t in r.tensors)
    dtype = np.float64 if n_params <= F64_MAX_PARAMS else np.float32

    def kv(name, default=None):
        return _field(r, f"{arch}.{name}", default)

    n_embd = int(kv("embedding_length"))
    n_head = int(kv("attention.head_count"))
    n_kv = int(kv("attention.head_count_kv", n_head))
    head_dim = int(kv("attention.key_length", n_embd // n_head))
    n_rot = int(kv("rope.dimension_count", head_dim))
    scaling_type = _field(r, f"{arch}.rope.scaling.type", "none")
    freq_scale = 1.0
    if scaling_type == "linear":
        freq_scale = 1.0 / float(kv("rope.scaling.factor", 1.0))

    tok_embd = _tensor(tensors, "token_embd.weight", dtype)
    tied = "output.weight" not in tensors
    output = tok_embd if tied else _tensor(tensors, "output.weight", dtype)
    out_name = "token_embd.weight" if tied else "output.weight"
    ff = None
    if "rope_freqs.weight" in tensors:
        ff = _tensor(tensors, "rope_freqs.weight", np.float64)
        if ff.shape != (n_rot // 2,):
            raise ValueError(f"rope_freqs.weight has shape {ff.shape}, expected ({n_rot // 2},)")

    m = Model(
        path=model_path, arch=arch, n_layer=int(kv("block_count")), n_embd=n_embd,
        n_head=n_head, n_kv=n_kv, head_dim=head_dim, n_ff=int(kv("feed_forward_length")),
        n_vocab=int(output.shape[0]), n_ctx=int(kv("context_length", 2048)), n_rot=n_rot,
        rope_base=float(kv("rope.freq_base", 10000.0)), rope_neox=(arch == "qwen2"),
        freq_scale=freq_scale, eps=float(kv("attention.layer_norm_rms_epsilon", 1e-5)),
        dtype=dtype, tok_embd=tok_embd, out_norm=_tensor(tensors, "output_norm.weight", dtype),
        output=output, tied=tied, freq_factors=ff, output_type=tensors[out_name].tensor_type)

    def opt(name):
        return _tensor(tensors, name, dtype) if name in tensors else None

    for i in range(m.n_layer):
        p = f"blk.{i}."
        m.layers.append(Layer(
            attn_norm=_tensor(tensors, p + "attn_norm.weight", dtype),
            wq=_tensor(tensors, p + "attn_q.weight", dtype),
            wk=_tensor(tensors, p + "attn_k.weight", dtype),
            wv=_tensor(tensors, p + "attn_v.weight", dtype),
            wo=_tensor(tensors, p + "attn_output.weight", dtype),
            bq=opt(p + "attn_q.bias"), bk=opt(p + "attn_k.bias"), bv=opt(p + "attn_v.bias"),
            ffn_norm=_tensor(tensors, p + "ffn_norm.weight", dtype),
            w_gate=_tensor(tensors, p + "ffn_gate.weight", dtype),
            w_up=_tensor(tensors, p + "ffn_up.weight", dtype),
            w_down=_tensor(tensors, p + "ffn_down.weight", dtype),
            wtype={k: tensors[p + n].tensor_type for k, n in (
                ("wq", "attn_q.weight"), ("wk", "attn_k.weight"), ("wv", "attn_v.weight"),
                ("wo", "attn_output.weight"), ("w_gate", "ffn_gate.weight"),
                ("w_up", "ffn_up.weight"), ("w_down", "ffn_down.weight"))}))
        L = m.layers[-1]
        if L.wq.shape != (n_head * head_dim, n_embd) or L.wk.shape != (n_kv * head_dim, n_embd):
            raise ValueError(f"layer {i}: q/k shapes {L.wq.shape}/{L.wk.shape} do not match "
                             f"n_head={n_head} n_kv={n_kv} head_dim={head_dim} n_embd={n_embd}")
    _CACHE[key] = m
    return m


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + float(eps)) * w).astype(x.dtype, copy=False)


def _rope_angles(m: Model, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of pos * base^(-2i/n_rot) * freq_scale / ff[i], shape [n_pos, n_rot/2]."""
    i = np.arange(m.n_rot // 2, dtype=np.float64)
    inv = m.rope_base ** (-2.0 * i / m.n_rot) * m.freq_scale
    if m.freq_factors is not None:
        inv = inv / m.freq_factors
    ang = pos.astype(np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(m.dtype), np.sin(ang).astype(m.dtype)


def rope(m: Model, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first n_rot dims of each head. x: [n_pos, n_heads, head_dim]."""
    out = x.copy()
    h = m.n_rot // 2
    c = cos[:, None, :]
    s = sin[:, None, :]
    if m.rope_neox:
        a, b = x[..., :h], x[..., h:m.n_rot]
        out[..., :h] = a * c - b * s
        out[..., h:m.n_rot] = a * s + b * c
    else:
        a, b = x[..., 0:m.n_rot:2], x[..., 1:m.n_rot:2]
        out[..., 0:m.n_rot:2] = a * c - b * s
        out[..., 1:m.n_rot:2] = a * s + b * c
    return out


def round_activations(x: np.ndarray, block: int, stats: dict | None = None) -> np.ndarray:
    """8-bit block rounding of the rows of x (see the module docstring), in float32:
    d = f32(max|x|) / f32(127), q = rint(f32(x) / d) (half to even), result q * d in
    x's dtype (exact in float64; one f32 rounding of q*d in float32).

    stats: if given, stats["min_margin"] is lowered to the smallest distance, in units
    of q, between any x/d and a rounding boundary (k + 1/2). An engine whose x differs
    from ours by f32 summation noise rounds some element the other way when that margin
    is tiny, and one such flip moves the logits by ~1e-3 of the row max; tests use the
    margin to pick inputs where the comparison is not decided by such a coin toss."""
    if block == 0:
        return x
    xf = np.asarray(x, dtype=np.float32)
    n = xf.shape[-1]
    if n % block:
        raise ValueError(f"row length {n} is not a multiple of the activation block {block}")
    b = xf.reshape(xf.shape[:-1] + (n // block, block))
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    assert d.dtype == np.float32
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(d > 0, b / d, np.float32(0))
    q = np.rint(v)
    if stats is not None:
        a = np.abs(v)
        marg = float(np.abs(a - np.floor(a) - np.float32(0.5)).min())
        stats["min_margin"] = min(stats.get("min_margin", np.inf), marg)
    out = q.astype(x.dtype) * d.astype(x.dtype)
    return out.reshape(x.shape)


def _matmul(x: np.ndarray, w: np.ndarray, wtype, act_quant: bool,
            stats: dict | None = None) -> np.ndarray:
    """x @ w.T, with x rounded to 8 bits per block first when act_quant and w is quantized."""
    if act_quant:
        if wtype not in ACT_BLOCK:
            raise ValueError(f"act_quant: no activation rounding contract for weight type "
                             f"{getattr(wtype, 'name', wtype)}")
        x = round_activations(x, ACT_BLOCK[wtype], stats)
    return x @ w.T


def _silu(x):
    return x / (1.0 + np.exp(-x))


class _State:
    """Per-layer K/V caches ([pos, n_kv, head_dim]) for incremental decoding."""

    def __init__(self, m: Model, kv_f16: bool = False):
        self.kv_f16 = kv_f16
        self.k = [np.zeros((0, m.n_kv, m.head_dim), m.dtype) for _ in range(m.n_layer)]
        self.v = [np.zeros((0, m.n_kv, m.head_dim), m.dtype) for _ in range(m.n_layer)]
        self.n_past = 0


def _step(m: Model, st: _State, tokens, all_logits: bool = True,
          act_quant: bool = False, stats: dict | None = None, deltas: dict | None = None) -> np.ndarray:
    """Run `tokens` after the st.n_past cached ones; return logits (all rows or last).
    deltas: {(layer, weight name): matrix} added to those weights (merged LoRA)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    if n == 0:
        raise ValueError("no tokens")
    if tokens.min() < 0 or tokens.max() >= m.tok_embd.shape[0]:
        raise ValueError(f"token id out of range [0, {m.tok_embd.shape[0]})")
    if st.n_past + n > m.n_ctx:
        raise ValueError(f"{st.n_past + n} positions exceed context length {m.n_ctx}")
    pos = np.arange(st.n_past, st.n_past + n)
    cos, sin = _rope_angles(m, pos)
    hd, nh, nkv = m.head_dim, m.n_head, m.n_kv
    group = nh // nkv
    scale = float(1.0 / np.sqrt(hd))  # Python float: keeps f32 arrays f32
    n_tot = st.n_past + n
    # causal mask for the new rows against all cached + new columns
    mask = np.arange(n_tot)[None, :] > pos[:, None]

    x = m.tok_embd[tokens].astype(m.dtype)
    for li, L in enumerate(m.layers):
        def mm(a, name):
            w = getattr(L, name)
            if deltas and (li, name) in deltas:
                w = w + deltas[(li, name)].astype(w.dtype)
            return _matmul(a, w, L.wtype.get(name), act_quant, stats)

        h = rms_norm(x, L.attn_norm, m.eps)
        q = mm(h, "wq")
        k = mm(h, "wk")
        v = mm(h, "wv")
        if L.bq is not None:
            q = q + L.bq
        if L.bk is not None:
            k = k + L.bk
        if L.bv is not None:
            v = v + L.bv
        q = rope(m, q.reshape(n, nh, hd), cos, sin)
        k = rope(m, k.reshape(n, nkv, hd), cos, sin)
        v = v.reshape(n, nkv, hd)
        if st.kv_f16:  # model a KV cache that stores (roped) K and V as IEEE half
            k = k.astype(np.float16).astype(m.dtype)
            v = v.astype(np.float16).astype(m.dtype)
        st.k[li] = K = np.concatenate([st.k[li], k], axis=0)
        st.v[li] = V = np.concatenate([st.v[li], v], axis=0)
        # GQA: query head j reads K/V head j // group
        qg = q.reshape(n, nkv, group, hd)
        scores = np.einsum("pkgd,tkd->kgpt", qg, K) * scale   # [nkv, group, n, n_tot]
        scores = np.where(mask[None, None], -np.inf, scores)
        scores = scores - scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        att = np.einsum("kgpt,tkd->pkgd", p, V).reshape(n, nh * hd)
        x = x + mm(att, "wo")
        h = rms_norm(x, L.ffn_norm, m.eps)
        x = x + mm(_silu(mm(h, "w_gate")) * mm(h, "w_up"), "w_down")
    st.n_past = n_tot
    if not all_logits:
        x = x[-1:]
    h = rms_norm(x, m.out_norm, m.eps)
    return _matmul(h, m.output, m.output_type, act_quant, stats).astype(np.float64)


def forward(model_path: str, tokens, kv_f16: bool = False, act_quant: bool = False,
            stats: dict | None = None, deltas: dict | None = None) -> np.ndarray:
    """Logits for every position of `tokens` (no BOS added): [n_tokens, n_vocab] float64.

    kv_f16: round K (after RoPE) and V to IEEE half before attention, as an engine whose
    KV cache is stored in f16 does; lets float-weight tests use a much tighter bound.
    act_quant: round every quantized-weight matmul's input to 8 bits per block, as an
    engine with integer dot products does (see the module docstring).
    stats: with act_quant, receives "min_margin" (see round_activations).
    deltas: merged weights, {(layer, name): [out, in] matrix} added to the layer's weight
    `name` ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"), e.g. a LoRA's s * B @ A
    (in the GGUF row order)."""
    m = load(model_path)
    return _step(m, _State(m, kv_f16), tokens, act_quant=act_quant, stats=stats, deltas=deltas)


def greedy_with_logits(model_path: str, tokens, n: int, kv_f16: bool = False,
                       act_quant: bool = False):
    """Greedy (argmax, lowest id on ties) continuation of `tokens` for n steps.

    Returns (ids, logits) where logits[j] is the distribution that chose ids[j].
    kv_f16 and act_quant as for forward()."""
    m = load(model_path)
    st = _State(m, kv_f16)
    lg = _step(m, st, tokens, all_logits=False, act_quant=act_quant)[-1]
    ids, dists = [], []
    for j in range(n):
        t = int(np.argmax(lg))
        ids.append(t)
        dists.append(lg)
        if j + 1 < n:
            lg = _step(m, st, [t], all_logits=False, act_quant=act_quant)[-1]
    return ids, dists


def greedy(model_path: str, tokens, n: int, kv_f16: bool = False,
           act_quant: bool = False) -> list[int]:
    """n greedily generated token ids after `tokens`."""
    return greedy_with_logits(model_path, tokens, n, kv_f16, act_quant)[0]


def tokenizer(model_path: str):
    """A HF `tokenizers` byte-level BPE built from the GGUF's own vocab and merges.

    Used only to turn test prompts into ids independently of mneme's tokenizer. Control
    tokens (token_type 3, e.g. <|im_start|>) are registered as special tokens so they
    encode to one id. The pre-tokenizer is GPT-2's byte-level split preceded by a split
    of digits into single digits (what SmolLM's tokenizer.json declares)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, AddedToken

    r = GGUFReader(model_path)
    tok_f = r.fields["tokenizer.ggml.tokens"]
    toks = [bytes(tok_f.parts[i]).decode("utf-8") for i in tok_f.data]
    mer_f = r.fields["tokenizer.ggml.merges"]
    merges = [tuple(bytes(mer_f.parts[i]).decode("utf-8").split(" ", 1)) for i in mer_f.data]
    typ_f = r.fields.get("tokenizer.ggml.token_type")
    types = [int(typ_f.parts[i][0]) for i in typ_f.data] if typ_f else [1] * len(toks)
    vocab = {t: i for i, t in enumerate(toks)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _field(r, "tokenizer.ggml.pre", "") in ("smollm", "qwen2"):
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tk.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False)
                for t, ty in zip(toks, types) if ty == 3]
    tk.add_special_tokens(specials)
    return tk
