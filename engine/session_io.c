/* engine/session_io.c — saving, loading, exporting and importing sessions.
 *
 * The file format (engine/session_file.c, docs/session-format.md) stores KV block-major
 * (one block of every layer per chunk); the pool stores it layer-major. Saving gathers
 * a session's blocks into a host image with backend copies (D2H), loading scatters them
 * into freshly reserved blocks (H2D). */
#include <stdio.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/session_file.h"
#include "engine/session_impl.h"
#include "engine/tp.h"

/* Pool address of (block id, layer, K=0/V=1). */
static uint16_t *pool_block(const mn_kv_pool *p, int32_t id, int32_t layer, int kind) {
    int64_t per_kind = (int64_t)p->n_blocks * p->block_elems;
    return (uint16_t *)p->buf->ptr + ((int64_t)layer * 2 + kind) * per_kind + (int64_t)id * p->block_elems;
}

void mn__session_put_block(const mn_kv_pool *p, int32_t id, const uint16_t *kv) {
    for (int32_t l = 0; l < p->n_layer; l++)
        for (int k = 0; k < 2; k++)
            memcpy(pool_block(p, id, l, k), kv + ((size_t)l * 2 + k) * p->block_elems, (size_t)p->block_elems * sizeof(uint16_t));
}

/* Copy a session's blocks between the pool and a block-major image ([block][layer][K|V]),
 * one strided copy per (layer, K|V, run of consecutive pool ids): the pool keeps each
 * (layer, kind) as one array of blocks, so a run is contiguous there, and the image rows
 * of a run are n_layer*2 blocks apart. Layer by layer, so that with layer_done non-NULL
 * an event after each layer lets layer l compute while later layers still copy. */
static mn_err copy_runs(const mn_kv_pool *p, const int32_t *ids, int32_t n_blocks, uint16_t *img, mn_copy_dir dir,
                        mn_event *layer_done, mn_errbuf *eb) {
    size_t blk = (size_t)p->block_elems * sizeof(uint16_t), img_pitch = (size_t)p->n_layer * 2 * blk;
    mn_err err = MN_OK;
    for (int32_t l = 0; l < p->n_layer && err == MN_OK; l++) {
        for (int k = 0; k < 2 && err == MN_OK; k++)
            for (int32_t b0 = 0, n; b0 < n_blocks && err == MN_OK; b0 += n) {
                for (n = 1; b0 + n < n_blocks && ids[b0 + n] == ids[b0] + n;) n++;
                uint16_t *pool = pool_block(p, ids[b0], l, k);
                uint16_t *im = img + ((size_t)b0 * p->n_layer + l) * 2 * p->block_elems + (size_t)k * p->block_elems;
                err = dir == MN_COPY_H2D ? mn_backend_copy_2d_async(p->backend, dir, pool, blk, im, img_pitch, blk, (size_t)n, eb)
                                         : mn_backend_copy_2d_async(p->backend, dir, im, img_pitch, pool, blk, blk, (size_t)n, eb);
            }
        if (err == MN_OK && layer_done) err = mn_backend_event_record(p->backend, &layer_done[l], eb);
    }
    return err;
}

/* ---- tensor parallelism: rank r's pool holds heads [r*hk, (r+1)*hk) of every block ----
 * An image keeps all heads: [block][layer][K|V][slot][kv_head][head_dim]. Each rank's
 * blocks go through a rank-shaped image (copy_runs on its pool) and their heads are
 * interleaved into / out of the full one on the host, one rank at a time, waiting for its
 * copies: no events to track across ranks (the pipelined restore and background copy
 * out fall back to this). */

/* Rows of one rank image: (block, layer, K|V, slot), each hk*head_dim elements. */
static void tp_interleave(uint16_t *full, uint16_t *part, int64_t rows, int32_t hk, int32_t n_heads, int32_t hd, int32_t r,
                          bool to_full) {
    size_t row = (size_t)hk * hd;
    for (int64_t i = 0; i < rows; i++) {
        uint16_t *f = full + (size_t)i * n_heads * hd + (size_t)r * row, *q = part + (size_t)i * row;
        if (to_full) memcpy(f, q, row * sizeof(uint16_t));
        else memcpy(q, f, row * sizeof(uint16_t));
    }
}

static mn_err tp_gather(mn_engine *e, const mn_session *s, uint16_t **kv_out, int32_t *n_blocks_out, mn_buffer **pinned,
                        mn_event *done, mn_errbuf *eb) {
    const mn_kv_pool *p0 = e->kv;
    int32_t n_blocks = (s->n_computed + p0->block_size - 1) / p0->block_size, P = mn_tp_size(e->tp);
    size_t full_n = (n_blocks ? (size_t)n_blocks : 1) * (size_t)mn__image_block_elems(e);
    size_t part_n = (n_blocks ? (size_t)n_blocks : 1) * (size_t)p0->n_layer * 2 * (size_t)p0->block_elems;
    uint16_t *kv = mn_aligned_alloc(64, full_n * sizeof(uint16_t)), *part = mn_aligned_alloc(64, part_n * sizeof(uint16_t));
    mn_err err = kv && part ? MN_OK : mn_errf(eb, MN_ENOMEM, "session %s: out of memory for a %d-block image", s->id, n_blocks);
    int64_t rows = (int64_t)n_blocks * p0->n_layer * 2 * p0->block_size;
    for (int r = 0; r < P && err == MN_OK; r++) {
        const mn_kv_pool *p = mn_tp_rank_kv(e->tp, r);
        err = copy_runs(p, s->seq.blocks, n_blocks, part, MN_COPY_D2H, NULL, eb);
        if (err == MN_OK) err = mn_backend_synchronize(p->backend, eb);
        if (err == MN_OK) tp_interleave(kv, part, rows, p->n_kv_head, mn__engine_kv_heads(e), p->head_dim, r, true);
    }
    mn_free(part);
    if (err != MN_OK) {
        mn_free(kv);
        return err;
    }
    if (pinned) *pinned = NULL; /* pageable: interleaved on the host */
    if (done) *done = (mn_event){0}; /* complete already */
    *kv_out = kv;
    *n_blocks_out = n_blocks;
    return MN_OK;
}

static mn_err tp_scatter(mn_engine *e, mn_session *s, const uint16_t *kv, int32_t n_tokens, mn_errbuf *eb) {
    mn_kv_pool *p0 = e->kv;
    int P = mn_tp_size(e->tp);
    mn_kv_pool_sort_free(p0); /* fresh blocks in ascending runs: few, large copies */
    mn_err err = mn_kv_seq_reserve(p0, &s->seq, n_tokens, eb); /* rank 0's ids serve every rank */
    int32_t n_blocks = (n_tokens + p0->block_size - 1) / p0->block_size;
    size_t part_n = (n_blocks ? (size_t)n_blocks : 1) * (size_t)p0->n_layer * 2 * (size_t)p0->block_elems;
    uint16_t *part = err == MN_OK ? mn_aligned_alloc(64, part_n * sizeof(uint16_t)) : NULL;
    if (err == MN_OK && !part) err = mn_errf(eb, MN_ENOMEM, "session %s: out of memory for a %d-block image", s->id, n_blocks);
    int64_t rows = (int64_t)n_blocks * p0->n_layer * 2 * p0->block_size;
    for (int r = 0; r < P && err == MN_OK; r++) {
        mn_kv_pool *p = mn_tp_rank_kv(e->tp, r);
        tp_interleave((uint16_t *)kv, part, rows, p->n_kv_head, mn__engine_kv_heads(e), p->head_dim, r, false);
        err = copy_runs(p, s->seq.blocks, n_blocks, part, MN_COPY_H2D, NULL, eb);
        if (err == MN_OK) err = mn_backend_synchronize(p->backend, eb);
    }
    mn_free(part);
    if (err != MN_OK) {
        mn_kv_seq_release(p0, &s->seq);
        return err;
    }
    s->seq.n_tokens = n_tokens;
    return MN_OK;
}

mn_err mn__session_gather_kv(mn_engine *e, const mn_session *s, uint16_t **kv_out, int32_t *n_blocks_out, mn_buffer **pinned,
                             mn_event *done, mn_errbuf *eb) {
    if (e->tp) return tp_gather(e, s, kv_out, n_blocks_out, pinned, done, eb);
    const mn_kv_pool *p = e->kv;
    int32_t n_blocks = (s->n_computed + p->block_size - 1) / p->block_size;
    size_t block_all = (size_t)p->n_layer * 2 * (size_t)p->block_elems;
    size_t bytes = (n_blocks ? (size_t)n_blocks : 1) * block_all * sizeof(uint16_t);
    mn_buffer *buf = NULL;
    uint16_t *kv = NULL;
    if (pinned && e->t1_pinned) {
        mn_errbuf ignore; /* over the pinned budget: pageable memory below */
        if (mn_buffer_alloc(p->backend, MN_MEM_HOST_PINNED, bytes, &buf, &ignore) == MN_OK) kv = buf->ptr;
    }
    if (!kv && !(kv = mn_aligned_alloc(64, bytes)))
        return mn_errf(eb, MN_ENOMEM, "session %s: out of memory for a %d-block image", s->id, n_blocks);
    mn_err err = copy_runs(p, s->seq.blocks, n_blocks, kv, MN_COPY_D2H, NULL, eb);
    if (err == MN_OK) err = done ? mn_backend_event_record(p->backend, done, eb) : mn_backend_synchronize(p->backend, eb);
    if (err != MN_OK) {
        if (done) { /* queued copies must not land in freed memory */
            mn_errbuf ignore;
            mn_backend_synchronize(p->backend, &ignore);
        }
        if (buf) mn_buffer_free(buf);
        else mn_free(kv);
        return err;
    }
    if (pinned) *pinned = buf;
    *kv_out = kv;
    *n_blocks_out = n_blocks;
    return MN_OK;
}

void mn__session_fill_image(const mn_engine *e, const mn_session *s, const uint16_t *kv, int32_t n_blocks,
                            mn_session_image *img) {
    const mn_kv_pool *p = e->kv;
    memset(img, 0, sizeof *img);
    memcpy(img->model_fp, e->m->fingerprint, 16);
    memcpy(img->adapter_fp, s->adapter_fp, 16);
    img->n_layer = p->n_layer;
    img->n_kv_head = mn__engine_kv_heads(e);
    img->head_dim = p->head_dim;
    img->block_size = p->block_size;
    img->n_tokens = s->n_computed;
    img->tokens = s->tokens;
    img->roles = s->roles;
    img->n_blocks = n_blocks;
    img->kv = kv;
}

static mn_err build_image(mn_engine *e, mn_session *s, mn_session_image *img, uint16_t **kv_out, mn_errbuf *eb) {
    if (s->gen) return mn_errf(eb, MN_EBUSY, "session %s is generating", s->id);
    mn_err err = mn__tier_ensure_resident(e, s, eb);
    if (err == MN_OK) err = mn__session_run_until_done(e, s, eb); /* pending tokens get their KV first */
    int32_t n_blocks = 0;
    if (err == MN_OK) err = mn__session_gather_kv(e, s, kv_out, &n_blocks, NULL, NULL, eb);
    if (err != MN_OK) return err;
    mn__session_fill_image(e, s, *kv_out, n_blocks, img);
    return MN_OK;
}

mn_err mn__session_scatter_kv(mn_engine *e, mn_session *s, const uint16_t *kv, int32_t n_tokens, mn_event *layer_done,
                              mn_errbuf *eb) {
    if (e->tp) return tp_scatter(e, s, kv, n_tokens, eb);
    mn_kv_pool *p = e->kv;
    mn_kv_pool_sort_free(p); /* fresh blocks in ascending runs: few, large copies */
    mn_err err = mn_kv_seq_reserve(p, &s->seq, n_tokens, eb);
    int32_t n_blocks = (n_tokens + p->block_size - 1) / p->block_size;
    if (err == MN_OK) err = copy_runs(p, s->seq.blocks, n_blocks, (uint16_t *)kv, MN_COPY_H2D, layer_done, eb);
    if (err == MN_OK && !layer_done) err = mn_backend_synchronize(p->backend, eb);
    if (err != MN_OK) {
        if (layer_done) { /* some copies may be queued: they must not land in reused blocks */
            mn_errbuf ignore;
            mn_backend_synchronize(p->backend, &ignore);
        }
        mn_kv_seq_release(p, &s->seq);
        return err;
    }
    s->seq.n_tokens = n_tokens;
    return MN_OK;
}

mn_err mn_session_save(mn_engine *e, mn_session *s, const char *path, mn_errbuf *eb) {
    mn_session_image img;
    uint16_t *kv;
    mn_err err = build_image(e, s, &img, &kv, eb);
    if (err != MN_OK) return err;
    err = mn_session_write_file(path, &img, eb);
    mn_free(kv);
    return err;
}

mn_err mn_session_export(mn_engine *e, mn_session *s, uint8_t **out, size_t *len, mn_errbuf *eb) {
    mn_session_image img;
    uint16_t *kv;
    mn_err err = build_image(e, s, &img, &kv, eb);
    if (err != MN_OK) return err;
    err = mn_session_write_mem(&img, out, len, eb);
    mn_free(kv);
    return err;
}

mn_err mn__session_check_geometry(const mn_engine *e, const mn_session_image *img, mn_errbuf *eb) {
    const mn_kv_pool *p = e->kv;
    if (img->n_layer != p->n_layer || img->n_kv_head != mn__engine_kv_heads(e) || img->head_dim != p->head_dim ||
        img->block_size != p->block_size)
        return mn_errf(eb, MN_EMISMATCH, "session KV geometry (layers %d, kv heads %d, head dim %d, block %d) does not match "
                       "this engine (%d, %d, %d, %d)", img->n_layer, img->n_kv_head, img->head_dim, img->block_size,
                       p->n_layer, mn__engine_kv_heads(e), p->head_dim, p->block_size);
    return MN_OK;
}

/* Checks beyond the file's own: the adapter, this engine's KV geometry and vocabulary. */
mn_err mn__session_check_image(const mn_engine *e, const mn_session_loaded *ld, const mn_lora **lora, mn_errbuf *eb) {
    const mn_session_image *img = &ld->img;
    static const uint8_t no_adapter[16] = {0};
    *lora = NULL;
    if (memcmp(img->adapter_fp, no_adapter, 16) != 0) {
        /* KV made under an adapter is only valid under that exact content (not a name) */
        if (!(*lora = mn__engine_find_adapter(e, img->adapter_fp))) {
            char hex[33];
            for (int i = 0; i < 16; i++) snprintf(hex + 2 * i, 3, "%02x", img->adapter_fp[i]);
            return mn_errf(eb, MN_EMISMATCH, "session was made under an adapter (fingerprint %s) that is not loaded "
                           "(an adapter reloaded with other weights has another fingerprint)", hex);
        }
    }
    mn_err err = mn__session_check_geometry(e, img, eb);
    if (err != MN_OK) return err;
    if (img->n_tokens > e->m->cfg.n_ctx)
        return mn_errf(eb, MN_ELIMIT, "session has %d tokens, more than the context length %d", img->n_tokens, e->m->cfg.n_ctx);
    for (int32_t i = 0; i < img->n_tokens; i++)
        if (img->tokens[i] >= e->m->cfg.n_vocab)
            return mn_errf(eb, MN_EFORMAT, "session token %d is %d, not in [0, %d)", i, img->tokens[i], e->m->cfg.n_vocab);
    return MN_OK;
}

/* Turn a validated image into a session of e. */
static mn_err restore(mn_engine *e, mn_session_loaded *ld, mn_session **out, mn_errbuf *eb) {
    const mn_session_image *img = &ld->img;
    mn_kv_pool *p = e->kv;
    const mn_lora *lora;
    mn_err err = mn__session_check_image(e, ld, &lora, eb);
    if (err != MN_OK) return err;
    mn_session *s;
    if ((err = mn__session_new(e, &s, eb)) != MN_OK) return err;
    mn__session_bind_adapter(s, lora);
    err = mn__session_add_tokens(s, img->tokens, img->n_tokens, MN_ROLE_NONE, eb);
    if (err == MN_OK && img->n_tokens) memcpy(s->roles, img->roles, (size_t)img->n_tokens);
    if (err == MN_OK) err = mn__tier_make_room(e, (img->n_tokens + p->block_size - 1) / p->block_size, s, eb);
    if (err == MN_OK) err = mn__session_scatter_kv(e, s, img->kv, img->n_tokens, NULL, eb);
    if (err != MN_OK) {
        mn_session_delete(e, s);
        return err;
    }
    s->seq.n_tokens = img->n_tokens;
    s->n_computed = img->n_tokens;
    s->logits_valid = false; /* the next generate recomputes the last token from the restored KV */
    *out = s;
    return MN_OK;
}

mn_err mn_session_load(mn_engine *e, const char *path, mn_session **out, mn_errbuf *eb) {
    mn_session_loaded *ld;
    mn_err err = mn_session_read_file(path, e->m->fingerprint, &ld, eb);
    if (err != MN_OK) return err;
    err = restore(e, ld, out, eb);
    mn_session_loaded_free(ld);
    return err;
}

mn_err mn_session_import(mn_engine *e, const void *data, size_t len, mn_session **out, mn_errbuf *eb) {
    mn_session_loaded *ld;
    mn_err err = mn_session_read_mem(data, len, e->m->fingerprint, &ld, eb);
    if (err != MN_OK) return err;
    err = restore(e, ld, out, eb);
    mn_session_loaded_free(ld);
    return err;
}
