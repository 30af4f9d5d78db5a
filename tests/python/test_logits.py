"""tests/python/test_logits.py — mneme's logits against the independent numpy reference.

`mneme logits -m MODEL --tokens a,b,c -o OUT.f32` writes n_tokens x n_vocab float32 logits
(every position); `--greedy N` prints N argmax ids. ref_forward.py computes the same from
the same GGUF file with gguf.quants.dequantize and textbook llama/qwen2 math.

Error metric: for each position (row) rel = max_v |mneme - ref| / max_v |ref|, and a
prompt/model reports the largest rel over its rows. Normalising by the row's largest
logit (not per element) is what matters for sampling: a tiny logit may have a large
relative error without changing any probability.

Tolerance budget (why these numbers; all were measured against build/mneme and checked
to be well below what a real bug produces):
* Real model, quantized weights: mneme rounds the activations of every matrix product
  to 8 bits per 32-element block before the integer dot product. One rounding is ~2^-8
  relative per element, but it recurs in 7 projections x 30 layers + the output and
  compounds through the residual stream. Emulating just that rounding inside the numpy
  reference (an experiment, not part of the test) moves the reference's own logits by
  4e-2 .. 6e-2 of the row max, and mneme differs from the f64 reference by 4e-2 .. 7.5e-2,
  i.e. by the same amount. So REAL_TOL = 0.15 (2x the worst measured). That bound alone is
  loose, so the distributions are also compared: the mean over positions of
  KL(p_ref || p_mneme) must stay below REAL_KL = 1e-2 (measured 3e-3 .. 5e-3, the same as
  the emulated rounding gives). For scale: NEOX instead of NORM RoPE pairs gives rel ~1 and
  KL ~0.9; a wrong rope base (1e4 instead of 1e5) rel 0.13 .. 0.5 and KL 1.5e-2 .. 1.1e-1.
* Synthetic models, quantized weights: QUANT_TOL = 2e-2 (measured 1e-3 .. 8e-3).
* Synthetic models, float weights (F32/F16/BF16): mneme uses f32 dots with the exact
  weight values, but its KV cache stores K and V as IEEE half (engine/kv.h). That rounding
  alone moves the logits by ~3e-5 of the row max (1.4e-4 with untied output), so the
  synthetic tests run the reference with kv_f16=True (K after RoPE and V rounded to f16),
  after which only f32 rounding and summation order remain: FLOAT_TOL = 5e-5 (measured
  4e-7 .. 1.6e-5; K/V values that land near an f16 rounding boundary decide the spread). If mneme's KV cache type changes, change KV_F16 below. For quantized
  weights kv_f16 makes no visible difference.

Contract-exact comparisons (ref_forward's act_quant=True: the reference rounds the
input of every quantized-weight matmul to 8 bits per block exactly as the matmul contract
in kernels/ops.h says, plus kv_f16). What is left between mneme and that reference is
f32 summation order, EXCEPT that an activation whose x/d lies within f32 noise of a
rounding boundary (k + 1/2) can round the other way in mneme; each such flip moves the
logits by ~1e-3 of the row max on the synthetic models and ~5e-3 on the real one (a
single flipped element in layer 0 of SmolLM2 measured 6.3e-3). Such flips are many per
forward pass on the real model, and the 30-layer network amplifies them: the act_quant
reference itself moves by 6e-2 .. 9e-2 of the row max when only its tie-breaking (half-even
vs half-away on exact .5) changes, and by 4e-2 .. 7e-2 when its KV rounding changes. So
on the full real model the act_quant reference is NOT closer to mneme than the pure-float
one (measured 4.6e-2 .. 8.7e-2 vs 3.8e-2 .. 8.3e-2); those numbers are printed, bounded by
REAL_TOL only. The tight checks therefore use inputs on which no rounding is a coin toss:
the reference reports the smallest distance of any x/d to a boundary (stats
"min_margin"), and the test uses token sequences whose margin is >= ACTQ_MARGIN (2e-4 q
units; 5e-5 and 1e-4 were measured to be too small: flips still happened). On those:
* every quantized synthetic case, 4 tokens: measured 5e-8 .. 7.2e-7 against 1.5e-3 ..
  7.6e-3 for the pure-float reference; ACTQ_TOL = 5e-6.
* the real model's weights with block_count patched to 1 in a copy (real shapes, Q4_1
  576/1536, tied Q8_0 49152 x 576 output, 9/3 GQA, head_dim 64), 3 fixed tokens found by
  a margin search: measured 6.2e-7 against 7.7e-3 pure-float.
Greedy on the full real model: mneme's 32 ids are compared with the act_quant
reference's. Identical for chatml and code; english diverges at step 19 where the
reference's top-2 gap is 2.5e-4 of max|logit|, numbers at step 17 with gap 1.05e-3
(against the pure-float reference: steps 14 and 6, gaps 2.2e-3 and 3.4e-3). That was with
Q4_1 dots summed in 8 lanes; since the Q4 kernels run the reference's per-element sequence
(bit-identical to mn_ref_matmul, tests/unit/test_matmul.c), the avx512-vnni level
diverges on code at step 9 with gap 6.45e-3 and on english at step 14 with gap 1.56e-3,
while the scalar and avx2 levels (other rmsnorm/attention summation orders) match all 32
ids: which near tie flips depends on the boundary flips above, whose effect on the logits
(4e-2 .. 9e-2 of the row max) is ten times these gaps. So the first divergence is
tolerated below GREEDY_TIE = 1e-2 of max|logit| (= NEAR_TIE, the rule for later steps);
a 1e-4 bound (pure summation-order noise) is not reachable because of the flips above.
A real error shows up as a gap of a good fraction of max|logit| and in the KL and
REAL_TOL checks of test_real_model_logits.

Synthetic models are "sharpened" before use: gen_gguf.py draws weights of std 0.02, with
which attention scores are ~0.1 and the attention branch adds only a few percent to the
residual; then even NEOX-vs-NORM RoPE changes the logits by only 1e-3 of the row max,
which no tolerance could separate from quantization noise. Multiplying every
attn_norm.weight by 4 and ffn_norm.weight by 2 (F32 tensors, edited in place in the file)
makes the layers matter: a RoPE pair-layout error then moves the logits by 5e-2 .. 3e-1, a
wrong rope base by ~1e-2, a K/V-head mapping error by > 0.14, a dropped qwen2 bias by
1.4e-3, missing llama3 frequency factors by ~7.6e-4 (64 positions) and a 10x larger
RMSNorm eps by 4e-5 .. 1.5e-4 (llama eps; only partly caught) — these last ones are only
visible against FLOAT_TOL, hence the F32 variants of the qwen2 and llama3 cases.
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

import ref_forward as rf

THREADS = int(os.environ.get("MNEME_TEST_THREADS", "2"))
REAL_TOL = 0.15
REAL_KL = 1e-2
QUANT_TOL = 2e-2
FLOAT_TOL = 5e-5
KV_F16 = True   # mneme's KV cache holds f16 K/V
ARGMAX_AGREE = 0.95
GREEDY_N = 32
# A greedy pick that loses to the reference's argmax by less than NEAR_TIE * max|logit|
# counts as a near tie. The activation rounding moves single logits by up to ~5e-2 of
# the row max (see REAL_TOL), so gaps of a few 1e-3 can flip; we measured divergences at
# gaps of 2.2e-3 and 3.4e-3. 1e-2 still rejects any pick the reference does not rank
# essentially level with its best.
NEAR_TIE = 1e-2
MAX_TIES = 4      # more near-tie flips than this in 32 greedy steps is not luck
# contract-exact (act_quant) comparisons; see the module docstring
ACTQ_TOL = 5e-6
ACTQ_MARGIN = 2e-4
ACTQ_TOKENS = 4
ACTQ_TRIES = 400
GREEDY_TIE = 1e-2
# Three tokens on which the 1-layer real model has no activation within ACTQ_MARGIN of a
# rounding boundary (found by the same search as the synthetic cases, which takes ~2 min
# on the real vocab, hence stored; the test re-checks the margin and says so if the
# model or reference changed).
REAL1_TOKENS = [2306, 16114, 3529]

CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
PROMPTS = {
    "english": "The old lighthouse keeper climbed the stairs every evening, and",
    "chatml": CHAT,
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
    "numbers": "1, 1, 2, 3, 5, 8, 13, 21, 34, 55,",
    "long": ("<|im_start|>user\nWrite a short poem about the sea, the wind and an old ship "
             "that sails home at night under the stars.<|im_end|>\n<|im_start|>assistant\n"
             "The sea is wide, the wind is cold,"),
}


def mneme_logits(run_mneme, model, tokens, tmp_path) -> np.ndarray:
    out = tmp_path / "logits.f32"
    run_mneme(["logits", "-m", model, "--tokens", ",".join(map(str, tokens)),
               "-o", out, "-t", THREADS])
    a = np.fromfile(out, dtype="<f4")
    assert a.size % len(tokens) == 0, f"{out}: {a.size} floats is not n_tokens x n_vocab"
    return a.reshape(len(tokens), -1).astype(np.float64)


def mneme_greedy(run_mneme, model, tokens, n) -> list[int]:
    p = run_mneme(["logits", "-m", model, "--tokens", ",".join(map(str, tokens)),
                   "--greedy", n, "-t", THREADS])
    return [int(x) for x in p.stdout.split()]


def row_rel_err(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: max|a-b| / max|b| (b is the reference)."""
    return np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)


def mean_kl(got: np.ndarray, ref: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(got))."""
    def logsm(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    lr, lg = logsm(ref), logsm(got)
    return float((np.exp(lr) * (lr - lg)).sum(axis=1).mean())


def compare(a: np.ndarray, b: np.ndarray, tol: float, what: str):
    assert a.shape == b.shape, f"{what}: mneme logits shape {a.shape}, reference {b.shape}"
    assert np.all(np.isfinite(a)), f"{what}: mneme logits contain NaN/inf"
    rel = row_rel_err(a, b)
    # positions where the reference's top two are level within NEAR_TIE are ties: either
    # pick is right, so they do not count for or against the argmax agreement
    top2 = np.sort(b, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) >= NEAR_TIE * np.abs(b).max(axis=1)
    same = a.argmax(1) == b.argmax(1)
    agree = float(np.mean(same[decided])) if decided.any() else 1.0
    worst = int(rel.argmax())
    print(f"{what}: max rel err {rel.max():.3e} (row {worst}), mean {rel.mean():.3e}, "
          f"argmax agree {agree:.3f} over {int(decided.sum())} non-tied positions "
          f"({int((~same).sum())} of {len(same)} differ in all)")
    assert rel.max() < tol, (f"{what}: logits differ from the reference by {rel.max():.3e} "
                             f"of the row max at position {worst} (bound {tol:g})")
    return rel, agree


# ---- the real model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_tokens(model_path):
    tk = rf.tokenizer(str(model_path))
    toks = {k: tk.encode(v).ids for k, v in PROMPTS.items()}
    for k, t in toks.items():
        assert 5 <= len(t) <= 60, f"prompt {k!r} is {len(t)} tokens"
    return toks


@pytest.mark.parametrize("name", list(PROMPTS))
def test_real_model_logits(name, model_path, real_tokens, run_mneme, tmp_path):
    toks = real_tokens[name]
    t0 = time.time()
    ref = rf.forward(str(model_path), toks)
    t1 = time.time()
    got = mneme_logits(run_mneme, model_path, toks, tmp_path)
    t2 = time.time()
    print(f"{name}: {len(toks)} tokens, reference {t1 - t0:.2f}s, mneme {t2 - t1:.2f}s")
    _, agree = compare(got, ref, REAL_TOL, f"SmolLM2 {name}")
    kl = mean_kl(got, ref)
    print(f"{name}: mean KL(ref||mneme) {kl:.3e}")
    assert kl < REAL_KL, f"{name}: mean KL divergence {kl:.3e} >= {REAL_KL:g}"
    assert agree >= ARGMAX_AGREE, f"{name}: argmax agrees at only {agree:.1%} of positions"
    # the contract-exact reference: printed for the record, bounded like the pure one
    # (rounding flips make it no closer on 30 layers; see the module docstring)
    refq = rf.forward(str(model_path), toks, kv_f16=KV_F16, act_quant=True)
    compare(got, refq, REAL_TOL, f"SmolLM2 {name} vs act_quant reference")


def truncate_layers(src, dst, n_layer: int) -> None:
    """Copy a llama GGUF with {arch}.block_count set to n_layer (extra tensors stay, unused)."""
    import shutil
    from gguf import GGUFReader
    shutil.copyfile(src, dst)
    r = GGUFReader(str(dst), "r+")
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    f = r.fields[f"{arch}.block_count"]
    f.parts[f.data[0]][0] = n_layer
    r.data.flush()
    del r


def test_real_model_one_layer_actq(model_path, run_mneme, tmp_path):
    """Contract-exact check on the real weights: layer 0 + output of SmolLM2 on three tokens
    where no activation is within ACTQ_MARGIN of a rounding boundary."""
    path = tmp_path / "smollm2-1layer.gguf"
    truncate_layers(model_path, path, 1)
    st: dict = {}
    refq = rf.forward(str(path), REAL1_TOKENS, kv_f16=KV_F16, act_quant=True, stats=st)
    assert st["min_margin"] >= ACTQ_MARGIN, (
        f"tokens {REAL1_TOKENS} have an activation {st['min_margin']:.1e} from a rounding "
        f"boundary on this model/reference; search new ones (see REAL1_TOKENS)")
    ref = rf.forward(str(path), REAL1_TOKENS, kv_f16=KV_F16)
    got = mneme_logits(run_mneme, path, REAL1_TOKENS, tmp_path)
    rel_pure = row_rel_err(got, ref).max()
    print(f"SmolLM2 1 layer: vs pure-float reference {rel_pure:.3e}")
    compare(got, refq, ACTQ_TOL, f"SmolLM2 1 layer vs act_quant reference "
            f"(margin {st['min_margin']:.1e})")


@pytest.mark.parametrize("name", ["chatml", "english", "code", "numbers"])
def test_real_model_greedy(name, model_path, real_tokens, run_mneme):
    """mneme's 32 greedy ids must equal the act_quant reference's greedy continuation.
    At the first divergence the reference's own distribution must be a near tie: mneme's
    pick loses to the reference's by less than GREEDY_TIE of max|logit|. After it the
    sequences differ, so each later choice of mneme is checked teacher-forced (one act_quant
    reference pass over prompt + mneme's continuation) with the looser NEAR_TIE rule;
    the run passes with a warning that names the near ties."""
    toks = real_tokens[name]
    t0 = time.time()
    ref_ids, dists = rf.greedy_with_logits(str(model_path), toks, GREEDY_N,
                                           kv_f16=KV_F16, act_quant=True)
    t1 = time.time()
    got = mneme_greedy(run_mneme, model_path, toks, GREEDY_N)
    print(f"{name}: reference greedy {t1 - t0:.2f}s, mneme {time.time() - t1:.2f}s")
    assert len(got) == GREEDY_N, f"mneme printed {len(got)} ids, expected {GREEDY_N}: {got}"
    if got == ref_ids:
        print(f"{name}: greedy continuation identical to the act_quant reference")
        return
    first = next(i for i in range(GREEDY_N) if got[i] != ref_ids[i])
    row = dists[first]
    gap0 = float(row[ref_ids[first]] - row[got[first]]) / float(np.abs(row).max())
    msg = (f"{name}: greedy continuations differ from step {first}, where the act_quant "
           f"reference prefers {ref_ids[first]} over mneme's {got[first]} by {gap0:.2e} of "
           f"max|logit| (tolerated below {GREEDY_TIE:g})\n  mneme {got}\n  ref   {ref_ids}")
    if gap0 >= GREEDY_TIE:
        pytest.fail(msg, pytrace=False)
    forced = rf.forward(str(model_path), toks + got[:-1], kv_f16=KV_F16,
                        act_quant=True)[len(toks) - 1:]
    ties, bad = [], []
    for j, t in enumerate(got):
        if j <= first:
            continue
        row = forced[j]
        best = int(np.argmax(row))
        if t == best:
            continue
        gap = float(row[best] - row[t]) / float(np.abs(row).max())
        (ties if gap < NEAR_TIE else bad).append(f"step {j}: mneme {t}, reference {best}, "
                                                 f"gap {gap:.2e} of max|logit|")
    msg += f"\n  later teacher-forced near ties: {ties}\n  real disagreements: {bad}"
    if bad or len(ties) > MAX_TIES:
        pytest.fail(msg, pytrace=False)
    print(msg)
    warnings.warn(f"{name}: greedy continuation diverges at step {first} after a near tie "
                  f"(gap {gap0:.2e}); later near ties: {ties}")


def test_reference_answers_paris(model_path):
    """The reference itself must be right: with the NORM RoPE layout SmolLM2 answers the
    question; this guards against testing mneme against a broken reference."""
    tk = rf.tokenizer(str(model_path))
    toks = tk.encode(CHAT).ids
    text = tk.decode(rf.greedy(str(model_path), toks, 12))
    assert "Paris" in text, f"reference continuation {text!r} does not mention Paris"


# ---- synthetic models ----------------------------------------------------------------------

FLOAT_TYPES = ("F32", "F16", "BF16")
ALL_TYPES = FLOAT_TYPES + ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

ATTN_NORM_GAIN = 4.0
FFN_NORM_GAIN = 2.0

# (id, generator options, prompt length). Dimensions are multiples of 256 so every
# K-quant fits.
SYNTH = [(f"type-{t}", dict(type=t), 20) for t in ALL_TYPES] + [
    ("gqa1", dict(n_head=8, n_kv_head=8, type="Q8_0"), 20),
    ("gqa3", dict(n_head=6, n_kv_head=2, head_dim=32, type="Q8_0"), 20),  # q dim 192 != n_embd
    ("gqa3-f32", dict(n_head=6, n_kv_head=2, head_dim=32, type="F32"), 20),
    ("gqa4", dict(n_head=8, n_kv_head=2, type="Q4_1"), 20),
    ("gqa8", dict(n_head=8, n_kv_head=1, type="Q4_1"), 20),
    ("qwen2-bias", dict(arch="qwen2", n_head=8, n_kv_head=2, type="Q4_1"), 20),
    ("qwen2-bias-f32", dict(arch="qwen2", n_head=8, n_kv_head=4, type="F32"), 20),
    ("untied", dict(untied=True, type="Q4_0"), 20),
    ("untied-f16", dict(untied=True, type="F16"), 20),
    ("llama3-rope", dict(rope_scaling="llama3", type="Q8_0", rope_base=500000.0), 20),
    ("llama3-rope-f32", dict(rope_scaling="llama3", type="F32", rope_base=500000.0), 64),
    ("headdim64", dict(n_head=4, n_kv_head=2, head_dim=64, type="F16"), 20),
]


def _tol(opts) -> float:
    types = {opts.get("type", "Q4_1"), opts.get("embd_type") or opts.get("type", "Q4_1")}
    return FLOAT_TOL if types <= set(FLOAT_TYPES) else QUANT_TOL


def sharpen(path) -> None:
    """Scale the RMSNorm gains in place (see the module docstring for why)."""
    from gguf import GGUFReader
    r = GGUFReader(str(path), "r+")
    n = 0
    for t in r.tensors:
        if t.name.endswith("attn_norm.weight"):
            t.data[...] *= ATTN_NORM_GAIN
            n += 1
        elif t.name.endswith("ffn_norm.weight"):
            t.data[...] *= FFN_NORM_GAIN
            n += 1
    assert n > 0 and all(t.tensor_type.name == "F32" for t in r.tensors if "norm" in t.name)
    r.data.flush()
    del r


@pytest.fixture(scope="module")
def sharp_model(gen_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharp")
    made = {}

    def make(case_id, opts):
        if case_id not in made:
            path = root / f"{case_id}.gguf"
            gen_gguf.generate(str(path), **opts)
            sharpen(path)
            made[case_id] = path
        return made[case_id]

    return make


@pytest.mark.parametrize("case_id,opts,n_tok", SYNTH, ids=[c[0] for c in SYNTH])
def test_synthetic_logits(case_id, opts, n_tok, sharp_model, run_mneme, tmp_path):
    path = sharp_model(case_id, opts)
    m = rf.load(str(path))
    rng = np.random.default_rng(sum(map(ord, case_id)))
    toks = [int(t) for t in rng.integers(0, m.n_vocab, size=n_tok)]
    ref = rf.forward(str(path), toks, kv_f16=KV_F16)
    got = mneme_logits(run_mneme, path, toks, tmp_path)
    _, agree = compare(got, ref, _tol(opts), f"synthetic {case_id}")
    assert agree >= ARGMAX_AGREE, f"argmax agrees at only {agree:.1%} of positions"


QUANT_SYNTH = [c for c in SYNTH if _tol(c[1]) == QUANT_TOL]


@pytest.mark.parametrize("case_id,opts,n_tok", QUANT_SYNTH, ids=[c[0] for c in QUANT_SYNTH])
def test_synthetic_actq(case_id, opts, n_tok, sharp_model, run_mneme, tmp_path):
    """Quantized synthetic models against the contract-exact reference, on the first of a
    deterministic series of ACTQ_TOKENS-token sequences that has no activation within
    ACTQ_MARGIN of a rounding boundary (see the module docstring)."""
    path = sharp_model(case_id, opts)
    m = rf.load(str(path))
    rng = np.random.default_rng(1000 + sum(map(ord, case_id)))
    for tries in range(1, ACTQ_TRIES + 1):
        toks = [int(t) for t in rng.integers(0, m.n_vocab, size=ACTQ_TOKENS)]
        st: dict = {}
        refq = rf.forward(str(path), toks, kv_f16=KV_F16, act_quant=True, stats=st)
        if st["min_margin"] >= ACTQ_MARGIN:
            break
    else:
        pytest.fail(f"{case_id}: no {ACTQ_TOKENS}-token sequence with rounding margin >= "
                    f"{ACTQ_MARGIN:g} in {ACTQ_TRIES} tries", pytrace=False)
    got = mneme_logits(run_mneme, path, toks, tmp_path)
    pure = row_rel_err(got, rf.forward(str(path), toks, kv_f16=KV_F16)).max()
    print(f"synthetic {case_id}: {toks} after {tries} tries, vs pure-float reference {pure:.3e}")
    compare(got, refq, ACTQ_TOL, f"synthetic {case_id} vs act_quant reference "
            f"(margin {st['min_margin']:.1e})")


def test_round_activations_contract():
    """The reference's rounding itself, on hand-worked values: block max 127 gives d = 1,
    so q is x rounded half to even; the block length decides which max sets d; an
    all-zero block stays zero; float weights (block 0) leave x alone."""
    x = np.zeros((2, 256), np.float64)
    x[0, :6] = [127.0, 2.5, -2.5, 3.5, 0.4999, -126.6]
    x[0, 32:36] = [31.75, 0.625, -0.875, 0.3]   # 2nd block: max 31.75 -> d = 0.25 exactly
    got = rf.round_activations(x, 32)
    want = np.zeros_like(x)
    want[0, :6] = [127, 2, -2, 4, 0, -127]
    want[0, 32:36] = [127 * 0.25, 2 * 0.25, -4 * 0.25, 1 * 0.25]  # 2.5 -> 2, -3.5 -> -4
    np.testing.assert_array_equal(got, want)
    # one block of 256: the max 127 sets d = 1 for the second group too
    got256 = rf.round_activations(x, 256)
    want256 = want.copy()
    want256[0, 32:36] = [32, 1, -1, 0]
    np.testing.assert_array_equal(got256, want256)
    np.testing.assert_array_equal(got[1], 0)                      # all-zero row: d = 0
    assert rf.round_activations(x, 0) is x
