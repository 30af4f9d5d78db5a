"""Compare mneme's tokenizer (through tests/tools/tokenize_dump) with independent ones.

1. Byte-level BPE: a HuggingFace `tokenizers.Tokenizer` built from the SmolLM2 GGUF's own
   vocab and merges (read with the python gguf package), with the pre-tokenizer SmolLM2's
   tokenizer.json uses: Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)].
2. SentencePiece BPE: a tiny model trained with the `sentencepiece` package, converted to
   a llama-style GGUF (tokens, scores, types), compared with sentencepiece's own encoding.
"""
import functools
import os
import random
import subprocess
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

BUILD = Path(os.environ.get("MNEME_BUILD_DIR", "/work/main/build"))
DUMP = BUILD / "tokenize_dump"


def model_path():
    if os.environ.get("MNEME_MODEL"):
        return Path(os.environ["MNEME_MODEL"])
    d = os.environ.get("MNEME_MODELS") or os.path.expanduser("~/.cache/mneme")
    return Path(d) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def need_model():
    p = model_path()
    if not p.exists():
        if os.environ.get("MNEME_ALLOW_NO_MODEL") == "1":
            pytest.skip(f"{p} missing and MNEME_ALLOW_NO_MODEL=1")
        pytest.fail(f"model {p} not found (set MNEME_MODEL, or MNEME_ALLOW_NO_MODEL=1)")
    return p


def dump(model, data: bytes, *flags):
    r = subprocess.run([str(DUMP), str(model), *flags], input=data, capture_output=True, check=True)
    return r.stdout


def encode_many(model, texts, *flags):
    """All texts in one process: --batch takes NUL-separated texts, prints a line each."""
    assert not any("\0" in t for t in texts)
    out = dump(model, b"\0".join(t.encode("utf-8") for t in texts), "--batch", *flags)
    lines = out.decode().split("\n")
    assert len(lines) == len(texts) + 1 and lines[-1] == ""
    return [[int(x) for x in line.split()] for line in lines[:-1]]


def field_strings(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def field_ints(reader, key):
    f = reader.fields[key]
    return [int(f.parts[i][0]) for i in f.data]


@functools.lru_cache(maxsize=2)
def gguf_vocab(path):
    r = gguf.GGUFReader(str(path))
    return (field_strings(r, "tokenizer.ggml.tokens"), field_ints(r, "tokenizer.ggml.token_type"),
            [tuple(m.split(" ", 1)) for m in field_strings(r, "tokenizer.ggml.merges")])


def hf_from_gguf(path, with_special):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, AddedToken
    toks, types, merges = gguf_vocab(path)
    vocab = {t: i for i, t in enumerate(toks)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    if with_special:
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, ty in zip(toks, types) if ty in (3, 4)])
    return tk


def varied_strings(n=300, seed=1234):
    rnd = random.Random(seed)
    fixed = [
        "Hello world's 12345 !!", "I'm can't we'll they've she'd you're IT'S", "",
        " ", "  ", "\n", "\n\n\n", " \n \n  x", "a  b\n\n c", "\t\tindent\n    four",
        "def f(x):\n    return x**2 + 3.14159  # comment\n", "for (int i=0;i<n;++i){a[i]+=b[i];}",
        "<html><body class=\"x\">&amp;</body></html>", "SELECT * FROM t WHERE id = 42;",
        "1234567890 12 1,000,000 3.5e-10 0x1F 2024-01-01", "١٢٣٤ ⅷ ½ ² ³",
        "中文测试：你好，世界！", "日本語のテキスト、カタカナ", "한국어 텍스트입니다", "Ελληνικά Русский עברית العربية हिन्दी ไทย",
        "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 ❤️", "e\u0301 a\u030a Z\u0351\u034c", "nbsp\u00a0x\u3000y\u2003z",
        "trailing   ", "   leading", "mixed\r\nline\rendings\n", "ALLCAPS and CamelCase and snake_case",
        "https://example.com/path?q=1&r=2#frag", "email@example.org", "$100 €50 £20 ¥1000",
        "!!!???...,,,;;;", "'''\"\"\"```", "<|im_start|> not parsed without --special",
    ]
    alphabet = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") * 4 + list("0123456789") * 2 +
                list(" " * 20) + list("\n\t.,;:!?'\"()[]{}<>=+-*/_#@$%^&|~`") +
                list("éèàüößçñ中文日本한국Ωж€😀\u0301\u00a0\u3000١٢"))
    words = ["the", "of", "and", "token", "izer", "mneme", "session", "cache", "GPU", "'s", "'ll", "don't"]
    out = list(fixed)
    while len(out) < n:
        k = rnd.randint(1, 60)
        if rnd.random() < 0.5:
            s = "".join(rnd.choice(alphabet) for _ in range(k))
        else:
            s = " ".join(rnd.choice(words + [str(rnd.randint(0, 99999))]) for _ in range(k // 4 + 1))
            if rnd.random() < 0.3:
                s += rnd.choice(["  ", "\n", " \n ", "\t"])
        out.append(s)
    return out


def test_bpe_matches_hf():
    model = need_model()
    hf = hf_from_gguf(model, with_special=False)
    texts = varied_strings()
    ours = encode_many(model, texts)
    bad = []
    for t, o in zip(texts, ours):
        want = hf.encode(t, add_special_tokens=False).ids
        if o != want:
            bad.append((t, o, want))
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]!r}"


def test_bpe_special_matches_hf():
    model = need_model()
    hf = hf_from_gguf(model, with_special=True)
    texts = ["<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi 42!<|im_end|>\n",
             "a<|endoftext|>b", "<|im_end|><|im_end|>", "<|im_start|", "x <repo_name> y"]
    ours = encode_many(model, texts, "--special")
    for t, o in zip(texts, ours):
        assert o == hf.encode(t, add_special_tokens=False).ids, t


def test_decode_roundtrip_cli():
    model = need_model()
    text = "Round trip: 中文 😀 e\u0301 12345  \n\tend".encode("utf-8")
    ids = dump(model, text)
    assert dump(model, ids, "--decode") == text


def test_long_text_speed_reported():
    model = need_model()
    text = ("\n".join(varied_strings(400)) * 7).encode("utf-8")[:100_000]
    out = dump(model, text, "--bench", "5").decode()
    print(out)
    mbps = float(out.split(",")[-1].split()[0])
    assert mbps > 1.0   # 10 KB well under 10 ms


# ---- SentencePiece -------------------------------------------------------------------

def test_spm_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    rnd = random.Random(7)
    words = ("the quick brown fox jumps over lazy dog token session cache memory agent "
             "hello world über café naïve 東京 数据 привет мир 123 4567").split()
    lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) for _ in range(3000)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=prefix, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    toks, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        toks.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    texts = ["hello world", "the quick brown fox", "café über naïve", "東京 数据 привет",
             "  two  spaces", "unseen ñ Ω 😀 chars", "12345 4567", "x", "dog\ncat", "a  b   c"]
    texts += [" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 8))) for _ in range(100)]
    ours = encode_many(path, texts)
    bad = [(t, o, sp.encode(t)) for t, o in zip(texts, ours) if o != sp.encode(t)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]!r}"
    # --bos adds <s>; decode gives the text back
    assert [int(x) for x in dump(path, b"hello", "--bos").split()] == [1] + sp.encode("hello")
    ids = dump(path, "hello wörld 😀".encode())
    assert dump(path, ids, "--decode").decode() == "hello wörld 😀"
