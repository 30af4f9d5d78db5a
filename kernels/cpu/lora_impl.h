/* kernels/cpu/lora_impl.h — the body of the CPU LoRA kernel, compiled three times: plain
 * (kernels/cpu/lora.c), with AVX2 (kernels/cpu/lora_avx2.c) and with AVX-512
 * (kernels/cpu/lora_avx512.c). The plain and AVX2 loops are written with 8 explicit lanes
 * and no fused multiply-add, so those two perform the same float operations in the same
 * order: the same bits. The AVX-512 compilation has its own order (16 lanes, fma; stated
 * in its file): other bits, within the bound of kernels/ops.h like the others.
 *
 * lora_dot, lora_dot4, lora_expand1 and lora_expand4 (below) are the only SIMD parts; each
 * compilation unit gives its own.
 * Two phases separated by one barrier:
 *   shrink: the (segment, row or block of rows, j) dot products x_t . a_j, split evenly
 *           over the threads, written to v in work (segment by segment, row-major [n_rows, r]);
 *   expand: the output columns of all outputs, split over the threads; for a chunk of
 *           columns and each adapted row, acc[n] = sum_j v_j * bt[j][n] in j order (rows of
 *           bt are contiguous: pure vector multiply-adds, no reductions), then
 *           y[n] += scale * acc[n].
 * No element depends on the thread count or the other rows: batch invariant, at each
 * SIMD level (the level is process-wide: kernels/cpu/cpu.c).
 */
#ifndef MN_CPU_LORA_IMPL_H
#define MN_CPU_LORA_IMPL_H

#include <stdbool.h>

#include "kernels/ops.h"

/* The including file defines, before including this header (the lane orders given here
 * are the plain and AVX2 ones; lora_avx512.c states its own):
 *   float lora_dot(const float *x, const void *w, mn_dtype t, int64_t n)
 *       32 lanes: element k is added to lane k % 32 (acc[l] += x[k]*w[k], k ascending; four
 *       independent vector chains, so the adds do not wait on each other), then
 *       s[l] = (acc[l] + acc[8+l]) + (acc[16+l] + acc[24+l]) for l < 8 and
 *       ((s0+s4)+(s2+s6)) + ((s1+s5)+(s3+s7));
 *   void lora_dot4(const float *const x[4], const void *w, mn_dtype t, int64_t n, float out[4])
 *       out[r] = lora_dot(x[r], w, t, n), bit for bit, loading and converting w once;
 *   void lora_expand1(float *y, const float *v, float sc, const void *bt, mn_dtype t, int64_t ldb,
 *                     int32_t r, int64_t n0, int64_t n1)
 *       one row: acc = 0, acc += v[j] * bt[j*ldb + n] for j < r in order, y[n] += sc * acc;
 *   void lora_expand4(float *const y[4], const float *const v[4], int nr, float sc, const void *bt,
 *                     mn_dtype t, int64_t ldb, int32_t r, int64_t n0, int64_t n1)
 *       for rows q < nr and n in [n0, n1): acc = 0, acc += v[q][j] * bt[j*ldb + n] for j < r in
 *       order, y[q][n] += sc * acc (the general expand's operations per element);
 * w holds n elements of type t (F32, F16, BF16), converted exactly to f32.
 *
 * Row-blocked path (a segment of at least LORA_BLOCK_MIN rows; a batch whose tokens all use
 * one adapter is the extreme case, one segment of every row): the shrink does four rows
 * per pass over each row of A (A is read n_rows / 4 times, not n_rows times) and the
 * expand four rows per pass over B^T with the sums in registers. Segments of fewer rows
 * (decode, each sequence its own adapter) take the per-row path: blocking would compute
 * lanes for rows that do not exist. Every element takes the same operations in the same
 * order on both paths: the same bits, whatever the grouping. */

static inline int64_t lora_esz(mn_dtype t) { return t == MN_F32 ? 4 : 2; }

#define LORA_BLOCK_MIN 4
/* prefetch distances (no effect on results): the shrink asks for the A row about this many
 * bytes ahead of the one its dot reads; the per-row expand works in chunks of this many
 * columns, asking for the next segment's chunk before each */
#define LORA_PF_BYTES 4096
#define LORA_PF_COLS 128

static inline bool lora_blocked(const mn_lora_seg *g) { return g->n_rows >= LORA_BLOCK_MIN; }

/* shrink work items of a segment: (block of 4 rows, j) blocked, else (row, j) */
static inline int64_t lora_items(const mn_lora_seg *g) {
    return (int64_t)(lora_blocked(g) ? (g->n_rows + 3) / 4 : g->n_rows) * g->r;
}

/* Ask for bytes [p, p + n) to be brought into L2 (no effect on results). In a decode batch
 * every sequence has its own adapter, so each segment's A and B are a few tens of KB that
 * are read once per step: without this the next segment's rows start cold from DRAM every
 * time, and the streams are too short for the hardware prefetcher to ramp up. The calls
 * below ask a little at a time, a few KB ahead of the loads, in the order the loops read:
 * asking for a whole next segment at once (tens of KB in one burst) ran ~1.4x slower. */
static inline void lora_prefetch(const void *p, int64_t n) {
    for (int64_t o = 0; o < n; o += 64) __builtin_prefetch((const char *)p + o, 0, 2);
}

/* shrink: every segment's items split evenly over the threads; v is segment by segment,
 * row-major [n_rows, r] on both paths */
static inline void lora_shrink(const mn_lora_desc *d, float *v, const mn_par *par) {
    int64_t total = 0;
    for (int32_t s = 0; s < d->n_seg; s++) total += lora_items(&d->seg[s]);
    int64_t lo, hi;
    mn_par_range(par, total, &lo, &hi);
    int64_t base = 0;   /* the segment's first item */
    float *vs = v;      /* the segment's v */
    for (int32_t s = 0; s < d->n_seg && base < hi; s++) {
        const mn_lora_seg *g = &d->seg[s];
        const int64_t n = lora_items(g), esz = lora_esz(g->type), lda = d->a_ld ? d->a_ld : d->K;
        const int64_t a = lo > base ? lo - base : 0, b = hi - base < n ? hi - base : n;
        const mn_lora_seg *gn = s + 1 < d->n_seg ? &d->seg[s + 1] : NULL;
        const int64_t rowb = d->K * esz, dj = (LORA_PF_BYTES + rowb - 1) / rowb;
        for (int64_t i = a; i < b; i++) {
            const int64_t j = i % g->r, r0 = lora_blocked(g) ? i / g->r * 4 : i / g->r;
            const char *aj = (const char *)g->a + j * lda * esz;
            /* the A row dj rows ahead in the order the dots read them: this segment's, else
             * the next one's */
            if (j + dj < g->r) lora_prefetch(aj + dj * lda * esz, rowb);
            else if (gn && j + dj - g->r < gn->r)
                lora_prefetch((const char *)gn->a + (j + dj - g->r) * lda * lora_esz(gn->type), d->K * lora_esz(gn->type));
            if (lora_blocked(g) && r0 + 4 <= g->n_rows) {
                const float *x[4];
                float out[4];
                for (int q = 0; q < 4; q++) x[q] = d->x + (int64_t)d->rows[g->start + r0 + q] * d->x_stride;
                lora_dot4(x, aj, g->type, d->K, out);
                for (int q = 0; q < 4; q++) vs[(r0 + q) * g->r + j] = out[q];
            } else {
                const int64_t r1 = lora_blocked(g) ? g->n_rows : r0 + 1;   /* a block's tail rows one by one */
                for (int64_t row = r0; row < r1; row++) {
                    const float *x = d->x + (int64_t)d->rows[g->start + row] * d->x_stride;
                    vs[row * g->r + j] = lora_dot(x, aj, g->type, d->K);
                }
            }
        }
        base += n;
        vs += (int64_t)g->n_rows * g->r;
    }
}

/* Strided views (d->a_ld, d->b_ld: tensor-parallel shards) only change the addresses;
 * split phases (d->phase) run one half each, v in d->v instead of work. */

/* expand of a blocked segment over columns [n0, n1) of output o */
static inline void lora_expand_blocked(const mn_lora_desc *d, const mn_lora_seg *g, const float *vs, int o, int64_t n0,
                                       int64_t n1) {
    for (int32_t r0 = 0; r0 < g->n_rows; r0 += 4) {
        const int nr = g->n_rows - r0 < 4 ? g->n_rows - r0 : 4;
        float *y[4];
        const float *vr[4];
        for (int q = 0; q < 4; q++) {
            const int32_t row = r0 + (q < nr ? q : 0);   /* rows past nr are read, not written */
            y[q] = d->y[o] + (int64_t)d->rows[g->start + row] * d->y_stride[o];
            vr[q] = vs + (int64_t)row * g->r + g->r_off[o];
        }
        lora_expand4(y, vr, nr, g->scale[o], g->b[o], g->type, d->b_ld[o] ? d->b_ld[o] : d->N[o], g->r_out[o], n0, n1);
    }
}

/* expand of a per-row segment: each row over the columns, its sums in registers, in
 * chunks of LORA_PF_COLS columns; before each chunk, the same columns of the next adapted
 * segment gn's B (NULL: none) are asked for, so they stream in one segment ahead of the
 * expand instead of all at once */
static inline void lora_expand_rows(const mn_lora_desc *d, const mn_lora_seg *g, const mn_lora_seg *gn, const float *vs,
                                    int o, int64_t n0, int64_t n1) {
    const int64_t ldb = d->b_ld[o] ? d->b_ld[o] : d->N[o];
    for (int64_t c0 = n0; c0 < n1; c0 += LORA_PF_COLS) {
        const int64_t c1 = n1 - c0 < LORA_PF_COLS ? n1 : c0 + LORA_PF_COLS;
        if (gn) {
            const int64_t esn = lora_esz(gn->type);
            for (int32_t j = 0; j < gn->r_out[o]; j++)
                lora_prefetch((const char *)gn->b[o] + ((int64_t)j * ldb + c0) * esn, (c1 - c0) * esn);
        }
        for (int32_t i = 0; i < g->n_rows; i++)
            lora_expand1(d->y[o] + (int64_t)d->rows[g->start + i] * d->y_stride[o], vs + (int64_t)i * g->r + g->r_off[o],
                         g->scale[o], g->b[o], g->type, ldb, g->r_out[o], c0, c1);
    }
}

static inline void lora_body(const mn_lora_desc *d, void *work, const mn_par *par) {
    float *v = d->phase == MN_LORA_FUSED ? work : d->v;
    if (d->phase != MN_LORA_EXPAND) lora_shrink(d, v, par);
    if (d->phase == MN_LORA_SHRINK) return;   /* the backend's barrier after the op orders v */
    if (d->phase == MN_LORA_FUSED) mn_par_barrier(par);
    /* expand: columns of output 0, then output 1, ... split over the threads */
    int64_t lo, hi, cols = 0;
    for (int32_t o = 0; o < d->n_out; o++) cols += d->N[o];
    mn_par_range(par, cols, &lo, &hi);
    int64_t c0 = 0;
    for (int32_t o = 0; o < d->n_out && c0 < hi; o++) {
        const int64_t N = d->N[o];
        int64_t n0 = lo > c0 ? lo - c0 : 0, n1 = hi - c0 < N ? hi - c0 : N;
        c0 += N;
        /* segment-outer: one adapter's b rows are streamed before the next adapter's */
        const float *vs = v;
        for (int32_t s = 0; s < d->n_seg; s++) {
            const mn_lora_seg *g = &d->seg[s];
            if (g->b[o] && n0 < n1) {
                const mn_lora_seg *gn = NULL;   /* the next segment with a B for output o */
                for (int32_t sn = s + 1; sn < d->n_seg && !gn; sn++)
                    if (d->seg[sn].b[o]) gn = &d->seg[sn];
                if (lora_blocked(g)) {
                    if (gn) { /* its B columns while this segment computes */
                        const int64_t ldn = d->b_ld[o] ? d->b_ld[o] : N, esn = lora_esz(gn->type);
                        for (int32_t j = 0; j < gn->r_out[o]; j++)
                            lora_prefetch((const char *)gn->b[o] + ((int64_t)j * ldn + n0) * esn, (n1 - n0) * esn);
                    }
                    lora_expand_blocked(d, g, vs, o, n0, n1);
                } else {
                    lora_expand_rows(d, g, gn, vs, o, n0, n1);
                }
            }
            vs += (int64_t)g->n_rows * g->r;
        }
    }
}

#endif
