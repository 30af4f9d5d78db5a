/* kernels/cpu/matmul.c — mn_cpu_matmul: activation quantization, thread split and the
 * scalar level; the SIMD levels live in matmul_avx2.c and matmul_avx512vnni.c.
 *
 * One call: (1) the T rows of x are quantized once into the work buffer (q8_1 for
 * Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, q8_K for the K-quants), the blocks split across threads;
 * (2) barrier; (3) each thread computes a contiguous range of output rows n for all
 * tokens. Splitting by n, never by k, keeps every element's reduction independent of
 * the thread count (batch invariance, kernels/ops.h).
 */
#include "kernels/cpu/cpu_impl.h"
#include "kernels/cpu/matmul_impl.h"
#include "kernels/quant_math.h"

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static int is_legacy(mn_dtype t) {
    return t == MN_Q4_0 || t == MN_Q4_1 || t == MN_Q5_0 || t == MN_Q5_1 || t == MN_Q8_0;
}
static int is_kquant(mn_dtype t) { return t == MN_Q2_K || t == MN_Q3_K || t == MN_Q4_K || t == MN_Q5_K || t == MN_Q6_K; }

/* Byte offsets of the work-buffer parts (see matmul_impl.h). */
typedef struct layout { size_t qs, d, s, xc, bsums, scr, scr_per_thread, total; } layout;

static layout plan(const mn_matmul_desc *d, int nth) {
    layout L = {0};
    if (!is_legacy(d->w_type) && !is_kquant(d->w_type)) return L;
    size_t be = (size_t)mn_dtype_block_elems(d->w_type), nb = (size_t)d->K / be, T = (size_t)d->T;
    size_t off = 0;
    L.qs = off; off += align64(T * nb * be);
    L.d = off; off += align64(T * nb * sizeof(float));
    if (is_legacy(d->w_type)) {
        L.s = off; off += align64(T * nb * sizeof(float));
        L.xc = off; off += align64(T * nb * sizeof(int32_t));
        L.scr_per_thread = align64(MN__LQ_SCR_BYTES(nb));
        L.scr = off; off += (size_t)nth * L.scr_per_thread;
    } else {
        L.bsums = off; off += align64(T * nb * 16 * sizeof(int16_t));
        L.scr_per_thread = align64(MN__KQ_SCR_BYTES(nb));
        L.scr = off; off += (size_t)nth * L.scr_per_thread;
    }
    L.total = off + 64; /* room to align the caller's pointer */
    return L;
}

size_t mn_cpu_matmul_work_bytes(const mn_matmul_desc *d, int nth) {
    return plan(d, nth < 1 ? 1 : nth).total;
}

/* ---- scalar level --------------------------------------------------------------------- */

static float quant_group_scalar(const float *x, int n, int8_t *q) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    float d = amax / 127.0f;
    for (int i = 0; i < n; i++) q[i] = d == 0.0f ? 0 : (int8_t)nearbyintf(x[i] / d);
    return d;
}

/* Per element, the same sequence as mn_ref_matmul (so scalar == ref bit for bit). */
static float dot_legacy_scalar(mn_dtype t, const char *row, const mn__xq *xq, int64_t tok) {
    int64_t nb = xq->nb;
    const int8_t *qs = xq->qs + tok * nb * MN_QK;
    const float *xd = xq->d + tok * nb, *xs = xq->s + tok * nb;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *x = qs + b * MN_QK;
        int isum = 0;
        if (t == MN_Q8_0) {
            const mn_block_q8_0 *w = (const mn_block_q8_0 *)row + b;
            for (int j = 0; j < MN_QK; j++) isum += w->qs[j] * x[j];
            acc += (mn_fp16_to_fp32(w->d) * xd[b]) * (float)isum;
        } else if (t == MN_Q4_0) {
            const mn_block_q4_0 *w = (const mn_block_q4_0 *)row + b;
            for (int j = 0; j < 16; j++) isum += ((w->qs[j] & 15) - 8) * x[j] + ((w->qs[j] >> 4) - 8) * x[j + 16];
            acc += (mn_fp16_to_fp32(w->d) * xd[b]) * (float)isum;
        } else if (t == MN_Q5_0 || t == MN_Q5_1) {
            /* Q5_0 and Q5_1 share qh and qs; Q5_1's block is 2 bytes longer (the min) */
            const mn_block_q5_0 *w0 = (const mn_block_q5_0 *)row + b;
            const mn_block_q5_1 *w1 = (const mn_block_q5_1 *)row + b;
            const uint8_t *qs = t == MN_Q5_0 ? w0->qs : w1->qs;
            uint32_t qh = mn_q5_qh(t == MN_Q5_0 ? w0->qh : w1->qh);
            int off = t == MN_Q5_0 ? 16 : 0;
            for (int j = 0; j < 16; j++) {
                int q0 = (qs[j] & 15) | (int)(((qh >> j) & 1u) << 4), q1 = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
                isum += (q0 - off) * x[j] + (q1 - off) * x[j + 16];
            }
            if (t == MN_Q5_0) acc += (mn_fp16_to_fp32(w0->d) * xd[b]) * (float)isum;
            else acc += (mn_fp16_to_fp32(w1->d) * xd[b]) * (float)isum + mn_fp16_to_fp32(w1->m) * xs[b];
        } else {
            const mn_block_q4_1 *w = (const mn_block_q4_1 *)row + b;
            for (int j = 0; j < 16; j++) isum += (w->qs[j] & 15) * x[j] + (w->qs[j] >> 4) * x[j + 16];
            acc += (mn_fp16_to_fp32(w->d) * xd[b]) * (float)isum + mn_fp16_to_fp32(w->m) * xs[b];
        }
    }
    return acc;
}

static float dot_kquant_scalar(mn_dtype t, const char *row, const mn__xq *xq, int64_t tok) {
    int64_t nb = xq->nb;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *x = xq->qs + (tok * nb + b) * MN_QK_K;
        const int16_t *bs = xq->bsums + (tok * nb + b) * 16;
        float dx = xq->d[tok * nb + b];
        int isum = 0, imin = 0;
        if (t == MN_Q6_K) {
            const mn_block_q6_K *w = (const mn_block_q6_K *)(row + b * (int64_t)sizeof(mn_block_q6_K));
            for (int s = 0; s < 16; s++) {
                int ss = 0;
                for (int l = 0; l < 16; l++) ss += (mn_q6_K_value(w, 16 * s + l) - 32) * x[16 * s + l];
                isum += w->scales[s] * ss;
            }
            acc += (mn_fp16_to_fp32(w->d) * dx) * (float)isum;
            continue;
        }
        if (t == MN_Q2_K) {
            const mn_block_q2_K *w = (const mn_block_q2_K *)row + b;
            for (int s = 0; s < 16; s++) {
                int ss = 0;
                for (int l = 0; l < 16; l++) ss += mn_q2_K_value(w, 16 * s + l) * x[16 * s + l];
                isum += (w->scales[s] & 15) * ss;
                imin += (w->scales[s] >> 4) * bs[s];
            }
            acc += (mn_fp16_to_fp32(w->d) * dx) * (float)isum - (mn_fp16_to_fp32(w->dmin) * dx) * (float)imin;
            continue;
        }
        if (t == MN_Q3_K) {
            const mn_block_q3_K *w = (const mn_block_q3_K *)row + b;
            for (int s = 0; s < 16; s++) {
                int ss = 0;
                for (int l = 0; l < 16; l++) ss += mn_q3_K_value(w, 16 * s + l) * x[16 * s + l];
                isum += mn_q3_K_scale(w->scales, s) * ss;
            }
            acc += (mn_fp16_to_fp32(w->d) * dx) * (float)isum;
            continue;
        }
        const mn_block_q4_K *w4 = (const mn_block_q4_K *)row + b;
        const mn_block_q5_K *w5 = (const mn_block_q5_K *)row + b;
        const uint8_t *scales = t == MN_Q4_K ? w4->scales : w5->scales;
        const uint8_t *qs = t == MN_Q4_K ? w4->qs : w5->qs;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            mn_k4_scale_min(scales, j, &sc, &m);
            int ss = 0;
            for (int l = 0; l < 32; l++) {
                int v = (j & 1) ? (qs[32 * (j / 2) + l] >> 4) : (qs[32 * (j / 2) + l] & 15);
                if (t == MN_Q5_K) v |= ((w5->qh[l] >> j) & 1) << 4;
                ss += v * x[32 * j + l];
            }
            isum += sc * ss;
            imin += m * (bs[2 * j] + bs[2 * j + 1]);
        }
        uint16_t dd = t == MN_Q4_K ? w4->d : w5->d, dm = t == MN_Q4_K ? w4->dmin : w5->dmin;
        acc += (mn_fp16_to_fp32(dd) * dx) * (float)isum - (mn_fp16_to_fp32(dm) * dx) * (float)imin;
    }
    return acc;
}

static float dot_float_scalar(mn_dtype t, const char *row, const float *x, int64_t K) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        float w = t == MN_F32 ? ((const float *)row)[k]
                : t == MN_F16 ? mn_fp16_to_fp32(((const uint16_t *)row)[k])
                              : mn_bf16_to_fp32(((const uint16_t *)row)[k]);
        acc += x[k] * w;
    }
    return acc;
}

static void rows_scalar(const mn__mm_ctx *c, int64_t n0, int64_t n1) {
    const mn_matmul_desc *d = c->d;
    for (int64_t n = n0; n < n1; n++) {
        const char *row = (const char *)d->w + n * d->w_row_bytes;
        for (int64_t t = 0; t < d->T; t++) {
            float v = is_legacy(d->w_type) ? dot_legacy_scalar(d->w_type, row, &c->xq, t)
                    : is_kquant(d->w_type) ? dot_kquant_scalar(d->w_type, row, &c->xq, t)
                                           : dot_float_scalar(d->w_type, row, d->x + t * d->x_stride, d->K);
            mn__mm_store(d, t, n, v);
        }
    }
}

/* ---- the op ------------------------------------------------------------------------- */

static void rows_at_level(mn__simd lvl, const mn__mm_ctx *c, int64_t n0, int64_t n1) {
    switch (lvl) {
    case MN__SIMD_AVX512VNNI: mn__mm_rows_avx512vnni(c, n0, n1); break;
    case MN__SIMD_AVX512:
    case MN__SIMD_AVX2: mn__mm_rows_avx2(c, n0, n1); break;
    default: rows_scalar(c, n0, n1); break;
    }
}

/* Rows per prefetch slice: the thread's share of the LoRA bytes is asked for slice by
 * slice, spread over its rows, so the loads interleave with the compute instead of
 * queueing up in one burst. A multiple of every level's row group (16). */
#define MM_PREFETCH_ROWS 16

void mn_cpu_matmul(const mn_matmul_desc *d, void *work, const mn_par *par) {
    mn_cpu_matmul_prefetch_lora(d, NULL, 0.0, 0.0, work, par);
}

void mn_cpu_matmul_prefetch_lora(const mn_matmul_desc *d, const mn_lora_desc *lora, double f0, double f1, void *work,
                                 const mn_par *par) {
    mn__simd lvl = mn__cpu_simd();
    mn__mm_ctx c = {.d = d};
    if (is_legacy(d->w_type) || is_kquant(d->w_type)) {
        layout L = plan(d, par->nth);
        char *base = (char *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
        int be = (int)mn_dtype_block_elems(d->w_type);
        int64_t nb = d->K / be;
        int8_t *qs = (int8_t *)(base + L.qs);
        float *xd = (float *)(base + L.d);
        float *xs = is_legacy(d->w_type) ? (float *)(base + L.s) : NULL;
        int32_t *xc = is_legacy(d->w_type) ? (int32_t *)(base + L.xc) : NULL;
        int16_t *bsums = is_kquant(d->w_type) ? (int16_t *)(base + L.bsums) : NULL;
        /* (1) quantize: blocks of all rows split evenly, so T = 1 also uses every thread */
        int64_t lo, hi;
        mn_par_range(par, d->T * nb, &lo, &hi);
        for (int64_t i = lo; i < hi; i++) {
            int64_t t = i / nb, b = i % nb;
            const float *x = d->x + t * d->x_stride + b * be;
            int8_t *q = qs + i * be;
            int sum = 0;
            if (lvl >= MN__SIMD_AVX2) {
                xd[i] = mn__quant_group_avx2(x, be, q, xs ? &sum : NULL);
            } else {
                xd[i] = quant_group_scalar(x, be, q);
                for (int j = 0; j < be; j++) sum += q[j];
            }
            if (xs) {
                xs[i] = xd[i] * (float)sum;
                xc[i] = -128 * sum;
            } else {
                for (int g = 0; g < 16; g++) {
                    int gs = 0;
                    for (int j = 0; j < 16; j++) gs += q[16 * g + j];
                    bsums[i * 16 + g] = (int16_t)gs;
                }
            }
        }
        c.xq = (mn__xq){.qs = qs, .d = xd, .s = xs, .xc = xc, .bsums = bsums, .nb = nb};
        if (L.scr_per_thread) c.scr = (float *)(base + L.scr + (size_t)par->ith * L.scr_per_thread);
        mn_par_barrier(par);
    }
    /* (3) output rows in units of MN__MM_RMAX so row tiles are not cut by the split */
    int64_t groups = (d->N + MN__MM_RMAX - 1) / MN__MM_RMAX, g0, g1;
    mn_par_range(par, groups, &g0, &g1);
    int64_t n0 = g0 * MN__MM_RMAX, n1 = g1 * MN__MM_RMAX < d->N ? g1 * MN__MM_RMAX : d->N;
    if (n0 >= n1) return;
    const int64_t pf_total = lora ? mn__cpu_lora_prefetch_bytes(lora) : 0;
    if (pf_total <= 0) {
        rows_at_level(lvl, &c, n0, n1);
        return;
    }
    /* this thread's share of [f0, f1), one slice before each MM_PREFETCH_ROWS rows */
    const double span = (f1 - f0) * (double)pf_total;
    const int64_t p0 = (int64_t)(f0 * (double)pf_total + span * par->ith / par->nth);
    const int64_t p1 = (int64_t)(f0 * (double)pf_total + span * (par->ith + 1) / par->nth);
    const int64_t slices = (n1 - n0 + MM_PREFETCH_ROWS - 1) / MM_PREFETCH_ROWS;
    for (int64_t i = 0; i < slices; i++) {
        mn__cpu_lora_prefetch_span(lora, p0 + (p1 - p0) * i / slices, p0 + (p1 - p0) * (i + 1) / slices);
        const int64_t r0 = n0 + i * MM_PREFETCH_ROWS, r1 = r0 + MM_PREFETCH_ROWS < n1 ? r0 + MM_PREFETCH_ROWS : n1;
        rows_at_level(lvl, &c, r0, r1);
    }
}
