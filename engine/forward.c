/* engine/forward.c — plan and run one batch through the model. */
#include "engine/forward.h"

#include <assert.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "engine/alloc.h"

/* one adapter used by the batch: its rows are lora_rows[start .. start + n) */
typedef struct lora_use {
    const mn_lora *l;
    int32_t start, n;
} lora_use;

struct mn_forward {
    const mn_model *m;
    mn_kv_pool *kv;
    mn_backend *be;
    int32_t cap_tokens, cap_out;
    mn_buffer *act;      /* activations for cap_tokens rows */
    mn_buffer *meta;     /* token ids, seq, pos, block tables */
    mn_buffer *logits;   /* [cap_out][n_vocab] */
    /* sampling on the backend (mn_batch_sample), for up to cap_samp rows: the op's
     * parameters [cap_samp], then its outputs for this run's n rows, packed so that one
     * copy brings them back: token [n] | logprob [n] | top_id [n][M] | top_logprob [n][M]
     * (M = MN_SAMPLE_MAX_TOP; without logprobs only token [n] is copied). host_samp is
     * the host side of that copy. */
    mn_buffer *samp;
    char *host_samp;
    int32_t cap_samp;
    int32_t *host_meta;  /* staging for meta */
    mn_op *ops;
    int cap_ops;
    /* LoRA plan of the current batch, staged in host memory: adapted rows grouped by
     * adapter, the used adapters' ranges, one segment per (layer, linear group, adapter).
     * The ops read the copy in lora_dev (segments, then rows), uploaded with the batch's
     * metadata: device memory on CUDA, a host copy on the CPU backend. */
    int32_t *lora_rows, cap_lora_rows;
    lora_use *lora_act;
    int32_t cap_lora_act;
    mn_lora_seg *lora_segs;
    int32_t cap_lora_segs;
    mn_buffer *lora_dev;
    /* Tensor parallelism: this rank's share of the heads and of the ffn (the model's own
     * sizes when tp == 1), its weight slices, and where the op list stops for an
     * all-reduce of the partial sums of O and down (cuts[i]: ops before it run first). */
    mn_comm *comm;
    int32_t tp, rank;
    int32_t n_head, n_kv_head, n_ff;
    mn_layer *shard;     /* [n_layer] views into m->layers' weights; NULL when tp == 1 */
    int *cuts;           /* [2 * n_layer] */
    size_t *cut_n;       /* [2 * n_layer] floats all-reduced at each cut (partial sums, then lora v) */
    /* This rank's feature ranges in the full q, kv and ffn widths (LoRA views of A and B) */
    int64_t q0, kv0, f0;
    /* tp > 1: what is all-reduced, one contiguous range: [T][E] partial sums of O / down,
     * then the partial LoRA shrink of the same linear (mn_lora_v_floats of its segments) */
    mn_buffer *red;
    size_t cap_red;      /* floats */
    /* mn_forward_wait_layers: [n_layer] copy events the next run's layers wait for */
    mn_event *layer_ready;
};

/* activation row widths, in floats (this rank's share of q, k, v, gate, up) */
static int64_t act_floats_per_token(const mn_forward *f) {
    const mn_model_config *c = &f->m->cfg;
    int64_t E = c->n_embd, Q = (int64_t)f->n_head * c->head_dim, KV = (int64_t)f->n_kv_head * c->head_dim;
    /* x xn q att k v gate up xo (with tp > 1 the partial sums of O / down are in f->red) */
    return 2 * E + 2 * Q + 2 * KV + 2 * (int64_t)f->n_ff + E;
}

/* Rows [n0, n1) of w (output features): a pointer into the same bytes. */
static mn_weight rows_of(const mn_weight *w, int64_t n0, int64_t n1) {
    mn_weight s = *w;
    s.data = (const char *)w->data + n0 * w->row_bytes;
    s.N = n1 - n0;
    return s;
}

/* Columns [k0, k1) of w (input features), both on block boundaries: the same rows, each
 * starting k0 elements in. The matmul contract addresses row n at w + n*w_row_bytes and
 * reads K elements from there, so a narrower K under the full row stride is a valid
 * operand: no repacking, the slice stays in the mmapped file (or the device copy). */
static mn_weight cols_of(const mn_weight *w, int64_t k0, int64_t k1) {
    mn_weight s = *w;
    s.data = (const char *)w->data + k0 / mn_dtype_block_elems(w->type) * mn_dtype_block_bytes(w->type);
    s.K = k1 - k0;
    return s;
}

/* This rank's views of every layer: column-parallel q, k, v, gate, up (whole heads, a
 * block-aligned range of ffn features), row-parallel o and down over the same ranges. */
static mn_err make_shard(mn_forward *f, mn_errbuf *eb) {
    const mn_model *m = f->m;
    const mn_model_config *c = &m->cfg;
    const int32_t P = f->tp, r = f->rank, hd = c->head_dim;
    /* the ffn is split in whole blocks of the coarsest w_down type */
    int64_t g = 1;
    for (int32_t l = 0; l < c->n_layer; l++)
        if (mn_dtype_block_elems(m->layers[l].w_down.type) > g) g = mn_dtype_block_elems(m->layers[l].w_down.type);
    int64_t nb = c->n_ff / g;
    if (c->n_ff % g != 0 || nb < P)
        return mn_errf(eb, MN_EINVALID,
                       "tensor parallel size %d: n_ff %d cannot be split into %d parts of whole %lld-element blocks",
                       P, c->n_ff, P, (long long)g);
    const int64_t f0 = nb * r / P * g, f1 = nb * (r + 1) / P * g;
    const int64_t q0 = (int64_t)r * f->n_head * hd, q1 = q0 + (int64_t)f->n_head * hd;
    const int64_t kv0 = (int64_t)r * f->n_kv_head * hd, kv1 = kv0 + (int64_t)f->n_kv_head * hd;
    f->n_ff = (int32_t)(f1 - f0);
    f->q0 = q0;
    f->kv0 = kv0;
    f->f0 = f0;
    f->shard = mn_calloc((size_t)c->n_layer, sizeof *f->shard);
    if (!f->shard) return mn_errf(eb, MN_ENOMEM, "forward: out of memory");
    for (int32_t l = 0; l < c->n_layer; l++) {
        const mn_layer *L = &m->layers[l];
        mn_layer *S = &f->shard[l];
        int64_t bo = mn_dtype_block_elems(L->wo.type);
        if (q0 % bo != 0 || q1 % bo != 0)
            return mn_errf(eb, MN_EINVALID,
                           "tensor parallel size %d: layer %d attn_output (%s, %lld-element blocks) "
                           "cannot be split at head boundaries (%lld columns per rank)",
                           P, l, mn_dtype_name(L->wo.type), (long long)bo, (long long)(q1 - q0));
        *S = *L;
        S->wq = rows_of(&L->wq, q0, q1);
        S->wk = rows_of(&L->wk, kv0, kv1);
        S->wv = rows_of(&L->wv, kv0, kv1);
        S->bq = L->bq ? L->bq + q0 : NULL;
        S->bk = L->bk ? L->bk + kv0 : NULL;
        S->bv = L->bv ? L->bv + kv0 : NULL;
        S->wo = cols_of(&L->wo, q0, q1);
        S->w_gate = rows_of(&L->w_gate, f0, f1);
        S->w_up = rows_of(&L->w_up, f0, f1);
        S->w_down = cols_of(&L->w_down, f0, f1);
    }
    return MN_OK;
}

mn_err mn_forward_new(const mn_model *m, mn_kv_pool *kv, mn_forward **out, mn_errbuf *eb) {
    return mn_forward_new_tp(m, kv, NULL, out, eb);
}

mn_err mn_forward_new_tp(const mn_model *m, mn_kv_pool *kv, mn_comm *comm, mn_forward **out, mn_errbuf *eb) {
    const mn_model_config *c = &m->cfg;
    const int32_t P = comm ? mn_comm_size(comm) : 1;
    if (c->n_head % P != 0 || c->n_kv_head % P != 0)
        return mn_errf(eb, MN_EINVALID,
                       "tensor parallel size %d does not divide the model's heads (n_head %d, n_kv_head %d): "
                       "every rank takes whole query and kv heads", P, c->n_head, c->n_kv_head);
    const int32_t n_kv = c->n_kv_head / P;
    if (kv->n_layer != c->n_layer || kv->n_kv_head != n_kv || kv->head_dim != c->head_dim)
        return mn_errf(eb, MN_EMISMATCH,
                       "kv pool shape (%d layers, %d kv heads, dim %d) does not match the model (%d, %d, %d)%s",
                       kv->n_layer, kv->n_kv_head, kv->head_dim, c->n_layer, n_kv, c->head_dim,
                       P > 1 ? " (kv heads of this rank)" : "");
    mn_forward *f = mn_calloc(1, sizeof *f);
    if (!f) return mn_errf(eb, MN_ENOMEM, "forward: out of memory");
    f->m = m;
    f->kv = kv;
    f->be = m->backend;
    f->tp = P;
    f->rank = comm ? mn_comm_rank(comm) : 0;
    f->comm = P > 1 ? comm : NULL;
    f->n_head = c->n_head / P;
    f->n_kv_head = n_kv;
    f->n_ff = c->n_ff;
    if (P > 1) {
        mn_err e = make_shard(f, eb);
        if (e == MN_OK && (!(f->cuts = mn_malloc((size_t)c->n_layer * 2 * sizeof *f->cuts)) ||
                           !(f->cut_n = mn_malloc((size_t)c->n_layer * 2 * sizeof *f->cut_n))))
            e = mn_errf(eb, MN_ENOMEM, "forward: out of memory");
        if (e != MN_OK) { mn_forward_free(f); return e; }
    }
    *out = f;
    return MN_OK;
}

void mn_forward_free(mn_forward *f) {
    if (!f) return;
    mn_buffer_free(f->act);
    mn_buffer_free(f->meta);
    mn_buffer_free(f->logits);
    mn_buffer_free(f->samp);
    mn_free(f->host_samp);
    mn_free(f->host_meta);
    mn_free(f->ops);
    mn_free(f->layer_ready);
    mn_free(f->lora_rows);
    mn_free(f->lora_act);
    mn_free(f->lora_segs);
    mn_buffer_free(f->lora_dev);
    mn_buffer_free(f->red);
    mn_free(f->shard);
    mn_free(f->cuts);
    mn_free(f->cut_n);
    mn_free(f);
}

static int32_t grow(int32_t have, int32_t need) {
    int32_t c = have ? have : 16;
    while (c < need) c *= 2;
    return c;
}

/* Make every buffer big enough for this batch (outside the layer loop). */
static mn_err ensure_capacity(mn_forward *f, int32_t T, int32_t n_out, int32_t n_seqs, int32_t n_blocks, mn_errbuf *eb) {
    const mn_model_config *c = &f->m->cfg;
    mn_err e;
    if (T > f->cap_tokens) {
        int32_t cap = grow(f->cap_tokens, T);
        mn_buffer *nb;
        if ((e = mn_buffer_alloc(f->be, MN_MEM_DEVICE, (size_t)cap * act_floats_per_token(f) * sizeof(float), &nb, eb))) return e;
        mn_buffer_free(f->act);
        f->act = nb;
        f->cap_tokens = cap;
    }
    if (n_out > f->cap_out) {
        int32_t cap = grow(f->cap_out, n_out);
        mn_buffer *nb;
        if ((e = mn_buffer_alloc(f->be, MN_MEM_DEVICE, (size_t)cap * c->n_vocab * sizeof(float), &nb, eb))) return e;
        mn_buffer_free(f->logits);
        f->logits = nb;
        f->cap_out = cap;
    }
    size_t meta_need = (size_t)3 * f->cap_tokens + (size_t)n_seqs + 1 + (size_t)n_blocks;
    if (!f->meta || f->meta->size < meta_need * sizeof(int32_t)) {
        size_t n = meta_need + meta_need / 2 + 64;
        mn_buffer *nb;
        if ((e = mn_buffer_alloc(f->be, MN_MEM_DEVICE, n * sizeof(int32_t), &nb, eb))) return e;
        int32_t *hm = mn_malloc(n * sizeof(int32_t));
        if (!hm) { mn_buffer_free(nb); return mn_errf(eb, MN_ENOMEM, "forward: out of memory"); }
        mn_buffer_free(f->meta);
        mn_free(f->host_meta);
        f->meta = nb;
        f->host_meta = hm;
    }
    /* + up to 6 lora ops (o and down split in two with tp > 1), 2 tp adds and a copy wait per layer */
    int need_ops = 1 + c->n_layer * (14 + 6 + 2 + 1) + n_out + 2;  /* + output head, sample */
    if (need_ops > f->cap_ops) {
        mn_op *no = mn_realloc(f->ops, (size_t)need_ops * sizeof(mn_op));
        if (!no) return mn_errf(eb, MN_ENOMEM, "forward: out of memory");
        f->ops = no;
        f->cap_ops = need_ops;
    }
    return MN_OK;
}

/* bytes of one row's sample outputs: token, logprob, top ids, top logprobs */
#define SAMP_OUT_BYTES (2 * sizeof(int32_t) + MN_SAMPLE_MAX_TOP * (sizeof(int32_t) + sizeof(float)))

/* Room for n sampled rows (outside the layer loop, like ensure_capacity). */
static mn_err ensure_sample(mn_forward *f, int32_t n, mn_errbuf *eb) {
    if (n <= f->cap_samp) return MN_OK;
    int32_t cap = grow(f->cap_samp, n);
    size_t out_bytes = (size_t)cap * SAMP_OUT_BYTES;
    mn_buffer *nb;
    mn_err e = mn_buffer_alloc(f->be, MN_MEM_DEVICE, (size_t)cap * sizeof(mn_sample_params) + out_bytes, &nb, eb);
    if (e != MN_OK) return e;
    char *hs = mn_malloc(out_bytes);
    if (!hs) { mn_buffer_free(nb); return mn_errf(eb, MN_ENOMEM, "forward: out of memory"); }
    mn_buffer_free(f->samp);
    mn_free(f->host_samp);
    f->samp = nb;
    f->host_samp = hs;
    f->cap_samp = cap;
    return MN_OK;
}

static mn_err validate_sample(const mn_batch *b, const mn_batch_sample *sp, mn_errbuf *eb) {
    if (!sp) return MN_OK;
    if (sp->n_sample < 0 || sp->n_sample > b->n_out)
        return mn_errf(eb, MN_EINVALID, "batch: n_sample %d not in [0, %d] (n_out)", sp->n_sample, b->n_out);
    if (sp->n_sample > 0 && (!sp->params || !sp->token))
        return mn_errf(eb, MN_EINVALID, "batch: n_sample %d with NULL params or token", sp->n_sample);
    if (sp->logprob && (!sp->top_id || !sp->top_logprob))
        return mn_errf(eb, MN_EINVALID, "batch: sample logprob without top_id / top_logprob");
    for (int32_t i = 0; i < sp->n_sample; i++) {
        const mn_sample_params *p = &sp->params[i];
        if (p->n_logprobs < 0 || p->n_logprobs > MN_SAMPLE_MAX_TOP)
            return mn_errf(eb, MN_ERANGE, "batch: sample row %d: n_logprobs %d not in [0, %d]", i, p->n_logprobs,
                           MN_SAMPLE_MAX_TOP);
        if (p->n_logprobs > 0 && !sp->logprob)
            return mn_errf(eb, MN_EINVALID, "batch: sample row %d asks for %d logprobs, logprob is NULL", i,
                           p->n_logprobs);
        if (!(p->u >= 0.0 && p->u < 1.0))
            return mn_errf(eb, MN_ERANGE, "batch: sample row %d: u %g not in [0, 1)", i, p->u);
    }
    return MN_OK;
}

static mn_err validate(const mn_forward *f, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b, const mn_batch_lora *lb,
                       mn_errbuf *eb) {
    const mn_model_config *c = &f->m->cfg;
    if (b->n_tokens < 1) return mn_errf(eb, MN_EINVALID, "batch: n_tokens must be >= 1, got %d", b->n_tokens);
    if (n_seqs < 1) return mn_errf(eb, MN_EINVALID, "batch: no sequences");
    if (b->n_out < 0 || b->n_out > b->n_tokens) return mn_errf(eb, MN_EINVALID, "batch: n_out %d not in [0, %d]", b->n_out, b->n_tokens);
    int32_t *end = mn_malloc((size_t)n_seqs * sizeof(int32_t));
    if (!end) return mn_errf(eb, MN_ENOMEM, "forward: out of memory");
    for (int32_t s = 0; s < n_seqs; s++) end[s] = seqs[s]->n_tokens;
    mn_err e = MN_OK;
    for (int32_t i = 0; i < b->n_tokens && e == MN_OK; i++) {
        int32_t t = b->tokens[i], s = b->seq[i], p = b->pos[i];
        if (t < 0 || t >= c->n_vocab) e = mn_errf(eb, MN_ERANGE, "batch row %d: token id %d not in [0, %d)", i, t, c->n_vocab);
        else if (s < 0 || s >= n_seqs) e = mn_errf(eb, MN_ERANGE, "batch row %d: sequence %d not in [0, %d)", i, s, n_seqs);
        else if (p < 0 || p >= c->n_ctx) e = mn_errf(eb, MN_ERANGE, "batch row %d: position %d not in [0, %d) (context length)", i, p, c->n_ctx);
        else if (p > end[s]) e = mn_errf(eb, MN_EINVALID, "batch row %d: position %d leaves a gap (sequence %d has %d positions)", i, p, s, end[s]);
        else if (p == end[s]) end[s]++;
    }
    /* the CPU backend reads host memory: host copies and any registry's views will do */
    const bool host_mem = strcmp(mn_backend_name(f->be), "cpu") == 0;
    for (int32_t i = 0; lb && lb->adapter && i < b->n_tokens && e == MN_OK; i++) {
        int32_t a = lb->adapter[i];
        if (a < -1 || a >= lb->n_adapters)
            e = mn_errf(eb, MN_ERANGE, "batch row %d: adapter %d not in [-1, %d)", i, a, lb->n_adapters);
        else if (a >= 0 && !lb->adapters[a])
            e = mn_errf(eb, MN_EINVALID, "batch row %d: adapter %d is not loaded", i, a);
        else if (a >= 0 && !host_mem && lb->adapters[a]->backend != f->be)
            e = mn_errf(eb, MN_EINVALID,
                        "batch row %d: adapter %d ('%.128s') is not in the %s backend's memory: on this backend "
                        "adapters come from a registry attached to it (mn_lora_registry_set_budget)",
                        i, a, lb->adapters[a]->name, mn_backend_name(f->be));
        else if (a >= 0 && (e = mn_lora_check_model(lb->adapters[a], f->m, eb)) != MN_OK && eb) {
            char why[sizeof eb->msg];
            memcpy(why, eb->msg, sizeof why);
            mn_errf(eb, e, "batch row %d: adapter %d: %.400s", i, a, why);
        }
    }
    for (int32_t i = 0; i < b->n_out && e == MN_OK; i++)
        if (b->out_rows[i] < 0 || b->out_rows[i] >= b->n_tokens)
            e = mn_errf(eb, MN_ERANGE, "batch: out_rows[%d] = %d not in [0, %d)", i, b->out_rows[i], b->n_tokens);
    mn_free(end);
    return e;
}

static mn_matmul_desc mm(const mn_weight *w, const float *x, int64_t xs, float *y, int64_t ys, int64_t T, const float *bias, int acc) {
    mn_matmul_desc d = {.T = T, .N = w->N, .K = w->K, .x = x, .x_stride = xs, .w = w->data, .w_type = w->type,
                        .w_row_bytes = w->row_bytes, .bias = bias, .y = y, .y_stride = ys, .accumulate = acc};
    return d;
}

/* Group the adapted rows by adapter (batch order within one adapter), so each linear gets
 * one lora op whose segments are the used adapters. Sets *n_act (0: no lora ops). */
static mn_err plan_lora(mn_forward *f, const mn_batch *b, const mn_batch_lora *lb, int32_t *n_act, mn_errbuf *eb) {
    *n_act = 0;
    if (!lb || !lb->adapter || lb->n_adapters <= 0) return MN_OK;
    const int32_t T = b->n_tokens, nA = lb->n_adapters;
    if (T > f->cap_lora_rows) {
        int32_t *nr = mn_realloc(f->lora_rows, (size_t)T * sizeof *nr);
        if (!nr) return mn_errf(eb, MN_ENOMEM, "forward: out of memory");
        f->lora_rows = nr;
        f->cap_lora_rows = T;
    }
    if (nA > f->cap_lora_act) {
        lora_use *na = mn_realloc(f->lora_act, (size_t)nA * sizeof *na);
        if (!na) return mn_errf(eb, MN_ENOMEM, "forward: out of memory");
        f->lora_act = na;
        f->cap_lora_act = nA;
    }
    /* counting sort: lora_act[a].n counts, then prefix sums give starts */
    lora_use *use = f->lora_act;
    for (int32_t a = 0; a < nA; a++) use[a] = (lora_use){lb->adapters[a], 0, 0};
    for (int32_t i = 0; i < T; i++)
        if (lb->adapter[i] >= 0) use[lb->adapter[i]].n++;
    int32_t at = 0;
    for (int32_t a = 0; a < nA; a++) {
        use[a].start = at;
        at += use[a].n;
        use[a].n = 0;
    }
    for (int32_t i = 0; i < T; i++)
        if (lb->adapter[i] >= 0) f->lora_rows[use[lb->adapter[i]].start + use[lb->adapter[i]].n++] = i;
    /* keep only the used adapters, in index order */
    int32_t k = 0;
    for (int32_t a = 0; a < nA; a++)
        if (use[a].n) use[k++] = use[a];
    int32_t need = f->m->cfg.n_layer * 4 * k;
    if (need > f->cap_lora_segs) {
        mn_lora_seg *ns = mn_realloc(f->lora_segs, (size_t)need * sizeof *ns);
        if (!ns) return mn_errf(eb, MN_ENOMEM, "forward: out of memory");
        f->lora_segs = ns;
        f->cap_lora_segs = need;
    }
    /* the ops' copy of segments and rows: segments first (they hold pointers) */
    size_t dev_need = (size_t)f->cap_lora_segs * sizeof(mn_lora_seg) + (size_t)f->cap_lora_rows * sizeof(int32_t);
    if (!f->lora_dev || f->lora_dev->size < dev_need) {
        mn_buffer *nb;
        mn_err e = mn_buffer_alloc(f->be, MN_MEM_DEVICE, dev_need, &nb, eb);
        if (e != MN_OK) return e;
        mn_buffer_free(f->lora_dev);
        f->lora_dev = nb;
    }
    *n_act = k;
    return MN_OK;
}

/* tp > 1: room in f->red for the partial sums of T rows and, after them, the largest
 * partial LoRA shrink of O or down (each used adapter's rows times its widest rank: a
 * bound on mn_lora_v_floats of any one linear's segments). */
static mn_err ensure_red(mn_forward *f, int32_t T, int32_t n_act, mn_errbuf *eb) {
    size_t need = (size_t)T * f->m->cfg.n_embd;
    for (int32_t u = 0; u < n_act; u++) need += (size_t)f->lora_act[u].n * (size_t)f->lora_act[u].l->r_max;
    if (need <= f->cap_red) return MN_OK;
    size_t cap = need + need / 2;
    mn_buffer *nb;
    mn_err e = mn_buffer_alloc(f->be, MN_MEM_DEVICE, cap * sizeof(float), &nb, eb);
    if (e != MN_OK) return e;
    mn_buffer_free(f->red);
    f->red = nb;
    f->cap_red = cap;
    return MN_OK;
}

/* The linears that share an input, in the order their A's are stored (engine/lora.h). */
static const int lora_groups[4][MN_LORA_MAX_OUT] = {
    {MN_LORA_Q, MN_LORA_K, MN_LORA_V}, {MN_LORA_O, -1, -1}, {MN_LORA_GATE, MN_LORA_UP, -1}, {MN_LORA_DOWN, -1, -1}};

/* The lora op of group g of layer l over this rank's share, if any used adapter adapts
 * the group: x [T][K] (stride xs) is its input, y[o] its outputs of N[o] features each.
 * Views for tensor parallelism (kernels/ops.h, a_ld / b_ld), nothing copied:
 *   column-parallel (q, k, v; gate, up): x is replicated, so every rank does the whole
 *     shrink with all of A; the expand takes the columns of B^T ([r, out]) of this rank's
 *     output features: b + n0, row stride the full width;
 *   row-parallel (o, down): x holds this rank's input features [k0, k0 + K), so the shrink
 *     reads those columns of A ([r, in]): a + k0, row stride the full width, giving a
 *     partial v that the caller sums over ranks before the expand (with all of B^T).
 * Segments go to f->lora_segs[*n_segs ..); d points at the ops' copy of them (lora_dev).
 * Returns 0 when no used adapter adapts the group (no op). */
static int lora_desc(mn_forward *f, int32_t n_act, int32_t l, int g, const float *x, int64_t K, int64_t xs,
                     float *const y[MN_LORA_MAX_OUT], const int64_t N[MN_LORA_MAX_OUT], mn_lora_desc *d, int32_t *n_segs) {
    const mn_model_config *c = &f->m->cfg;
    const int64_t Qf = (int64_t)c->n_head * c->head_dim, KVf = (int64_t)c->n_kv_head * c->head_dim, Ff = c->n_ff;
    /* full input width of A, this rank's first input feature, and per output the full
     * width of B^T and this rank's first output feature */
    static const int col[4] = {1, 0, 1, 0};
    const int64_t in_full = g == 1 ? Qf : g == 3 ? Ff : c->n_embd;
    const int64_t k0 = f->tp == 1 || col[g] ? 0 : g == 1 ? f->q0 : f->f0;
    int64_t out_full[MN_LORA_MAX_OUT] = {0}, n0[MN_LORA_MAX_OUT] = {0};
    for (int o = 0; o < MN_LORA_MAX_OUT && lora_groups[g][o] >= 0; o++) {
        switch (lora_groups[g][o]) {
        case MN_LORA_Q: out_full[o] = Qf; n0[o] = f->q0; break;
        case MN_LORA_K: case MN_LORA_V: out_full[o] = KVf; n0[o] = f->kv0; break;
        case MN_LORA_GATE: case MN_LORA_UP: out_full[o] = Ff; n0[o] = f->f0; break;
        default: out_full[o] = c->n_embd; n0[o] = 0; break;
        }
        if (f->tp == 1) n0[o] = 0;
    }
    mn_lora_seg *segs = f->lora_segs + *n_segs;
    int32_t ns = 0, max_rows = 0, max_r = 0;
    int n_out = 0;
    while (n_out < MN_LORA_MAX_OUT && lora_groups[g][n_out] >= 0) n_out++;
    for (int32_t u = 0; u < n_act; u++) {
        const lora_use *use = &f->lora_act[u];
        mn_lora_seg s = {.start = use->start, .n_rows = use->n, .type = use->l->wtype};
        const int64_t esz = use->l->wtype == MN_F32 ? 4 : 2;
        const char *a_full = NULL;
        for (int o = 0; o < n_out; o++) {
            const mn_lora_mat *mt = &use->l->layers[l].t[lora_groups[g][o]];
            if (!mt->r) continue;
            if (!a_full) a_full = mt->a;
            /* A's of a group are adjacent rows */
            assert((const char *)mt->a == a_full + (int64_t)s.r * in_full * esz);
            s.b[o] = (const char *)mt->b + n0[o] * esz;
            s.r_off[o] = s.r;
            s.r_out[o] = mt->r;
            s.scale[o] = mt->scale;
            s.r += mt->r;
        }
        if (!s.r) continue;
        s.a = a_full + k0 * esz;
        if (s.n_rows > max_rows) max_rows = s.n_rows;
        if (s.r > max_r) max_r = s.r;
        segs[ns++] = s;
    }
    if (!ns) return 0;
    mn_lora_seg *dev_segs = f->lora_dev->ptr;
    const int32_t *dev_rows = (const int32_t *)(dev_segs + f->cap_lora_segs);
    *d = (mn_lora_desc){.K = K, .x = x, .x_stride = xs, .n_out = n_out, .n_seg = ns, .seg = dev_segs + *n_segs,
                        .rows = dev_rows, .max_rows = max_rows, .max_r = max_r, .a_ld = in_full};
    for (int o = 0; o < n_out; o++) {
        d->N[o] = N[o];
        d->y[o] = y[o];
        d->y_stride[o] = N[o];
        d->b_ld[o] = out_full[o];
    }
    *n_segs += ns;
    return 1;
}

/* Column-parallel (or tp == 1) lora op of group g: append it to ops. */
static int emit_lora(mn_forward *f, int32_t n_act, int32_t l, int g, const float *x, int64_t K, int64_t xs,
                     float *const y[MN_LORA_MAX_OUT], const int64_t N[MN_LORA_MAX_OUT], mn_op *op, int32_t *n_segs) {
    mn_lora_desc d;
    if (!lora_desc(f, n_act, l, g, x, K, xs, y, N, &d, n_segs)) return 0;
    *op = (mn_op){MN_OP_LORA, .u.lora = d};
    return 1;
}

/* The rest of a row-parallel linear (o: g = 1, down: g = 3) after its matmul wrote this
 * rank's partial sum into part: the partial lora shrink of this rank's input features
 * into lv (right after part), one cut that all-reduces both at once, the residual add,
 * then the lora expand from the summed v into x.
 * The expand runs on every rank after the all-reduce, not on one rank before it: every
 * rank then holds the same x and the same v, so each computes the same bits with no
 * further collective; the term is added after the linear exactly as with tp == 1
 * (x + W x, then + s v B^T), not folded into the cross-rank sum; and the wall time is the
 * same either way (the ranks would wait for the one doing it at the all-reduce). The price
 * is the expand's r x E multiply-adds per adapted row repeated on each rank: small next
 * to the linear. v rides in the partial sums' collective, so adapters add no collective
 * per linear, only n_rows x r floats to it. Returns the new op count. */
static int row_parallel(mn_forward *f, mn_op *ops, int n, int *n_cuts, int32_t T, int32_t n_act, int32_t l, int g,
                        const float *xin, int64_t K, float *x, float *part, float *lv, int32_t *n_segs) {
    const int64_t E = f->m->cfg.n_embd;
    mn_lora_desc d;
    const int has = n_act && lora_desc(f, n_act, l, g, xin, K, K, (float *const[]){x, NULL, NULL},
                                        (const int64_t[]){E, 0, 0}, &d, n_segs);
    size_t n_red = (size_t)T * E;
    if (has) {
        d.phase = MN_LORA_SHRINK;
        d.v = lv;
        ops[n++] = (mn_op){MN_OP_LORA, .u.lora = d};
        n_red += (size_t)mn_lora_v_floats(f->lora_segs + (*n_segs - d.n_seg), d.n_seg);
        assert(n_red <= f->cap_red);
    }
    f->cut_n[*n_cuts] = n_red;
    f->cuts[(*n_cuts)++] = n;
    ops[n++] = (mn_op){MN_OP_ADD, .u.add = {T, E, x, E, part, E}};
    if (has) {
        d.phase = MN_LORA_EXPAND;
        ops[n++] = (mn_op){MN_OP_LORA, .u.lora = d};
    }
    return n;
}

/* Run the op list; with tp > 1 stop at each cut to all-reduce cut_n[i] floats of red: the
 * partial sums (rows [0, T) are contiguous: stride E) and the partial LoRA v after them.
 * The CPU backend has finished a run when it returns; the CUDA backend has only enqueued
 * it, and NCCL enqueues on the same stream. */
static mn_err run_ops(mn_forward *f, const mn_op *ops, int n, int n_cuts, float *red, mn_errbuf *eb) {
    mn_err e = MN_OK;
    int at = 0;
    for (int i = 0; i < n_cuts && e == MN_OK; i++) {
        e = mn_backend_run(f->be, ops + at, f->cuts[i] - at, eb);
        if (e == MN_OK) e = mn_comm_all_reduce_sum(f->comm, red, f->cut_n[i], eb);
        at = f->cuts[i];
    }
    if (e == MN_OK) e = mn_backend_run(f->be, ops + at, n - at, eb);
    return e;
}

mn_err mn_forward_wait_layers(mn_forward *f, const mn_event *ready, mn_errbuf *eb) {
    int32_t nl = f->m->cfg.n_layer;
    if (!f->layer_ready && !(f->layer_ready = mn_calloc((size_t)nl, sizeof(mn_event))))
        return mn_errf(eb, MN_ENOMEM, "forward: out of memory");
    for (int32_t l = 0; l < nl; l++)
        if (ready[l].ticket > f->layer_ready[l].ticket) f->layer_ready[l] = ready[l];
    return MN_OK;
}

mn_err mn_forward_run(mn_forward *f, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b, float *logits, mn_errbuf *eb) {
    return mn_forward_run_sample(f, seqs, n_seqs, b, NULL, NULL, logits, eb);
}

mn_err mn_forward_run_lora(mn_forward *f, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b,
                           const mn_batch_lora *lb, float *logits, mn_errbuf *eb) {
    return mn_forward_run_sample(f, seqs, n_seqs, b, lb, NULL, logits, eb);
}

static mn_err run_batch(mn_forward *f, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b,
                        const mn_batch_lora *lb, const mn_batch_sample *sp, float *logits, bool *alike, mn_errbuf *eb);

/* With tp > 1 a rank that fails on its own (out of memory, a device error, its share of
 * the run) would leave the others waiting in a collective, so it aborts the group. Not so
 * for what every rank refuses alike, given the same batch and sequences: a bad batch, and
 * a full KV pool (the ranks' pools are the same size and see the same reservations). */
mn_err mn_forward_run_sample(mn_forward *f, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b,
                             const mn_batch_lora *lb, const mn_batch_sample *sp, float *logits, mn_errbuf *eb) {
    bool alike = false;
    mn_err e = run_batch(f, seqs, n_seqs, b, lb, sp, logits, &alike, eb);
    if (f->layer_ready) memset(f->layer_ready, 0, (size_t)f->m->cfg.n_layer * sizeof(mn_event)); /* one run's */
    if (e != MN_OK && !alike && f->comm) mn_comm_abort(f->comm);
    return e;
}

static mn_err run_batch(mn_forward *f, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b,
                        const mn_batch_lora *lb, const mn_batch_sample *sp, float *logits, bool *alike, mn_errbuf *eb) {
    const mn_model *m = f->m;
    const mn_model_config *c = &m->cfg;
    mn_err e = validate(f, seqs, n_seqs, b, lb, eb);
    if (e == MN_OK) e = validate_sample(b, sp, eb);
    const int32_t n_samp = sp ? sp->n_sample : 0;
    const bool want_lp = n_samp > 0 && sp->logprob;
    *alike = e != MN_ENOMEM;
    if (e != MN_OK) return e;
    *alike = false;
    const int32_t T = b->n_tokens;

    /* KV blocks for the new positions; on failure nothing has been computed. */
    int32_t *new_len = mn_malloc((size_t)n_seqs * sizeof(int32_t));
    if (!new_len) return mn_errf(eb, MN_ENOMEM, "forward: out of memory");
    for (int32_t s = 0; s < n_seqs; s++) new_len[s] = seqs[s]->n_tokens;
    for (int32_t i = 0; i < T; i++)
        if (b->pos[i] + 1 > new_len[b->seq[i]]) new_len[b->seq[i]] = b->pos[i] + 1;
    int32_t total_blocks = 0;
    for (int32_t s = 0; s < n_seqs && e == MN_OK; s++) {
        e = mn_kv_seq_reserve(f->kv, seqs[s], new_len[s], eb);
        total_blocks += seqs[s]->n_blocks;
    }
    *alike = e == MN_ELIMIT;
    if (e == MN_OK) e = ensure_capacity(f, T, b->n_out, n_seqs, total_blocks, eb);
    if (e == MN_OK) e = ensure_sample(f, n_samp, eb);
    int32_t n_act = 0, n_segs = 0;
    if (e == MN_OK) e = plan_lora(f, b, lb, &n_act, eb);
    if (e == MN_OK && f->tp > 1) e = ensure_red(f, T, n_act, eb);
    if (e != MN_OK) { mn_free(new_len); return e; }

    /* metadata: tokens | seq | pos | indptr | indices, staged on the host and copied over */
    int32_t *hm = f->host_meta;
    int32_t *dm = f->meta->ptr;
    const int64_t ct = f->cap_tokens;
    memcpy(hm, b->tokens, (size_t)T * 4);
    memcpy(hm + ct, b->seq, (size_t)T * 4);
    memcpy(hm + 2 * ct, b->pos, (size_t)T * 4);
    int32_t *indptr = hm + 3 * ct, *indices = indptr + n_seqs + 1;
    indptr[0] = 0;
    for (int32_t s = 0; s < n_seqs; s++) {
        if (seqs[s]->n_blocks) memcpy(indices + indptr[s], seqs[s]->blocks, (size_t)seqs[s]->n_blocks * 4);
        indptr[s + 1] = indptr[s] + seqs[s]->n_blocks;
    }
    size_t meta_n = (size_t)(3 * ct + n_seqs + 1 + total_blocks);
    /* ordered with compute: never behind a restore's copies on the copy queue */
    e = mn_backend_copy_compute_async(f->be, MN_COPY_H2D, dm, hm, meta_n * 4, eb);
    const int32_t *d_tok = dm, *d_seq = dm + ct, *d_pos = dm + 2 * ct;
    const int32_t *d_indptr = dm + 3 * ct, *d_indices = d_indptr + n_seqs + 1;
    /* the sample op's parameters ride along with the metadata, ordered with compute */
    mn_sample_params *d_sparams = n_samp ? f->samp->ptr : NULL;
    char *d_sout = n_samp ? (char *)f->samp->ptr + (size_t)f->cap_samp * sizeof(mn_sample_params) : NULL;
    if (e == MN_OK && n_samp)
        e = mn_backend_copy_compute_async(f->be, MN_COPY_H2D, d_sparams, sp->params, (size_t)n_samp * sizeof *d_sparams, eb);

    /* activations (q, att, k, v, gate, up: this rank's heads and ffn share) */
    const int32_t nh = f->n_head, nkv = f->n_kv_head;
    const int64_t E = c->n_embd, Q = (int64_t)nh * c->head_dim, KV = (int64_t)nkv * c->head_dim, F = f->n_ff;
    float *a = f->act->ptr;
    float *x = a, *xn = x + ct * E, *q = xn + ct * E, *att = q + ct * Q, *k = att + ct * Q, *v = k + ct * KV;
    float *gate = v + ct * KV, *up = gate + ct * F, *xo = up + ct * F;
    /* tp > 1: partial sums [T][E], then the partial lora v of the same linear */
    float *part = f->tp > 1 ? f->red->ptr : NULL, *lv = part ? part + (int64_t)T * E : NULL;
    int n_cuts = 0;

    mn_op *ops = f->ops;
    int n = 0;
    ops[n++] = (mn_op){MN_OP_GET_ROWS, .u.get_rows = {.T = T, .D = E, .ids = d_tok, .table = m->tok_embd.data,
                                                       .type = m->tok_embd.type, .row_bytes = m->tok_embd.row_bytes, .y = x, .y_stride = E}};
    const float scale = 1.0f / sqrtf((float)c->head_dim);
    int32_t max_pos = 0; /* attention's plan hint: backends with device-side pos size scratch from it */
    for (int32_t i = 0; i < T; i++)
        if (b->pos[i] + 1 > max_pos) max_pos = b->pos[i] + 1;
    for (int32_t l = 0; l < c->n_layer; l++) {
        const mn_layer *L = f->shard ? &f->shard[l] : &m->layers[l];
        mn_kv_view kv = mn_kv_pool_view(f->kv, l, d_indptr, d_indices);
        ops[n++] = (mn_op){MN_OP_RMSNORM, .u.rmsnorm = {T, E, x, E, L->attn_norm, c->rms_eps, xn, E}};
        ops[n++] = (mn_op){MN_OP_MATMUL, .u.matmul = mm(&L->wq, xn, E, q, Q, T, L->bq, 0)};
        ops[n++] = (mn_op){MN_OP_MATMUL, .u.matmul = mm(&L->wk, xn, E, k, KV, T, L->bk, 0)};
        ops[n++] = (mn_op){MN_OP_MATMUL, .u.matmul = mm(&L->wv, xn, E, v, KV, T, L->bv, 0)};
        if (n_act) n += emit_lora(f, n_act, l, 0, xn, E, E, (float *const[]){q, k, v}, (const int64_t[]){Q, KV, KV}, &ops[n], &n_segs);
        ops[n++] = (mn_op){MN_OP_ROPE, .u.rope = {T, nh, c->head_dim, c->n_rot, c->rope_mode, q, Q, d_pos, m->inv_freq, 1.0f}};
        ops[n++] = (mn_op){MN_OP_ROPE, .u.rope = {T, nkv, c->head_dim, c->n_rot, c->rope_mode, k, KV, d_pos, m->inv_freq, 1.0f}};
        if (f->layer_ready && f->layer_ready[l].ticket) /* this layer's KV is still being restored */
            ops[n++] = (mn_op){MN_OP_WAIT_COPY, .u.wait_copy = f->layer_ready[l]};
        ops[n++] = (mn_op){MN_OP_KV_STORE, .u.kv_store = {T, k, KV, v, KV, d_seq, d_pos, kv}};
        ops[n++] = (mn_op){MN_OP_ATTENTION, .u.attention = {T, nh, nkv, c->head_dim, q, Q, d_seq, d_pos, kv, scale, att, Q, max_pos}};
        if (f->tp > 1) {
            /* row-parallel: this rank's partial sum, all-reduced, then the residual add */
            ops[n++] = (mn_op){MN_OP_MATMUL, .u.matmul = mm(&L->wo, att, Q, part, E, T, NULL, 0)};
            n = row_parallel(f, ops, n, &n_cuts, T, n_act, l, 1, att, Q, x, part, lv, &n_segs);
        } else {
            ops[n++] = (mn_op){MN_OP_MATMUL, .u.matmul = mm(&L->wo, att, Q, x, E, T, NULL, 1)};
            if (n_act) n += emit_lora(f, n_act, l, 1, att, Q, Q, (float *const[]){x, NULL, NULL}, (const int64_t[]){E, 0, 0}, &ops[n], &n_segs);
        }
        ops[n++] = (mn_op){MN_OP_RMSNORM, .u.rmsnorm = {T, E, x, E, L->ffn_norm, c->rms_eps, xn, E}};
        ops[n++] = (mn_op){MN_OP_MATMUL, .u.matmul = mm(&L->w_gate, xn, E, gate, F, T, NULL, 0)};
        ops[n++] = (mn_op){MN_OP_MATMUL, .u.matmul = mm(&L->w_up, xn, E, up, F, T, NULL, 0)};
        if (n_act) n += emit_lora(f, n_act, l, 2, xn, E, E, (float *const[]){gate, up, NULL}, (const int64_t[]){F, F, 0}, &ops[n], &n_segs);
        ops[n++] = (mn_op){MN_OP_SILU_MUL, .u.silu_mul = {T, F, gate, F, up, F, gate, F}};
        if (f->tp > 1) {
            ops[n++] = (mn_op){MN_OP_MATMUL, .u.matmul = mm(&L->w_down, gate, F, part, E, T, NULL, 0)};
            n = row_parallel(f, ops, n, &n_cuts, T, n_act, l, 3, gate, F, x, part, lv, &n_segs);
        } else {
            ops[n++] = (mn_op){MN_OP_MATMUL, .u.matmul = mm(&L->w_down, gate, F, x, E, T, NULL, 1)};
            if (n_act) n += emit_lora(f, n_act, l, 3, gate, F, F, (float *const[]){x, NULL, NULL}, (const int64_t[]){E, 0, 0}, &ops[n], &n_segs);
        }
    }
    for (int32_t i = 0; i < b->n_out; i++)
        ops[n++] = (mn_op){MN_OP_RMSNORM, .u.rmsnorm = {1, E, x + (int64_t)b->out_rows[i] * E, E, m->output_norm, c->rms_eps, xo + (int64_t)i * E, E}};
    float *d_logits = b->n_out > 0 ? f->logits->ptr : NULL;
    if (b->n_out > 0) ops[n++] = (mn_op){MN_OP_MATMUL, .u.matmul = mm(&m->output, xo, E, d_logits, c->n_vocab, b->n_out, NULL, 0)};
    /* rows [0, n_samp) of the logits are sampled here; outputs packed in d_sout (f->samp) */
    int32_t *d_stok = (int32_t *)d_sout;
    float *d_slp = want_lp ? (float *)(d_stok + n_samp) : NULL;
    int32_t *d_stop = want_lp ? (int32_t *)(d_slp + n_samp) : NULL;
    float *d_stoplp = want_lp ? (float *)(d_stop + (size_t)n_samp * MN_SAMPLE_MAX_TOP) : NULL;
    if (n_samp)
        ops[n++] = (mn_op){MN_OP_SAMPLE, .u.sample = {.n_rows = n_samp, .V = c->n_vocab, .logits = d_logits,
                                                      .logits_stride = c->n_vocab, .params = d_sparams, .token = d_stok,
                                                      .logprob = d_slp, .top_id = d_stop, .top_logprob = d_stoplp}};

    if (e == MN_OK && n_segs > 0) {
        /* the lora plan is complete only now: its segments and rows go with the metadata */
        char *dev = f->lora_dev->ptr;
        e = mn_backend_copy_compute_async(f->be, MN_COPY_H2D, dev, f->lora_segs, (size_t)n_segs * sizeof(mn_lora_seg), eb);
        if (e == MN_OK)
            e = mn_backend_copy_compute_async(f->be, MN_COPY_H2D, dev + (size_t)f->cap_lora_segs * sizeof(mn_lora_seg),
                                              f->lora_rows, (size_t)T * sizeof(int32_t), eb);
    }
    if (e == MN_OK) e = mn_backend_reserve(f->be, ops, n, eb);
    if (e == MN_OK) e = run_ops(f, ops, n, n_cuts, part, eb);
    *alike = false;
    /* back to the host: the sampled rows' outputs (one copy), the other rows' logits */
    const size_t samp_bytes = (size_t)n_samp * (want_lp ? SAMP_OUT_BYTES : sizeof(int32_t));
    if (e == MN_OK && n_samp) e = mn_backend_copy_async(f->be, MN_COPY_D2H, f->host_samp, d_sout, samp_bytes, eb);
    if (e == MN_OK && b->n_out > n_samp)
        e = mn_backend_copy_async(f->be, MN_COPY_D2H, logits, d_logits + (size_t)n_samp * c->n_vocab,
                                  (size_t)(b->n_out - n_samp) * c->n_vocab * sizeof(float), eb);
    if (e == MN_OK) e = mn_backend_synchronize(f->be, eb);
    if (e == MN_OK && n_samp) { /* unpack: the same layout as on the device, from host_samp */
        const int32_t *h_tok = (const int32_t *)f->host_samp;
        memcpy(sp->token, h_tok, (size_t)n_samp * sizeof(int32_t));
        if (want_lp) {
            const float *h_lp = (const float *)(h_tok + n_samp);
            const int32_t *h_top = (const int32_t *)(h_lp + n_samp);
            const float *h_toplp = (const float *)(h_top + (size_t)n_samp * MN_SAMPLE_MAX_TOP);
            memcpy(sp->logprob, h_lp, (size_t)n_samp * sizeof(float));
            memcpy(sp->top_id, h_top, (size_t)n_samp * MN_SAMPLE_MAX_TOP * sizeof(int32_t));
            memcpy(sp->top_logprob, h_toplp, (size_t)n_samp * MN_SAMPLE_MAX_TOP * sizeof(float));
        }
    }
    if (e == MN_OK)
        for (int32_t s = 0; s < n_seqs; s++) seqs[s]->n_tokens = new_len[s];
    mn_free(new_len);
    return e;
}
