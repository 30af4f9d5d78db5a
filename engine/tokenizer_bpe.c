/* engine/tokenizer_bpe.c — byte-level BPE (tokenizer.ggml.model = "gpt2").
 *
 * Encoding is: pre-tokenizer split (a hand-written matcher per regex, below), then for
 * each piece a BPE over its raw bytes: start with one symbol per byte, repeatedly merge
 * the adjacent pair with the lowest merge rank (leftmost on ties) until no pair has a
 * merge. A min-heap of candidate pairs with lazy invalidation makes a piece of m bytes
 * cost O(m log m) instead of the O(m^2) of rescanning.
 *
 * The regexes (as used by HF tokenizers / llama.cpp for each tokenizer.ggml.pre):
 *   gpt2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *   smollm: each \p{N} is first split off on its own (HF Digits(individual_digits)),
 *           then the gpt2 regex runs on the text between digits.
 *   llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *           ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 *   qwen2:  as llama3 with \p{N} instead of \p{N}{1,3}.
 * Each matcher returns the end of the leftmost-alternative, backtracking-regex match at
 * a position; the lookahead (?!\S) sees the end of the current segment as end of text.
 */
#include <string.h>

#include "engine/alloc.h"
#include "engine/tokenizer_impl.h"
#include "engine/unicode.h"

/* ---- bytes_to_unicode ------------------------------------------------------------- */

/* Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, DEL,
 * NBSP, soft hyphen) are moved to U+0100.. in byte order, so every byte gets a visible
 * code point. */
static bool byte_is_printable(unsigned b)
{
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
}

uint32_t mn__byte_to_cp(uint8_t b)
{
    if (byte_is_printable(b))
        return b;
    unsigned n = 0;
    for (unsigned c = 0; c < b; c++)
        n += !byte_is_printable(c);
    return 256 + n;
}

int mn__cp_to_byte(int32_t cp)
{
    if (cp < 0 || cp >= 256 + 68)
        return -1;
    if (cp < 256)
        return byte_is_printable((unsigned)cp) ? cp : -1;
    unsigned n = 0;
    for (unsigned c = 0; c < 256; c++) {
        if (!byte_is_printable(c)) {
            if (n == (unsigned)cp - 256)
                return (int)c;
            n++;
        }
    }
    return -1;
}

/* ---- pre-tokenizer -------------------------------------------------------------------- */

typedef struct unit { int32_t cp; uint8_t cls; } unit;

static bool is_l(const unit *u) { return u->cls & MN__UC_L; }
static bool is_n(const unit *u) { return u->cls & MN__UC_N; }
static bool is_ws(const unit *u) { return u->cls & MN__UC_WS; }
static bool is_other(const unit *u) { return !(u->cls & (MN__UC_L | MN__UC_N | MN__UC_WS)); }
static bool is_nl(const unit *u) { return u->cp == '\r' || u->cp == '\n'; }

static int32_t fold(int32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

/* 's 't 're 've 'm 'll 'd at i: the end index, or 0 if none. */
static size_t contraction(const unit *u, size_t i, size_t e, bool icase)
{
    if (u[i].cp != '\'' || i + 1 >= e)
        return 0;
    int32_t a = icase ? fold(u[i + 1].cp) : u[i + 1].cp;
    if (a == 's' || a == 't' || a == 'm' || a == 'd')
        return i + 2;
    if (i + 2 >= e)
        return 0;
    int32_t b = icase ? fold(u[i + 2].cp) : u[i + 2].cp;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
        return i + 3;
    return 0;
}

static size_t run(const unit *u, size_t i, size_t e, bool (*pred)(const unit *))
{
    while (i < e && pred(&u[i]))
        i++;
    return i;
}

/* \s+(?!\S)|\s+ at a whitespace unit i: the whole run if it reaches the end, else all but
 * its last unit (which then starts the next piece), else one unit. */
static size_t ws_tail(const unit *u, size_t i, size_t e)
{
    size_t r = run(u, i, e, is_ws);
    if (r == e)
        return e;
    return r - 1 > i ? r - 1 : r;
}

static size_t match_gpt2(const unit *u, size_t i, size_t e)
{
    size_t k = contraction(u, i, e, false);
    if (k)
        return k;
    size_t j = (u[i].cp == ' ' && i + 1 < e) ? i + 1 : i;   /* " ?" */
    if (is_l(&u[j]))
        return run(u, j, e, is_l);
    if (is_n(&u[j]))
        return run(u, j, e, is_n);
    if (is_other(&u[j]))
        return run(u, j, e, is_other);
    /* u[i] is whitespace here (a lone ' ' before whitespace, or other whitespace) */
    return ws_tail(u, i, e);
}

static size_t match_llama3(const unit *u, size_t i, size_t e, size_t max_digits)
{
    size_t k = contraction(u, i, e, true);
    if (k)
        return k;
    if (is_l(&u[i]))
        return run(u, i, e, is_l);
    if (!is_nl(&u[i]) && !is_n(&u[i]) && i + 1 < e && is_l(&u[i + 1]))
        return run(u, i + 1, e, is_l);
    if (is_n(&u[i])) {
        size_t j = i;
        while (j < e && j - i < max_digits && is_n(&u[j]))
            j++;
        return j;
    }
    size_t j = (u[i].cp == ' ' && i + 1 < e) ? i + 1 : i;
    if (is_other(&u[j])) {
        j = run(u, j, e, is_other);
        return run(u, j, e, is_nl);
    }
    /* whitespace: \s*[\r\n]+ ends after the run's last newline, if it has one */
    size_t r = run(u, i, e, is_ws);
    for (size_t q = r; q > i; q--)
        if (is_nl(&u[q - 1]))
            return q;
    return ws_tail(u, i, e);
}

/* Split units [s, e) with the regex of pre, reporting byte ranges through fn. */
static mn_err split_segment(int pre, const unit *u, const size_t *off, size_t s, size_t e,
                            mn__piece_fn fn, void *ctx)
{
    size_t i = s;
    while (i < e) {
        size_t j;
        switch (pre) {
        case MN__PRE_LLAMA3: j = match_llama3(u, i, e, 3); break;
        case MN__PRE_QWEN2: j = match_llama3(u, i, e, 1); break;
        default: j = match_gpt2(u, i, e); break;
        }
        mn_err err = fn(ctx, off[i], off[j] - off[i]);
        if (err)
            return err;
        i = j;
    }
    return MN_OK;
}

mn_err mn__pretok_split(int pre, const char *text, size_t len, mn__piece_fn fn, void *ctx)
{
    if (len == 0)
        return MN_OK;
    unit *u = mn_malloc(len * sizeof *u);
    size_t *off = mn_malloc((len + 1) * sizeof *off);
    if (!u || !off) {
        mn_free(u);
        mn_free(off);
        return MN_ENOMEM;
    }
    const uint8_t *s = (const uint8_t *)text;
    size_t n = 0;
    for (size_t p = 0; p < len;) {
        int32_t cp;
        int k = mn__utf8_decode(s + p, len - p, &cp);
        u[n].cp = cp;
        u[n].cls = mn__ucat(cp);
        off[n++] = p;
        p += (size_t)k;
    }
    off[n] = len;
    mn_err err = MN_OK;
    if (pre == MN__PRE_SMOLLM) {
        size_t a = 0;
        for (size_t i = 0; i <= n && !err; i++) {
            if (i < n && !is_n(&u[i]))
                continue;
            err = split_segment(MN__PRE_GPT2, u, off, a, i, fn, ctx);
            if (!err && i < n)
                err = fn(ctx, off[i], off[i + 1] - off[i]);
            a = i + 1;
        }
    } else {
        err = split_segment(pre, u, off, 0, n, fn, ctx);
    }
    mn_free(u);
    mn_free(off);
    return err;
}

/* ---- merges ------------------------------------------------------------------------- */

static uint32_t hash64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return (uint32_t)k;
}

/* Rank and result of merging left and right, or -1. */
static int32_t merge_find(const mn_tokenizer *t, int32_t left, int32_t right, int32_t *res)
{
    if (!t->mkey)
        return -1;
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (uint32_t h = hash64(key) & t->mmask;; h = (h + 1) & t->mmask) {
        if (t->mkey[h] == UINT64_MAX)
            return -1;
        if (t->mkey[h] == key) {
            *res = t->mres[h];
            return t->mrank[h];
        }
    }
}

size_t mn__unmap_text(const char *s, size_t len, char *out)
{
    size_t o = 0;
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

mn_err mn__bpe_load_merges(mn_tokenizer *t, const mn_gguf *g, mn_errbuf *eb)
{
    const mn_gguf_value *arr = NULL;
    mn_err err = mn_gguf_get_arr(g, "tokenizer.ggml.merges", MN_GGUF_STRING, &arr, eb);
    if (err == MN_ENOT_FOUND)
        return MN_OK;   /* a vocab without merges: every piece becomes single bytes */
    if (err)
        return err;
    uint64_t n = arr->v.arr.n;
    if (n > (1u << 26))
        return mn_errf(eb, MN_ELIMIT, "tokenizer.ggml.merges: %llu entries (limit %u)",
                       (unsigned long long)n, 1u << 26);
    uint32_t cap = 16;
    while (cap < 2 * n)
        cap <<= 1;
    t->mkey = mn_malloc((size_t)cap * sizeof *t->mkey);
    t->mrank = mn_malloc((size_t)cap * sizeof *t->mrank);
    t->mres = mn_malloc((size_t)cap * sizeof *t->mres);
    char *buf = NULL;
    size_t buf_cap = 0;
    if (!t->mkey || !t->mrank || !t->mres)
        return MN_ENOMEM;
    memset(t->mkey, 0xff, (size_t)cap * sizeof *t->mkey);
    t->mmask = cap - 1;
    for (uint64_t i = 0; i < n; i++) {
        mn_str s = arr->v.arr.items[i].v.str;
        const char *sp = s.len > 1 ? memchr(s.ptr + 1, ' ', s.len - 1) : NULL;
        if (!sp)
            return mn_errf(eb, MN_EFORMAT, "tokenizer.ggml.merges[%llu]: no space separating "
                           "the two parts", (unsigned long long)i);
        if (4 * s.len > buf_cap) {
            mn_free(buf);
            buf_cap = 4 * s.len + 64;
            if (!(buf = mn_malloc(buf_cap)))
                return MN_ENOMEM;
        }
        size_t la = mn__unmap_text(s.ptr, (size_t)(sp - s.ptr), buf);
        size_t lb = mn__unmap_text(sp + 1, s.len - (size_t)(sp - s.ptr) - 1, buf + la);
        int32_t a = mn__tok_lookup(t, buf, la), b = mn__tok_lookup(t, buf + la, lb);
        int32_t r = mn__tok_lookup(t, buf, la + lb);
        if (a < 0 || b < 0 || r < 0)
            continue;   /* refers to tokens not in the vocab: unusable, as in HF */
        uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
        uint32_t h = hash64(key) & t->mmask;
        while (t->mkey[h] != UINT64_MAX && t->mkey[h] != key)
            h = (h + 1) & t->mmask;
        if (t->mkey[h] == key)
            continue;   /* duplicate: the first (lowest rank) wins */
        t->mkey[h] = key;
        t->mrank[h] = (int32_t)i;
        t->mres[h] = r;
    }
    mn_free(buf);
    return MN_OK;
}

/* ---- BPE of one piece ---------------------------------------------------------------- */

typedef struct cand { int32_t rank, pos, left, right; } cand;

typedef struct bpe_work {
    const mn_tokenizer *t;
    const char *text;
    mn__tokvec *out;
    int32_t *id, *prev, *next;   /* symbols, one per byte at first; linked list */
    cand *heap;
    size_t nheap;
} bpe_work;

static bool cand_less(const cand *a, const cand *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(bpe_work *w, cand c)
{
    size_t i = w->nheap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_less(&c, &w->heap[p]))
            break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = c;
}

static cand heap_pop(bpe_work *w)
{
    cand top = w->heap[0], last = w->heap[--w->nheap];
    size_t i = 0, n = w->nheap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && cand_less(&w->heap[c + 1], &w->heap[c]))
            c++;
        if (!cand_less(&w->heap[c], &last))
            break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n)
        w->heap[i] = last;
    return top;
}

static void try_pair(bpe_work *w, int32_t l)
{
    if (l < 0 || w->next[l] < 0)
        return;
    int32_t r = w->next[l], res;
    int32_t rank = merge_find(w->t, w->id[l], w->id[r], &res);
    if (rank >= 0)
        heap_push(w, (cand){rank, l, w->id[l], w->id[r]});
}

static mn_err bpe_piece(void *ctx, size_t off, size_t len)
{
    bpe_work *w = ctx;
    const mn_tokenizer *t = w->t;
    const char *s = w->text + off;
    if (len > 1 && t->ignore_merges) {
        int32_t id = mn__tok_lookup(t, s, len);
        if (id >= 0)
            return mn__tokvec_push(w->out, id);
    }
    int32_t n = (int32_t)len;
    for (int32_t i = 0; i < n; i++) {
        w->id[i] = t->byte_tok[(uint8_t)s[i]];
        w->prev[i] = i - 1;
        w->next[i] = i + 1 < n ? i + 1 : -1;
    }
    w->nheap = 0;
    for (int32_t i = 0; i + 1 < n; i++)
        if (w->id[i] >= 0 && w->id[i + 1] >= 0)
            try_pair(w, i);
    while (w->nheap) {
        cand c = heap_pop(w);
        int32_t l = c.pos, r = w->next[l];
        /* stale if l was absorbed (id -2), or either side changed since the push */
        if (w->id[l] != c.left || r < 0 || w->id[r] != c.right)
            continue;
        int32_t res;
        merge_find(t, c.left, c.right, &res);
        w->id[l] = res;
        w->id[r] = -2;
        w->next[l] = w->next[r];
        if (w->next[r] >= 0)
            w->prev[w->next[r]] = l;
        try_pair(w, w->prev[l]);
        try_pair(w, l);
    }
    for (int32_t i = 0; i >= 0; i = w->next[i]) {
        /* A byte the vocab has no token for is dropped, as HF tokenizers does without an
         * unk token: SmolLM2's unknown_token_id is <|endoftext|>, which must not appear
         * in the middle of user text. */
        if (w->id[i] >= 0) {
            mn_err err = mn__tokvec_push(w->out, w->id[i]);
            if (err)
                return err;
        }
    }
    return MN_OK;
}

mn_err mn__bpe_encode(const mn_tokenizer *t, const char *text, size_t len, mn__tokvec *out)
{
    if (len == 0)
        return MN_OK;
    if (len > INT32_MAX / 4)
        return MN_ELIMIT;
    bpe_work w = {.t = t, .text = text, .out = out};
    w.id = mn_malloc(3 * len * sizeof(int32_t));
    w.heap = mn_malloc(3 * len * sizeof(cand));
    mn_err err = MN_ENOMEM;
    if (w.id && w.heap) {
        w.prev = w.id + len;
        w.next = w.id + 2 * len;
        err = mn__pretok_split(t->pre, text, len, bpe_piece, &w);
    }
    mn_free(w.id);
    mn_free(w.heap);
    return err;
}
