/* tests/unit/test_tokenizer.c — the tokenizer on the real SmolLM2 vocab and on a small
 * SentencePiece-style vocab built here as an in-memory GGUF.
 *
 * Expected values come from the regex rules and the SPM algorithm worked out by hand
 * (comments show the derivation), from round trips, and from UTF-8 validity; the
 * comparison with HuggingFace tokenizers lives in tests/python/test_tokenizer.py.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/alloc.h"
#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "engine/tokenizer_impl.h"
#include "engine/unicode.h"

/* ---- helpers ---------------------------------------------------------------------- */

static const char *model_path(void) { return mn_model_default_path(); }

static mn_tokenizer *smol;   /* loaded once by the group setup */

static int setup_smol(void **state)
{
    (void)state;
    mn_errbuf eb = {{0}};
    mn_gguf *g = NULL;
    mn_err err = mn_gguf_open(model_path(), &g, &eb);
    if (err) {
        const char *allow = getenv("MNEME_ALLOW_NO_MODEL");
        if (allow && !strcmp(allow, "1")) {
            fprintf(stderr, "model %s missing, MNEME_ALLOW_NO_MODEL=1: skipping SmolLM2 tests\n",
                    model_path());
            return 0;
        }
        fprintf(stderr, "cannot open model %s: %s (set MNEME_MODEL, or MNEME_ALLOW_NO_MODEL=1)\n",
                model_path(), eb.msg);
        return -1;
    }
    err = mn_tokenizer_from_gguf(g, &smol, &eb);
    mn_gguf_close(g);
    if (err)
        fprintf(stderr, "tokenizer: %s\n", eb.msg);
    return err ? -1 : 0;
}

static int teardown_smol(void **state)
{
    (void)state;
    mn_tokenizer_free(smol);
    smol = NULL;
    return 0;
}

#define NEED_SMOL() do { if (!smol) skip(); } while (0)

static bool valid_utf8(const char *s, size_t n)
{
    for (size_t p = 0; p < n;) {
        int k = mn__utf8_check((const uint8_t *)s + p, n - p);
        if (k <= 0)
            return false;
        p += (size_t)k;
    }
    return true;
}

static void roundtrip(const mn_tokenizer *t, const char *s, size_t n)
{
    mn_errbuf eb;
    int32_t *ids;
    int64_t nt;
    assert_int_equal(mn_tokenize(t, s, n, 0, &ids, &nt, &eb), MN_OK);
    char *out;
    size_t olen;
    assert_int_equal(mn_detokenize(t, ids, nt, false, &out, &olen, &eb), MN_OK);
    if (olen != n || memcmp(out, s, n) != 0)
        fail_msg("round trip of %zu bytes gave %zu bytes: \"%.*s\"", n, olen, (int)olen, out);
    /* streaming: one token at a time, valid UTF-8 each time; for valid input it must add
     * up to the decode exactly */
    mn_detok d;
    mn_detok_reset(&d);
    char *acc = mn_malloc(3 * n + 64), piece[1024];
    size_t alen = 0;
    for (int64_t i = 0; i < nt; i++) {
        size_t k = mn_detok_push(t, &d, ids[i], false, piece, sizeof piece);
        assert_true(valid_utf8(piece, k));
        memcpy(acc + alen, piece, k);
        alen += k;
    }
    size_t k = mn_detok_flush(&d, piece, sizeof piece);
    assert_true(valid_utf8(piece, k));
    memcpy(acc + alen, piece, k);
    alen += k;
    assert_true(valid_utf8(acc, alen));
    if (valid_utf8(s, n)) {
        assert_int_equal(alen, n);
        assert_memory_equal(acc, s, n);
    }
    mn_free(acc);
    mn_free(out);
    mn_free(ids);
}

/* ---- pre-tokenizer splits, derived by hand from the regexes ------------------------- */

typedef struct pieces { char buf[512]; const char *text; } pieces;

static mn_err collect(void *ctx, size_t off, size_t len)
{
    pieces *p = ctx;
    size_t n = strlen(p->buf);
    snprintf(p->buf + n, sizeof p->buf - n, "%s%.*s", n ? "|" : "", (int)len, p->text + off);
    return MN_OK;
}

static void check_split(int pre, const char *text, const char *want)
{
    pieces p = {.text = text};
    p.buf[0] = 0;
    assert_int_equal(mn__pretok_split(pre, text, strlen(text), collect, &p), MN_OK);
    if (strcmp(p.buf, want) != 0) {
        for (char *c = p.buf; *c; c++)
            *c = *c == '\n' ? 'N' : *c == '\r' ? 'R' : *c;
        fail_msg("pre %d, text %zu bytes: got [%s] (newlines as N, R), want [%s]", pre,
                 strlen(text), p.buf, want);
    }
}

static void test_pretok_splits(void **state)
{
    (void)state;
    const char *s = "Hello world's 12345 !!";
    /* gpt2: letters take one leading space, ' ?\p{N}+' keeps the number whole */
    check_split(MN__PRE_GPT2, s, "Hello| world|'s| 12345| !!");
    /* smollm: digits isolated first, so the space before them is a piece on its own
     * (\s+(?!\S) at the end of the segment "Hello world's ") */
    check_split(MN__PRE_SMOLLM, s, "Hello| world|'s| |1|2|3|4|5| !!");
    /* llama3: \p{N}{1,3}; the lone space before a digit falls to \s+ */
    check_split(MN__PRE_LLAMA3, s, "Hello| world|'s| |123|45| !!");
    check_split(MN__PRE_QWEN2, s, "Hello| world|'s| |1|2|3|4|5| !!");
    /* whitespace runs: all but the last space, which joins the next word */
    check_split(MN__PRE_GPT2, "a  b\n\n c", "a| | b|\n\n| c");
    check_split(MN__PRE_LLAMA3, "a  b\n\n c", "a| | b|\n\n| c");
    /* llama3 ends a whitespace run at its last newline: "\n \n" + "  x" -> " " , " x" */
    check_split(MN__PRE_LLAMA3, "\n \n  x", "\n \n| | x");
    /* gpt2 has no newline rule: the run gives up only its last space */
    check_split(MN__PRE_GPT2, "\n \n  x", "\n \n | x");
    /* contractions: case-sensitive in gpt2, case-insensitive in llama3 */
    check_split(MN__PRE_GPT2, "I'M don'T", "I|'|M| don|'|T");
    check_split(MN__PRE_LLAMA3, "I'M don'T", "I|'M| don|'T");
    /* llama3: punctuation swallows following newlines; a symbol may lead a word */
    check_split(MN__PRE_LLAMA3, "x=1;\r\n", "x|=|1|;\r\n");
    check_split(MN__PRE_LLAMA3, "(foo)", "(foo|)");
    check_split(MN__PRE_GPT2, "(foo)", "(|foo|)");
    /* trailing whitespace at the end of text is one piece */
    check_split(MN__PRE_GPT2, "ab   ", "ab|   ");
    /* non-ASCII classes: CJK letters, Arabic-Indic digits, NBSP (White_Space) */
    check_split(MN__PRE_GPT2, "日本 \xd9\xa3\xd9\xa4", "日本| \xd9\xa3\xd9\xa4");
    check_split(MN__PRE_SMOLLM, "x\xd9\xa3\xd9\xa4", "x|\xd9\xa3|\xd9\xa4");
    /* only a literal ' ' may lead a word: NBSPs stay whitespace pieces */
    check_split(MN__PRE_GPT2, "a\xc2\xa0\xc2\xa0" "b", "a|\xc2\xa0|\xc2\xa0|b");
    /* invalid bytes behave like punctuation and are kept */
    check_split(MN__PRE_GPT2, "\xff\xfe ab", "\xff\xfe| ab");
    check_split(MN__PRE_GPT2, "a\xe2\x82 b", "a|\xe2\x82| b");
}

static void test_unicode_classes(void **state)
{
    (void)state;
    assert_int_equal(mn__ucat('a'), MN__UC_L);
    assert_int_equal(mn__ucat(0x4E2D), MN__UC_L);      /* 中 Lo */
    assert_int_equal(mn__ucat(0x0663), MN__UC_N);      /* ٣ Nd */
    assert_int_equal(mn__ucat(0x2167), MN__UC_N);      /* Ⅷ Nl */
    assert_int_equal(mn__ucat(0x3000), MN__UC_WS);     /* ideographic space */
    assert_int_equal(mn__ucat(0x0301), 0);             /* combining acute: Mn */
    assert_int_equal(mn__ucat(0x1F600), 0);            /* emoji: So */
    assert_int_equal(mn__ucat(-1), 0);
    int32_t cp;
    assert_int_equal(mn__utf8_decode((const uint8_t *)"\xc0\xaf", 2, &cp), 1);   /* overlong */
    assert_int_equal(cp, -1);
    assert_int_equal(mn__utf8_decode((const uint8_t *)"\xed\xa0\x80", 3, &cp), 1); /* surrogate */
    assert_int_equal(cp, -1);
    assert_int_equal(mn__utf8_decode((const uint8_t *)"\xf0\x9f\x98\x80", 4, &cp), 4);
    assert_int_equal(cp, 0x1F600);
    assert_int_equal(mn__utf8_check((const uint8_t *)"\xf0\x9f", 2), 0);          /* incomplete */
}

/* ---- SmolLM2 --------------------------------------------------------------------------- */

static void test_smol_basics(void **state)
{
    (void)state;
    NEED_SMOL();
    assert_string_equal(mn_tokenizer_kind(smol), "gpt2");
    assert_string_equal(mn_tokenizer_pre(smol), "smollm");
    assert_int_equal(mn_tokenizer_n_vocab(smol), 49152);
    int32_t im_end = mn_tokenizer_find(smol, "<|im_end|>", 10);
    int32_t eot_text = mn_tokenizer_find(smol, "<|endoftext|>", 13);
    assert_true(im_end >= 0 && eot_text >= 0);
    assert_int_equal(mn_tokenizer_eot(smol), im_end);
    assert_true(mn_tokenizer_is_eog(smol, im_end));
    assert_true(mn_tokenizer_is_eog(smol, eot_text));
    assert_true(mn_tokenizer_is_eog(smol, mn_tokenizer_eos(smol)));
    assert_true(mn_tokenizer_is_special(smol, im_end));
    int32_t hello = mn_tokenizer_find(smol, "Hello", 5);
    assert_true(hello >= 0);
    assert_false(mn_tokenizer_is_eog(smol, hello));
    assert_false(mn_tokenizer_is_special(smol, hello));
    /* byte-level decoding: the token "Ġworld" stands for " world" */
    int32_t w = mn_tokenizer_find(smol, "\xc4\xa0world", 7);
    assert_true(w >= 0);
    size_t n;
    const char *b = mn_token_bytes(smol, w, &n);
    assert_int_equal(n, 6);
    assert_memory_equal(b, " world", 6);
    assert_null(mn_token_bytes(smol, -1, &n));
    assert_null(mn_token_bytes(smol, 49152, &n));
}

/* Encoding equals the vocab entries of the hand-derived pieces, where a piece is itself a
 * token (true for these common words), and single-digit tokens for the digits. */
static void test_smol_known_pieces(void **state)
{
    (void)state;
    NEED_SMOL();
    const char *s = "Hello world's 12345 !";
    const char *want[] = {"Hello", "\xc4\xa0world", "'s", "\xc4\xa0", "1", "2", "3", "4", "5",
                          "\xc4\xa0!"};
    mn_errbuf eb;
    int32_t *ids;
    int64_t n;
    assert_int_equal(mn_tokenize(smol, s, strlen(s), 0, &ids, &n, &eb), MN_OK);
    assert_int_equal(n, 10);
    for (int i = 0; i < 10; i++) {
        int32_t id = mn_tokenizer_find(smol, want[i], strlen(want[i]));
        assert_true(id >= 0);
        if (ids[i] != id)
            fail_msg("token %d: got %d, want %d (%s)", i, ids[i], id, want[i]);
    }
    mn_free(ids);
}

static void test_smol_special(void **state)
{
    (void)state;
    NEED_SMOL();
    const char *s = "<|im_start|>user\nHi<|im_end|>";
    int32_t start = mn_tokenizer_find(smol, "<|im_start|>", 12);
    int32_t end = mn_tokenizer_find(smol, "<|im_end|>", 10);
    mn_errbuf eb;
    int32_t *ids;
    int64_t n;
    assert_int_equal(mn_tokenize(smol, s, strlen(s), MN_TOK_PARSE_SPECIAL, &ids, &n, &eb), MN_OK);
    assert_true(n >= 4);
    assert_int_equal(ids[0], start);
    assert_int_equal(ids[n - 1], end);
    int32_t *ids2;
    int64_t n2;
    /* the middle equals encoding "user\nHi" alone */
    assert_int_equal(mn_tokenize(smol, "user\nHi", 7, 0, &ids2, &n2, &eb), MN_OK);
    assert_int_equal(n2, n - 2);
    assert_memory_equal(ids2, ids + 1, (size_t)n2 * sizeof *ids2);
    mn_free(ids2);
    mn_free(ids);
    /* without PARSE_SPECIAL the markers are plain text: no special id appears */
    assert_int_equal(mn_tokenize(smol, s, strlen(s), 0, &ids, &n, &eb), MN_OK);
    for (int64_t i = 0; i < n; i++)
        assert_false(mn_tokenizer_is_special(smol, ids[i]));
    roundtrip(smol, s, strlen(s));
    mn_free(ids);
    /* add_bos_token is false in this model: ADD_BOS adds nothing */
    assert_int_equal(mn_tokenize(smol, "Hi", 2, MN_TOK_ADD_BOS, &ids, &n, &eb), MN_OK);
    assert_int_equal(n, 1);
    mn_free(ids);
    /* render_special decides whether the streaming detokenizer shows markers */
    mn_detok d;
    mn_detok_reset(&d);
    char out[64];
    assert_int_equal(mn_detok_push(smol, &d, end, false, out, sizeof out), 0);
    assert_int_equal(mn_detok_push(smol, &d, end, true, out, sizeof out), 10);
    assert_memory_equal(out, "<|im_end|>", 10);
}

static const char *const corpus[] = {
    "The quick brown fox jumps over the lazy dog.",
    "中文测试：你好，世界！日本語のテキスト、カタカナ。한국어 텍스트입니다.",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ❤️",
    "combining: e\xcc\x81 a\xcc\x8a n\xcc\x83 Z\xcd\x91\xcd\x8c\xcd\x8f",
    "mixed Ελληνικά Русский עברית العربية हिन्दी ไทย",
    "numbers 0 1 12 123 1234 3.14159 -42 1e10 ١٢٣ ⅷ ½",
    "whitespace:  two   three\t\ttabs\n\nnewlines\r\n  \u3000ideographic\xc2\xa0nbsp   ",
    "code: for (int i = 0; i < n; i++) { x[i] += y[i] * 2; } // done\n\tif (a != b) return;",
    "   leading spaces and trailing   ",
    "I'm can't we'll they've she'd you're IT'S",
    "",
    " ",
    "\n",
};

static void test_smol_roundtrip(void **state)
{
    (void)state;
    NEED_SMOL();
    for (size_t i = 0; i < sizeof corpus / sizeof *corpus; i++)
        roundtrip(smol, corpus[i], strlen(corpus[i]));
    /* invalid UTF-8 made of bytes the vocab has tokens for: truncated sequences,
     * overlongs, surrogates, > U+10FFFF, stray continuation bytes */
    static const char bad[][16] = {
        "\xc3", "x\xe2\x82", "\xf0\x9f\x98", "\xe0\x80\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80",
        "\x80\x80\x80", "a\xbf b", "\xf0\x9f\x98 \xf0\x9f\x98\x80",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        roundtrip(smol, bad[i], strlen(bad[i]));
    /* 0xFF, 0xFE and 0xC0 have no token in SmolLM2 (checked through bytes_to_unicode: ÿ þ
     * and À stand for themselves): they are dropped, the rest is kept */
    assert_int_equal(mn_tokenizer_find(smol, "\xc3\xbf", 2), -1);   /* ÿ */
    assert_int_equal(mn_tokenizer_find(smol, "\xc3\xbe", 2), -1);   /* þ */
    assert_int_equal(mn_tokenizer_find(smol, "\xc3\x80", 2), -1);   /* À */
    mn_errbuf eb;
    int32_t *ids;
    int64_t n;
    char *out;
    size_t olen;
    const char *in = "a\xff" "b\xfe\xc0 ok";
    assert_int_equal(mn_tokenize(smol, in, strlen(in), 0, &ids, &n, &eb), MN_OK);
    assert_int_equal(mn_detokenize(smol, ids, n, false, &out, &olen, &eb), MN_OK);
    assert_int_equal(olen, 5);
    assert_memory_equal(out, "ab ok", 5);
    mn_free(out);
    mn_free(ids);
    /* a NUL byte is text too */
    roundtrip(smol, "a\0b", 3);
}

static void test_smol_streaming_split_char(void **state)
{
    (void)state;
    NEED_SMOL();
    /* byte tokens of "é" fed one at a time: nothing until the sequence completes */
    int32_t c3 = mn_tokenizer_find(smol, "\xc3\x83", 2);   /* Ã = byte 0xC3 */
    int32_t a9 = mn_tokenizer_find(smol, "\xc2\xa9", 2);   /* © = byte 0xA9 */
    assert_true(c3 >= 0 && a9 >= 0);
    mn_detok d;
    mn_detok_reset(&d);
    char out[32];
    assert_int_equal(mn_detok_push(smol, &d, c3, false, out, sizeof out), 0);
    assert_int_equal(mn_detok_push(smol, &d, a9, false, out, sizeof out), 2);
    assert_memory_equal(out, "\xc3\xa9", 2);
    /* an unfinished sequence becomes U+FFFD at flush; a broken one at once */
    assert_int_equal(mn_detok_push(smol, &d, c3, false, out, sizeof out), 0);
    assert_int_equal(mn_detok_flush(&d, out, sizeof out), 3);
    assert_memory_equal(out, "\xef\xbf\xbd", 3);
    int32_t a = mn_tokenizer_find(smol, "a", 1);
    assert_int_equal(mn_detok_push(smol, &d, c3, false, out, sizeof out), 0);
    assert_int_equal(mn_detok_push(smol, &d, a, false, out, sizeof out), 4);
    assert_memory_equal(out, "\xef\xbf\xbd" "a", 4);
}

static void test_smol_speed(void **state)
{
    (void)state;
    NEED_SMOL();
    /* ~10 KB of varied text must encode in well under 10 ms */
    size_t cap = 12000, n = 0;
    char *buf = mn_malloc(cap);
    for (size_t i = 0; n + 200 < cap - 2000; i++) {
        const char *s = corpus[i % 10];
        memcpy(buf + n, s, strlen(s));
        n += strlen(s);
    }
    mn_errbuf eb;
    int32_t *ids;
    int64_t nt;
    struct timespec t0, t1;
    double best = 1e9;
    for (int r = 0; r < 5; r++) {
        clock_gettime(CLOCK_MONOTONIC, &t0);
        assert_int_equal(mn_tokenize(smol, buf, n, 0, &ids, &nt, &eb), MN_OK);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double dt = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        best = dt < best ? dt : best;
        mn_free(ids);
    }
    fprintf(stderr, "encode %zu bytes: %.3f ms (%.1f MB/s)\n", n, best * 1e3, (double)n / best / 1e6);
    assert_true(best < 0.010);
    mn_free(buf);
}

/* ---- a SentencePiece-style vocab in an in-memory GGUF ------------------------------------ */

typedef struct wbuf { uint8_t *p; size_t n, cap; } wbuf;

static void wput(wbuf *w, const void *d, size_t n)
{
    if (w->n + n > w->cap) {
        w->cap = 2 * (w->n + n);
        w->p = realloc(w->p, w->cap);
        assert_non_null(w->p);
    }
    memcpy(w->p + w->n, d, n);
    w->n += n;
}
static void wu32(wbuf *w, uint32_t v) { wput(w, &v, 4); }
static void wu64(wbuf *w, uint64_t v) { wput(w, &v, 8); }
static void wstr(wbuf *w, const char *s) { wu64(w, strlen(s)); wput(w, s, strlen(s)); }
static void wkey(wbuf *w, const char *k, uint32_t type) { wstr(w, k); wu32(w, type); }

#define N_SPM (3 + 256 + 14)

/* <unk> <s> </s>, the 256 byte tokens, then pieces with scores chosen so the merge order
 * of "▁hello" is he(-2), ll(-3), llo(-4), ▁he(-5), ▁hello(-6). */
static uint8_t *build_spm_gguf(size_t *size, bool space_prefix)
{
    static const char *const pieces[14] = {"\xe2\x96\x81", "h", "e", "l", "o", "w", "r", "d",
                                           "he", "ll", "llo", "\xe2\x96\x81he",
                                           "\xe2\x96\x81hello", "lo"};
    static const float piece_score[14] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                          -2, -3, -4, -5, -6, -10};
    char names[N_SPM][16];
    float scores[N_SPM];
    int32_t types[N_SPM];
    strcpy(names[0], "<unk>");
    strcpy(names[1], "<s>");
    strcpy(names[2], "</s>");
    types[0] = MN__TT_UNKNOWN;
    types[1] = types[2] = MN__TT_CONTROL;
    scores[0] = scores[1] = scores[2] = 0;
    for (int b = 0; b < 256; b++) {
        snprintf(names[3 + b], 16, "<0x%02X>", b);
        types[3 + b] = MN__TT_BYTE;
        scores[3 + b] = 0;
    }
    for (int i = 0; i < 14; i++) {
        strcpy(names[259 + i], pieces[i]);
        types[259 + i] = MN__TT_NORMAL;
        scores[259 + i] = piece_score[i];
    }
    wbuf w = {0};
    wput(&w, "GGUF", 4);
    wu32(&w, 3);
    wu64(&w, 0);   /* tensors */
    wu64(&w, 8);   /* kv pairs */
    wkey(&w, "tokenizer.ggml.model", MN_GGUF_STRING);
    wstr(&w, "llama");
    wkey(&w, "tokenizer.ggml.tokens", MN_GGUF_ARRAY);
    wu32(&w, MN_GGUF_STRING);
    wu64(&w, N_SPM);
    for (int i = 0; i < N_SPM; i++)
        wstr(&w, names[i]);
    wkey(&w, "tokenizer.ggml.scores", MN_GGUF_ARRAY);
    wu32(&w, MN_GGUF_FLOAT32);
    wu64(&w, N_SPM);
    wput(&w, scores, sizeof scores);
    wkey(&w, "tokenizer.ggml.token_type", MN_GGUF_ARRAY);
    wu32(&w, MN_GGUF_INT32);
    wu64(&w, N_SPM);
    wput(&w, types, sizeof types);
    wkey(&w, "tokenizer.ggml.bos_token_id", MN_GGUF_UINT32);
    wu32(&w, 1);
    wkey(&w, "tokenizer.ggml.eos_token_id", MN_GGUF_UINT32);
    wu32(&w, 2);
    wkey(&w, "tokenizer.ggml.unknown_token_id", MN_GGUF_UINT32);
    wu32(&w, 0);
    wkey(&w, "tokenizer.ggml.add_space_prefix", MN_GGUF_BOOL);
    uint8_t b = space_prefix;
    wput(&w, &b, 1);
    while (w.n % 32)
        wput(&w, "", 1);
    *size = w.n;
    return w.p;
}

static void expect_ids(const mn_tokenizer *t, const char *s, int flags, const int32_t *want, int64_t nw)
{
    mn_errbuf eb;
    int32_t *ids;
    int64_t n;
    assert_int_equal(mn_tokenize(t, s, strlen(s), flags, &ids, &n, &eb), MN_OK);
    if (n != nw || memcmp(ids, want, (size_t)n * sizeof *ids) != 0) {
        char got[256] = "";
        for (int64_t i = 0; i < n && strlen(got) < 200; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), " %d", ids[i]);
        fail_msg("\"%s\": got%s (%lld tokens, want %lld)", s, got, (long long)n, (long long)nw);
    }
    mn_free(ids);
}

static void test_spm(void **state)
{
    (void)state;
    size_t size;
    uint8_t *file = build_spm_gguf(&size, true);
    mn_errbuf eb;
    mn_gguf *g;
    mn_tokenizer *t;
    assert_int_equal(mn_gguf_open_memory(file, size, &g, &eb), MN_OK);
    mn_err err = mn_tokenizer_from_gguf(g, &t, &eb);
    if (err)
        fail_msg("%s", eb.msg);
    mn_gguf_close(g);
    assert_string_equal(mn_tokenizer_kind(t), "llama");
    enum { SP = 259, H, E, L, O, W, R, D, HE, LL, LLO, SPHE, SPHELLO, LO };
#define BYTE(c) (3 + (c))
    /* "hello wox" -> "▁hello▁wox": ▁hello as derived above; "▁w" is no piece, so ▁ w o;
     * x is in no piece: byte fallback */
    expect_ids(t, "hello wox", 0, (int32_t[]){SPHELLO, SP, W, O, BYTE('x')}, 5);
    /* ADD_BOS: add_bos_token defaults to true for llama */
    expect_ids(t, "hello", MN_TOK_ADD_BOS, (int32_t[]){1, SPHELLO}, 2);
    /* é is no piece: its two UTF-8 bytes; an invalid byte also falls back */
    expect_ids(t, "\xc3\xa9\xff", 0, (int32_t[]){SP, BYTE(0xC3), BYTE(0xA9), BYTE(0xFF)}, 4);
    /* "<s>" is text unless PARSE_SPECIAL; after a special token the space prefix again */
    expect_ids(t, "<s>hello", MN_TOK_PARSE_SPECIAL, (int32_t[]){1, SPHELLO}, 2);
    expect_ids(t, "<s>", 0, (int32_t[]){SP, BYTE('<'), BYTE('s'), BYTE('>')}, 4);
    /* decode drops the prefix space again; byte tokens reassemble */
    const int32_t ids[] = {1, SPHELLO, SP, W, O, BYTE(0xC3), BYTE(0xA9)};
    char *out;
    size_t olen;
    assert_int_equal(mn_detokenize(t, ids, 7, false, &out, &olen, &eb), MN_OK);
    assert_int_equal(olen, 10);
    assert_memory_equal(out, "hello wo\xc3\xa9", 10);
    mn_free(out);
    roundtrip(t, "hello world, héllo\xff  lo", strlen("hello world, héllo\xff  lo"));
    mn_tokenizer_free(t);
    free(file);

    /* without the leading-space rule: "hello" -> he llo ("hello" is no piece); "llo"
     * (-4) is preferred although "lo" (-10) is also a piece */
    file = build_spm_gguf(&size, false);
    assert_int_equal(mn_gguf_open_memory(file, size, &g, &eb), MN_OK);
    assert_int_equal(mn_tokenizer_from_gguf(g, &t, &eb), MN_OK);
    mn_gguf_close(g);
    expect_ids(t, "hello", 0, (int32_t[]){HE, LLO}, 2);
    expect_ids(t, "lo", 0, (int32_t[]){LO}, 1);
    roundtrip(t, "hello  world", 12);
    mn_tokenizer_free(t);
    free(file);
}

static void test_bad_gguf(void **state)
{
    (void)state;
    size_t size;
    uint8_t *file = build_spm_gguf(&size, true);
    /* rename the model to an unsupported one of the same length */
    uint8_t *p = NULL;
    for (size_t i = 0; i + 5 <= size && !p; i++)
        if (memcmp(file + i, "llama", 5) == 0)
            p = file + i;
    assert_non_null(p);
    memcpy(p, "bert!", 5);
    mn_errbuf eb = {{0}};
    mn_gguf *g;
    mn_tokenizer *t = NULL;
    assert_int_equal(mn_gguf_open_memory(file, size, &g, &eb), MN_OK);
    assert_int_equal(mn_tokenizer_from_gguf(g, &t, &eb), MN_EUNSUPPORTED);
    assert_null(t);
    assert_non_null(strstr(eb.msg, "tokenizer.ggml.model"));
    mn_gguf_close(g);
    free(file);
}

int main(void)
{
    const struct CMUnitTest pure[] = {
        cmocka_unit_test(test_unicode_classes),
        cmocka_unit_test(test_pretok_splits),
        cmocka_unit_test(test_spm),
        cmocka_unit_test(test_bad_gguf),
    };
    const struct CMUnitTest model[] = {
        cmocka_unit_test(test_smol_basics),
        cmocka_unit_test(test_smol_known_pieces),
        cmocka_unit_test(test_smol_special),
        cmocka_unit_test(test_smol_roundtrip),
        cmocka_unit_test(test_smol_streaming_split_char),
        cmocka_unit_test(test_smol_speed),
    };
    int fails = cmocka_run_group_tests_name("tokenizer", pure, NULL, NULL);
    fails += cmocka_run_group_tests_name("tokenizer_smollm2", model, setup_smol, teardown_smol);
    return fails;
}
