/* kernels/cpu/lora.c — batched LoRA apply on the CPU (contract in kernels/ops.h; the body
 * is kernels/cpu/lora_impl.h). Picks the AVX-512 compilation (kernels/cpu/lora_avx512.c:
 * 16 lanes, fma; its own bits, within the contract's bound) at the AVX-512 levels, else the
 * AVX2 one (kernels/cpu/lora_avx2.c) when the CPU has it, which gives this file's bits. */
#include <stdint.h>

#include "kernels/cpu/cpu_impl.h"
#include "kernels/ops.h"

static inline float w_at(const void *w, mn_dtype t, int64_t i) {
    if (t == MN_F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    return t == MN_F16 ? mn_fp16_to_fp32(h) : mn_bf16_to_fp32(h);
}

static float lora_dot(const float *x, const void *w, mn_dtype t, int64_t n) {
    float acc[32] = {0};
    for (int64_t k = 0; k < n; k++) acc[k % 32] += x[k] * w_at(w, t, k);
    float s[8];
    for (int l = 0; l < 8; l++) s[l] = (acc[l] + acc[8 + l]) + (acc[16 + l] + acc[24 + l]);
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

/* lora_dot of four rows x[0..3] against one w: each row's sums exactly as lora_dot's */
static void lora_dot4(const float *const x[4], const void *w, mn_dtype t, int64_t n, float out[4]) {
    float acc[4][32] = {{0}};
    for (int64_t k = 0; k < n; k++) {
        const float wk = w_at(w, t, k);
        for (int r = 0; r < 4; r++) acc[r][k % 32] += x[r][k] * wk;
    }
    for (int r = 0; r < 4; r++) {
        float s[8];
        for (int l = 0; l < 8; l++) s[l] = (acc[r][l] + acc[r][8 + l]) + (acc[r][16 + l] + acc[r][24 + l]);
        out[r] = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
    }
}

/* y[q][n] += sc * sum_j v[q][j] * bt[j][n], n in [n0, n1), rows q < nr; j in order */
static void lora_expand4(float *const y[4], const float *const v[4], int nr, float sc, const void *bt, mn_dtype t,
                         int64_t ldb, int32_t r, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
        for (int q = 0; q < nr; q++) {
            float acc = 0.0f;
            for (int32_t j = 0; j < r; j++) acc += v[q][j] * w_at(bt, t, (int64_t)j * ldb + n);
            y[q][n] += sc * acc;
        }
}

/* y[n] += sc * sum_j v[j] * bt[j][n], n in [n0, n1), one row; j in order */
static void lora_expand1(float *y, const float *v, float sc, const void *bt, mn_dtype t, int64_t ldb, int32_t r,
                         int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        float acc = 0.0f;
        for (int32_t j = 0; j < r; j++) acc += v[j] * w_at(bt, t, (int64_t)j * ldb + n);
        y[n] += sc * acc;
    }
}

#include "kernels/cpu/lora_impl.h"

void mn__cpu_lora_avx2(const mn_lora_desc *d, void *work, const mn_par *par);
void mn__cpu_lora_avx512(const mn_lora_desc *d, void *work, const mn_par *par);

size_t mn_cpu_lora_work_bytes(const mn_lora_desc *d) {
    /* split phases keep v in d->v */
    return d->phase == MN_LORA_FUSED ? (size_t)mn_lora_v_floats(d->seg, d->n_seg) * sizeof(float) : 0;
}

void mn_cpu_lora(const mn_lora_desc *d, void *work, const mn_par *par) {
    if (mn__cpu_simd() >= MN__SIMD_AVX512) mn__cpu_lora_avx512(d, work, par);
    else if (mn__cpu_simd() >= MN__SIMD_AVX2) mn__cpu_lora_avx2(d, work, par);
    else lora_body(d, work, par);
}

/* ---- prefetch hints for mn_cpu_matmul_prefetch_lora --------------------------------- */

/* Only the head of the op's reads, this many bytes, is asked for during the matmuls: the
 * op's own prefetches stream the rest a few KB ahead of its loops (lora_impl.h). Asking
 * for all of it (MBs with 32 adapters) there brought rows into L2 long before use, where
 * the matmuls' weights evicted them, and took bandwidth from the matmuls: with the
 * streaming prefetches, SmolLM2 decode with 32 rank-16 adapters ran at ~0.52x of no
 * adapters with the whole op prefetched, ~0.61x with nothing, ~0.67x with 64 or 256 KB
 * (bench_lora -t 1, this file's AVX-512 level, 2026-11). */
#define LORA_PREFETCH_HEAD ((int64_t)256 << 10)

/* Matrix m of the op's read sequence, which is the order one thread reads them in: the
 * segments' A (unless the op only expands), then the segments' B of output 0, of output
 * 1, ... (unless it only shrinks). false past the end. */
typedef struct lora_mat { const char *p; int64_t rows, row_bytes, stride; } lora_mat;

static bool lora_mat_at(const mn_lora_desc *d, int32_t s, int m, lora_mat *out) {
    const mn_lora_seg *g = &d->seg[s];
    const int64_t esz = g->type == MN_F32 ? 4 : 2;
    if (m == 0) {
        if (d->phase == MN_LORA_EXPAND) return false;
        *out = (lora_mat){g->a, g->r, d->K * esz, (d->a_ld ? d->a_ld : d->K) * esz};
        return true;
    }
    const int o = m - 1;
    if (d->phase == MN_LORA_SHRINK || o >= d->n_out || !g->b[o]) return false;
    *out = (lora_mat){g->b[o], g->r_out[o], d->N[o] * esz, (d->b_ld[o] ? d->b_ld[o] : d->N[o]) * esz};
    return true;
}

int64_t mn__cpu_lora_prefetch_bytes(const mn_lora_desc *d) {
    int64_t n = 0;
    lora_mat mt;
    for (int32_t s = 0; s < d->n_seg; s++)
        for (int m = 0; m <= MN_LORA_MAX_OUT; m++)
            if (lora_mat_at(d, s, m, &mt)) n += mt.rows * mt.row_bytes;
    return n < LORA_PREFETCH_HEAD ? n : LORA_PREFETCH_HEAD;
}

void mn__cpu_lora_prefetch_span(const mn_lora_desc *d, int64_t lo, int64_t hi) {
    int64_t base = 0;   /* the matrix's first byte in the sequence */
    lora_mat mt;
    for (int m = 0; m <= MN_LORA_MAX_OUT && base < hi; m++)
        for (int32_t s = 0; s < d->n_seg && base < hi; s++) {
            if (!lora_mat_at(d, s, m, &mt)) continue;
            const int64_t size = mt.rows * mt.row_bytes;
            const int64_t a = lo > base ? lo - base : 0, b = hi - base < size ? hi - base : size;
            for (int64_t off = a; off < b; off += 64) {
                const int64_t row = off / mt.row_bytes, col = off % mt.row_bytes;
                __builtin_prefetch(mt.p + row * mt.stride + col, 0, 2);
            }
            base += size;
        }
}
