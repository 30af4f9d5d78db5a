"""tests/python/test_lora.py — many LoRA adapters in one batch, against merged weights.

A synthetic llama GGUF with F32 weights (tools/gen_gguf.py) and four PEFT adapters
(tools/gen_lora.py) of ranks 4, 8, 16 and 64 — F32, F16 and BF16 files, all seven or a few
targets, one with use_rslora, rank_pattern and alpha_pattern — run in ONE batch with
sequences that use no adapter, by build/lora_logits (engine/forward.c with MN_OP_LORA), on
one CPU rank and on two (tensor parallelism, engine/tp.h: the bound is the same).
The prompts are interleaved round-robin, so every adapter's rows are scattered through the
batch; then three decode steps batch one token per sequence.

Reference: tests/python/ref_forward.py on weights merged as W + s * B @ A, with s =
alpha / r (alpha / sqrt(r) for rslora) and the per-module rank / alpha from the patterns,
and with B's rows of q_proj and k_proj permuted the way llama.cpp's converter permutes Q
and K (written here from convert_hf_to_gguf's `permute`), since GGUF llama weights are
stored in that order. Tolerance: every row's max |mneme - ref| below FLOAT_TOL = 5e-5 of
the row's max |logit| (the bound test_logits.py uses for float-weight models; the KV cache
is f16 in both), and every greedy token mneme picked must be the reference's argmax unless
the reference's top two are within GREEDY_TIE. The adapters must move the logits by far
more than the tolerance, or the test would prove nothing.

Each malformed adapter (tools/gen_lora.py --break KIND) must be refused with its own error
code and a message naming the file, tensor or field.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import ref_forward

FLOAT_TOL = 5e-5
GREEDY_TIE = 2e-3
MODEL_OPTS = dict(type="F32", n_layer=2, n_embd=128, n_head=4, n_kv_head=2, n_ff=256, n_vocab=320, seed=7)
SHAPE = dict(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, head_dim=32, n_ff=256)
WEIGHT = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w_gate",
          "up_proj": "w_up", "down_proj": "w_down"}
ALL = tuple(WEIGHT)

ADAPTERS = [
    dict(r=4, dtype="F32", targets=ALL, seed=11, std_b=0.08),
    dict(r=8, dtype="F16", targets=("q_proj", "v_proj", "down_proj"), seed=12, alpha=24.0, std_b=0.06),
    dict(r=16, dtype="BF16", targets=ALL, seed=13, rslora=True,
         rank_pattern={"k_proj": 12, "model.layers.1.mlp.up_proj": 20}, alpha_pattern={"o_proj": 40.0}),
    dict(r=64, dtype="F32", targets=ALL, seed=14, std_a=0.03, std_b=0.03),
]
# (adapter index or -1, prompt length)
SEQS = [(0, 5), (1, 3), (2, 7), (3, 4), (-1, 6), (2, 2), (-1, 1), (3, 9)]
N_DECODE = 3


@pytest.fixture(scope="module")
def gen_lora(repo_root):
    src = repo_root / "tools" / "gen_lora.py"
    spec = importlib.util.spec_from_file_location("gen_lora", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tool(build_dir):
    exe = build_dir / "lora_logits"
    if not exe.is_file():
        pytest.fail(f"{exe} not built (ninja -C {build_dir} lora_logits)", pytrace=False)
    return exe


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's Q/K row permutation: per head, rows [0..hd/2) and [hd/2..hd)
    become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def merged_deltas(values: dict, targets) -> dict:
    deltas = {}
    for li in range(SHAPE["n_layer"]):
        for t in targets:
            block = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            mod = f"model.layers.{li}.{block}.{t}"
            a = values[f"base_model.model.{mod}.lora_A.weight"].astype(np.float64)
            b = values[f"base_model.model.{mod}.lora_B.weight"].astype(np.float64)
            if t == "q_proj":
                b = llama_permute(b, SHAPE["n_head"])
            elif t == "k_proj":
                b = llama_permute(b, SHAPE["n_kv_head"])
            deltas[(li, WEIGHT[t])] = values["__scales__"][mod] * (b @ a)
    return deltas


def row_rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).max(axis=-1) / np.abs(b).max(axis=-1)


def run_mixed(synth_model, gen_lora, tool, tmp_path, adapters, seqs, extra=()):
    """Run SEQS (adapter index, prompt length) through lora_logits with these adapters, check
    every row against the merged-weight numpy reference; returns (worst error, stderr)."""
    model = synth_model(**MODEL_OPTS)
    dirs, deltas = [], []
    for i, opts in enumerate(adapters):
        d = tmp_path / f"ad{i}"
        o = dict(opts)
        vals = gen_lora.generate(str(d), SHAPE, **o)
        dirs.append(d)
        deltas.append(merged_deltas(vals, o["targets"]))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, MODEL_OPTS["n_vocab"], n).tolist() for _, n in seqs]
    out = tmp_path / "logits.f32"
    cmd = [str(tool), "run", str(model), str(out), "--threads", "2", "--decode", str(N_DECODE), *extra]
    for d in dirs:
        cmd += ["--adapter", str(d)]
    for (a, _), p in zip(seqs, prompts):
        cmd += ["--seq", f"{a}:" + ",".join(map(str, p))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"lora_logits failed: {r.stderr}"
    V = MODEL_OPTS["n_vocab"]
    got = np.fromfile(out, dtype=np.float32).reshape(-1, V).astype(np.float64)
    chosen = {}
    for line in r.stdout.split("\n"):
        if line.startswith("decode "):
            _, step, s, t = line.split()
            chosen[(int(step), int(s))] = int(t)
    n_prompt = sum(n for _, n in seqs)
    assert got.shape[0] == n_prompt + N_DECODE * len(seqs)

    worst, moved = 0.0, []
    row = 0
    for s, ((a, n), p) in enumerate(zip(seqs, prompts)):
        toks = p + [chosen[(k, s)] for k in range(N_DECODE)]
        ref = ref_forward.forward(str(model), toks, kv_f16=True, deltas=deltas[a] if a >= 0 else None)
        mine = np.concatenate([got[row:row + n]] +
                              [got[n_prompt + k * len(seqs) + s][None] for k in range(N_DECODE)])
        row += n
        mine_ref = ref[:n + N_DECODE]
        rel = row_rel(mine, mine_ref)
        worst = max(worst, float(rel.max()))
        assert rel.max() < FLOAT_TOL, (f"sequence {s} (adapter {a}): logits differ from the merged-weight reference "
                                       f"by {rel.max():.3e} of the row max at position {int(rel.argmax())}")
        # greedy: mneme's choices must be the reference's argmax (up to near-ties)
        for k in range(N_DECODE):
            lg = ref[n - 1 + k]
            top = np.sort(lg)[-2:]
            if chosen[(k, s)] != int(np.argmax(lg)):
                assert top[1] - top[0] < GREEDY_TIE * np.abs(lg).max(), (
                    f"sequence {s} step {k}: mneme chose {chosen[(k, s)]}, reference argmax {int(np.argmax(lg))}")
        if a >= 0:
            base = ref_forward.forward(str(model), toks, kv_f16=True)
            moved.append(float(row_rel(base[:n], mine_ref[:n]).max()))
    # the adapters must matter: each moves its logits by far more than the tolerance
    assert min(moved) > 100 * FLOAT_TOL, f"adapters barely change the logits ({moved}); the test would prove nothing"
    return worst, moved, r.stderr


@pytest.mark.parametrize("tp", [1, 2])
def test_mixed_batch_matches_merged_reference(synth_model, gen_lora, tool, tmp_path, tp):
    # tp 2: the same batches on two CPU ranks (engine/tp.h): each rank 2 of the 4 query heads,
    # 1 of the 2 kv heads, half the ffn; its share of every adapter through views of A and B
    worst, moved, _ = run_mixed(synth_model, gen_lora, tool, tmp_path, ADAPTERS, SEQS, ("--tp", str(tp)))
    print(f"\ntp {tp}: worst row error {worst:.2e} of row max (bound {FLOAT_TOL:g}); "
          f"adapter effect {min(moved):.2e}..{max(moved):.2e}")


def test_mixed_batches_under_eviction(synth_model, gen_lora, tool, tmp_path):
    """Eight adapters (the four above and four more), a device budget that holds one half of
    them: every step runs as two batches of four adapters each (ranks 4, 8, 16, 64, plus rows
    without an adapter), so each batch evicts the other half's copies and pages its own back
    in. Every row must still match the merged-weight reference."""
    more = [dict(o, seed=o["seed"] + 100) for o in ADAPTERS]
    adapters = ADAPTERS + more
    seqs = SEQS + [(4, 4), (5, 3), (6, 6), (7, 5), (-1, 2)]
    sizes = []
    for i, o in enumerate(adapters):
        d = tmp_path / f"size{i}"
        gen_lora.generate(str(d), SHAPE, **dict(o))
        code, msg = check(tool, synth_model(**MODEL_OPTS), d)
        assert code == 0, msg
        sizes.append(int(msg.split("bytes=")[1].split()[0]))
    budget = max(sum(sizes[:4]), sum(sizes[4:]))
    assert budget < sum(sizes)
    worst, moved, err = run_mixed(synth_model, gen_lora, tool, tmp_path, adapters, seqs,
                                  ("--budget", str(budget), "--halves"))
    page_ins, evictions = (int(x) for x in err.split("page_ins ")[1].split(" evictions "))
    steps = 1 + N_DECODE
    assert page_ins >= 8 * steps - 4 and evictions >= 8 * steps - 8, err   # each half reloaded every step
    print(f"\neviction: worst row error {worst:.2e}; {page_ins} page-ins, {evictions} evictions")


def check(tool, model, d) -> tuple[int, str]:
    r = subprocess.run([str(tool), "check", str(model), str(d)], capture_output=True, text=True, timeout=60)
    return r.returncode, (r.stdout + r.stderr).strip()


BAD = [
    ("truncate", "MN_EFORMAT", "past the end of the data"),
    ("header-past-eof", "MN_EFORMAT", "runs past the end of the file"),
    ("overlap", "MN_EFORMAT", "overlaps tensor"),
    ("wrong-size", "MN_EFORMAT", "but shape x F32 needs"),
    ("bad-dtype", "MN_EFORMAT", "unknown dtype 'Q7'"),
    ("missing-tensor", "MN_EFORMAT", "missing tensor 'base_model.model.model.layers.1.mlp.down_proj.lora_B.weight'"),
    ("wrong-shape", "MN_EFORMAT", "rank 9, config says 8"),
    ("rank0", "MN_EINVALID", "r = 0, must be in [1, 65536]"),
    ("hidden", "MN_EMISMATCH", "input size 160 does not match the model's 128"),
    ("extra-layer", "MN_EMISMATCH", "is for layer 2, the model has 2 layers"),
    ("no-config", "MN_ENOT_FOUND", "adapter_config.json: cannot open"),
]


@pytest.mark.parametrize("kind,code,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_adapter_refused(synth_model, gen_lora, tool, tmp_path, kind, code, needle):
    model = synth_model(**MODEL_OPTS)
    d = tmp_path / kind
    gen_lora.generate(str(d), SHAPE, r=8, brk=kind)
    rc, msg = check(tool, model, d)
    assert rc == 1, f"{kind}: expected a refusal, got rc={rc}: {msg}"
    assert msg.startswith(f"error {code}:"), f"{kind}: expected {code}, got: {msg}"
    assert needle in msg, f"{kind}: message should contain {needle!r}: {msg}"


def test_bad_config_fields(synth_model, gen_lora, tool, tmp_path):
    model = synth_model(**MODEL_OPTS)
    d = tmp_path / "cfg"
    gen_lora.generate(str(d), SHAPE, r=4, targets=("q_proj",))
    cfg_path = d / "adapter_config.json"
    good = json.loads(cfg_path.read_text())
    cases = [
        ({"target_modules": ["q_proj", "lm_head"]}, "MN_EUNSUPPORTED", "target_modules[1] = \"lm_head\""),
        ({"r": "four"}, "MN_EFORMAT", "\"r\" missing or not an integer"),
        ({"use_dora": True}, "MN_EUNSUPPORTED", "\"use_dora\""),
        ({"rank_pattern": {"q_proj": 0}}, "MN_EINVALID", "rank of model.layers.0.self_attn.q_proj is 0"),
        ({"target_modules": ["q_proj", "v_proj"]}, "MN_EFORMAT", "missing tensor 'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight'"),
        ({"target_modules": []}, "MN_EINVALID", "target_modules is empty"),
    ]
    for patch, code, needle in cases:
        cfg_path.write_text(json.dumps(dict(good, **patch)))
        rc, msg = check(tool, model, d)
        assert rc == 1 and msg.startswith(f"error {code}:") and needle in msg, f"{patch}: {msg}"
    cfg_path.write_text("{\"r\": 4,")
    rc, msg = check(tool, model, d)
    assert rc == 1 and "MN_EFORMAT" in msg and "adapter_config.json: line" in msg, msg
    # tensors of a module not in target_modules
    cfg_path.write_text(json.dumps(dict(good, target_modules=["q_proj"])))
    gen_lora.generate(str(d / "x"), SHAPE, r=4, targets=("q_proj", "up_proj"))
    (d / "x" / "adapter_config.json").write_text(json.dumps(dict(good, target_modules=["q_proj"])))
    rc, msg = check(tool, model, d / "x")
    assert rc == 1 and "MN_EUNSUPPORTED" in msg and "up_proj.lora_A.weight" in msg, msg


def test_fingerprint_is_content(synth_model, gen_lora, tool, tmp_path):
    model = synth_model(**MODEL_OPTS)
    fp = {}
    for name, seed, alpha in (("a", 1, 16.0), ("b", 1, 16.0), ("c", 2, 16.0), ("d", 1, 8.0)):
        gen_lora.generate(str(tmp_path / name), SHAPE, r=8, seed=seed, alpha=alpha)
        rc, msg = check(tool, model, tmp_path / name)
        assert rc == 0, msg
        fp[name] = msg.split("fingerprint=")[1].split()[0]
    assert fp["a"] == fp["b"], "same content under another path must give the same fingerprint"
    assert fp["a"] != fp["c"], "other weights must change the fingerprint"
    assert fp["a"] != fp["d"], "another scale must change the fingerprint"


def test_gguf_lora_same_content_as_peft(synth_model, gen_lora, tool, tmp_path):
    """The same adapter as a PEFT directory and as a llama.cpp GGUF LoRA (B's Q/K rows in
    the GGUF order) loads to the same content: equal fingerprints (ranks, scales, weights)."""
    model = synth_model(**MODEL_OPTS)
    vals = gen_lora.generate(str(tmp_path / "peft"), SHAPE, r=4, alpha=6.0, seed=21,
                             rank_pattern={"down_proj": 8}, targets=("q_proj", "k_proj", "o_proj", "down_proj"))
    gen_lora.to_gguf(vals, SHAPE, str(tmp_path / "a.gguf"), alpha=6.0)
    rc1, m1 = check(tool, model, tmp_path / "peft")
    rc2, m2 = check(tool, model, tmp_path / "a.gguf")
    assert rc1 == 0 and rc2 == 0, (m1, m2)
    assert m1.split("fingerprint=")[1].split()[0] == m2.split("fingerprint=")[1].split()[0], (m1, m2)
    # an unsupported tensor in a GGUF LoRA is refused, naming it
    gen_lora.to_gguf(vals, SHAPE, str(tmp_path / "bad.gguf"), alpha=6.0,
                     extra={"token_embd.weight.lora_a": np.zeros((4, 128), np.float32)})
    rc, msg = check(tool, model, tmp_path / "bad.gguf")
    assert rc == 1 and msg.startswith("error MN_EUNSUPPORTED:") and "token_embd.weight.lora_a" in msg, msg
