/* engine/tokenizer.c — loading a tokenizer from GGUF metadata, the public API, special
 * tokens and the streaming detokenizer. The two encoders live in tokenizer_bpe.c (gpt2)
 * and tokenizer_spm.c (llama); see tokenizer_impl.h for the shared layout.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/tokenizer_impl.h"
#include "engine/unicode.h"

#define MN__MAX_VOCAB (1 << 24)

mn_err mn__tokvec_push(mn__tokvec *tv, int32_t id)
{
    if (tv->n == tv->cap) {
        int64_t cap = tv->cap ? 2 * tv->cap : 64;
        int32_t *v = mn_realloc(tv->v, (size_t)cap * sizeof *v);
        if (!v)
            return MN_ENOMEM;
        tv->v = v;
        tv->cap = cap;
    }
    tv->v[tv->n++] = id;
    return MN_OK;
}

static uint32_t hash_bytes(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

/* The text the lookup table is keyed by (see tokenizer_impl.h). */
static const char *key_text(const mn_tokenizer *t, int32_t id, size_t *n)
{
    if (t->kind == MN__TOK_GPT2) {
        *n = t->dec_len[id];
        return t->arena + t->dec_off[id];
    }
    *n = t->raw_len[id];
    return t->arena + t->raw_off[id];
}

int32_t mn__tok_lookup(const mn_tokenizer *t, const char *s, size_t n)
{
    for (uint32_t h = hash_bytes(s, n) & t->lut_mask;; h = (h + 1) & t->lut_mask) {
        int32_t id = t->lut[h];
        if (id < 0)
            return -1;
        size_t kn;
        const char *k = key_text(t, id, &kn);
        if (kn == n && memcmp(k, s, n) == 0)
            return id;
    }
}

static void lut_insert(mn_tokenizer *t, int32_t id)
{
    size_t n;
    const char *s = key_text(t, id, &n);
    if (mn__tok_lookup(t, s, n) >= 0)
        return;   /* duplicate text: the first id keeps it */
    uint32_t h = hash_bytes(s, n) & t->lut_mask;
    while (t->lut[h] >= 0)
        h = (h + 1) & t->lut_mask;
    t->lut[h] = id;
}

/* Decoded bytes of token i from its raw text s (written to out, room for 3*len). */
static size_t decode_token(const mn_tokenizer *t, int32_t i, const char *s, size_t len, char *out)
{
    uint8_t ty = t->type[i];
    if (ty == MN__TT_CONTROL || ty == MN__TT_USER_DEFINED || ty == MN__TT_UNKNOWN) {
        memcpy(out, s, len);
        return len;
    }
    size_t o = 0;
    if (t->kind == MN__TOK_LLAMA) {
        if (ty == MN__TT_BYTE && len == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>') {
            char hex[3] = {s[3], s[4], 0};
            char *end;
            long b = strtol(hex, &end, 16);
            if (*end == 0) {
                out[0] = (char)b;
                return 1;
            }
        }
        for (size_t p = 0; p < len;) {
            if (p + 3 <= len && memcmp(s + p, "\xE2\x96\x81", 3) == 0) {
                out[o++] = ' ';
                p += 3;
            } else {
                out[o++] = s[p++];
            }
        }
        return o;
    }
    for (size_t p = 0; p < len;) {
        int32_t cp;
        int k = mn__utf8_decode((const uint8_t *)s + p, len - p, &cp);
        int b = mn__cp_to_byte(cp);
        if (b >= 0) {
            out[o++] = (char)b;
        } else {
            memcpy(out + o, s + p, (size_t)k);
            o += (size_t)k;
        }
        p += (size_t)k;
    }
    return o;
}

/* An optional u32 id key: -1 if absent or out of range. */
static int32_t opt_id(const mn_gguf *g, const char *key, int32_t n_vocab)
{
    uint32_t v;
    if (mn_gguf_get_u32(g, key, &v, NULL) != MN_OK || v >= (uint32_t)n_vocab)
        return -1;
    return (int32_t)v;
}

static bool opt_bool(const mn_gguf *g, const char *key, bool dflt)
{
    bool b;
    return mn_gguf_get_bool(g, key, &b, NULL) == MN_OK ? b : dflt;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static mn_err load_vocab(mn_tokenizer *t, const mn_gguf *g, mn_errbuf *eb)
{
    const mn_gguf_value *toks = NULL, *types = NULL, *scores = NULL;
    mn_err err = mn_gguf_get_arr(g, "tokenizer.ggml.tokens", MN_GGUF_STRING, &toks, eb);
    if (err)
        return err;
    uint64_t n = toks->v.arr.n;
    if (n == 0 || n > MN__MAX_VOCAB)
        return mn_errf(eb, MN_EFORMAT, "tokenizer.ggml.tokens: %llu tokens (must be 1..%d)",
                       (unsigned long long)n, MN__MAX_VOCAB);
    t->n_vocab = (int32_t)n;
    const mn_gguf_value *tv = mn_gguf_find(g, "tokenizer.ggml.token_type");
    if (tv) {
        if ((err = mn_gguf_get_arr(g, "tokenizer.ggml.token_type", MN_GGUF_INT32, &types, eb)))
            return err;
        if (types->v.arr.n != n)
            return mn_errf(eb, MN_EFORMAT, "tokenizer.ggml.token_type: %llu entries, "
                           "tokenizer.ggml.tokens has %llu",
                           (unsigned long long)types->v.arr.n, (unsigned long long)n);
    }
    if (mn_gguf_find(g, "tokenizer.ggml.scores")) {
        if ((err = mn_gguf_get_arr(g, "tokenizer.ggml.scores", MN_GGUF_FLOAT32, &scores, eb)))
            return err;
        if (scores->v.arr.n != n)
            return mn_errf(eb, MN_EFORMAT, "tokenizer.ggml.scores: %llu entries, "
                           "tokenizer.ggml.tokens has %llu",
                           (unsigned long long)scores->v.arr.n, (unsigned long long)n);
    } else if (t->kind == MN__TOK_LLAMA) {
        return mn_errf(eb, MN_EFORMAT, "tokenizer.ggml.scores: missing (required for model llama)");
    }
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++)
        total += toks->v.arr.items[i].v.str.len;
    if (total > (1u << 30) / 4)
        return mn_errf(eb, MN_ELIMIT, "tokenizer.ggml.tokens: %llu bytes of text (limit %u)",
                       (unsigned long long)total, (1u << 30) / 4);
    t->arena = mn_malloc(4 * total + 1);
    t->raw_off = mn_malloc(4 * n * sizeof(uint32_t));
    t->type = mn_malloc(n);
    t->eog = mn_calloc(n, 1);
    if (scores)
        t->score = mn_malloc(n * sizeof(float));
    uint32_t cap = 16;
    while (cap < 2 * n)
        cap <<= 1;
    t->lut = mn_malloc((size_t)cap * sizeof(int32_t));
    if (!t->arena || !t->raw_off || !t->type || !t->eog || (scores && !t->score) || !t->lut)
        return MN_ENOMEM;
    t->raw_len = t->raw_off + n;
    t->dec_off = t->raw_off + 2 * n;
    t->dec_len = t->raw_off + 3 * n;
    memset(t->lut, 0xff, (size_t)cap * sizeof(int32_t));
    t->lut_mask = cap - 1;
    uint32_t pos = 0;
    for (uint64_t i = 0; i < n; i++) {
        mn_str s = toks->v.arr.items[i].v.str;
        int64_t ty = types ? mn_gguf_arr_int(types, i) : MN__TT_NORMAL;
        t->type[i] = (ty >= 1 && ty <= 6) ? (uint8_t)ty : MN__TT_NORMAL;
        if (scores)
            t->score[i] = (float)mn_gguf_arr_float(scores, i);
        t->raw_off[i] = pos;
        t->raw_len[i] = (uint32_t)s.len;
        memcpy(t->arena + pos, s.ptr, s.len);
        pos += (uint32_t)s.len;
        t->dec_off[i] = pos;
        t->dec_len[i] = (uint32_t)decode_token(t, (int32_t)i, s.ptr, s.len, t->arena + pos);
        pos += t->dec_len[i];
    }
    /* normal tokens first, so a special token never shadows a normal one's text */
    for (int pass = 0; pass < 2; pass++)
        for (int32_t i = 0; i < t->n_vocab; i++) {
            bool special = t->type[i] == MN__TT_CONTROL || t->type[i] == MN__TT_USER_DEFINED;
            if (special == (pass == 1))
                lut_insert(t, i);
        }
    return MN_OK;
}

static mn_err find_bytes_and_specials(mn_tokenizer *t)
{
    for (int b = 0; b < 256; b++) {
        if (t->kind == MN__TOK_GPT2) {
            char c = (char)b;
            t->byte_tok[b] = mn__tok_lookup(t, &c, 1);
        } else {
            char name[8];
            snprintf(name, sizeof name, "<0x%02X>", b);
            t->byte_tok[b] = mn__tok_lookup(t, name, 6);
        }
    }
    /* longest text first (so "<|im_start|>" wins over any prefix of it), then by id:
     * sort keys (~len << 32 | id) */
    uint64_t *keys = mn_malloc((size_t)t->n_vocab * sizeof *keys);
    t->special = mn_malloc((size_t)t->n_vocab * sizeof(int32_t));
    if (!keys || !t->special) {
        mn_free(keys);
        return MN_ENOMEM;
    }
    t->n_special = 0;
    for (int32_t i = 0; i < t->n_vocab; i++)
        if ((t->type[i] == MN__TT_CONTROL || t->type[i] == MN__TT_USER_DEFINED) && t->raw_len[i])
            keys[t->n_special++] = (uint64_t)(UINT32_MAX - t->raw_len[i]) << 32 | (uint32_t)i;
    qsort(keys, (size_t)t->n_special, sizeof *keys, cmp_u64);
    for (int32_t k = 0; k < t->n_special; k++)
        t->special[k] = (int32_t)(keys[k] & 0xffffffffu);
    mn_free(keys);
    for (int32_t k = 0; k < t->n_special; k++) {
        uint8_t c = (uint8_t)t->arena[t->raw_off[t->special[k]]];
        t->special_first[c >> 3] |= (uint8_t)(1u << (c & 7));
    }
    return MN_OK;
}

static int32_t find_raw(const mn_tokenizer *t, const char *s)
{
    size_t n = strlen(s);
    for (int32_t k = 0; k < t->n_special; k++) {
        int32_t id = t->special[k];
        if (t->raw_len[id] == n && memcmp(t->arena + t->raw_off[id], s, n) == 0)
            return id;
    }
    return -1;
}

static void find_eog(mn_tokenizer *t, const mn_gguf *g)
{
    static const char *const eot_names[] = {"<|im_end|>", "<|eot_id|>", "<end_of_turn>",
                                            "<|end_of_text|>", "<|endoftext|>", "</s>"};
    t->eot = opt_id(g, "tokenizer.ggml.eot_token_id", t->n_vocab);
    for (size_t k = 0; k < sizeof eot_names / sizeof *eot_names; k++) {
        int32_t id = find_raw(t, eot_names[k]);
        if (id < 0)
            id = mn_tokenizer_find(t, eot_names[k], strlen(eot_names[k]));
        if (id < 0)
            continue;
        t->eog[id] = 1;
        if (t->eot < 0 && k < 3)   /* the first three are end-of-turn markers proper */
            t->eot = id;
    }
    if (t->eos >= 0)
        t->eog[t->eos] = 1;
    if (t->eot >= 0)
        t->eog[t->eot] = 1;
}

mn_err mn_tokenizer_from_gguf(const mn_gguf *g, mn_tokenizer **out, mn_errbuf *eb)
{
    *out = NULL;
    mn_str model, pre = {"", 0};
    mn_err err = mn_gguf_get_str(g, "tokenizer.ggml.model", &model, eb);
    if (err)
        return err;
    mn_tokenizer *t = mn_calloc(1, sizeof *t);
    if (!t)
        return MN_ENOMEM;
    if (model.len == 4 && memcmp(model.ptr, "gpt2", 4) == 0) {
        t->kind = MN__TOK_GPT2;
    } else if (model.len == 5 && memcmp(model.ptr, "llama", 5) == 0) {
        t->kind = MN__TOK_LLAMA;
    } else {
        mn_tokenizer_free(t);
        return mn_errf(eb, MN_EUNSUPPORTED, "tokenizer.ggml.model: \"%.*s\" (supported: gpt2, llama)",
                       (int)(model.len > 64 ? 64 : model.len), model.ptr);
    }
    strcpy(t->kind_name, t->kind == MN__TOK_GPT2 ? "gpt2" : "llama");
    if (mn_gguf_find(g, "tokenizer.ggml.pre") &&
        (err = mn_gguf_get_str(g, "tokenizer.ggml.pre", &pre, eb))) {
        mn_tokenizer_free(t);
        return err;
    }
    t->pre = MN__PRE_GPT2;
    snprintf(t->pre_name, sizeof t->pre_name, "%.*s", (int)(pre.len > 31 ? 31 : pre.len), pre.ptr);
    if (strcmp(t->pre_name, "llama-bpe") == 0 || strcmp(t->pre_name, "llama3") == 0)
        t->pre = MN__PRE_LLAMA3;
    else if (strcmp(t->pre_name, "qwen2") == 0)
        t->pre = MN__PRE_QWEN2;
    else if (strcmp(t->pre_name, "smollm") == 0)
        t->pre = MN__PRE_SMOLLM;
    if (t->kind == MN__TOK_LLAMA)
        snprintf(t->pre_name, sizeof t->pre_name, "%s", pre.len ? t->pre_name : "default");
    else if (!pre.len)
        strcpy(t->pre_name, "gpt-2");
    /* llama-3's HF tokenizer looks a whole piece up before merging (ignore_merges) */
    t->ignore_merges = t->pre == MN__PRE_LLAMA3;
    if ((err = load_vocab(t, g, eb)) ||
        (t->kind == MN__TOK_GPT2 && (err = mn__bpe_load_merges(t, g, eb)))) {
        mn_tokenizer_free(t);
        return err;
    }
    if ((err = find_bytes_and_specials(t))) {
        int32_t n_vocab = t->n_vocab; /* read before the free */
        mn_tokenizer_free(t);
        return mn_errf(eb, err, "tokenizer: out of memory for %d tokens", n_vocab);
    }
    t->bos = opt_id(g, "tokenizer.ggml.bos_token_id", t->n_vocab);
    t->eos = opt_id(g, "tokenizer.ggml.eos_token_id", t->n_vocab);
    t->unk = opt_id(g, "tokenizer.ggml.unknown_token_id", t->n_vocab);
    t->add_bos = opt_bool(g, "tokenizer.ggml.add_bos_token", t->kind == MN__TOK_LLAMA);
    t->add_space_prefix = opt_bool(g, "tokenizer.ggml.add_space_prefix", t->kind == MN__TOK_LLAMA);
    find_eog(t, g);
    *out = t;
    return MN_OK;
}

void mn_tokenizer_free(mn_tokenizer *t)
{
    if (!t)
        return;
    mn_free(t->arena);
    mn_free(t->raw_off);
    mn_free(t->type);
    mn_free(t->eog);
    mn_free(t->score);
    mn_free(t->lut);
    mn_free(t->mkey);
    mn_free(t->mrank);
    mn_free(t->mres);
    mn_free(t->special);
    mn_free(t);
}

int32_t mn_tokenizer_n_vocab(const mn_tokenizer *t) { return t->n_vocab; }
int32_t mn_tokenizer_bos(const mn_tokenizer *t) { return t->bos; }
int32_t mn_tokenizer_eos(const mn_tokenizer *t) { return t->eos; }
int32_t mn_tokenizer_eot(const mn_tokenizer *t) { return t->eot; }
const char *mn_tokenizer_kind(const mn_tokenizer *t) { return t->kind_name; }
const char *mn_tokenizer_pre(const mn_tokenizer *t) { return t->pre_name; }

bool mn_tokenizer_is_eog(const mn_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab && t->eog[id];
}

bool mn_tokenizer_is_special(const mn_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab &&
           (t->type[id] == MN__TT_CONTROL || t->type[id] == MN__TT_USER_DEFINED);
}

int32_t mn_tokenizer_find(const mn_tokenizer *t, const char *s, size_t len)
{
    for (int32_t k = 0; k < t->n_special; k++) {
        int32_t id = t->special[k];
        if (t->raw_len[id] == len && memcmp(t->arena + t->raw_off[id], s, len) == 0)
            return id;
    }
    if (t->kind == MN__TOK_LLAMA)
        return mn__tok_lookup(t, s, len);
    /* gpt2: the lookup table holds decoded bytes; "Ġworld" is looked up as " world" */
    char buf[512];
    if (len > sizeof buf)
        return -1;
    size_t n = mn__unmap_text(s, len, buf);
    int32_t id = mn__tok_lookup(t, buf, n);
    if (id >= 0 && t->raw_len[id] == len && memcmp(t->arena + t->raw_off[id], s, len) == 0)
        return id;
    return -1;
}

const char *mn_token_bytes(const mn_tokenizer *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n_vocab)
        return NULL;
    *len = t->dec_len[id];
    return t->arena + t->dec_off[id];
}

/* The special token whose text starts text[0..n) (longest first), or -1. */
static int32_t special_at(const mn_tokenizer *t, const char *text, size_t n)
{
    uint8_t c = (uint8_t)text[0];
    if (!(t->special_first[c >> 3] & (1u << (c & 7))))
        return -1;
    for (int32_t k = 0; k < t->n_special; k++) {
        int32_t id = t->special[k];
        size_t l = t->raw_len[id];
        if (l <= n && memcmp(t->arena + t->raw_off[id], text, l) == 0)
            return id;
    }
    return -1;
}

static mn_err encode_text(const mn_tokenizer *t, const char *s, size_t n, mn__tokvec *tv)
{
    if (t->kind == MN__TOK_GPT2)
        return mn__bpe_encode(t, s, n, tv);
    return mn__spm_encode(t, s, n, t->add_space_prefix, tv);
}

mn_err mn_tokenize(const mn_tokenizer *t, const char *text, size_t len, int flags,
                   int32_t **tokens, int64_t *n_tokens, mn_errbuf *eb)
{
    mn__tokvec tv = {0};
    mn_err err = MN_OK;
    *tokens = NULL;
    *n_tokens = 0;
    if ((flags & MN_TOK_ADD_BOS) && t->add_bos && t->bos >= 0)
        err = mn__tokvec_push(&tv, t->bos);
    /* Every text run starts the text or follows a special token; SPM prefixes a space to
     * each (llama.cpp does the same). */
    size_t start = 0;
    if (!err && (flags & MN_TOK_PARSE_SPECIAL) && t->n_special) {
        for (size_t p = 0; p < len && !err;) {
            int32_t id = special_at(t, text + p, len - p);
            if (id < 0) {
                p++;
                continue;
            }
            if (p > start)
                err = encode_text(t, text + start, p - start, &tv);
            if (!err)
                err = mn__tokvec_push(&tv, id);
            p += t->raw_len[id];
            start = p;
        }
    }
    if (!err && start < len)
        err = encode_text(t, text + start, len - start, &tv);
    if (err) {
        mn_free(tv.v);
        if (err == MN_ENOMEM)
            return mn_errf(eb, err, "tokenize: out of memory (%zu bytes of text)", len);
        return mn_errf(eb, err, "tokenize: text of %zu bytes too long", len);
    }
    if (!tv.v && !(tv.v = mn_malloc(sizeof(int32_t))))
        return mn_errf(eb, MN_ENOMEM, "tokenize: out of memory");
    *tokens = tv.v;
    *n_tokens = tv.n;
    return MN_OK;
}

/* ---- detokenizing ------------------------------------------------------------------- */

mn_err mn_detokenize(const mn_tokenizer *t, const int32_t *ids, int64_t n, bool render_special,
                     char **out, size_t *len, mn_errbuf *eb)
{
    *out = NULL;
    *len = 0;
    size_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return mn_errf(eb, MN_ERANGE, "detokenize: token %lld at index %lld not in [0, %d)",
                           (long long)ids[i], (long long)i, t->n_vocab);
        total += t->dec_len[ids[i]];
    }
    char *buf = mn_malloc(total + 1);
    if (!buf)
        return mn_errf(eb, MN_ENOMEM, "detokenize: out of memory (%zu bytes)", total);
    size_t o = 0;
    bool started = false;
    for (int64_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (mn_tokenizer_is_special(t, id)) {
            if (!render_special)
                continue;
        } else if (!started) {
            started = true;
            /* undo the leading-space rule on the first text piece */
            if (t->kind == MN__TOK_LLAMA && t->add_space_prefix && t->dec_len[id] &&
                t->arena[t->dec_off[id]] == ' ') {
                memcpy(buf + o, t->arena + t->dec_off[id] + 1, t->dec_len[id] - 1);
                o += t->dec_len[id] - 1;
                continue;
            }
        }
        memcpy(buf + o, t->arena + t->dec_off[id], t->dec_len[id]);
        o += t->dec_len[id];
    }
    buf[o] = 0;
    *out = buf;
    *len = o;
    return MN_OK;
}

void mn_detok_reset(mn_detok *d)
{
    memset(d, 0, sizeof *d);
}

typedef struct obuf { char *p; size_t n, cap; } obuf;

/* Append whole sequences only: what does not fit is dropped, never split. */
static void put(obuf *o, const char *s, size_t n)
{
    if (o->n + n <= o->cap) {
        memcpy(o->p + o->n, s, n);
        o->n += n;
    }
}

static const char repl[3] = {(char)0xEF, (char)0xBF, (char)0xBD};   /* U+FFFD */

/* Feed one byte: emit complete sequences, U+FFFD for bytes that start none. */
static void feed(mn_detok *d, uint8_t b, obuf *o)
{
    d->pending[d->n_pending++] = (char)b;
    while (d->n_pending) {
        int k = mn__utf8_check((const uint8_t *)d->pending, (size_t)d->n_pending);
        if (k == 0)
            return;   /* incomplete: wait for more bytes */
        if (k > 0) {
            put(o, d->pending, (size_t)k);
        } else {
            put(o, repl, 3);
            k = 1;
        }
        memmove(d->pending, d->pending + k, (size_t)(d->n_pending - k));
        d->n_pending -= k;
    }
}

size_t mn_detok_flush(mn_detok *d, char *out, size_t cap)
{
    obuf o = {out, 0, cap};
    if (d->n_pending)
        put(&o, repl, 3);
    d->n_pending = 0;
    return o.n;
}

size_t mn_detok_push(const mn_tokenizer *t, mn_detok *d, int32_t id, bool render_special,
                     char *out, size_t cap)
{
    if (id < 0 || id >= t->n_vocab)
        return 0;
    obuf o = {out, 0, cap};
    const char *s = t->arena + t->dec_off[id];
    size_t n = t->dec_len[id];
    if (mn_tokenizer_is_special(t, id)) {
        if (!render_special)
            return 0;
        /* a special token breaks any byte sequence in progress */
        o.n = mn_detok_flush(d, out, cap);
        put(&o, s, n);
        return o.n;
    }
    if (!d->started) {
        d->started = true;
        if (t->kind == MN__TOK_LLAMA && t->add_space_prefix && n && s[0] == ' ') {
            s++;
            n--;
        }
    }
    for (size_t i = 0; i < n; i++)
        feed(d, (uint8_t)s[i], &o);
    return o.n;
}
