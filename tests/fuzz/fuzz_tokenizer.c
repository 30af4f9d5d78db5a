/* tests/fuzz/fuzz_tokenizer.c — libFuzzer target for the text path every request takes:
 * mn_tokenize, mn_detokenize and the streaming detokenizer, on the default model's real
 * tokenizer (SmolLM2's GPT-2 byte-level BPE; MNEME_FUZZ_MODEL names another GGUF).
 *
 * Input: byte 0 picks the flags (bit 0: MN_TOK_PARSE_SPECIAL, bit 1: MN_TOK_ADD_BOS), the rest
 * is the text. Checked, beyond what the sanitizers catch:
 *  - tokenizing any bytes succeeds and every id is in [0, n_vocab);
 *  - decoding with special tokens rendered gives back the text exactly, less the bytes the
 *    vocabulary has no token for (found once at start-up: a byte alone encodes to nothing)
 *    (tokenizer.h: "encode followed by decode gives back the input exactly"); ADD_BOS adds
 *    at most a BOS in front of the ids the text gives without it;
 *  - the streaming detokenizer, fed one id at a time and flushed, emits valid UTF-8, and the
 *    same text when that text is valid UTF-8.
 * A failed check aborts with the input (libFuzzer saves it as a crash reproducer).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

static mn_tokenizer *tok;
static bool dropped[256]; /* bytes with no token: encode drops them */

static void die(const char *what, const uint8_t *text, size_t n) {
    fprintf(stderr, "fuzz_tokenizer: %s (input of %zu bytes:", what, n);
    for (size_t i = 0; i < n && i < 64; i++) fprintf(stderr, " %02x", text[i]);
    fprintf(stderr, "%s)\n", n > 64 ? " ..." : "");
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    char path[4096];
    const char *env = getenv("MNEME_FUZZ_MODEL");
    snprintf(path, sizeof path, "%s", env ? env : mn_model_default_path());
    mn_gguf *g = NULL;
    mn_errbuf eb = {{0}};
    if (mn_gguf_open(path, &g, &eb) != MN_OK || mn_tokenizer_from_gguf(g, &tok, &eb) != MN_OK) {
        fprintf(stderr, "fuzz_tokenizer: %s: %s (tools/setup.sh fetches the default model)\n", path, eb.msg);
        exit(1);
    }
    mn_gguf_close(g); /* the tokenizer keeps its own copies */
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        int32_t *ids = NULL;
        int64_t n = 0;
        if (mn_tokenize(tok, &c, 1, 0, &ids, &n, &eb) != MN_OK) die("a single byte does not tokenize", (uint8_t *)&c, 1);
        dropped[b] = n == 0;
        mn_free(ids);
    }
    return 0;
}

/* Length of the valid UTF-8 prefix of s (RFC 3629: no overlongs, no surrogates, <= U+10FFFF). */
static size_t utf8_valid_prefix(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!k || i + k > n || (k == 2 && c < 0xC2) || (k == 4 && c > 0xF4)) return i;
        for (size_t j = 1; j < k; j++)
            if ((s[i + j] & 0xC0) != 0x80) return i;
        if (k == 3 && ((c == 0xE0 && s[i + 1] < 0xA0) || (c == 0xED && s[i + 1] > 0x9F))) return i;
        if (k == 4 && ((c == 0xF0 && s[i + 1] < 0x90) || (c == 0xF4 && s[i + 1] > 0x8F))) return i;
        i += k;
    }
    return i;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    int flags = (data[0] & 1 ? MN_TOK_PARSE_SPECIAL : 0) | (data[0] & 2 ? MN_TOK_ADD_BOS : 0);
    const uint8_t *text = data + 1;
    size_t n = size - 1;
    char *copy = malloc(n ? n : 1); /* exact size: a read one past the end is caught */
    if (!copy) return 0;
    memcpy(copy, text, n);
    int32_t *ids = NULL;
    int64_t n_ids = 0;
    mn_errbuf eb = {{0}};
    if (mn_tokenize(tok, copy, n, flags, &ids, &n_ids, &eb) != MN_OK) die("tokenize failed", text, n);
    int32_t V = mn_tokenizer_n_vocab(tok);
    for (int64_t i = 0; i < n_ids; i++)
        if (ids[i] < 0 || ids[i] >= V) die("id out of range", text, n);

    /* the text the round trip must give back */
    uint8_t *want = malloc(n ? n : 1);
    size_t nw = 0;
    for (size_t i = 0; i < n; i++)
        if (!dropped[text[i]]) want[nw++] = text[i];
    int64_t skip = 0; /* a BOS that ADD_BOS put in front: the count without the flag tells
                       * (the text itself may start with the BOS's text, parsed as special) */
    if (flags & MN_TOK_ADD_BOS) {
        int32_t *plain = NULL;
        int64_t n_plain = 0;
        if (mn_tokenize(tok, copy, n, flags & ~MN_TOK_ADD_BOS, &plain, &n_plain, &eb) != MN_OK) die("tokenize failed", text, n);
        skip = n_ids - n_plain;
        if (skip < 0 || skip > 1 || (skip && ids[0] != mn_tokenizer_bos(tok)) || memcmp(ids + skip, plain, (size_t)n_plain * 4))
            die("ADD_BOS did more than put one BOS in front", text, n);
        mn_free(plain);
    }

    char *out = NULL;
    size_t len = 0;
    if (mn_detokenize(tok, ids + skip, n_ids - skip, true, &out, &len, &eb) != MN_OK) die("detokenize failed", text, n);
    if (len != nw || memcmp(out, want, nw) != 0) die("decode(encode(text)) != text", text, n);
    mn_free(out);

    /* streaming: one id at a time, then flush */
    size_t cap = 3 * (nw + 64) + 64, sl = 0;
    char *stream = malloc(cap);
    mn_detok dt;
    mn_detok_reset(&dt);
    for (int64_t i = skip; i < n_ids; i++) {
        size_t tl = 0;
        mn_token_bytes(tok, ids[i], &tl);
        if (sl + 3 * (tl + 3) > cap) die("stream buffer estimate too small", text, n);
        sl += mn_detok_push(tok, &dt, ids[i], true, stream + sl, cap - sl);
    }
    sl += mn_detok_flush(&dt, stream + sl, cap - sl);
    if (utf8_valid_prefix((const uint8_t *)stream, sl) != sl) die("streamed text is not valid UTF-8", text, n);
    if (utf8_valid_prefix(want, nw) == nw && (sl != nw || memcmp(stream, want, nw) != 0))
        die("streamed text != valid UTF-8 input", text, n);
    free(stream);
    free(want);
    mn_free(ids);
    free(copy);
    return 0;
}
