/* engine/tp.c — P ranks as threads, each running its share of mn_forward_new_tp: CPU
 * backends over the in-process communicator, or one CUDA backend per GPU over NCCL. */
#include "engine/tp.h"

#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/comm.h"
#include "engine/kv.h"
#ifdef MNEME_HAVE_CUDA
#include "engine/cuda/backend_cuda.h"
#endif

typedef struct tp_rank {
    mn_tp *t;
    mn_backend *be;
    mn_model *m;
    mn_kv_pool *kv;
    mn_forward *f;
    mn_comm *comm;
    mn_kv_seq *seqs;         /* [n_seqs] slots */
    mn_kv_seq **seq_ptrs;    /* [n_seqs] */
    mn_kv_seq *shadow;       /* ranks > 0, mn_tp_run_seqs: [cap_shadow] copies of rank 0's block tables */
    mn_kv_seq **shadow_ptrs;
    int32_t cap_shadow;
    /* ranks > 0: outputs of the sample op (rank 0's are the caller's), [cap_samp] rows */
    int32_t *s_tok, *s_top;
    float *s_lp, *s_toplp;
    int32_t cap_samp;
    mn_batch_sample samp_copy;
    float *logits;           /* ranks > 0: [cap_out][n_vocab] scratch */
    int32_t cap_out;
    /* the call in flight */
    mn_kv_seq *const *run_seqs;
    int32_t run_n_seqs;
    const mn_batch *b;
    const mn_batch_lora *lora;
    const mn_batch_sample *samp;
    float *out;
    mn_err e;
    mn_errbuf eb;
} tp_rank;

struct mn_tp {
    int P;
    int32_t n_seqs;
    tp_rank *r;
    bool broken;             /* a run failed inside: ranks may disagree */
    bool shared_tables;      /* mn_tp_run_seqs was used: rank 0's pool allocates for every rank */
};

void mn_tp_free(mn_tp *t) {
    if (!t) return;
    for (int i = 0; i < t->P; i++) {
        tp_rank *r = &t->r[i];
        for (int32_t s = 0; r->seqs && r->kv && s < t->n_seqs; s++) mn_kv_seq_release(r->kv, &r->seqs[s]);
        mn_forward_free(r->f);
        mn_kv_pool_free(r->kv);
        mn_model_free(r->m);
        mn_backend_free(r->be);
        mn_comm_free(r->comm);
        mn_free(r->seqs);
        mn_free(r->seq_ptrs);
        mn_free(r->logits);
        mn_free(r->shadow);
        mn_free(r->shadow_ptrs);
        mn_free(r->s_tok); mn_free(r->s_top); mn_free(r->s_lp); mn_free(r->s_toplp);
    }
    mn_free(t->r);
    mn_free(t);
}

static bool on_cuda(const mn_tp_params *p) { return p->device && strcmp(p->device, "cpu") != 0; }

/* Rank i's backend: a CPU backend, or GPU i. */
static mn_err rank_backend(tp_rank *r, int i, const mn_tp_params *p, mn_errbuf *eb) {
    mn_backend_params bp = {.device = on_cuda(p) ? p->device : "cpu", .device_index = on_cuda(p) ? i : 0,
                            .n_threads = p->n_threads > 0 ? p->n_threads : 1};
    return mn_backend_new(&bp, &r->be, NULL, eb);
}

/* The group's communicator, once every rank has its backend. */
static mn_err group_comm(mn_tp *t, const mn_tp_params *p, mn_errbuf *eb) {
    mn_comm *comm[64];
    mn_err e;
    if (!on_cuda(p)) {
        e = mn_comm_local_group_new(t->P, comm, eb);
    } else {
#if defined(MNEME_HAVE_CUDA) && defined(MNEME_HAVE_NCCL)
        int dev[64];
        void *streams[64];
        for (int i = 0; i < t->P; i++) {
            dev[i] = mn_backend_cuda_device(t->r[i].be);
            streams[i] = mn_backend_cuda_stream(t->r[i].be);
        }
        e = mn_comm_nccl_group_new(t->P, dev, streams, comm, eb);
#else
        e = mn_errf(eb, MN_EUNSUPPORTED, "tensor parallel on %s: this build has no NCCL", p->device);
#endif
    }
    if (e == MN_OK)
        for (int i = 0; i < t->P; i++) t->r[i].comm = comm[i];
    return e;
}

static mn_err rank_open(mn_tp *t, tp_rank *r, const char *path, const mn_tp_params *p, mn_errbuf *eb) {
    mn_err e = mn_model_load(path, r->be, &p->model, &r->m, eb);
    if (e != MN_OK) return e;
    const mn_model_config *c = &r->m->cfg;
    /* an indivisible head count is reported by mn_forward_new_tp; size the pool anyway */
    int32_t n_kv = c->n_kv_head % t->P == 0 ? c->n_kv_head / t->P : c->n_kv_head;
    int32_t ctx = c->n_ctx < 4096 ? c->n_ctx : 4096, bs = p->block_size;
    /* 0: the session engine's default, four full contexts of at most 4096 tokens; < 0: the
     * whole context (n_ctx, which may be far longer) for every slot */
    int32_t n_blocks = p->n_blocks > 0 ? p->n_blocks
                       : bs <= 0       ? 0
                       : p->n_blocks < 0 ? t->n_seqs * ((c->n_ctx + bs - 1) / bs)
                                         : 4 * ((ctx + bs - 1) / bs);
    e = mn_kv_pool_new(r->be, c->n_layer, n_kv, c->head_dim, bs, n_blocks, &r->kv, eb);
    if (e == MN_OK) e = mn_forward_new_tp(r->m, r->kv, r->comm, &r->f, eb);
    if (e != MN_OK) return e;
    r->seqs = mn_calloc((size_t)t->n_seqs, sizeof *r->seqs);
    r->seq_ptrs = mn_calloc((size_t)t->n_seqs, sizeof *r->seq_ptrs);
    if (!r->seqs || !r->seq_ptrs) return mn_errf(eb, MN_ENOMEM, "tensor parallel: out of memory");
    for (int32_t s = 0; s < t->n_seqs; s++) r->seq_ptrs[s] = &r->seqs[s];
    r->t = t;
    return MN_OK;
}

mn_err mn_tp_new(const char *path, const mn_tp_params *p, mn_tp **out, mn_errbuf *eb) {
    if (p->n_ranks < 1 || p->n_ranks > 64)
        return mn_errf(eb, MN_ERANGE, "tensor parallel size %d not in [1, 64]", p->n_ranks);
    if (p->n_seqs < 1) return mn_errf(eb, MN_ERANGE, "tensor parallel: n_seqs %d must be >= 1", p->n_seqs);
    mn_tp *t = mn_calloc(1, sizeof *t);
    if (!t || !(t->r = mn_calloc((size_t)p->n_ranks, sizeof *t->r))) {
        mn_free(t);
        return mn_errf(eb, MN_ENOMEM, "tensor parallel: out of memory");
    }
    t->P = p->n_ranks;
    t->n_seqs = p->n_seqs;
    mn_err e = MN_OK;
    for (int i = 0; i < t->P && e == MN_OK; i++) e = rank_backend(&t->r[i], i, p, eb);
    if (e == MN_OK) e = group_comm(t, p, eb);
    for (int i = 0; i < t->P && e == MN_OK; i++) e = rank_open(t, &t->r[i], path, p, eb);
    if (e != MN_OK) {
        mn_tp_free(t);
        return e;
    }
    *out = t;
    return MN_OK;
}

const mn_model *mn_tp_model(const mn_tp *t) { return t->r[0].m; }
mn_backend *mn_tp_backend(const mn_tp *t) { return t->r[0].be; }
int mn_tp_size(const mn_tp *t) { return t->P; }

int32_t mn_tp_seq_len(const mn_tp *t, int32_t s) { return t->r[0].seqs[s].n_tokens; }

void mn_tp_seq_release(mn_tp *t, int32_t s) {
    for (int i = 0; i < t->P; i++) mn_kv_seq_release(t->r[i].kv, &t->r[i].seqs[s]);
}

mn_kv_pool *mn_tp_kv(mn_tp *t) { return t->r[0].kv; }
mn_kv_pool *mn_tp_rank_kv(mn_tp *t, int r) { return t->r[r].kv; }

static void *rank_main(void *arg) {
    tp_rank *r = arg;
    r->e = mn_forward_run_sample(r->f, r->run_seqs, r->run_n_seqs, r->b, r->lora, r->samp, r->out, &r->eb);
    return NULL;
}

static mn_err run_all(mn_tp *t, const mn_batch *b, const mn_batch_lora *lora, const mn_batch_sample *samp, float *logits,
                      mn_errbuf *eb);

mn_err mn_tp_run(mn_tp *t, const mn_batch *b, float *logits, mn_errbuf *eb) {
    return mn_tp_run_lora(t, b, NULL, logits, eb);
}

mn_err mn_tp_run_lora(mn_tp *t, const mn_batch *b, const mn_batch_lora *lora, float *logits, mn_errbuf *eb) {
    /* the slots' blocks come from each rank's own free list, which shared tables bypass */
    if (t->shared_tables) return mn_errf(eb, MN_EINVALID, "tensor parallel: slots cannot be run on a group driven by mn_tp_run_seqs");
    for (int i = 0; i < t->P; i++) {
        t->r[i].run_seqs = t->r[i].seq_ptrs;
        t->r[i].run_n_seqs = t->n_seqs;
    }
    return run_all(t, b, lora, NULL, logits, eb);
}

mn_err mn_tp_run_seqs(mn_tp *t, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b, const mn_batch_lora *lora,
                      const mn_batch_sample *samp, float *logits, mn_errbuf *eb) {
    if (t->broken) return mn_errf(eb, MN_EINVALID, "tensor parallel: the group is unusable after a failed run");
    for (int32_t s = 0; s < t->n_seqs; s++)
        if (t->r[0].seqs[s].n_blocks)
            return mn_errf(eb, MN_EINVALID, "tensor parallel: slot %d holds blocks: mn_tp_run_seqs needs a group whose slots are empty", s);
    t->shared_tables = true;
    if (n_seqs < 1) return mn_errf(eb, MN_EINVALID, "batch: no sequences");
    /* Every position's block is reserved here, in rank 0's pool, before any rank runs: the
     * forwards then find their tables complete and allocate nothing, so each other rank can
     * run on a copy of rank 0's tables over its own pool (same ids, its own heads). A batch
     * the forward would refuse is refused by every rank alike after this. */
    mn_kv_pool *kv0 = t->r[0].kv;
    for (int32_t s = 0; s < n_seqs; s++) {
        int32_t len = seqs[s]->n_tokens;
        for (int32_t i = 0; i < b->n_tokens; i++)
            if (b->seq[i] == s && b->pos[i] >= 0 && b->pos[i] + 1 > len) len = b->pos[i] + 1;
        mn_err e = mn_kv_seq_reserve(kv0, seqs[s], len, eb);
        if (e != MN_OK) return e;
    }
    for (int i = 1; i < t->P; i++) {
        tp_rank *r = &t->r[i];
        if (n_seqs > r->cap_shadow) {
            mn_kv_seq *ns = mn_realloc(r->shadow, (size_t)n_seqs * sizeof *ns);
            if (ns) r->shadow = ns;
            mn_kv_seq **np = ns ? mn_realloc(r->shadow_ptrs, (size_t)n_seqs * sizeof *np) : NULL;
            if (np) r->shadow_ptrs = np;
            if (!ns || !np) return mn_errf(eb, MN_ENOMEM, "tensor parallel: out of memory");
            r->cap_shadow = n_seqs;
        }
        /* the copies share rank 0's block arrays read-only: nothing reallocates them
         * during the run, every block being reserved above */
        for (int32_t s = 0; s < n_seqs; s++) {
            r->shadow[s] = *seqs[s];
            r->shadow_ptrs[s] = &r->shadow[s];
        }
        r->run_seqs = r->shadow_ptrs;
        r->run_n_seqs = n_seqs;
    }
    t->r[0].run_seqs = seqs;
    t->r[0].run_n_seqs = n_seqs;
    return run_all(t, b, lora, samp, logits, eb);
}

mn_err mn_tp_copy_block(mn_tp *t, int32_t dst, int32_t src, mn_errbuf *eb) {
    for (int i = 1; i < t->P; i++) {
        mn_err e = mn_kv_block_copy(t->r[i].kv, dst, src, eb);
        if (e != MN_OK) {
            t->broken = true; /* rank i lacks data that rank 0 has */
            return e;
        }
    }
    return MN_OK;
}

/* Rank r > 0's copy of samp: the same rows and parameters, its own outputs (every rank
 * samples the same bits from the same logits with the same u; rank 0's are returned). */
static mn_err rank_samp(tp_rank *r, const mn_batch_sample *samp, mn_errbuf *eb) {
    if (!samp) {
        r->samp = NULL;
        return MN_OK;
    }
    int32_t n = samp->n_sample > 0 ? samp->n_sample : 1;
    if (n > r->cap_samp) {
        int32_t *tk = mn_realloc(r->s_tok, (size_t)n * sizeof(int32_t));
        if (tk) r->s_tok = tk;
        int32_t *tp = tk ? mn_realloc(r->s_top, (size_t)n * MN_SAMPLE_MAX_TOP * sizeof(int32_t)) : NULL;
        if (tp) r->s_top = tp;
        float *lp = tp ? mn_realloc(r->s_lp, (size_t)n * sizeof(float)) : NULL;
        if (lp) r->s_lp = lp;
        float *tl = lp ? mn_realloc(r->s_toplp, (size_t)n * MN_SAMPLE_MAX_TOP * sizeof(float)) : NULL;
        if (tl) r->s_toplp = tl;
        if (!tl) return mn_errf(eb, MN_ENOMEM, "tensor parallel: out of memory");
        r->cap_samp = n;
    }
    r->samp_copy = (mn_batch_sample){.n_sample = samp->n_sample, .params = samp->params, .token = samp->token ? r->s_tok : NULL,
                                     .logprob = samp->logprob ? r->s_lp : NULL, .top_id = samp->top_id ? r->s_top : NULL,
                                     .top_logprob = samp->top_logprob ? r->s_toplp : NULL};
    r->samp = &r->samp_copy;
    return MN_OK;
}

static mn_err run_all(mn_tp *t, const mn_batch *b, const mn_batch_lora *lora, const mn_batch_sample *samp, float *logits,
                      mn_errbuf *eb) {
    if (t->broken) return mn_errf(eb, MN_EINVALID, "tensor parallel: the group is unusable after a failed run");
    const int32_t V = t->r[0].m->cfg.n_vocab;
    t->r[0].samp = samp;
    for (int i = 1; i < t->P; i++) {
        mn_err e = rank_samp(&t->r[i], samp, eb);
        if (e != MN_OK) return e;
    }
    for (int i = 1; i < t->P; i++) {
        tp_rank *r = &t->r[i];
        if (b->n_out > r->cap_out) {
            float *nl = mn_realloc(r->logits, (size_t)b->n_out * V * sizeof(float));
            if (!nl) return mn_errf(eb, MN_ENOMEM, "tensor parallel: out of memory");
            r->logits = nl;
            r->cap_out = b->n_out;
        }
    }
    pthread_t th[64];
    int started = 0;
    for (int i = 0; i < t->P; i++) {
        tp_rank *r = &t->r[i];
        r->b = b;
        r->lora = lora;
        r->out = i == 0 ? logits : r->logits;
        r->e = MN_OK;
    }
    for (int i = 1; i < t->P; i++, started++)
        if (pthread_create(&th[i], NULL, rank_main, &t->r[i]) != 0) break;
    if (started < t->P - 1) {
        /* the ranks already started would wait for the missing ones: release them */
        mn_comm_abort(t->r[0].comm);
        for (int i = 1; i <= started; i++) pthread_join(th[i], NULL);
        t->broken = true;
        return mn_errf(eb, MN_ENOMEM, "tensor parallel: cannot start the thread of rank %d", started + 1);
    }
    rank_main(&t->r[0]);
    for (int i = 1; i < t->P; i++) pthread_join(th[i], NULL);
    /* Every rank refuses a bad batch or a full KV pool alike and stays usable; a rank that
     * failed on its own aborted the communicator (mn_forward_run_lora), and the others
     * then report MN_ECANCELLED: report the rank that failed first and retire the group. */
    mn_err e = t->r[0].e;
    int bad = 0;
    for (int i = 0; i < t->P; i++) {
        mn_err ei = t->r[i].e;
        if (ei != e || ei == MN_ENOMEM || ei == MN_ECANCELLED || ei == MN_EDEVICE) t->broken = true;
        if (ei != MN_OK && ei != MN_ECANCELLED && (t->r[bad].e == MN_OK || t->r[bad].e == MN_ECANCELLED)) bad = i;
    }
    if (t->r[bad].e != MN_OK) e = t->r[bad].e;
    if (e != MN_OK && eb) memcpy(eb->msg, t->r[bad].eb.msg, sizeof eb->msg);
    return e;
}
