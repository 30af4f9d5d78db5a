/* tests/gpu/test_cuda_ops.c — every CUDA op against the scalar reference, table-driven
 * (after ggml's test-backend-ops), then a smoke test of the CUDA backend vtable.
 * Self-contained (no cmocka): the GPU machine has no Debian -dev packages.
 *
 * For each row of `cases`: fresh random inputs from the row's seed are built in host
 * memory (odd sizes, strided rows, every weight type for get_rows / matmul, a paged KV
 * pool whose blocks are shuffled, GQA), every host allocation is copied to the device,
 * mn_ref_<op> runs on the host copy and mn_cuda_<op> on the device copy, and the output
 * allocation is compared element by element:
 *   - inside the op's output rows: |y - ref| <= tolerance (per op, below), or bytes equal
 *     for the bit-exact ops (get_rows, kv_store, add); NaN / inf always fails;
 *   - everywhere else (stride gaps, other cache slots, 64 guard bytes): bytes unchanged.
 * Outputs start as 0xff bytes (NaN), so an element the op forgets to write fails too.
 * Tolerances: ops.h's where it states one (attention 1e-4*max|V| + 1e-5; matmul with F32
 * weights, or any weights at T <= MN_CUDA_GEMV_MAX_T (the fused GEMV), 1e-4 * (sum|x w| +
 * |b|)); matmul on the cuBLAS path (larger T) with any other weight type gets the bf16
 * allowance (1e-4 + 2^-7) * (sum|x w| + |b|) (x and W are each rounded to bf16 once);
 * rmsnorm 1e-7 + 1e-5|ref|; silu_mul 1e-7 + 2e-6|ref| and rope 4e-6 + 1e-6|ref| (device
 * expf / cosf / sinf are within 2 ulp, not glibc's bits).
 * lora has its own table (lcases): several outputs and a device segment array.
 * Attention at long contexts (2K..32K positions), its split / unsplit / token-alone bit
 * identity and the decode timing lines live in test_cuda_attention.c, the fused GEMV's
 * own checks and timing lines in test_cuda_gemv.c (both called from main).
 * Exit status: 0 all pass (or no device: prints "skipped: no CUDA device (reason)"), 1 if
 * anything fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cuda/backend_cuda.h"
#include "kernels/cuda/ops_cuda.h"
#include "tests/gpu/gpu_test_util.h"

enum { OP_GET_ROWS, OP_RMSNORM, OP_MATMUL, OP_ROPE, OP_KV_STORE, OP_ATTENTION, OP_SILU_MUL, OP_ADD };
static const char *const op_names[] = {"get_rows", "rmsnorm", "matmul", "rope", "kv_store", "attention", "silu_mul", "add"};
enum { F_INPLACE = 1, F_STRIDE = 2, F_BIAS = 4, F_ACC = 8, F_YARN = 16 };

/* D is the row width (matmul K); for kv_store / attention D is the longest sequence. */
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

/* K / D for a weight type: a few whole blocks, odd where the type allows */
#define KL 288 /* 9 blocks of 32 */
#define KK 512 /* 2 super-blocks of 256 */
#define MM3(ty, K_, s)                                                                          \
    MM(1, K_, 37, ty, 0, s), MM(5, K_, 129, ty, F_BIAS | F_STRIDE, s + 1), MM(33, K_, 64, ty, F_ACC | F_BIAS, s + 2)

static const tcase cases[] = {
    GR(7, 77, MN_F32, 1), GR(7, 77, MN_F16, 2), GR(7, 77, MN_BF16, 3), GR(7, KL, MN_Q4_0, 4), GR(7, KL, MN_Q4_1, 5),
    GR(7, KL, MN_Q8_0, 6), GR(7, 768, MN_Q4_K, 7), GR(7, 768, MN_Q5_K, 8), GR(7, 768, MN_Q6_K, 9),
    GR(7, KL, MN_Q5_0, 11), GR(7, KL, MN_Q5_1, 12), GR(7, 768, MN_Q3_K, 13), GR(7, 768, MN_Q2_K, 14),
    MM3(MN_F32, 77, 10), MM3(MN_F16, 77, 20), MM3(MN_BF16, 77, 30), MM3(MN_Q4_0, KL, 40), MM3(MN_Q4_1, KL, 50),
    MM3(MN_Q8_0, KL, 60), MM3(MN_Q4_K, KK, 70), MM3(MN_Q5_K, KK, 80), MM3(MN_Q6_K, KK, 90),
    MM3(MN_Q5_0, KL, 170), MM3(MN_Q5_1, KL, 180), MM3(MN_Q3_K, KK, 190), MM3(MN_Q2_K, KK, 200),
    MM(64, 576, 1536, MN_Q4_1, F_STRIDE, 100), MM(3, 576, 4099, MN_Q8_0, 0, 101), MM(17, 1536, 576, MN_Q6_K, F_ACC, 102),
    RN(5, 576, 0, 110), RN(3, 1000, F_INPLACE | F_STRIDE, 111), RN(1, 4096, 0, 112),
    /* the 16-byte path's widths (1, 2, 4, 8 float4 a thread; in place; a partial round), and past it */
    RN(7, 1536, F_INPLACE, 113), RN(2, 8192, 0, 114), RN(3, 2052, 0, 115), RN(2, 9000, 0, 116),
    RP(5, 9, 64, 64, MN_ROPE_NORM, 0, 120), RP(4, 3, 128, 64, MN_ROPE_NEOX, F_YARN, 121),
    RP(3, 2, 80, 80, MN_ROPE_NORM, F_STRIDE, 122), RP(6, 4, 64, 64, MN_ROPE_NEOX, 0, 123),
    KS(20, 50, 3, 64, 16, 130), KS(7, 33, 2, 128, 8, 131), KS(5, 9, 1, 80, 3, 132),
    AT(6, 70, 9, 3, 64, 16, 140), AT(5, 300, 8, 2, 128, 32, 141), AT(4, 40, 4, 4, 80, 7, 142),
    AT(3, 1000, 2, 1, 256, 16, 143), AT(3, 5, 6, 2, 32, 4, 144),
    SM(5, 1536, 0, 150), SM(3, 1001, F_INPLACE | F_STRIDE, 151),
    AD(5, 576, 0, 160), AD(2, 999, F_STRIDE, 161),
};

static int64_t row_stride(const tcase *c, int64_t w) { return c->flags & F_STRIDE ? w + 5 : w; }

/* The case being built: its arena, the output allocation and how to judge it. */
typedef struct judge {
    int out;                /* arena index of the output allocation */
    int64_t rows, cols, stride; /* the region the op may write, as float rows */
    int bitexact;           /* compare bytes, also inside the region */
    int whole;              /* the whole allocation is the region (kv pool) */
    double atol, rtol;
    float *elem_tol;        /* per-element tolerance [rows*cols] or NULL */
} judge;

/* A paged pool for three sequences of lengths L, L/2+1, min(3, L), blocks shuffled, a few
 * spare blocks, block_stride with a gap. K and V live in one allocation (returned in *idx). */
static mn_kv_view make_pool(gt_arena *a, const tcase *c, int32_t L[3], int *idx) {
    mn_kv_view kv = {0};
    L[0] = (int32_t)c->D;
    L[1] = (int32_t)c->D / 2 + 1;
    L[2] = (int32_t)c->D < 3 ? (int32_t)c->D : 3;
    int32_t nb[3], total = 3;
    for (int s = 0; s < 3; s++) {
        nb[s] = (L[s] + c->bs - 1) / c->bs;
        total += nb[s];
    }
    int32_t *perm = gt_shuffled(a, total);
    int32_t *indptr = gt_host(a, 4 * sizeof(int32_t), NULL);
    int32_t *indices = gt_host(a, (size_t)(total - 3) * sizeof(int32_t), NULL);
    indptr[0] = 0;
    for (int s = 0; s < 3; s++) {
        indptr[s + 1] = indptr[s] + nb[s];
        for (int32_t b = 0; b < nb[s]; b++) indices[indptr[s] + b] = perm[indptr[s] + b];
    }
    kv.block_size = c->bs;
    kv.n_kv_head = c->nkv;
    kv.head_dim = c->hd;
    kv.block_stride = (int64_t)c->bs * c->nkv * c->hd + 8;
    size_t half = (size_t)total * (size_t)kv.block_stride;
    uint16_t *pool = gt_host(a, 2 * half * sizeof(uint16_t), idx);
    memset(pool, 0xff, 2 * half * sizeof(uint16_t));
    kv.k = pool;
    kv.v = pool + half;
    kv.block_indptr = indptr;
    kv.block_indices = indices;
    return kv;
}

/* Random weights of type ty, n rows of k elements; float scales kept small and finite. */
static void *rand_weights(gt_arena *a, mn_dtype ty, int64_t n, int64_t k, int64_t *row_bytes) {
    *row_bytes = mn_dtype_row_bytes(ty, k);
    size_t bytes = (size_t)(n * *row_bytes);
    uint8_t *w = gt_host(a, bytes, NULL);
    if (ty == MN_F32) {
        for (size_t i = 0; i < bytes / 4; i++) ((float *)w)[i] = gt_unif(-1, 1);
        return w;
    }
    if (ty == MN_F16 || ty == MN_BF16) {
        for (size_t i = 0; i < bytes / 2; i++)
            ((uint16_t *)w)[i] = ty == MN_F16 ? mn_fp32_to_fp16(gt_unif(-1, 1)) : mn_fp32_to_bf16(gt_unif(-1, 1));
        return w;
    }
    for (size_t i = 0; i < bytes; i++) w[i] = (uint8_t)gt_rnd_int(256);
    size_t bb = (size_t)mn_dtype_block_bytes(ty);
    for (size_t b = 0; b < bytes / bb; b++) {
        uint8_t *blk = w + b * bb;
        uint16_t d = mn_fp32_to_fp16(gt_unif(0.002f, 0.05f)), m = mn_fp32_to_fp16(gt_unif(-0.1f, 0.1f));
        switch (ty) {
        case MN_Q6_K: memcpy(blk + 208, &d, 2); break;           /* d after ql, qh, scales */
        case MN_Q3_K: memcpy(blk + 108, &d, 2); break;           /* d after hmask, qs, scales */
        case MN_Q2_K:                                             /* d, dmin after scales, qs */
            memcpy(blk + 80, &d, 2);
            m = mn_fp32_to_fp16(gt_unif(0.0f, 0.05f));
            memcpy(blk + 82, &m, 2);
            break;
        case MN_Q4_1: case MN_Q5_1: case MN_Q4_K: case MN_Q5_K:
            memcpy(blk, &d, 2);
            if (ty != MN_Q4_1 && ty != MN_Q5_1) m = mn_fp32_to_fp16(gt_unif(0.0f, 0.05f));
            memcpy(blk + 2, &m, 2);
            break;
        default: memcpy(blk, &d, 2); break;                    /* Q4_0, Q5_0, Q8_0 */
        }
    }
    return w;
}

/* Build case c: host inputs in the arena, the host descriptor in *op, the judge. */
static void build(gt_arena *a, const tcase *c, mn_op *op, judge *j) {
    int64_t T = c->T;
    memset(j, 0, sizeof *j);
    switch (c->op) {
    case OP_GET_ROWS: {
        mn_get_rows_desc *d = &op->u.get_rows;
        op->kind = MN_OP_GET_ROWS;
        int64_t n_rows = 50;
        d->T = T;
        d->D = c->D;
        d->type = c->type;
        d->table = rand_weights(a, c->type, n_rows, c->D, &d->row_bytes);
        int32_t *ids = gt_host(a, (size_t)T * sizeof(int32_t), NULL);
        for (int64_t t = 0; t < T; t++) ids[t] = t == 0 ? (int32_t)n_rows - 1 : gt_rnd_int((int)n_rows);
        d->ids = ids;
        d->y_stride = c->D + 3;
        d->y = gt_out(a, T, c->D, d->y_stride, &j->out);
        *j = (judge){.out = j->out, .rows = T, .cols = c->D, .stride = d->y_stride, .bitexact = 1};
        break;
    }
    case OP_RMSNORM: {
        mn_rmsnorm_desc *d = &op->u.rmsnorm;
        op->kind = MN_OP_RMSNORM;
        d->T = T;
        d->D = c->D;
        d->eps = 1e-5f;
        d->x_stride = d->y_stride = row_stride(c, c->D);
        d->w = gt_matrix(a, 1, c->D, c->D, 0.5f, 1.5f, NULL);
        int inplace = c->flags & F_INPLACE;
        float *x = inplace ? gt_matrix(a, T, c->D, d->x_stride, -2, 2, &j->out) : gt_matrix(a, T, c->D, d->x_stride, -2, 2, NULL);
        for (int64_t i = 0; i < c->D; i++) x[i] *= 1e-3f; /* a row where eps matters */
        d->x = x;
        d->y = inplace ? x : gt_out(a, T, c->D, d->y_stride, &j->out);
        j->rows = T, j->cols = c->D, j->stride = d->y_stride, j->atol = 1e-7, j->rtol = 1e-5;
        break;
    }
    case OP_MATMUL: {
        mn_matmul_desc *d = &op->u.matmul;
        op->kind = MN_OP_MATMUL;
        d->T = T;
        d->N = c->N;
        d->K = c->D;
        d->x_stride = row_stride(c, c->D);
        d->y_stride = row_stride(c, c->N) + 2;
        float *x = gt_matrix(a, T, c->D, d->x_stride, -1, 1, NULL);
        d->x = x;
        d->w = rand_weights(a, c->type, c->N, c->D, &d->w_row_bytes);
        d->w_type = c->type;
        d->bias = c->flags & F_BIAS ? gt_matrix(a, 1, c->N, c->N, -1, 1, NULL) : NULL;
        d->accumulate = !!(c->flags & F_ACC);
        d->y = d->accumulate ? gt_matrix(a, T, c->N, d->y_stride, -1, 1, &j->out) : gt_out(a, T, c->N, d->y_stride, &j->out);
        j->rows = T, j->cols = c->N, j->stride = d->y_stride;
        /* ops.h contract; the cuBLAS path (T > 8) with any type but F32: plus the bf16 allowance */
        double k = c->type == MN_F32 || T <= MN_CUDA_GEMV_MAX_T ? 1e-4 : 1e-4 + 1.0 / 128.0;
        j->elem_tol = gt_host(a, (size_t)(T * c->N) * sizeof(float), NULL);
        float *wrow = gt_host(a, (size_t)c->D * sizeof(float), NULL);
        for (int64_t n = 0; n < c->N; n++) {
            mn_ref_dequant_row(c->type, (const char *)d->w + n * d->w_row_bytes, wrow, c->D);
            for (int64_t t = 0; t < T; t++) {
                double s = d->bias ? fabs(d->bias[n]) : 0.0;
                for (int64_t i = 0; i < c->D; i++) s += fabs((double)x[t * d->x_stride + i] * wrow[i]);
                double y0 = d->accumulate ? fabs(d->y[t * d->y_stride + n]) : 0.0;
                j->elem_tol[t * c->N + n] = (float)(k * s + 2e-7 * y0 + 1e-7);
            }
        }
        break;
    }
    case OP_ROPE: {
        mn_rope_desc *d = &op->u.rope;
        op->kind = MN_OP_ROPE;
        d->T = T;
        d->n_head = c->nh;
        d->head_dim = c->hd;
        d->n_rot = c->nrot;
        d->mode = c->mode;
        d->x_stride = row_stride(c, (int64_t)c->nh * c->hd);
        d->x = gt_matrix(a, T, (int64_t)c->nh * c->hd, d->x_stride, -3, 3, &j->out);
        int32_t *pos = gt_host(a, (size_t)T * sizeof(int32_t), NULL);
        for (int64_t t = 0; t < T; t++) pos[t] = t == 0 ? 0 : gt_rnd_int(8192);
        d->pos = pos;
        float *inv = gt_host(a, (size_t)(c->nrot / 2) * sizeof(float), NULL);
        for (int i = 0; i < c->nrot / 2; i++) inv[i] = powf(10000.0f, -2.0f * (float)i / (float)c->nrot);
        d->inv_freq = inv;
        d->attn_factor = c->flags & F_YARN ? 1.2345f : 1.0f;
        j->rows = T, j->cols = (int64_t)c->nh * c->hd, j->stride = d->x_stride, j->atol = 4e-6, j->rtol = 1e-6;
        break;
    }
    case OP_KV_STORE: {
        mn_kv_store_desc *d = &op->u.kv_store;
        op->kind = MN_OP_KV_STORE;
        int32_t L[3];
        d->kv = make_pool(a, c, L, &j->out);
        int64_t row = (int64_t)c->nkv * c->hd;
        d->T = T;
        d->k_stride = row + 3;
        d->v_stride = row + 7;
        float *k = gt_host(a, (size_t)(T * d->k_stride) * sizeof(float), NULL);
        float *v = gt_host(a, (size_t)(T * d->v_stride) * sizeof(float), NULL);
        for (int64_t i = 0; i < T * d->k_stride; i++) k[i] = gt_f16_edge();
        for (int64_t i = 0; i < T * d->v_stride; i++) v[i] = gt_f16_edge();
        d->k = k;
        d->v = v;
        int32_t *seq = gt_host(a, (size_t)T * sizeof(int32_t), NULL), *pos = gt_host(a, (size_t)T * sizeof(int32_t), NULL);
        for (int64_t t = 0; t < T; t++) { /* distinct (seq, pos), the sequences interleaved */
            for (;;) {
                int32_t s = (int32_t)((t + gt_rnd_int(2)) % 3), p = gt_rnd_int(L[s]), dup = 0;
                for (int64_t u = 0; u < t; u++) dup |= seq[u] == s && pos[u] == p;
                if (!dup) { seq[t] = s; pos[t] = p; break; }
            }
        }
        d->seq = seq;
        d->pos = pos;
        j->whole = 1, j->bitexact = 1;
        break;
    }
    case OP_ATTENTION: {
        mn_attention_desc *d = &op->u.attention;
        op->kind = MN_OP_ATTENTION;
        int32_t L[3];
        int pool_idx;
        d->kv = make_pool(a, c, L, &pool_idx);
        d->T = T;
        d->n_head = c->nh;
        d->n_kv_head = c->nkv;
        d->head_dim = c->hd;
        d->scale = 1.0f / sqrtf((float)c->hd);
        float vmax = 0.0f; /* every valid position filled; the rest stays NaN */
        for (int s = 0; s < 3; s++)
            for (int32_t p = 0; p < L[s]; p++)
                for (int32_t h = 0; h < c->nkv; h++) {
                    int64_t off = mn_kv_offset(&d->kv, s, p, h);
                    for (int32_t i = 0; i < c->hd; i++) {
                        d->kv.k[off + i] = mn_fp32_to_fp16(gt_unif(-1, 1));
                        d->kv.v[off + i] = mn_fp32_to_fp16(gt_unif(-2, 2));
                        vmax = fmaxf(vmax, fabsf(mn_fp16_to_fp32(d->kv.v[off + i])));
                    }
                }
        d->q_stride = (int64_t)c->nh * c->hd + 4;
        d->q = gt_matrix(a, T, (int64_t)c->nh * c->hd, d->q_stride, -3, 3, NULL); /* peaky softmaxes too */
        int32_t *seq = gt_host(a, (size_t)T * sizeof(int32_t), NULL), *pos = gt_host(a, (size_t)T * sizeof(int32_t), NULL);
        for (int64_t t = 0; t < T; t++) {
            int32_t s = (int32_t)((t + 1) % 3);
            seq[t] = s;
            int32_t p = t < 3 ? L[s] - 1 : (t % 4 == 0 ? c->bs - 1 : (t % 4 == 1 ? c->bs : gt_rnd_int(L[s])));
            pos[t] = p < L[s] ? p : L[s] - 1;
        }
        d->seq = seq;
        d->pos = pos;
        for (int64_t t = 0; t < T; t++) d->max_pos = pos[t] + 1 > d->max_pos ? pos[t] + 1 : d->max_pos;
        d->out_stride = (int64_t)c->nh * c->hd + 3;
        d->out = gt_out(a, T, (int64_t)c->nh * c->hd, d->out_stride, &j->out);
        j->rows = T, j->cols = (int64_t)c->nh * c->hd, j->stride = d->out_stride;
        j->atol = 1e-4 * vmax + 1e-5;
        break;
    }
    case OP_SILU_MUL: {
        mn_silu_mul_desc *d = &op->u.silu_mul;
        op->kind = MN_OP_SILU_MUL;
        d->T = T;
        d->F = c->D;
        d->gate_stride = d->up_stride = d->y_stride = row_stride(c, c->D);
        int inplace = c->flags & F_INPLACE;
        float *g = gt_matrix(a, T, c->D, d->gate_stride, -8, 8, inplace ? &j->out : NULL);
        for (int64_t i = 0; i < c->D; i += 7) g[i] *= 15.0f; /* deep into both tails of exp */
        d->gate = g;
        d->up = gt_matrix(a, T, c->D, d->up_stride, -2, 2, NULL);
        d->y = inplace ? g : gt_out(a, T, c->D, d->y_stride, &j->out);
        j->rows = T, j->cols = c->D, j->stride = d->y_stride, j->atol = 1e-7, j->rtol = 2e-6;
        break;
    }
    case OP_ADD: {
        mn_add_desc *d = &op->u.add;
        op->kind = MN_OP_ADD;
        d->T = T;
        d->D = c->D;
        d->y_stride = row_stride(c, c->D);
        d->x_stride = c->D + 1;
        d->x = gt_matrix(a, T, c->D, d->x_stride, -1, 1, NULL);
        d->y = gt_matrix(a, T, c->D, d->y_stride, -1, 1, &j->out);
        j->rows = T, j->cols = c->D, j->stride = d->y_stride, j->bitexact = 1;
        break;
    }
    }
}

/* The descriptor with every host pointer replaced by its device twin. */
static void to_device(gt_arena *a, mn_op *op) {
#define DEV(p) ((p) = gt_dev_of(a, (p)))
    switch (op->kind) {
    case MN_OP_GET_ROWS: DEV(op->u.get_rows.ids); DEV(op->u.get_rows.table); DEV(op->u.get_rows.y); break;
    case MN_OP_RMSNORM: DEV(op->u.rmsnorm.x); DEV(op->u.rmsnorm.w); DEV(op->u.rmsnorm.y); break;
    case MN_OP_MATMUL:
        DEV(op->u.matmul.x); DEV(op->u.matmul.w); DEV(op->u.matmul.y);
        if (op->u.matmul.bias) DEV(op->u.matmul.bias);
        break;
    case MN_OP_ROPE: DEV(op->u.rope.x); DEV(op->u.rope.pos); DEV(op->u.rope.inv_freq); break;
    case MN_OP_KV_STORE:
        DEV(op->u.kv_store.k); DEV(op->u.kv_store.v); DEV(op->u.kv_store.seq); DEV(op->u.kv_store.pos);
        DEV(op->u.kv_store.kv.k); DEV(op->u.kv_store.kv.v);
        DEV(op->u.kv_store.kv.block_indptr); DEV(op->u.kv_store.kv.block_indices);
        break;
    case MN_OP_ATTENTION:
        DEV(op->u.attention.q); DEV(op->u.attention.seq); DEV(op->u.attention.pos); DEV(op->u.attention.out);
        DEV(op->u.attention.kv.k); DEV(op->u.attention.kv.v);
        DEV(op->u.attention.kv.block_indptr); DEV(op->u.attention.kv.block_indices);
        break;
    case MN_OP_SILU_MUL: DEV(op->u.silu_mul.gate); DEV(op->u.silu_mul.up); DEV(op->u.silu_mul.y); break;
    case MN_OP_ADD: DEV(op->u.add.y); DEV(op->u.add.x); break;
    case MN_OP_LORA: case MN_OP_WAIT_COPY: case MN_OP_SAMPLE: case MN_OP_COUNT: break;
    }
#undef DEV
}

static void run_ref(const mn_op *op) {
    switch (op->kind) {
    case MN_OP_GET_ROWS: mn_ref_get_rows(&op->u.get_rows); break;
    case MN_OP_RMSNORM: mn_ref_rmsnorm(&op->u.rmsnorm); break;
    case MN_OP_MATMUL: mn_ref_matmul(&op->u.matmul); break;
    case MN_OP_ROPE: mn_ref_rope(&op->u.rope); break;
    case MN_OP_KV_STORE: mn_ref_kv_store(&op->u.kv_store); break;
    case MN_OP_ATTENTION: mn_ref_attention(&op->u.attention); break;
    case MN_OP_SILU_MUL: mn_ref_silu_mul(&op->u.silu_mul); break;
    case MN_OP_ADD: mn_ref_add(&op->u.add); break;
    case MN_OP_LORA: mn_ref_lora(&op->u.lora); break;
    case MN_OP_WAIT_COPY: case MN_OP_SAMPLE: case MN_OP_COUNT: break;
    }
}

static mn_err run_cuda(const mn_op *op, void *work, size_t work_bytes, cublasHandle_t blas, cudaStream_t s, mn_errbuf *eb) {
    switch (op->kind) {
    case MN_OP_GET_ROWS: return mn_cuda_get_rows(&op->u.get_rows, s, eb);
    case MN_OP_RMSNORM: return mn_cuda_rmsnorm(&op->u.rmsnorm, s, eb);
    case MN_OP_MATMUL: return mn_cuda_matmul(&op->u.matmul, work, work_bytes, blas, s, eb);
    case MN_OP_ROPE: return mn_cuda_rope(&op->u.rope, s, eb);
    case MN_OP_KV_STORE: return mn_cuda_kv_store(&op->u.kv_store, s, eb);
    case MN_OP_ATTENTION: return mn_cuda_attention(&op->u.attention, work, work_bytes, s, eb);
    case MN_OP_SILU_MUL: return mn_cuda_silu_mul(&op->u.silu_mul, s, eb);
    case MN_OP_ADD: return mn_cuda_add(&op->u.add, s, eb);
    case MN_OP_LORA: case MN_OP_WAIT_COPY: case MN_OP_SAMPLE: case MN_OP_COUNT: break;
    }
    return MN_EINVALID;
}

/* Compare got against want (the reference's output allocation) under judge j; init is the
 * allocation before either ran. Returns 1 if it passes; fills the worst error and ratio. */
static int compare(const judge *j, const uint8_t *init, const uint8_t *want, const uint8_t *got, size_t bytes,
                   double *max_err, double *max_ratio, char *why, size_t why_len) {
    *max_err = 0, *max_ratio = 0;
    if (j->whole) {
        for (size_t i = 0; i < bytes; i++)
            if (want[i] != got[i]) {
                snprintf(why, why_len, "byte %zu: got 0x%02x want 0x%02x", i, got[i], want[i]);
                return 0;
            }
        return 1;
    }
    (void)init;
    for (size_t i = 0; i + 4 <= bytes; i += 4) {
        int64_t e = (int64_t)(i / 4), r = e / j->stride, col = e % j->stride;
        int inside = r < j->rows && col < j->cols;
        float a, b;
        memcpy(&a, got + i, 4);
        memcpy(&b, want + i, 4);
        if (memcmp(got + i, want + i, 4) == 0 && (!inside || isfinite(a))) continue;
        if (!inside || j->bitexact) {
            if (inside) {
                snprintf(why, why_len, "[%lld,%lld]: got %.9g want %.9g (bit-exact op)", (long long)r, (long long)col, a, b);
                return 0;
            }
            snprintf(why, why_len, "wrote outside the output at float %lld (row %lld col %lld)", (long long)e,
                     (long long)r, (long long)col);
            return 0;
        }
        double err = fabs((double)a - (double)b);
        double tol = j->elem_tol ? j->elem_tol[r * j->cols + col] : j->atol + j->rtol * fabs(b);
        if (!isfinite(a) || !isfinite(b) || !(err <= tol)) {
            snprintf(why, why_len, "[%lld,%lld]: got %.9g want %.9g (tol %.3g)", (long long)r, (long long)col, a, b, tol);
            return 0;
        }
        if (err > *max_err) *max_err = err;
        if (tol > 0 && err / tol > *max_ratio) *max_ratio = err / tol;
    }
    return 1;
}

static const char *type_of(const tcase *c) {
    return c->op == OP_GET_ROWS || c->op == OP_MATMUL ? mn_dtype_name(c->type) : "";
}

/* One case: build, upload, ref, cuda, compare, then time the cuda op. Returns 1 on pass. */
static int run_case(const tcase *c, cublasHandle_t blas, cudaStream_t s) {
    gt_arena a;
    gt_arena_init(&a);
    gt_seed(c->seed);
    mn_op op = {0};
    judge j;
    build(&a, c, &op, &j);
    int ok = 0;
    char why[640] = "";
    double err = 0, ratio = 0, us = 0;
    size_t out_bytes = a.bytes[j.out];
    uint8_t *init = malloc(out_bytes), *got = malloc(out_bytes);
    mn_errbuf eb = {{0}};
    mn_op dop = op;
    void *work = NULL;
    size_t work_bytes = op.kind == MN_OP_MATMUL      ? mn_cuda_matmul_work_bytes(&op.u.matmul)
                        : op.kind == MN_OP_ATTENTION ? mn_cuda_attention_work_bytes(&op.u.attention)
                                                     : 0;
    if (!init || !got) {
        snprintf(why, sizeof why, "out of host memory");
        goto done;
    }
    memcpy(init, a.host[j.out], out_bytes);
    if (gt_upload(&a, &eb) != MN_OK || (work_bytes && cudaMalloc(&work, work_bytes) != cudaSuccess)) {
        snprintf(why, sizeof why, "upload: %s", eb.msg[0] ? eb.msg : "cudaMalloc of scratch failed");
        goto done;
    }
    to_device(&a, &dop);
    run_ref(&op);
    mn_err e = run_cuda(&dop, work, work_bytes, blas, s, &eb);
    cudaError_t ce = cudaStreamSynchronize(s);
    if (e == MN_OK && ce == cudaSuccess) ce = cudaMemcpy(got, a.dev[j.out], out_bytes, cudaMemcpyDeviceToHost);
    if (e != MN_OK || ce != cudaSuccess) {
        snprintf(why, sizeof why, "%s", e != MN_OK ? eb.msg : cudaGetErrorString(ce));
        goto done;
    }
    ok = compare(&j, init, a.host[j.out], got, out_bytes, &err, &ratio, why, sizeof why);
    if (ok) { /* only a correct op is timed */
        cudaEvent_t e0, e1;
        float ms = 0;
        cudaEventCreate(&e0);
        cudaEventCreate(&e1);
        cudaEventRecord(e0, s);
        for (int r = 0; r < 10; r++) run_cuda(&dop, work, work_bytes, blas, s, &eb);
        cudaEventRecord(e1, s);
        cudaEventSynchronize(e1);
        cudaEventElapsedTime(&ms, e0, e1);
        us = ms * 100.0; /* ms / 10 runs, in microseconds */
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
    }
done:;
    char shape[96];
    snprintf(shape, sizeof shape, "T=%lld D=%lld N=%lld h=%d/%d hd=%d bs=%d fl=%d", (long long)c->T, (long long)c->D,
             (long long)c->N, c->nh, c->nkv, c->hd, c->bs, c->flags);
    if (ok && j.bitexact)
        printf("%-9s %-5s %-46s exact              %9.1f us  ok\n", op_names[c->op], type_of(c), shape, us);
    else if (ok)
        printf("%-9s %-5s %-46s err=%-8.2g r=%-5.3f %9.1f us  ok\n", op_names[c->op], type_of(c), shape, err, ratio, us);
    else
        printf("%-9s %-5s %-46s FAIL: %s\n", op_names[c->op], type_of(c), shape, why);
    if (work) cudaFree(work);
    free(init);
    free(got);
    gt_arena_free(&a);
    return ok;
}

/* ---- lora: its own table (up to three outputs, a segment array of device pointers) ----
 * Per case: T rows, K inputs, n_out outputs of N columns; segments with the given ranks
 * (each output gets the whole rank; the A of a three-output case is [3r, K] as Q/K/V
 * pass it), types cycling F32 / F16 / BF16, rows shuffled, the last rows of the batch in
 * no segment (they must keep their bytes). Tolerance is the contract's, per element:
 *   1e-4 * (|y_in| + |scale| * sum_j (sum_k |x_k a_jk|) |b_nj|). */
typedef struct lcase {
    int32_t T, K, n_out, N, rows_per_seg, n_seg, r[4];
    uint32_t seed;
} lcase;

static const lcase lcases[] = {
    {.T = 9, .K = 576, .n_out = 3, .N = 192, .rows_per_seg = 1, .n_seg = 8, .r = {4, 8, 16, 64}, .seed = 170},
    {.T = 70, .K = 576, .n_out = 2, .N = 1536, .rows_per_seg = 15, .n_seg = 4, .r = {4, 8, 16, 64}, .seed = 171},
    {.T = 40, .K = 1536, .n_out = 1, .N = 576, .rows_per_seg = 9, .n_seg = 4, .r = {64, 16, 8, 4}, .seed = 172},
    {.T = 33, .K = 300, .n_out = 1, .N = 77, .rows_per_seg = 32, .n_seg = 1, .r = {16}, .seed = 173},
    /* gathered with an odd K: unaligned A rows and x rows take the scalar loop of lora_dot_warp */
    {.T = 12, .K = 301, .n_out = 2, .N = 130, .rows_per_seg = 1, .n_seg = 10, .r = {4, 8, 16, 64}, .seed = 174},
    /* the bench's decode shape: 32 adapters of rank 16 on q/k/v, one token each */
    {.T = 32, .K = 4096, .n_out = 3, .N = 1024, .rows_per_seg = 1, .n_seg = 32, .r = {16, 16, 16, 16}, .seed = 175},
};

/* element i of an F32 / F16 / BF16 array, as f32 */
static double lora_elem_h(const void *p, mn_dtype t, int64_t i) {
    if (t == MN_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return t == MN_F16 ? mn_fp16_to_fp32(h) : mn_bf16_to_fp32(h);
}

/* Split phases (ops.h, tensor parallelism): on the device outputs left by the fused op,
 * SHRINK (v to global memory) then EXPAND from init must give the fused op's bits, and
 * SHRINK alone must leave every output byte as it was. Leaves the fused result in place. */
static int lora_split_check(const gt_arena *a, const mn_lora_desc *d, const mn_lora_desc *dd, const int *yi,
                            uint8_t *const *init, cudaStream_t s, char *why, size_t nwhy) {
    const int64_t nv = mn_lora_v_floats(d->seg, d->n_seg);
    uint8_t *fused[MN_LORA_MAX_OUT] = {0}, *now = NULL;
    float *v = NULL;
    int ok = cudaMalloc((void **)&v, (size_t)(nv > 0 ? nv : 1) * sizeof(float)) == cudaSuccess;
    if (!ok) snprintf(why, nwhy, "split phases: cudaMalloc of v");
    for (int o = 0; o < d->n_out && ok; o++) {
        size_t bytes = a->bytes[yi[o]];
        fused[o] = malloc(bytes);
        ok = cudaMemcpy(fused[o], a->dev[yi[o]], bytes, cudaMemcpyDeviceToHost) == cudaSuccess &&
             cudaMemcpy(a->dev[yi[o]], init[o], bytes, cudaMemcpyHostToDevice) == cudaSuccess;
    }
    mn_lora_desc ds = *dd;
    ds.v = v;
    mn_errbuf eb = {{0}};
    /* the fused op without scratch (gathered: the shrink inside the expand kernel) */
    if (ok) {
        mn_err e = mn_cuda_lora(dd, NULL, 0, s, &eb);
        cudaError_t ce = cudaStreamSynchronize(s);
        if (e != MN_OK || ce != cudaSuccess) {
            snprintf(why, nwhy, "fused without scratch: %s", e != MN_OK ? eb.msg : cudaGetErrorString(ce));
            ok = 0;
        }
        for (int o = 0; o < d->n_out && ok; o++) {
            size_t bytes = a->bytes[yi[o]];
            now = realloc(now, bytes);
            cudaMemcpy(now, a->dev[yi[o]], bytes, cudaMemcpyDeviceToHost);
            if (memcmp(now, fused[o], bytes) != 0) {
                snprintf(why, nwhy, "out %d: the fused op without scratch differs from the one with scratch", o);
                ok = 0;
            }
            cudaMemcpy(a->dev[yi[o]], init[o], bytes, cudaMemcpyHostToDevice);
        }
    }
    for (int phase = MN_LORA_SHRINK; phase <= MN_LORA_EXPAND && ok; phase++) {
        ds.phase = phase;
        mn_err e = mn_cuda_lora(&ds, NULL, 0, s, &eb);
        cudaError_t ce = cudaStreamSynchronize(s);
        if (e != MN_OK || ce != cudaSuccess) {
            snprintf(why, nwhy, "split phase %d: %s", phase, e != MN_OK ? eb.msg : cudaGetErrorString(ce));
            ok = 0;
        }
        for (int o = 0; o < d->n_out && ok; o++) {
            size_t bytes = a->bytes[yi[o]];
            now = realloc(now, bytes);
            cudaMemcpy(now, a->dev[yi[o]], bytes, cudaMemcpyDeviceToHost);
            const uint8_t *want = phase == MN_LORA_SHRINK ? init[o] : fused[o];
            if (memcmp(now, want, bytes) != 0) {
                snprintf(why, nwhy, "out %d: %s", o,
                         phase == MN_LORA_SHRINK ? "the shrink phase wrote to y" : "shrink + expand differ from the fused op");
                ok = 0;
            }
        }
    }
    for (int o = 0; o < d->n_out; o++) free(fused[o]);
    free(now);
    cudaFree(v);
    return ok;
}

static int lora_case(const lcase *c, cudaStream_t s) {
    gt_arena a;
    gt_arena_init(&a);
    gt_seed(c->seed);
    static const mn_dtype types[3] = {MN_F32, MN_F16, MN_BF16};
    int xi, yi[MN_LORA_MAX_OUT], si, ri, wi;
    float *x = gt_matrix(&a, c->T, c->K, c->K, -1, 1, &xi);
    mn_lora_desc d = {.K = c->K, .x = x, .x_stride = c->K, .n_out = c->n_out, .n_seg = c->n_seg};
    for (int o = 0; o < c->n_out; o++) {
        d.N[o] = c->N + o;
        d.y_stride[o] = d.N[o] + 3;
        d.y[o] = gt_matrix(&a, c->T, d.N[o], d.y_stride[o], -1, 1, &yi[o]);
    }
    mn_lora_seg *seg = gt_host(&a, (size_t)c->n_seg * sizeof *seg, &si);
    int32_t *rows = gt_host(&a, (size_t)c->T * sizeof(int32_t), &ri);
    for (int32_t i = 0; i < c->T; i++) rows[i] = i;
    for (int32_t i = c->T - 1; i > 0; i--) {
        int32_t j = gt_rnd_int(i + 1), t = rows[i];
        rows[i] = rows[j];
        rows[j] = t;
    }
    size_t wbytes = 0;
    for (int g = 0; g < c->n_seg; g++) {
        int64_t r = c->r[g % 4], n = r * c->n_out * c->K;
        for (int o = 0; o < c->n_out; o++) n += r * d.N[o];
        wbytes += (size_t)n * 4 + 64;
    }
    uint8_t *w = gt_host(&a, wbytes, &wi), *wp = w;
    int32_t covered = 0;
    for (int g = 0; g < c->n_seg; g++) {
        mn_lora_seg *q = &seg[g];
        q->r = c->r[g % 4] * c->n_out;
        q->type = types[g % 3];
        q->start = covered;
        q->n_rows = c->rows_per_seg;
        covered += q->n_rows;
        size_t es = q->type == MN_F32 ? 4 : 2;
        void *arrs[1 + MN_LORA_MAX_OUT] = {0};
        int64_t lens[1 + MN_LORA_MAX_OUT];
        lens[0] = (int64_t)q->r * c->K;
        for (int o = 0; o < c->n_out; o++) {
            q->r_off[o] = o * c->r[g % 4];
            q->r_out[o] = c->r[g % 4];
            q->scale[o] = gt_unif(0.25f, 2.0f);
            lens[1 + o] = (int64_t)q->r_out[o] * d.N[o];
        }
        for (int m = 0; m < 1 + c->n_out; m++) {
            arrs[m] = wp;
            for (int64_t i = 0; i < lens[m]; i++) {
                float v = gt_unif(-0.5f, 0.5f);
                if (q->type == MN_F32) ((float *)wp)[i] = v;
                else if (q->type == MN_F16) ((uint16_t *)wp)[i] = mn_fp32_to_fp16(v);
                else ((uint16_t *)wp)[i] = mn_fp32_to_bf16(v);
            }
            wp += ((size_t)lens[m] * es + 15) / 16 * 16;
        }
        q->a = arrs[0];
        for (int o = 0; o < c->n_out; o++) q->b[o] = arrs[1 + o];
        d.max_rows = q->n_rows > d.max_rows ? q->n_rows : d.max_rows;
        d.max_r = q->r > d.max_r ? q->r : d.max_r;
    }
    d.seg = seg;
    d.rows = rows;
    int ok = 1;
    char why[640] = "";
    double worst = 0, us = 0;
    mn_errbuf eb = {{0}};
    uint8_t *init[MN_LORA_MAX_OUT] = {0}, *got = NULL;
    int *seg_of = NULL;
    double *sx = NULL;
    mn_lora_seg *dseg = malloc((size_t)c->n_seg * sizeof *dseg);
    void *lwork = NULL;
    for (int o = 0; o < c->n_out; o++) {
        init[o] = malloc(a.bytes[yi[o]]);
        memcpy(init[o], a.host[yi[o]], a.bytes[yi[o]]);
    }
    if (covered > c->T || gt_upload(&a, &eb) != MN_OK) {
        snprintf(why, sizeof why, "setup: %s", eb.msg[0] ? eb.msg : "segments cover more rows than T");
        ok = 0;
        goto done;
    }
    /* the device seg array holds device addresses */
    for (int g = 0; g < c->n_seg; g++) {
        dseg[g] = seg[g];
        dseg[g].a = gt_dev_of(&a, seg[g].a);
        for (int o = 0; o < c->n_out; o++) dseg[g].b[o] = gt_dev_of(&a, seg[g].b[o]);
    }
    mn_lora_desc dd = d;
    dd.x = gt_dev_of(&a, d.x);
    for (int o = 0; o < c->n_out; o++) dd.y[o] = gt_dev_of(&a, d.y[o]);
    dd.seg = gt_dev_of(&a, d.seg);
    dd.rows = gt_dev_of(&a, d.rows);
    if (cudaMemcpy((void *)dd.seg, dseg, (size_t)c->n_seg * sizeof *dseg, cudaMemcpyHostToDevice) != cudaSuccess) {
        snprintf(why, sizeof why, "upload of the seg array");
        ok = 0;
        goto done;
    }
    mn_ref_lora(&d);
    /* with the scratch the backend reserves (gathered: shrink once, then expand) */
    size_t work_n = mn_cuda_lora_work_bytes(&dd);
    if (work_n && cudaMalloc(&lwork, work_n) != cudaSuccess) {
        snprintf(why, sizeof why, "cudaMalloc of %zu scratch bytes", work_n);
        ok = 0;
        goto done;
    }
    mn_err e = mn_cuda_lora(&dd, lwork, work_n, s, &eb);
    cudaError_t ce = cudaStreamSynchronize(s);
    if (e != MN_OK || ce != cudaSuccess) {
        snprintf(why, sizeof why, "%s", e != MN_OK ? eb.msg : cudaGetErrorString(ce));
        ok = 0;
        goto done;
    }
    /* per batch row: its segment (or -1) and sx[j] = sum_k |x_k a_jk| for the bounds */
    seg_of = malloc((size_t)c->T * sizeof *seg_of);
    sx = calloc((size_t)c->T * (size_t)d.max_r, sizeof *sx);
    for (int32_t t = 0; t < c->T; t++) seg_of[t] = -1;
    for (int g = 0; g < c->n_seg; g++)
        for (int32_t k = 0; k < seg[g].n_rows; k++) {
            int32_t t = rows[seg[g].start + k];
            seg_of[t] = g;
            for (int32_t j = 0; j < seg[g].r; j++)
                for (int64_t q = 0; q < c->K; q++) {
                    double av = lora_elem_h(seg[g].a, seg[g].type, (int64_t)j * c->K + q);
                    sx[(size_t)t * d.max_r + j] += fabs(x[t * c->K + q] * av);
                }
        }
    for (int o = 0; o < c->n_out && ok; o++) {
        size_t bytes = a.bytes[yi[o]];
        got = realloc(got, bytes);
        cudaMemcpy(got, a.dev[yi[o]], bytes, cudaMemcpyDeviceToHost);
        const float *want = a.host[yi[o]], *g32 = (const float *)got, *in = (const float *)init[o];
        for (size_t i = 0; i < bytes / 4 && ok; i++) {
            int64_t t = (int64_t)i / d.y_stride[o], n = (int64_t)i % d.y_stride[o];
            int g = t < c->T && n < d.N[o] ? seg_of[t] : -1;
            if (g < 0 || !seg[g].b[o]) { /* no adapter, a stride gap or the guard: bytes unchanged */
                if (memcmp(got + 4 * i, init[o] + 4 * i, 4) != 0) {
                    snprintf(why, sizeof why, "out %d: float %zu (row %lld col %lld) changed outside the segments", o,
                             i, (long long)t, (long long)n);
                    ok = 0;
                }
                continue;
            }
            const mn_lora_seg *q = &seg[g];
            double bound = 0;
            for (int32_t j = 0; j < q->r_out[o]; j++)
                bound += sx[(size_t)t * d.max_r + q->r_off[o] + j] *
                         fabs(lora_elem_h(q->b[o], q->type, (int64_t)j * d.N[o] + n));
            double tol = 1e-4 * (fabs(in[i]) + fabs(q->scale[o]) * bound), err = fabs((double)g32[i] - want[i]);
            if (!isfinite(g32[i]) || !(err <= tol)) {
                snprintf(why, sizeof why, "out %d [%lld,%lld]: got %.9g want %.9g (tol %.3g)", o, (long long)t,
                         (long long)n, g32[i], want[i], tol);
                ok = 0;
            }
            if (tol > 0 && err / tol > worst) worst = err / tol;
        }
    }
    if (ok) ok = lora_split_check(&a, &d, &dd, yi, init, s, why, sizeof why);
    if (ok) { /* only a correct op is timed (y keeps accumulating: harmless) */
        cudaEvent_t e0, e1;
        float ms = 0;
        cudaEventCreate(&e0);
        cudaEventCreate(&e1);
        cudaEventRecord(e0, s);
        for (int k = 0; k < 10; k++) mn_cuda_lora(&dd, lwork, work_n, s, &eb);
        cudaEventRecord(e1, s);
        cudaEventSynchronize(e1);
        cudaEventElapsedTime(&ms, e0, e1);
        us = ms * 100.0;
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
    }
done:
    printf("%-9s %-5s T=%d K=%d N=%d out=%d seg=%dx%d r=%d/%d/%d/%d %s r=%-5.3f %9.1f us  %s%s\n", "lora", "mixed",
           c->T, c->K, c->N, c->n_out, c->n_seg, c->rows_per_seg, c->r[0], c->r[1], c->r[2], c->r[3],
           c->rows_per_seg == 1 ? "gathered " : "segmented", worst, us, ok ? "ok" : "FAIL: ", ok ? "" : why);
    if (lwork) cudaFree(lwork);
    for (int o = 0; o < c->n_out; o++) free(init[o]);
    free(got);
    free(dseg);
    free(seg_of);
    free(sx);
    gt_arena_free(&a);
    return ok;
}

int gt_backend_smoke(void); /* tests/gpu/test_cuda_backend.c */
int gt_lora_e2e(const char *device); /* tests/gpu/test_cuda_lora_e2e.c */
int gt_attention_long(cudaStream_t s); /* tests/gpu/test_cuda_attention.c */
int gt_gemv(cudaStream_t s, cublasHandle_t blas); /* tests/gpu/test_cuda_gemv.c */
int gt_session_e2e(const char *device); /* tests/gpu/test_cuda_session.c */
int gt_tp_e2e(void); /* tests/gpu/test_cuda_tp.c */
int gt_sample(cudaStream_t s); /* tests/gpu/test_cuda_sample.c */
int gt_session_sample(const char *device); /* tests/gpu/test_cuda_session_sample.c */
int gt_session_tp(const char *device); /* tests/gpu/test_cuda_session_tp.c */
int gt_real_model(const char *device); /* tests/gpu/test_cuda_real_model.c */

/* The check groups, in the order a plain run takes them. `test_cuda_ops GROUP...` runs only
 * the named ones, so a device script can give each its own process and timeout: a kernel
 * fault poisons the whole CUDA context, and a hang would eat the lease. */
static const char *const group_names[] = {"ops", "gemv", "sample", "attn", "backend", "lora",
                                          "session", "session_sample", "tp", "session_tp", "real"};
enum { N_GROUPS = (int)(sizeof group_names / sizeof group_names[0]) };

static int run_group(int g, cublasHandle_t blas, cudaStream_t s) {
    switch (g) {
    case 0: {
        int n = (int)(sizeof cases / sizeof cases[0]), pass = 0;
        for (int i = 0; i < n; i++) pass += run_case(&cases[i], blas, s);
        int nl = (int)(sizeof lcases / sizeof lcases[0]);
        for (int i = 0; i < nl; i++) pass += lora_case(&lcases[i], s);
        n += nl;
        printf("ops: %d/%d passed\n", pass, n);
        return pass == n;
    }
    case 1: return gt_gemv(s, blas);
    case 2: return gt_sample(s);
    case 3: return gt_attention_long(s);
    case 4: return gt_backend_smoke();
    case 5: return gt_lora_e2e("cuda");
    case 6: return gt_session_e2e("cuda");
    case 7: return gt_session_sample("cuda");
#ifdef MNEME_HAVE_NCCL
    case 8: return gt_tp_e2e();
    case 9: return gt_session_tp("cuda");
#else
    case 8:
    case 9: printf("%s: skipped (built without NCCL)\n", group_names[g]); return 1;
#endif
    case 10: return gt_real_model("cuda");
    }
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* a group killed by its timeout keeps its lines */
    int want[N_GROUPS];
    for (int g = 0; g < N_GROUPS; g++) want[g] = argc < 2;
    for (int a = 1; a < argc; a++) {
        int g = 0;
        while (g < N_GROUPS && strcmp(argv[a], group_names[g]) != 0) g++;
        if (g == N_GROUPS) {
            fprintf(stderr, "test_cuda_ops: unknown group '%s' (argument %d); groups:", argv[a], a);
            for (int k = 0; k < N_GROUPS; k++) fprintf(stderr, " %s", group_names[k]);
            fprintf(stderr, "\n");
            return 2;
        }
        want[g] = 1;
    }
    int count = 0;
    cudaError_t ce = cudaGetDeviceCount(&count);
    if (ce != cudaSuccess || count == 0) {
        printf("skipped: no CUDA device (%s)\n", ce != cudaSuccess ? cudaGetErrorString(ce) : "device count is 0");
        return 0;
    }
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
        printf("device 0: %s, sm_%d%d, %.1f GiB\n", prop.name, prop.major, prop.minor,
               (double)prop.totalGlobalMem / (1 << 30));
    cudaStream_t s;
    cublasHandle_t blas;
    if (cudaStreamCreate(&s) != cudaSuccess || cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
        printf("FAIL: cannot create a stream / cuBLAS handle\n");
        return 1;
    }
    int ok = 1;
    for (int g = 0; g < N_GROUPS; g++) {
        if (!want[g]) continue;
        int r = run_group(g, blas, s);
        printf("group %s: %s\n", group_names[g], r ? "passed" : "FAILED");
        fflush(stdout);
        ok = r && ok;
    }
    cublasDestroy(blas);
    cudaStreamDestroy(s);
    printf("%s\n", ok ? "ALL PASSED" : "FAILED");
    return ok ? 0 : 1;
}
