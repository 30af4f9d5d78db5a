/* tests/unit/test_ops.c — every op of kernels/ops.h, CPU against reference, table-driven
 * (in the manner of ggml's test-backend-ops).
 *
 * Each row of `cases` names an op, its shape and a seed. For each row the harness builds
 * fresh random inputs from the seed, runs mn_ref_<op> once, then for every SIMD level
 * this CPU has ("scalar", "avx2", "avx512", "avx512-vnni") runs mn_cpu_<op> with one
 * thread and with three real pthreads that share a barrier, and checks:
 *   - |y - ref| <= atol + rtol*|ref| per element (per-op tolerance; matmul uses the
 *     contract of ops.h, 1e-4 * (sum_k |x_k w_k| + |b|); attention 1e-4 max|V| + 1e-5);
 *     bit-exact ops compare bytes; NaN or inf in an output always fails;
 *   - the bytes of the output buffer outside the rows it may write (stride gaps, the
 *     cache slots of other positions) are unchanged, and guard bytes after it intact;
 *   - the 3-thread output is bit-identical to the 1-thread one (batch invariance).
 * Output buffers start filled with 0xff bytes (NaN as f32 and f16), so an element an op
 * forgets to write fails too. One line per (case, level) and a summary are printed.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "kernels/ops.h"

enum { OP_GET_ROWS, OP_RMSNORM, OP_MATMUL, OP_ROPE, OP_KV_STORE, OP_ATTENTION, OP_SILU_MUL, OP_ADD };
static const char *const op_names[] = {"get_rows", "rmsnorm", "matmul", "rope", "kv_store", "attention", "silu_mul", "add"};

enum { F_INPLACE = 1, F_STRIDE = 2, F_BIAS = 4, F_ACC = 8, F_YARN = 16 };

/* One test case. D is the row width (get_rows D, rmsnorm D, silu F, add D, matmul K);
 * for kv_store / attention D is the longest sequence length of the three sequences. */
typedef struct tcase {
    int op;
    int64_t T, D, N;
    mn_dtype type;
    int32_t nh, nkv, hd, nrot, mode, bs;
    int flags;
    uint32_t seed;
} tcase;

#define GR(T_, D_, ty, s) {.op = OP_GET_ROWS, .T = T_, .D = D_, .type = ty, .seed = s}
#define MM(T_, K_, N_, ty, fl, s) {.op = OP_MATMUL, .T = T_, .D = K_, .N = N_, .type = ty, .flags = fl, .seed = s}
#define RN(T_, D_, fl, s) {.op = OP_RMSNORM, .T = T_, .D = D_, .flags = fl, .seed = s}
#define RP(T_, nh_, hd_, nrot_, mode_, fl, s) \
    {.op = OP_ROPE, .T = T_, .nh = nh_, .hd = hd_, .nrot = nrot_, .mode = mode_, .flags = fl, .seed = s}
#define KS(T_, L, nkv_, hd_, bs_, s) {.op = OP_KV_STORE, .T = T_, .D = L, .nkv = nkv_, .hd = hd_, .bs = bs_, .seed = s}
#define AT(T_, L, nh_, nkv_, hd_, bs_, s) \
    {.op = OP_ATTENTION, .T = T_, .D = L, .nh = nh_, .nkv = nkv_, .hd = hd_, .bs = bs_, .seed = s}
#define SM(T_, F_, fl, s) {.op = OP_SILU_MUL, .T = T_, .D = F_, .flags = fl, .seed = s}
#define AD(T_, D_, fl, s) {.op = OP_ADD, .T = T_, .D = D_, .flags = fl, .seed = s}

static const tcase cases[] = {
    GR(1, 576, MN_Q8_0, 1), GR(3, 96, MN_Q4_0, 2), GR(17, 160, MN_Q4_1, 3), GR(3, 77, MN_F32, 4),
    GR(17, 99, MN_F16, 5), GR(3, 45, MN_BF16, 6), GR(3, 512, MN_Q4_K, 7), GR(17, 256, MN_Q5_K, 8),
    GR(3, 768, MN_Q6_K, 9), GR(3, 96, MN_Q5_0, 10), GR(17, 160, MN_Q5_1, 11), GR(5, 512, MN_Q3_K, 12), GR(3, 768, MN_Q2_K, 13),
    MM(1, 576, 37, MN_Q4_1, 0, 20), MM(3, 96, 33, MN_Q4_0, F_BIAS, 21), MM(17, 160, 19, MN_Q8_0, F_ACC, 22),
    MM(3, 77, 13, MN_F32, F_BIAS | F_STRIDE, 23), MM(17, 40, 29, MN_F16, 0, 24), MM(3, 64, 31, MN_BF16, F_ACC, 25),
    MM(3, 512, 17, MN_Q4_K, F_BIAS, 26), MM(17, 256, 9, MN_Q5_K, 0, 27), MM(1, 768, 21, MN_Q6_K, F_STRIDE, 28),
    MM(3, 96, 33, MN_Q5_0, F_BIAS, 29), MM(17, 160, 19, MN_Q5_1, F_ACC | F_STRIDE, 30),
    MM(17, 512, 21, MN_Q3_K, F_BIAS, 31), MM(1, 768, 9, MN_Q3_K, F_ACC, 32),
    MM(17, 512, 19, MN_Q2_K, F_ACC | F_BIAS, 33), MM(3, 256, 40, MN_Q2_K, F_STRIDE, 34),
    RN(1, 576, 0, 40), RN(3, 577, F_STRIDE, 41), RN(17, 1155, F_INPLACE, 42), RN(3, 7, 0, 43),
    RN(3, 4096, F_INPLACE | F_STRIDE, 44),
    RP(1, 9, 64, 64, MN_ROPE_NORM, 0, 60), RP(3, 4, 128, 128, MN_ROPE_NEOX, F_STRIDE, 61),
    RP(17, 3, 64, 32, MN_ROPE_NEOX, 0, 62), RP(17, 5, 80, 80, MN_ROPE_NORM, F_YARN, 63),
    RP(3, 2, 64, 48, MN_ROPE_NORM, F_STRIDE | F_YARN, 64),
    KS(1, 40, 3, 64, 16, 80), KS(3, 70, 4, 128, 32, 81), KS(17, 50, 2, 80, 16, 82), KS(17, 90, 1, 36, 32, 83),
    AT(1, 70, 9, 3, 64, 16, 100), AT(3, 45, 4, 4, 128, 32, 101), AT(17, 70, 12, 4, 80, 16, 102),
    AT(17, 100, 16, 4, 64, 32, 103), AT(9, 50, 16, 2, 128, 16, 104), AT(5, 40, 12, 1, 64, 16, 105),
    AT(3, 33, 6, 2, 40, 16, 106), AT(2, 600, 9, 3, 64, 32, 107), AT(3, 20, 8, 1, 256, 16, 108),
    /* contexts of several MN__ATTN_SEG segments: with 3 threads the segments are split
     * over threads (flash-decoding), with 1 they are folded in one pass; same bits */
    AT(1, 2000, 9, 3, 64, 16, 109), AT(5, 1100, 8, 2, 128, 16, 110), AT(4, 700, 6, 2, 40, 32, 111),
    SM(1, 1536, 0, 120), SM(3, 1537, F_INPLACE, 121), SM(17, 333, F_STRIDE, 122), SM(3, 5, F_INPLACE | F_STRIDE, 123),
    AD(1, 576, 0, 140), AD(3, 577, F_STRIDE, 141), AD(17, 1001, 0, 142),
};

/* ---- random numbers ------------------------------------------------------------------ */
static uint64_t rng_state;
static uint64_t rnd_u64(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rnd_unif(float lo, float hi) { return lo + (hi - lo) * (float)((rnd_u64() >> 40) * 0x1p-24); }
static int rnd_int(int n) { return (int)(rnd_u64() % (uint64_t)n); }

/* ---- harness state of one case ------------------------------------------------------- */
#define GUARD 64
#define MAX_PTRS 16

typedef struct ctx {
    const tcase *c;
    union {
        mn_get_rows_desc gr;
        mn_rmsnorm_desc rn;
        mn_matmul_desc mm;
        mn_rope_desc rp;
        mn_kv_store_desc ks;
        mn_attention_desc at;
        mn_silu_mul_desc sm;
        mn_add_desc ad;
    } d;
    uint8_t *init, *ref, *buf; /* output image before the op, after ref, working copy (+GUARD) */
    size_t out_bytes;
    int64_t rows, cols, stride; /* float output region; cols == 0: compare all bytes exactly */
    int bitexact;
    double atol, rtol;
    float *elem_tol;            /* per-element tolerance [rows*cols] (matmul) or NULL */
    void *work;
    void *ptrs[MAX_PTRS];
    int n_ptrs;
} ctx;

static void *ctx_alloc(ctx *cx, size_t n) {
    void *p = mn_aligned_alloc(64, n ? n : 1);
    assert_non_null(p);
    assert_true(cx->n_ptrs < MAX_PTRS);
    cx->ptrs[cx->n_ptrs++] = p;
    return p;
}

static float *rand_matrix(ctx *cx, int64_t rows, int64_t cols, int64_t stride, float lo, float hi) {
    float *m = ctx_alloc(cx, (size_t)(rows * stride) * sizeof(float));
    memset(m, 0xff, (size_t)(rows * stride) * sizeof(float));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < cols; i++) m[r * stride + i] = rnd_unif(lo, hi);
    return m;
}

/* Output buffer of rows x stride floats: init filled with 0xff (NaN), or with `src`. */
static float *out_matrix(ctx *cx, int64_t rows, int64_t cols, int64_t stride, const float *src) {
    cx->rows = rows;
    cx->cols = cols;
    cx->stride = stride;
    cx->out_bytes = (size_t)(rows * stride) * sizeof(float);
    cx->init = ctx_alloc(cx, cx->out_bytes);
    cx->ref = ctx_alloc(cx, cx->out_bytes);
    cx->buf = ctx_alloc(cx, cx->out_bytes + GUARD);
    if (src) memcpy(cx->init, src, cx->out_bytes);
    else memset(cx->init, 0xff, cx->out_bytes);
    return (float *)(void *)cx->buf;
}

static int64_t row_stride(const tcase *c, int64_t cols) { return c->flags & F_STRIDE ? cols + 5 : cols; }

/* A random weight table of `rows` rows of D elements of `type`: random bytes with the
 * block scales replaced by small finite f16 values, so every dequantized value is finite. */
static void *rand_weights(ctx *cx, mn_dtype type, int64_t rows, int64_t D, int64_t *row_bytes) {
    int64_t rb = mn_dtype_row_bytes(type, D);
    assert_true(rb > 0);
    uint8_t *w = ctx_alloc(cx, (size_t)(rows * rb));
    for (int64_t i = 0; i < rows * rb; i++) w[i] = (uint8_t)rnd_u64();
    int64_t nb = rows * D / mn_dtype_block_elems(type);
    for (int64_t b = 0; b < nb; b++) {
        uint16_t d0 = mn_fp32_to_fp16(rnd_unif(0.002f, 0.05f)), d1 = mn_fp32_to_fp16(rnd_unif(0.001f, 0.02f));
        switch (type) {
        case MN_F32: ((float *)(void *)w)[b] = rnd_unif(-1, 1); break;
        case MN_F16: ((uint16_t *)(void *)w)[b] = mn_fp32_to_fp16(rnd_unif(-1, 1)); break;
        case MN_BF16: ((uint16_t *)(void *)w)[b] = mn_fp32_to_bf16(rnd_unif(-1, 1)); break;
        case MN_Q4_0: ((mn_block_q4_0 *)(void *)w)[b].d = d0; break;
        case MN_Q4_1: ((mn_block_q4_1 *)(void *)w)[b].d = d0; ((mn_block_q4_1 *)(void *)w)[b].m = d1; break;
        case MN_Q5_0: ((mn_block_q5_0 *)(void *)w)[b].d = d1; break;
        case MN_Q5_1: ((mn_block_q5_1 *)(void *)w)[b].d = d1; ((mn_block_q5_1 *)(void *)w)[b].m = d1; break;
        case MN_Q8_0: ((mn_block_q8_0 *)(void *)w)[b].d = d1; break;
        case MN_Q4_K: ((mn_block_q4_K *)(void *)w)[b].d = d1; ((mn_block_q4_K *)(void *)w)[b].dmin = d1; break;
        case MN_Q5_K: ((mn_block_q5_K *)(void *)w)[b].d = d1; ((mn_block_q5_K *)(void *)w)[b].dmin = d1; break;
        case MN_Q6_K: ((mn_block_q6_K *)(void *)w)[b].d = mn_fp32_to_fp16(rnd_unif(0.0005f, 0.002f)); break;
        case MN_Q3_K: ((mn_block_q3_K *)(void *)w)[b].d = mn_fp32_to_fp16(rnd_unif(0.0005f, 0.002f)); break;
        case MN_Q2_K: ((mn_block_q2_K *)(void *)w)[b].d = d1; ((mn_block_q2_K *)(void *)w)[b].dmin = d1; break;
        default: fail_msg("no weight generator for %s", mn_dtype_name(type));
        }
    }
    *row_bytes = rb;
    return w;
}

/* Three sequences of lengths L[s] in a paged pool with shuffled block ids, two unused
 * blocks and padding between blocks; every slot starts 0xffff (NaN). */
typedef struct pool_info {
    uint16_t *base;
    size_t bytes;
    int32_t L[3];
    int32_t *indptr, *indices;
} pool_info;

static mn_kv_view make_pool(ctx *cx, const tcase *c, int32_t maxlen, pool_info *pi) {
    pi->L[0] = maxlen;
    pi->L[1] = 1 + rnd_int(maxlen);
    pi->L[2] = 1 + rnd_int(maxlen);
    pi->indptr = ctx_alloc(cx, 4 * sizeof(int32_t));
    pi->indptr[0] = 0;
    for (int s = 0; s < 3; s++) pi->indptr[s + 1] = pi->indptr[s] + (pi->L[s] + c->bs - 1) / c->bs;
    int32_t n_used = pi->indptr[3], n_blocks = n_used + 2;
    int32_t *perm = ctx_alloc(cx, (size_t)n_blocks * sizeof(int32_t));
    for (int32_t i = 0; i < n_blocks; i++) perm[i] = i;
    for (int32_t i = n_blocks - 1; i > 0; i--) {
        int32_t j = rnd_int(i + 1), tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    pi->indices = perm; /* the first n_used entries of a random permutation */
    mn_kv_view kv = {0};
    kv.block_size = c->bs;
    kv.n_kv_head = c->nkv;
    kv.head_dim = c->hd;
    kv.block_stride = (int64_t)c->bs * c->nkv * c->hd + 24;
    kv.block_indptr = pi->indptr;
    kv.block_indices = pi->indices;
    pi->bytes = 2 * (size_t)(n_blocks * kv.block_stride) * sizeof(uint16_t);
    pi->base = ctx_alloc(cx, pi->bytes + GUARD);
    memset(pi->base, 0xff, pi->bytes);
    kv.k = pi->base;
    kv.v = pi->base + n_blocks * kv.block_stride;
    return kv;
}

/* A float that exercises f16 rounding: normal, subnormal, overflowing or an exact tie. */
static float rnd_f16_edge(void) {
    int kind = rnd_int(8);
    if (kind == 0) return rnd_unif(-1, 1) * 6e-6f;    /* f16 subnormal range */
    if (kind == 1) return rnd_unif(-1, 1) * 7e4f;     /* near / past the f16 max */
    if (kind == 2) {                                  /* halfway between two f16 values */
        float h = mn_fp16_to_fp32(mn_fp32_to_fp16(rnd_unif(-4, 4)));
        return h + ldexpf(1.0f, ilogbf(h) - 11) * (h < 0 ? -1.0f : 1.0f);
    }
    return rnd_unif(-3, 3);
}

static void setup(ctx *cx, const tcase *c) {
    memset(cx, 0, sizeof *cx);
    cx->c = c;
    rng_state = c->seed * 0x1234567ull + 1;
    int64_t T = c->T;
    switch (c->op) {
    case OP_GET_ROWS: {
        mn_get_rows_desc *d = &cx->d.gr;
        int64_t n_rows = 23;
        d->T = T;
        d->D = c->D;
        d->type = c->type;
        d->table = rand_weights(cx, c->type, n_rows, c->D, &d->row_bytes);
        int32_t *ids = ctx_alloc(cx, (size_t)T * sizeof(int32_t));
        for (int64_t t = 0; t < T; t++) ids[t] = t == 0 ? (int32_t)n_rows - 1 : rnd_int((int)n_rows);
        d->ids = ids;
        d->y_stride = row_stride(c, c->D);
        d->y = out_matrix(cx, T, c->D, d->y_stride, NULL);
        cx->bitexact = 1;
        break;
    }
    case OP_RMSNORM: {
        mn_rmsnorm_desc *d = &cx->d.rn;
        d->T = T;
        d->D = c->D;
        d->eps = 1e-5f;
        d->x_stride = d->y_stride = row_stride(c, c->D);
        float *x = rand_matrix(cx, T, c->D, d->x_stride, -2, 2);
        for (int64_t i = 0; i < c->D; i++) x[i] *= 1e-3f; /* a row where eps matters */
        d->w = rand_matrix(cx, 1, c->D, c->D, 0.5f, 1.5f);
        d->y = out_matrix(cx, T, c->D, d->y_stride, c->flags & F_INPLACE ? x : NULL);
        d->x = c->flags & F_INPLACE ? d->y : x;
        cx->atol = 1e-7;
        cx->rtol = 1e-5;
        break;
    }
    case OP_MATMUL: {
        mn_matmul_desc *d = &cx->d.mm;
        d->T = T;
        d->N = c->N;
        d->K = c->D;
        d->x_stride = row_stride(c, c->D);
        d->y_stride = row_stride(c, c->N);
        float *x = rand_matrix(cx, T, c->D, d->x_stride, -1, 1);
        d->x = x;
        d->w = rand_weights(cx, c->type, c->N, c->D, &d->w_row_bytes);
        d->w_type = c->type;
        d->bias = c->flags & F_BIAS ? rand_matrix(cx, 1, c->N, c->N, -1, 1) : NULL;
        d->accumulate = !!(c->flags & F_ACC);
        float *y0 = rand_matrix(cx, T, c->N, d->y_stride, -1, 1);
        d->y = out_matrix(cx, T, c->N, d->y_stride, d->accumulate ? y0 : NULL);
        /* contract: 1e-4 * (sum_k |x_k w_k| + |b|) on the dequantized weights */
        cx->elem_tol = ctx_alloc(cx, (size_t)(T * c->N) * sizeof(float));
        float *wrow = ctx_alloc(cx, (size_t)c->D * sizeof(float));
        for (int64_t n = 0; n < c->N; n++) {
            mn_get_rows_desc g = {.T = 1, .D = c->D, .ids = &(int32_t){(int32_t)n}, .table = d->w,
                                  .type = c->type, .row_bytes = d->w_row_bytes, .y = wrow, .y_stride = c->D};
            mn_ref_get_rows(&g);
            for (int64_t t = 0; t < T; t++) {
                double s = d->bias ? fabs(d->bias[n]) : 0.0;
                for (int64_t k = 0; k < c->D; k++) s += fabs((double)x[t * d->x_stride + k] * wrow[k]);
                cx->elem_tol[t * c->N + n] = (float)(1e-4 * s);
            }
        }
        break;
    }
    case OP_ROPE: {
        mn_rope_desc *d = &cx->d.rp;
        d->T = T;
        d->n_head = c->nh;
        d->head_dim = c->hd;
        d->n_rot = c->nrot;
        d->mode = c->mode;
        d->x_stride = row_stride(c, (int64_t)c->nh * c->hd);
        float *x = rand_matrix(cx, T, (int64_t)c->nh * c->hd, d->x_stride, -3, 3);
        int32_t *pos = ctx_alloc(cx, (size_t)T * sizeof(int32_t));
        for (int64_t t = 0; t < T; t++) pos[t] = t == 0 ? 0 : rnd_int(8192);
        d->pos = pos;
        float *inv = ctx_alloc(cx, (size_t)(c->nrot / 2) * sizeof(float));
        for (int i = 0; i < c->nrot / 2; i++) inv[i] = powf(10000.0f, -2.0f * (float)i / (float)c->nrot);
        d->inv_freq = inv;
        d->attn_factor = c->flags & F_YARN ? 1.2345f : 1.0f;
        d->x = out_matrix(cx, T, (int64_t)c->nh * c->hd, d->x_stride, x);
        cx->bitexact = 1;
        break;
    }
    case OP_KV_STORE: {
        mn_kv_store_desc *d = &cx->d.ks;
        pool_info pi;
        d->kv = make_pool(cx, c, (int32_t)c->D, &pi);
        int64_t row = (int64_t)c->nkv * c->hd;
        d->T = T;
        d->k_stride = row + 3;
        d->v_stride = row + 7;
        float *k = rand_matrix(cx, T, row, d->k_stride, 0, 0), *v = rand_matrix(cx, T, row, d->v_stride, 0, 0);
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < row; i++) {
                k[t * d->k_stride + i] = rnd_f16_edge();
                v[t * d->v_stride + i] = rnd_f16_edge();
            }
        d->k = k;
        d->v = v;
        /* distinct (seq, pos) pairs, tokens of the three sequences interleaved */
        int32_t *seq = ctx_alloc(cx, (size_t)T * sizeof(int32_t)), *pos = ctx_alloc(cx, (size_t)T * sizeof(int32_t));
        int32_t used[3] = {0, 0, 0};
        assert_true(T <= pi.L[0]);
        for (int64_t t = 0; t < T; t++) {
            int32_t s = (int32_t)(t % 3);
            while (used[s] >= pi.L[s]) s = (s + 1) % 3;
            for (;;) {
                int32_t p = rnd_int(pi.L[s]), dup = 0;
                for (int64_t u = 0; u < t; u++) dup |= seq[u] == s && pos[u] == p;
                if (!dup) { seq[t] = s; pos[t] = p; used[s]++; break; }
            }
        }
        d->seq = seq;
        d->pos = pos;
        /* the output is the whole pool (K and V), compared byte for byte */
        cx->out_bytes = pi.bytes;
        cx->init = ctx_alloc(cx, pi.bytes);
        cx->ref = ctx_alloc(cx, pi.bytes);
        memcpy(cx->init, pi.base, pi.bytes);
        cx->buf = (uint8_t *)pi.base;
        cx->bitexact = 1;
        break;
    }
    case OP_ATTENTION: {
        mn_attention_desc *d = &cx->d.at;
        pool_info pi;
        d->kv = make_pool(cx, c, (int32_t)c->D, &pi);
        d->T = T;
        d->n_head = c->nh;
        d->n_kv_head = c->nkv;
        d->head_dim = c->hd;
        d->scale = 1.0f / sqrtf((float)c->hd);
        /* fill every valid position; slots past a sequence's length stay NaN */
        float vmax = 0.0f;
        for (int s = 0; s < 3; s++)
            for (int32_t p = 0; p < pi.L[s]; p++)
                for (int32_t h = 0; h < c->nkv; h++) {
                    int64_t off = mn_kv_offset(&d->kv, s, p, h);
                    for (int32_t i = 0; i < c->hd; i++) {
                        float vv = rnd_unif(-2, 2);
                        d->kv.k[off + i] = mn_fp32_to_fp16(rnd_unif(-1, 1));
                        d->kv.v[off + i] = mn_fp32_to_fp16(vv);
                        vmax = fmaxf(vmax, fabsf(mn_fp16_to_fp32(d->kv.v[off + i])));
                    }
                }
        /* q large enough that some softmaxes are peaky */
        d->q_stride = (int64_t)c->nh * c->hd + 4;
        float *q = rand_matrix(cx, T, (int64_t)c->nh * c->hd, d->q_stride, -3, 3);
        d->q = q;
        int32_t *seq = ctx_alloc(cx, (size_t)T * sizeof(int32_t)), *pos = ctx_alloc(cx, (size_t)T * sizeof(int32_t));
        for (int64_t t = 0; t < T; t++) {
            int32_t s = (int32_t)((t + 1) % 3);
            seq[t] = s;
            /* the first tokens sit at the last position and at block ends / starts */
            int32_t p = t < 3 ? pi.L[s] - 1 : (t % 4 == 0 ? c->bs - 1 : (t % 4 == 1 ? c->bs : rnd_int(pi.L[s])));
            pos[t] = p < pi.L[s] ? p : pi.L[s] - 1;
        }
        d->seq = seq;
        d->pos = pos;
        d->out_stride = (int64_t)c->nh * c->hd + 3;
        d->out = out_matrix(cx, T, (int64_t)c->nh * c->hd, d->out_stride, NULL);
        cx->atol = 1e-4 * vmax + 1e-5;
        cx->rtol = 0.0;
        break;
    }
    case OP_SILU_MUL: {
        mn_silu_mul_desc *d = &cx->d.sm;
        d->T = T;
        d->F = c->D;
        d->gate_stride = d->up_stride = d->y_stride = row_stride(c, c->D);
        float *g = rand_matrix(cx, T, c->D, d->gate_stride, -8, 8);
        for (int64_t i = 0; i < c->D; i += 7) g[i] *= 15.0f; /* deep into both tails of exp */
        d->up = rand_matrix(cx, T, c->D, d->up_stride, -2, 2);
        d->y = out_matrix(cx, T, c->D, d->y_stride, c->flags & F_INPLACE ? g : NULL);
        d->gate = c->flags & F_INPLACE ? d->y : g;
        cx->atol = 1e-7;
        cx->rtol = 1e-6;
        break;
    }
    case OP_ADD: {
        mn_add_desc *d = &cx->d.ad;
        d->T = T;
        d->D = c->D;
        d->y_stride = row_stride(c, c->D);
        d->x_stride = c->D + 1;
        d->x = rand_matrix(cx, T, c->D, d->x_stride, -1, 1);
        float *y0 = rand_matrix(cx, T, c->D, d->y_stride, -1, 1);
        d->y = out_matrix(cx, T, c->D, d->y_stride, y0);
        cx->bitexact = 1;
        break;
    }
    }
    if (c->op == OP_MATMUL) {
        size_t w1 = mn_cpu_matmul_work_bytes(&cx->d.mm, 1), w3 = mn_cpu_matmul_work_bytes(&cx->d.mm, 3);
        cx->work = ctx_alloc(cx, w1 > w3 ? w1 : w3);
    }
    if (c->op == OP_ATTENTION) {
        size_t w = mn_cpu_attention_work_bytes(&cx->d.at, 3);
        cx->work = w ? ctx_alloc(cx, w) : NULL;
    }
}

static void teardown(ctx *cx) {
    for (int i = 0; i < cx->n_ptrs; i++) mn_free(cx->ptrs[i]);
}

static void reset_buf(ctx *cx) {
    memcpy(cx->buf, cx->init, cx->out_bytes);
    memset(cx->buf + cx->out_bytes, 0xa5, GUARD);
}

static void run_ref(ctx *cx) {
    switch (cx->c->op) {
    case OP_GET_ROWS: mn_ref_get_rows(&cx->d.gr); break;
    case OP_RMSNORM: mn_ref_rmsnorm(&cx->d.rn); break;
    case OP_MATMUL: mn_ref_matmul(&cx->d.mm); break;
    case OP_ROPE: mn_ref_rope(&cx->d.rp); break;
    case OP_KV_STORE: mn_ref_kv_store(&cx->d.ks); break;
    case OP_ATTENTION: mn_ref_attention(&cx->d.at); break;
    case OP_SILU_MUL: mn_ref_silu_mul(&cx->d.sm); break;
    case OP_ADD: mn_ref_add(&cx->d.ad); break;
    }
}

static void run_cpu(ctx *cx, const mn_par *par) {
    switch (cx->c->op) {
    case OP_GET_ROWS: mn_cpu_get_rows(&cx->d.gr, cx->work, par); break;
    case OP_RMSNORM: mn_cpu_rmsnorm(&cx->d.rn, cx->work, par); break;
    case OP_MATMUL: mn_cpu_matmul(&cx->d.mm, cx->work, par); break;
    case OP_ROPE: mn_cpu_rope(&cx->d.rp, cx->work, par); break;
    case OP_KV_STORE: mn_cpu_kv_store(&cx->d.ks, cx->work, par); break;
    case OP_ATTENTION: mn_cpu_attention(&cx->d.at, cx->work, par); break;
    case OP_SILU_MUL: mn_cpu_silu_mul(&cx->d.sm, cx->work, par); break;
    case OP_ADD: mn_cpu_add(&cx->d.ad, cx->work, par); break;
    }
}

/* ---- threads: a counting barrier with a generation number ---------------------------- */
typedef struct tbarrier {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n, waiting;
    unsigned gen;
} tbarrier;

static void tbarrier_wait(void *arg) {
    tbarrier *b = arg;
    pthread_mutex_lock(&b->mu);
    unsigned gen = b->gen;
    if (++b->waiting == b->n) {
        b->waiting = 0;
        b->gen++;
        pthread_cond_broadcast(&b->cv);
    } else {
        while (gen == b->gen) pthread_cond_wait(&b->cv, &b->mu);
    }
    pthread_mutex_unlock(&b->mu);
}

typedef struct targ {
    ctx *cx;
    mn_par par;
} targ;

static void *thread_main(void *arg) {
    targ *a = arg;
    run_cpu(a->cx, &a->par);
    mn_par_barrier(&a->par); /* every thread passes one barrier, as a pool would */
    return NULL;
}

#define NTH_MAX 3
static void run_cpu_threads(ctx *cx, int nth) {
    tbarrier b = {.n = nth};
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    targ args[NTH_MAX];
    pthread_t tid[NTH_MAX];
    for (int i = 0; i < nth; i++) args[i] = (targ){cx, {.ith = i, .nth = nth, .barrier = tbarrier_wait, .ctx = &b}};
    for (int i = 1; i < nth; i++) assert_int_equal(pthread_create(&tid[i], NULL, thread_main, &args[i]), 0);
    thread_main(&args[0]);
    for (int i = 1; i < nth; i++) pthread_join(tid[i], NULL);
    pthread_mutex_destroy(&b.mu);
    pthread_cond_destroy(&b.cv);
}

/* ---- checking ------------------------------------------------------------------------ */

/* Elementwise check of y against ref; returns the number of failing elements and the
 * largest error and error/tolerance ratio. NaN/inf in y always fails. */
static int64_t check_close(const float *y, const float *ref, int64_t rows, int64_t cols, int64_t stride,
                           double atol, double rtol, const float *elem_tol, double *max_err, double *max_ratio) {
    int64_t bad = 0;
    *max_err = 0.0;
    *max_ratio = 0.0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < cols; i++) {
            double a = y[r * stride + i], b = ref[r * stride + i];
            double tol = elem_tol ? elem_tol[r * cols + i] + 1e-30 : atol + rtol * fabs(b);
            double err = fabs(a - b);
            if (!isfinite(a) || !isfinite(b) || !(err <= tol)) {
                bad++;
                err = isfinite(err) ? err : INFINITY;
            }
            if (err > *max_err) *max_err = err;
            if (tol > 0 && err / tol > *max_ratio) *max_ratio = err / tol;
        }
    return bad;
}

/* Bytes outside the output rows must equal the initial image; guard bytes must be intact. */
static int check_untouched(const ctx *cx, const uint8_t *out) {
    for (int g = 0; g < GUARD; g++)
        if (cx->buf[cx->out_bytes + g] != 0xa5) return 0;
    if (cx->cols == 0) return 1; /* whole-buffer outputs are compared byte for byte */
    uint8_t *tmp = mn_malloc(cx->out_bytes);
    memcpy(tmp, out, cx->out_bytes);
    for (int64_t r = 0; r < cx->rows; r++)
        memcpy(tmp + (size_t)(r * cx->stride) * 4, cx->init + (size_t)(r * cx->stride) * 4, (size_t)cx->cols * 4);
    int ok = memcmp(tmp, cx->init, cx->out_bytes) == 0;
    mn_free(tmp);
    return ok;
}

static void case_shape(const tcase *c, char *s, size_t n) {
    switch (c->op) {
    case OP_GET_ROWS: snprintf(s, n, "T=%lld D=%lld %s", (long long)c->T, (long long)c->D, mn_dtype_name(c->type)); break;
    case OP_MATMUL:
        snprintf(s, n, "T=%lld K=%lld N=%lld %s%s%s%s", (long long)c->T, (long long)c->D, (long long)c->N,
                 mn_dtype_name(c->type), c->flags & F_BIAS ? " bias" : "", c->flags & F_ACC ? " acc" : "",
                 c->flags & F_STRIDE ? " strided" : "");
        break;
    case OP_ROPE:
        snprintf(s, n, "T=%lld heads=%d hd=%d rot=%d %s%s", (long long)c->T, c->nh, c->hd, c->nrot,
                 c->mode == MN_ROPE_NEOX ? "neox" : "norm", c->flags & F_YARN ? " af" : "");
        break;
    case OP_KV_STORE:
        snprintf(s, n, "T=%lld L<=%lld kv=%d hd=%d bs=%d", (long long)c->T, (long long)c->D, c->nkv, c->hd, c->bs);
        break;
    case OP_ATTENTION:
        snprintf(s, n, "T=%lld L<=%lld heads=%d/%d hd=%d bs=%d", (long long)c->T, (long long)c->D, c->nh, c->nkv, c->hd, c->bs);
        break;
    default:
        snprintf(s, n, "T=%lld D=%lld%s%s", (long long)c->T, (long long)c->D, c->flags & F_INPLACE ? " inplace" : "",
                 c->flags & F_STRIDE ? " strided" : "");
        break;
    }
}

static const char *const simd_levels[] = {"scalar", "avx2", "avx512", "avx512-vnni"};

/* Runs one case on every SIMD level; returns the number of failed (case, level) runs. */
static int run_case(const tcase *c) {
    ctx cx;
    setup(&cx, c);
    reset_buf(&cx);
    run_ref(&cx);
    memcpy(cx.ref, cx.buf, cx.out_bytes);
    uint8_t *one = mn_malloc(cx.out_bytes);
    char shape[128];
    case_shape(c, shape, sizeof shape);
    int fails = 0;
    for (int lv = 0; lv < 4; lv++) {
        if (!mn_cpu_set_simd(simd_levels[lv])) continue;
        reset_buf(&cx);
        run_cpu_threads(&cx, 1);
        memcpy(one, cx.buf, cx.out_bytes);
        int ok = check_untouched(&cx, one);
        const char *why = ok ? "" : " (wrote outside its output)";
        double err = 0, ratio = 0;
        if (cx.cols == 0 || cx.bitexact) {
            size_t diff = 0;
            for (size_t i = 0; i < cx.out_bytes; i++) diff += one[i] != cx.ref[i];
            if (diff) { ok = 0; why = " (not bit-exact)"; }
            err = (double)diff;
        } else if (check_close((const float *)(void *)one, (const float *)(void *)cx.ref, cx.rows, cx.cols,
                               cx.stride, cx.atol, cx.rtol, cx.elem_tol, &err, &ratio)) {
            ok = 0;
            why = " (out of tolerance or not finite)";
        }
        reset_buf(&cx);
        run_cpu_threads(&cx, 3);
        if (!check_untouched(&cx, cx.buf)) { ok = 0; why = " (3 threads wrote outside)"; }
        if (memcmp(cx.buf, one, cx.out_bytes) != 0) { ok = 0; why = " (3 threads differ from 1)"; }
        if (cx.bitexact || cx.cols == 0)
            printf("%-9s %-40s %-11s diff_bytes=%-6.0f tol=exact       %s%s\n", op_names[c->op], shape,
                   simd_levels[lv], err, ok ? "PASS" : "FAIL", why);
        else
            printf("%-9s %-40s %-11s max_err=%-9.3g err/tol=%-7.3f %s%s\n", op_names[c->op], shape, simd_levels[lv],
                   err, ratio, ok ? "PASS" : "FAIL", why);
        fails += !ok;
    }
    mn_cpu_set_simd(simd_levels[0]);
    for (int lv = 3; lv >= 0; lv--)
        if (mn_cpu_set_simd(simd_levels[lv])) break; /* restore the best level */
    mn_free(one);
    teardown(&cx);
    return fails;
}

static void test_ops_table(void **state) {
    (void)state;
    mn_cpu_init();
    int fails = 0, n = (int)(sizeof cases / sizeof cases[0]);
    for (int i = 0; i < n; i++) fails += run_case(&cases[i]);
    printf("test_ops: %d cases, %d failed (case, simd level) runs\n", n, fails);
    assert_int_equal(fails, 0);
}

/* The same token computed alone and inside a batch of 9 mixed tokens (3 threads) must
 * give the same bits, on every SIMD level. */
static void test_attention_batch_invariance(void **state) {
    (void)state;
    static const tcase c9 = AT(9, 90, 9, 3, 64, 16, 777);
    ctx cx;
    setup(&cx, &c9);
    mn_attention_desc *d = &cx.d.at;
    const int x = 5; /* the token under test, in the middle of the batch */
    size_t row = (size_t)d->n_head * d->head_dim * sizeof(float);
    for (int lv = 0; lv < 4; lv++) {
        if (!mn_cpu_set_simd(simd_levels[lv])) continue;
        reset_buf(&cx);
        run_cpu_threads(&cx, 3);
        float batched[9 * 64];
        memcpy(batched, d->out + x * d->out_stride, row);
        mn_attention_desc one = *d;
        one.T = 1;
        one.q = d->q + x * d->q_stride;
        one.seq = d->seq + x;
        one.pos = d->pos + x;
        float alone[9 * 64 + 16];
        one.out = alone;
        mn_par par = {.ith = 0, .nth = 1};
        mn_cpu_attention(&one, NULL, &par);
        int same = memcmp(alone, batched, row) == 0;
        printf("attention batch invariance [%s]: token pos=%d alone vs in a batch of 9: %s\n", simd_levels[lv],
               d->pos[x], same ? "bit-identical" : "DIFFERENT");
        assert_true(same);
    }
    for (int lv = 3; lv >= 0; lv--)
        if (mn_cpu_set_simd(simd_levels[lv])) break;
    teardown(&cx);
}

/* The harness itself must be able to fail: NaN, an error past tolerance and a write
 * into the guard bytes are all caught. */
static void test_harness_catches_errors(void **state) {
    (void)state;
    float ref[4] = {1, 2, 3, 4}, y[4] = {1, 2, 3, 4};
    double e, r;
    assert_int_equal(check_close(y, ref, 1, 4, 4, 1e-6, 1e-6, NULL, &e, &r), 0);
    y[2] = NAN;
    assert_int_equal(check_close(y, ref, 1, 4, 4, 1e-6, 1e-6, NULL, &e, &r), 1);
    y[2] = 3.0f + 1e-3f;
    assert_int_equal(check_close(y, ref, 1, 4, 4, 1e-6, 1e-6, NULL, &e, &r), 1);
    y[2] = INFINITY;
    ref[2] = INFINITY;
    assert_int_equal(check_close(y, ref, 1, 4, 4, 1e-6, 1e-6, NULL, &e, &r), 1);

    static const tcase c = AD(3, 10, F_STRIDE, 5);
    ctx cx;
    setup(&cx, &c);
    reset_buf(&cx);
    run_ref(&cx);
    assert_true(check_untouched(&cx, cx.buf));
    cx.buf[cx.out_bytes] ^= 1; /* one byte past the end */
    assert_false(check_untouched(&cx, cx.buf));
    reset_buf(&cx);
    run_ref(&cx);
    cx.d.ad.y[10] = 0.0f; /* a stride gap of row 0 */
    assert_false(check_untouched(&cx, cx.buf));
    teardown(&cx);
}

/* Prefill shape: many consecutive tokens of one sequence (the CPU kernel tiles them and
 * shares each converted K/V chunk). Every token must match the reference within the
 * ops.h tolerance and be bit-identical to the same token computed alone with 1 thread,
 * which is what prefill-equals-decode needs. Covers head_dims with a 16-lane tail (40) and an 8-lane tail (36), and
 * positions that start and end inside chunks. */
static void test_attention_prefill_tiles(void **state) {
    (void)state;
    static const tcase cases[] = {AT(45, 70, 9, 3, 64, 16, 901), AT(21, 50, 6, 2, 40, 16, 902),
                                  AT(13, 40, 8, 1, 128, 32, 903), AT(11, 37, 4, 2, 36, 16, 904),
                                  AT(45, 700, 9, 3, 64, 16, 905)};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        ctx cx;
        setup(&cx, &cases[ci]);
        mn_attention_desc *d = &cx.d.at;
        int32_t seq[64], pos[64];
        int32_t L = (int32_t)cases[ci].D; /* sequence 0 holds L positions */
        for (int64_t t = 0; t < d->T; t++) {
            seq[t] = 0;
            pos[t] = L - (int32_t)d->T + (int32_t)t;
        }
        pos[3] = 0; /* one out-of-order token with a single position */
        d->seq = seq;
        d->pos = pos;
        int64_t hn = (int64_t)d->n_head * d->head_dim;
        float *ref = mn_malloc((size_t)(d->T * d->out_stride) * sizeof(float));
        mn_attention_desc rd = *d;
        rd.out = ref;
        mn_ref_attention(&rd);
        for (int lv = 0; lv < 4; lv++) {
            if (!mn_cpu_set_simd(simd_levels[lv])) continue;
            reset_buf(&cx);
            run_cpu_threads(&cx, 2);
            double max_err, max_ratio;
            int64_t bad = check_close(d->out, ref, d->T, hn, d->out_stride, cx.atol, 0.0, NULL, &max_err, &max_ratio);
            int n_diff = 0;
            for (int64_t t = 0; t < d->T; t++) {
                mn_attention_desc one = *d;
                float alone[8 * 128];
                one.T = 1;
                one.q = d->q + t * d->q_stride;
                one.seq = seq + t;
                one.pos = pos + t;
                one.out = alone;
                mn_par par = {.ith = 0, .nth = 1};
                mn_cpu_attention(&one, NULL, &par);
                n_diff += memcmp(alone, d->out + t * d->out_stride, (size_t)hn * sizeof(float)) != 0;
                /* alone on 3 threads: past one segment it is split over the threads */
                float split[8 * 128];
                mn_attention_desc saved = *d;
                one.out = split;
                *d = one;
                run_cpu_threads(&cx, 3);
                *d = saved;
                n_diff += memcmp(split, alone, (size_t)hn * sizeof(float)) != 0;
            }
            printf("attention prefill tiles [%s] T=%d hd=%d: %d bad vs ref (max err %.3g), %d tokens differ alone\n",
                   simd_levels[lv], (int)d->T, d->head_dim, (int)bad, max_err, n_diff);
            assert_int_equal(bad, 0);
            assert_int_equal(n_diff, 0);
        }
        mn_free(ref);
        teardown(&cx);
    }
    for (int lv = 3; lv >= 0; lv--)
        if (mn_cpu_set_simd(simd_levels[lv])) break;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_harness_catches_errors),
        cmocka_unit_test(test_ops_table),
        cmocka_unit_test(test_attention_batch_invariance),
        cmocka_unit_test(test_attention_prefill_tiles),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
