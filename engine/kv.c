/* engine/kv.c — block pool with a free stack and reference counts. */
#include "engine/kv.h"

#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"

mn_err mn_kv_pool_new(mn_backend *be, int32_t n_layer, int32_t n_kv_head, int32_t head_dim, int32_t block_size,
                      int32_t n_blocks, mn_kv_pool **out, mn_errbuf *eb) {
    if (n_layer < 1 || n_kv_head < 1 || head_dim < 1 || block_size < 1 || n_blocks < 1)
        return mn_errf(eb, MN_EINVALID, "kv pool: sizes must be positive (layers %d, kv heads %d, head dim %d, block %d, blocks %d)",
                       n_layer, n_kv_head, head_dim, block_size, n_blocks);
    mn_kv_pool *p = mn_calloc(1, sizeof *p);
    if (!p) return mn_errf(eb, MN_ENOMEM, "kv pool: out of memory");
    p->backend = be;
    p->n_layer = n_layer;
    p->n_kv_head = n_kv_head;
    p->head_dim = head_dim;
    p->block_size = block_size;
    p->n_blocks = n_blocks;
    p->block_elems = (int64_t)block_size * n_kv_head * head_dim;
    size_t bytes = (size_t)n_layer * 2 * (size_t)n_blocks * (size_t)p->block_elems * sizeof(uint16_t);
    p->free_ids = mn_malloc((size_t)n_blocks * sizeof(int32_t));
    p->refs = mn_calloc((size_t)n_blocks, sizeof(int32_t));
    mn_err e = p->free_ids && p->refs ? MN_OK : mn_errf(eb, MN_ENOMEM, "kv pool: out of memory");
    if (e == MN_OK) e = mn_buffer_alloc(be, MN_MEM_DEVICE, bytes, &p->buf, eb);
    if (e != MN_OK) {
        mn_kv_pool_free(p);
        return e;
    }
    /* lowest ids on top of the stack: a fresh pool hands out 0, 1, 2, ... */
    for (int32_t i = 0; i < n_blocks; i++) p->free_ids[i] = n_blocks - 1 - i;
    p->n_free = n_blocks;
    *out = p;
    return MN_OK;
}

void mn_kv_pool_free(mn_kv_pool *p) {
    if (!p) return;
    mn_buffer_free(p->buf);
    mn_free(p->free_ids);
    mn_free(p->refs);
    mn_free(p);
}

int64_t mn_kv_bytes_per_token(const mn_kv_pool *p) {
    return (int64_t)p->n_layer * 2 * p->n_kv_head * p->head_dim * (int64_t)sizeof(uint16_t);
}

static mn_err seq_grow(mn_kv_seq *seq, int32_t need, mn_errbuf *eb) {
    if (need <= seq->cap) return MN_OK;
    int32_t cap = seq->cap ? seq->cap : 8;
    while (cap < need) cap *= 2;
    int32_t *nb = mn_realloc(seq->blocks, (size_t)cap * sizeof(int32_t));
    if (!nb) return mn_errf(eb, MN_ENOMEM, "kv sequence: out of memory");
    seq->blocks = nb;
    seq->cap = cap;
    return MN_OK;
}

void mn_kv_block_retain(mn_kv_pool *p, int32_t id) { p->refs[id]++; }

void mn_kv_block_release(mn_kv_pool *p, int32_t id) {
    if (--p->refs[id] == 0) p->free_ids[p->n_free++] = id;
}

mn_err mn_kv_seq_attach(mn_kv_pool *p, mn_kv_seq *seq, int32_t id, mn_errbuf *eb) {
    mn_err e = seq_grow(seq, seq->n_blocks + 1, eb);
    if (e != MN_OK) return e;
    mn_kv_block_retain(p, id);
    seq->blocks[seq->n_blocks++] = id;
    return MN_OK;
}

mn_err mn_kv_block_copy(mn_kv_pool *p, int32_t dst, int32_t src, mn_errbuf *eb) {
    uint16_t *base = p->buf->ptr;
    size_t bytes = (size_t)p->block_elems * sizeof(uint16_t);
    int64_t per_kind = (int64_t)p->n_blocks * p->block_elems;
    mn_err e = MN_OK;
    for (int32_t k = 0; k < p->n_layer * 2 && e == MN_OK; k++) {
        uint16_t *kind = base + (int64_t)k * per_kind;
        e = mn_backend_copy_async(p->backend, MN_COPY_D2D, kind + (int64_t)dst * p->block_elems,
                                  kind + (int64_t)src * p->block_elems, bytes, eb);
    }
    if (e == MN_OK) e = mn_backend_synchronize(p->backend, eb);
    return e;
}

mn_err mn_kv_seq_make_writable(mn_kv_pool *p, mn_kv_seq *seq, int32_t pos, mn_errbuf *eb) {
    int32_t bi = pos / p->block_size;
    if (bi >= seq->n_blocks) return MN_OK;
    int32_t old = seq->blocks[bi];
    if (p->refs[old] == 1) return MN_OK;
    if (p->n_free == 0) return mn_errf(eb, MN_ELIMIT, "kv pool full: no free block to copy a shared block (%d blocks)", p->n_blocks);
    int32_t id = p->free_ids[--p->n_free];
    p->refs[id] = 1;
    mn_err e = mn_kv_block_copy(p, id, old, eb);
    if (e != MN_OK) {
        mn_kv_block_release(p, id);
        return e;
    }
    mn_kv_block_release(p, old);
    seq->blocks[bi] = id;
    return MN_OK;
}

void mn_kv_seq_truncate(mn_kv_pool *p, mn_kv_seq *seq, int32_t n) {
    int32_t keep = (n + p->block_size - 1) / p->block_size;
    while (seq->n_blocks > keep) mn_kv_block_release(p, seq->blocks[--seq->n_blocks]);
    if (seq->n_tokens > n) seq->n_tokens = n;
}

mn_err mn_kv_seq_clone(mn_kv_pool *p, const mn_kv_seq *src, mn_kv_seq *dst, mn_errbuf *eb) {
    mn_err e = seq_grow(dst, src->n_blocks, eb);
    if (e != MN_OK) return e;
    for (int32_t i = 0; i < src->n_blocks; i++) {
        mn_kv_block_retain(p, src->blocks[i]);
        dst->blocks[i] = src->blocks[i];
    }
    dst->n_blocks = src->n_blocks;
    dst->n_tokens = src->n_tokens;
    return MN_OK;
}

static int cmp_desc(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x < y) - (x > y);
}

void mn_kv_pool_sort_free(mn_kv_pool *p) {
    /* the free list is a stack popped from the end: descending order hands out ascending ids */
    qsort(p->free_ids, (size_t)p->n_free, sizeof(int32_t), cmp_desc);
}

mn_err mn_kv_seq_reserve(mn_kv_pool *p, mn_kv_seq *seq, int32_t n_tokens, mn_errbuf *eb) {
    int32_t need = (n_tokens + p->block_size - 1) / p->block_size;
    if (need <= seq->n_blocks) return MN_OK;
    int32_t add = need - seq->n_blocks;
    if (add > p->n_free)
        return mn_errf(eb, MN_ELIMIT, "kv pool full: %d more blocks of %d tokens needed, %d of %d free", add,
                       p->block_size, p->n_free, p->n_blocks);
    mn_err e = seq_grow(seq, need, eb);
    if (e != MN_OK) return e;
    for (int32_t i = 0; i < add; i++) {
        int32_t id = p->free_ids[--p->n_free];
        p->refs[id] = 1;
        seq->blocks[seq->n_blocks++] = id;
    }
    return MN_OK;
}

void mn_kv_seq_release(mn_kv_pool *p, mn_kv_seq *seq) {
    for (int32_t i = 0; i < seq->n_blocks; i++) mn_kv_block_release(p, seq->blocks[i]);
    mn_free(seq->blocks);
    memset(seq, 0, sizeof *seq);
}

mn_kv_view mn_kv_pool_view(const mn_kv_pool *p, int32_t layer, const int32_t *indptr, const int32_t *indices) {
    uint16_t *base = p->buf->ptr;
    int64_t per_kind = (int64_t)p->n_blocks * p->block_elems;
    mn_kv_view v = {
        .k = base + (int64_t)layer * 2 * per_kind,
        .v = base + ((int64_t)layer * 2 + 1) * per_kind,
        .block_stride = p->block_elems,
        .block_size = p->block_size,
        .n_kv_head = p->n_kv_head,
        .head_dim = p->head_dim,
        .block_indptr = indptr,
        .block_indices = indices,
    };
    return v;
}
