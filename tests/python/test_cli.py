"""tests/python/test_cli.py — the mneme command line, run as a user would.

Each case runs the real binary on a real file and checks its output or its error: the
error must name the flag, the file offset or the limit, and the exit code must say
failure. Expected values come from independent sources (the gguf package, the token
ids of tokenize_dump, the arithmetic of the request), not from earlier mneme runs.
"""
import json
import os
import subprocess

import gguf
import pytest


def run(binary, args, timeout=120):
    return subprocess.run([str(binary)] + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def test_info_matches_file(mneme_bin, model_path):
    r = run(mneme_bin, ["info", "-m", model_path])
    assert r.returncode == 0, r.stderr
    rd = gguf.GGUFReader(str(model_path))
    assert f"layers:        {int(rd.fields['llama.block_count'].contents())}" in r.stdout
    assert f"tensors:       {len(rd.tensors)}" in r.stdout
    assert "chat template: chatml" in r.stdout
    for t in rd.tensors[:5]:
        assert t.name in r.stdout


def test_tokenize_tokenizer_only_file(mneme_bin, gen_gguf, tmp_path, build_dir):
    path = tmp_path / "tok.gguf"
    gen_gguf.generate(str(path), no_tensors=True, n_vocab=300)
    assert len(gguf.GGUFReader(str(path)).tensors) == 0
    text = "Hello world, hello tokens!"
    r = run(mneme_bin, ["tokenize", "-m", path, "-p", text, "--ids"])
    assert r.returncode == 0, r.stderr
    ref = subprocess.run([str(build_dir / "tokenize_dump"), str(path)], input=text, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    assert r.stdout.split() == ref.stdout.split()
    assert len(r.stdout.split()) > 0


def test_generate_and_stats(mneme_bin, model_path):
    r = run(mneme_bin, ["generate", "-m", model_path, "-p", "Once upon a time", "-n", "12", "--temp", "0", "-t", "2"])
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    assert "generated 12 tokens" in r.stderr or "generated" in r.stderr
    assert "tok/s" in r.stderr
    # greedy is deterministic: same output twice
    r2 = run(mneme_bin, ["generate", "-m", model_path, "-p", "Once upon a time", "-n", "12", "--temp", "0", "-t", "1"])
    assert r2.stdout == r.stdout


def test_generate_stop_string(mneme_bin, model_path):
    base = run(mneme_bin, ["generate", "-m", model_path, "-p", "1, 2, 3, 4,", "-n", "24", "--temp", "0"])
    assert base.returncode == 0, base.stderr
    out = base.stdout.rstrip("\n")
    assert len(out) > 4
    stop = out[2:4]
    r = run(mneme_bin, ["generate", "-m", model_path, "-p", "1, 2, 3, 4,", "-n", "24", "--temp", "0", "--stop", stop])
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == out[: out.index(stop)]


def test_bench_json(mneme_bin, model_path):
    r = run(mneme_bin, ["bench", "-m", model_path, "-p", "16", "-n", "4", "-t", "1", "-b", "1,2", "-r", "1", "--json"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert [(x["test"], x["batch"]) for x in rows] == [("pp16", 1), ("tg4", 1), ("tg4", 2)]
    for x in rows:
        assert {"test", "n_prompt", "n_gen", "threads", "batch", "tokens_per_s"} <= x.keys()
        assert x["tokens_per_s"] > 0 and x["threads"] == 1


def test_logits_file(mneme_bin, model_path, tmp_path):
    out = tmp_path / "l.f32"
    r = run(mneme_bin, ["logits", "-m", model_path, "--tokens", "1,2,3", "-o", out])
    assert r.returncode == 0, r.stderr
    n_vocab = len(gguf.GGUFReader(str(model_path)).fields["tokenizer.ggml.tokens"].data)
    assert os.path.getsize(out) == 3 * n_vocab * 4


BAD = [
    # (args, expected exit code, text the error must contain)
    (["generate", "-p", "x", "-n", "abc"], 2, "-n: 'abc' is not an integer"),
    (["generate", "-p", "x", "--temp", "-1"], 2, "--temp: -1 is out of range"),
    (["generate", "-p", "x", "--top-p", "2"], 2, "--top-p: 2 is out of range"),
    (["generate", "-p", "x", "--bogus"], 2, "unknown option '--bogus'"),
    (["generate", "-p"], 2, "option -p needs a value"),
    (["generate", "-p", "x", "-t", "0"], 2, "-t: 0 is out of range"),
    (["generate", "-p", "x", "--device", "tpu"], 1, "device must be cpu, cuda or auto, got 'tpu'"),
    (["logits", "--tokens", "1,x", "--greedy", "1"], 2, "--tokens: bad token id at character 2"),
    (["logits", "--tokens", "1,99999999", "--greedy", "1"], 2, "token 99999999 (index 1) is not in [0, 49152)"),
    (["bench", "-p", "1,,2"], 2, "-p: empty value in list '1,,2'"),
    (["frobnicate"], 2, "unknown command 'frobnicate'"),
]


@pytest.mark.parametrize("args,code,text", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_arguments(mneme_bin, model_path, args, code, text):
    r = run(mneme_bin, args[:1] + (["-m", model_path] if args[0] in ("generate", "logits") else []) + args[1:])
    assert r.returncode == code, (r.returncode, r.stderr)
    assert text in r.stderr, r.stderr


def test_missing_and_corrupt_model(mneme_bin, model_path, tmp_path):
    r = run(mneme_bin, ["info", "-m", tmp_path / "nope.gguf"])
    assert r.returncode != 0 and "nope.gguf" in r.stderr
    data = open(model_path, "rb").read(1 << 20)  # a truncated copy: header and part of the data
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data)
    r = run(mneme_bin, ["info", "-m", bad])
    assert r.returncode != 0
    assert "offset" in r.stderr and "past end" in r.stderr or "offset" in r.stderr, r.stderr
    bad.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + data[8:4096])
    r = run(mneme_bin, ["info", "-m", bad])
    assert r.returncode != 0 and "version" in r.stderr, r.stderr


def test_cuda_device_without_gpu(mneme_bin, model_path):
    if os.path.exists("/dev/nvidia0"):
        pytest.skip("a GPU is present: this checks the refusal on machines without one")
    r = run(mneme_bin, ["generate", "-m", model_path, "-p", "x", "-n", "1", "--device", "cuda"])
    assert r.returncode != 0
    assert "cuda" in r.stderr.lower() and ("no usable cuda device" in r.stderr.lower() or "no cuda backend" in r.stderr.lower())
