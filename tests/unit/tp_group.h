/* tests/unit/tp_group.h — a tensor-parallel group of CPU ranks for the unit tests
 * (test_tp.c, test_tp_lora.c): threads as ranks, each with its own CPU backend (1 thread),
 * its own load of the model file, its own KV pool holding its kv heads and a forward from
 * mn_forward_new_tp over an in-process communicator. P = 0 opens the reference instead:
 * the plain forward (TP = 1) on one rank. Each rank has MAX_SEQS sequences; a group runs
 * g->n_seqs of them (1 unless the test sets more), and optionally adapters that each rank
 * loads against its own model (group_load_adapter). Include after cmocka.h.
 * Ownership: group_close frees everything group_open and group_load_adapter made.
 */
#ifndef MN_TEST_TP_GROUP_H
#define MN_TEST_TP_GROUP_H

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/comm.h"
#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/lora.h"
#include "engine/model.h"
#include "tests/unit/test_model.h"

enum { MAX_RANKS = 4, MAX_SEQS = 4, MAX_ADAPTERS = 4 };

typedef struct rank {
    mn_backend *be;
    mn_model *m;
    mn_kv_pool *kv;
    mn_forward *f;
    mn_comm *comm;
    mn_kv_seq seq[MAX_SEQS];
    mn_lora *ad[MAX_ADAPTERS];   /* this rank's loads of the group's adapters */
    const mn_batch *b;           /* the call in flight */
    const int32_t *adapter;      /* its per-row adapter indices, or NULL */
    int32_t n_seqs;
    float *logits;
    mn_err e;
    mn_errbuf eb;
} rank;

typedef struct group {
    int P;                       /* 0: the plain forward (reference), else the TP size */
    rank r[MAX_RANKS];
    int32_t V;
    int32_t n_seqs;              /* sequences each batch may use, <= MAX_SEQS */
    int n_ad;                    /* adapters loaded on every rank */
} group;

static inline const char *smollm2_path(void) { return mn_test_model_path(); }

static inline void group_close(group *g) {
    for (int i = 0; i < (g->P ? g->P : 1); i++) {
        rank *r = &g->r[i];
        for (int s = 0; r->kv && s < MAX_SEQS; s++) mn_kv_seq_release(r->kv, &r->seq[s]);
        for (int a = 0; a < MAX_ADAPTERS; a++) mn_lora_free(r->ad[a]);
        mn_forward_free(r->f);
        mn_kv_pool_free(r->kv);
        mn_model_free(r->m);
        mn_backend_free(r->be);
        mn_comm_free(r->comm);
        free(r->logits);
    }
    memset(g, 0, sizeof *g);
}

/* Open P ranks on the model at path (P = 0: the reference). Returns the first error of
 * mn_forward_new_tp (the rest already opened is closed) with its message in eb. */
static inline mn_err group_open(group *g, const char *path, int P, mn_errbuf *eb) {
    memset(g, 0, sizeof *g);
    g->P = P;
    g->n_seqs = 1;
    int n = P ? P : 1;
    mn_comm *comm[MAX_RANKS] = {0};
    if (P) assert_int_equal(mn_comm_local_group_new(P, comm, eb), MN_OK);
    for (int i = 0; i < n; i++) {
        rank *r = &g->r[i];
        r->comm = comm[i];
        mn_backend_params bp = {.device = "cpu", .n_threads = 1};
        if (mn_backend_cpu_new(&bp, &r->be, eb) != MN_OK) fail_msg("%s", eb->msg);
        if (mn_model_load(path, r->be, NULL, &r->m, eb) != MN_OK)
            fail_msg("cannot load %s: %s (run tools/setup.sh)", path, eb->msg);
        const mn_model_config *c = &r->m->cfg;
        int32_t nkv = c->n_kv_head % n == 0 ? c->n_kv_head / n : c->n_kv_head;
        assert_int_equal(mn_kv_pool_new(r->be, c->n_layer, nkv, c->head_dim, 16, 64, &r->kv, eb), MN_OK);
        mn_err e = P ? mn_forward_new_tp(r->m, r->kv, r->comm, &r->f, eb) : mn_forward_new(r->m, r->kv, &r->f, eb);
        if (e != MN_OK) {
            for (int j = i + 1; j < n; j++) g->r[j].comm = comm[j];
            g->P = P;
            group_close(g);
            return e;
        }
        g->V = c->n_vocab;
    }
    return MN_OK;
}

/* Load the adapter in dir on every rank (against that rank's model) as index g->n_ad. */
static inline void group_load_adapter(group *g, const char *dir) {
    assert_true(g->n_ad < MAX_ADAPTERS);
    for (int i = 0; i < (g->P ? g->P : 1); i++) {
        mn_errbuf eb;
        if (mn_lora_load(dir, dir, g->r[i].m, &g->r[i].ad[g->n_ad], &eb) != MN_OK) fail_msg("load %s: %s", dir, eb.msg);
    }
    g->n_ad++;
}

static inline void *rank_main(void *arg) {
    rank *r = arg;
    mn_kv_seq *seqs[MAX_SEQS];
    for (int s = 0; s < r->n_seqs; s++) seqs[s] = &r->seq[s];
    mn_batch_lora lb = {r->adapter, (const mn_lora *const *)r->ad, MAX_ADAPTERS};
    r->e = mn_forward_run_lora(r->f, seqs, r->n_seqs, r->b, r->adapter ? &lb : NULL, r->logits, &r->eb);
    return NULL;
}

/* Run b on every rank at once, row i with adapter adapter[i] (-1: none; adapter NULL: no
 * adapters); logits of rank i in g->r[i].logits ([n_out][V]), the same bits on every rank. */
static inline void group_run_lora(group *g, const mn_batch *b, const int32_t *adapter) {
    int n = g->P ? g->P : 1;
    pthread_t th[MAX_RANKS];
    for (int i = 0; i < n; i++) {
        g->r[i].b = b;
        g->r[i].adapter = adapter;
        g->r[i].n_seqs = g->n_seqs;
        free(g->r[i].logits);
        g->r[i].logits = malloc((size_t)(b->n_out ? b->n_out : 1) * g->V * sizeof(float));
    }
    for (int i = 0; i < n; i++) pthread_create(&th[i], NULL, rank_main, &g->r[i]);
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < n; i++)
        if (g->r[i].e != MN_OK) fail_msg("rank %d: %s", i, g->r[i].eb.msg);
    /* replicated output head over all-reduced activations: the same bits on every rank */
    for (int i = 1; i < n; i++)
        if (memcmp(g->r[0].logits, g->r[i].logits, (size_t)b->n_out * g->V * sizeof(float)) != 0)
            fail_msg("TP %d: logits of rank %d differ from rank 0", g->P, i);
}

static inline void group_run(group *g, const mn_batch *b) { group_run_lora(g, b, NULL); }

static inline int32_t argmax(const float *x, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* max over rows of max|a - b| / max|b| */
static inline double max_rel_err(const float *a, const float *b, int rows, int32_t V) {
    double worst = 0;
    for (int i = 0; i < rows; i++) {
        double scale = 0, diff = 0;
        for (int32_t v = 0; v < V; v++) {
            const float x = a[(size_t)i * V + v], y = b[(size_t)i * V + v];
            if (!isfinite(x) || !isfinite(y)) return INFINITY;
            if (fabs(y) > scale) scale = fabs(y);
            if (fabs(x - y) > diff) diff = fabs(x - y);
        }
        if (diff / scale > worst) worst = diff / scale;
    }
    return worst;
}

/* mean over rows of KL(softmax(ref) || softmax(a)) */
static inline double mean_kl(const float *a, const float *ref, int rows, int32_t V) {
    double sum = 0;
    for (int i = 0; i < rows; i++) {
        const float *x = a + (size_t)i * V, *y = ref + (size_t)i * V;
        double mx = x[argmax(x, V)], my = y[argmax(y, V)], zx = 0, zy = 0, kl = 0;
        for (int32_t v = 0; v < V; v++) {
            zx += exp(x[v] - mx);
            zy += exp(y[v] - my);
        }
        for (int32_t v = 0; v < V; v++) {
            double ly = y[v] - my - log(zy), lx = x[v] - mx - log(zx);
            kl += exp(ly) * (ly - lx);
        }
        sum += kl;
    }
    return sum / rows;
}

/* A synthetic model at a temporary path (removed by the caller), "sharpened": gen_gguf.py
 * draws weights of std 0.02, with which the layers add only a few percent to the
 * residual stream and a sharding error could hide in the noise; scaling the RMSNorm gains
 * (attn x4, ffn x2, as tests/python/test_logits.py does) makes every layer matter. */
static inline void gen_model(char *path, size_t cap, const char *tag, const char *args) {
    snprintf(path, cap, "/tmp/mneme_test_tp_%d_%s.gguf", (int)getpid(), tag);
    char cmd[4096];
    const char *src = getenv("MNEME_SOURCE_DIR") ? getenv("MNEME_SOURCE_DIR") : ".";
    snprintf(cmd, sizeof cmd,
             "python3 %s/tools/gen_gguf.py %s %s >/dev/null 2>&1 && "
             "python3 -c \"import sys; from gguf import GGUFReader\n"
             "r = GGUFReader(sys.argv[1], 'r+')\nfor t in r.tensors:\n"
             "    if t.name.endswith('attn_norm.weight'): t.data[...] *= 4\n"
             "    if t.name.endswith('ffn_norm.weight'): t.data[...] *= 2\n"
             "r.data.flush()\" %s",
             src, path, args, path);
    if (system(cmd) != 0) fail_msg("cannot make a synthetic model (python3 with the gguf package is needed): %s", cmd);
}

#endif
