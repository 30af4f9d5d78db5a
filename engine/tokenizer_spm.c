/* engine/tokenizer_spm.c — SentencePiece-style BPE (tokenizer.ggml.model = "llama").
 *
 * The text is escaped first: spaces become "▁" (U+2581) and, with the leading-space
 * rule, one "▁" is prepended. Symbols start as single code points (an invalid byte is a
 * symbol of its own). Then, as SentencePiece's BPE model does, the adjacent pair whose
 * concatenation is a vocabulary piece with the highest score is merged (leftmost on
 * ties), until no pair forms a piece. A max-heap of candidates with lazy invalidation
 * keeps this O(n log n). Symbols that are not pieces fall back to <0xNN> byte tokens.
 * Only NORMAL, USER_DEFINED and UNUSED pieces take part: control pieces like "<s>" are
 * never produced from plain text.
 */
#include <string.h>

#include "engine/alloc.h"
#include "engine/tokenizer_impl.h"
#include "engine/unicode.h"

typedef struct sym { uint32_t off, len; int32_t prev, next; } sym;
typedef struct big { float score; int32_t left; uint32_t len; int32_t id; } big;

typedef struct spm_work {
    const mn_tokenizer *t;
    const char *s;
    sym *sy;
    big *heap;
    size_t nheap;
} spm_work;

static bool usable(const mn_tokenizer *t, int32_t id)
{
    if (id < 0)
        return false;
    uint8_t ty = t->type[id];
    return ty == MN__TT_NORMAL || ty == MN__TT_USER_DEFINED || ty == MN__TT_UNUSED;
}

/* Heap order: higher score first, then leftmost. */
static bool big_before(const big *a, const big *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void push(spm_work *w, big b)
{
    size_t i = w->nheap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!big_before(&b, &w->heap[p]))
            break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = b;
}

static big pop(spm_work *w)
{
    big top = w->heap[0], last = w->heap[--w->nheap];
    size_t i = 0, n = w->nheap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && big_before(&w->heap[c + 1], &w->heap[c]))
            c++;
        if (!big_before(&w->heap[c], &last))
            break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n)
        w->heap[i] = last;
    return top;
}

static void try_bigram(spm_work *w, int32_t l)
{
    if (l < 0 || w->sy[l].next < 0)
        return;
    const sym *a = &w->sy[l], *b = &w->sy[a->next];
    uint32_t len = a->len + b->len;
    int32_t id = mn__tok_lookup(w->t, w->s + a->off, len);
    if (usable(w->t, id))
        push(w, (big){w->t->score[id], l, len, id});
}

mn_err mn__spm_encode(const mn_tokenizer *t, const char *text, size_t len, bool space_prefix,
                      mn__tokvec *out)
{
    static const char sp[3] = {(char)0xE2, (char)0x96, (char)0x81};   /* U+2581 */
    if (len == 0)
        return MN_OK;
    if (len > INT32_MAX / 8)
        return MN_ELIMIT;
    size_t cap = 3 * (len + 1);
    char *s = mn_malloc(cap);
    sym *sy = mn_malloc((len + 1) * sizeof *sy);
    big *heap = mn_malloc(3 * (len + 1) * sizeof *heap);
    mn_err err = MN_ENOMEM;
    if (!s || !sy || !heap)
        goto done;
    size_t n = 0;
    if (space_prefix) {
        memcpy(s, sp, 3);
        n = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(s + n, sp, 3);
            n += 3;
        } else {
            s[n++] = text[i];
        }
    }
    int32_t ns = 0;
    for (size_t p = 0; p < n;) {
        int32_t cp;
        int k = mn__utf8_decode((const uint8_t *)s + p, n - p, &cp);
        sy[ns] = (sym){(uint32_t)p, (uint32_t)k, ns - 1, -1};
        if (ns > 0)
            sy[ns - 1].next = ns;
        ns++;
        p += (size_t)k;
    }
    spm_work w = {t, s, sy, heap, 0};
    for (int32_t i = 0; i + 1 < ns; i++)
        try_bigram(&w, i);
    while (w.nheap) {
        big b = pop(&w);
        sym *l = &sy[b.left];
        /* stale if either symbol changed since the push (the total length tells) */
        if (l->len == 0 || l->next < 0 || l->len + sy[l->next].len != b.len)
            continue;
        sym *r = &sy[l->next];
        l->len += r->len;
        r->len = 0;
        l->next = r->next;
        if (r->next >= 0)
            sy[r->next].prev = b.left;
        try_bigram(&w, l->prev);
        try_bigram(&w, b.left);
    }
    err = MN_OK;
    for (int32_t i = 0; i >= 0 && !err; i = sy[i].next) {
        int32_t id = mn__tok_lookup(t, s + sy[i].off, sy[i].len);
        if (usable(t, id)) {
            err = mn__tokvec_push(out, id);
            continue;
        }
        for (uint32_t k = 0; k < sy[i].len && !err; k++) {
            int32_t bid = t->byte_tok[(uint8_t)s[sy[i].off + k]];
            if (bid < 0)
                bid = t->unk;
            if (bid >= 0)
                err = mn__tokvec_push(out, bid);
        }
    }
done:
    mn_free(s);
    mn_free(sy);
    mn_free(heap);
    return err;
}
