/* kernels/cpu/matmul_impl.h — internal to kernels/cpu/matmul*.c: the layout of the
 * quantized activations in the work buffer and the per-SIMD-level entry points.
 *
 * Work buffer (caller-owned, mn_cpu_matmul_work_bytes), each part 64-byte aligned:
 *   qs    int8  [T][nb*be]   quantized x rows (be = 32 for q8_1, 256 for q8_K)
 *   d     f32   [T][nb]      block scales (amax/127)
 *   s     f32   [T][nb]      q8_1 only: d * sum(qs of the block)
 *   xc    i32   [T][nb]      q8_1 only: -128 * sum(qs of the block) (the Q8_0 vnni offset)
 *   bsums i16   [T][nb*16]   q8_K only: sums of 16 consecutive qs
 *   scr   [nth][MN__LQ_SCR_BYTES(nb)]  legacy quants: per thread, up to 16 weight rows
 *                                  interleaved, with their scales and mins (see matmul_x86.h)
 *         [nth][MN__KQ_SCR_BYTES(nb)]  K-quants: the same for up to 16 rows of super-blocks
 *                                  (see matmul_x86_kq.h)
 * Every output element is computed by one fixed per-element sequence that depends only
 * on (SIMD level, weight type, K), never on the tile it sits in: that is what makes the
 * op batch invariant (see kernels/ops.h).
 */
#ifndef MN_CPU_MATMUL_IMPL_H
#define MN_CPU_MATMUL_IMPL_H

#include <stdint.h>
#include "kernels/ops.h"

#define MN__MM_RMAX 4 /* most weight rows in one register tile (any level) */

/* Legacy-quant per-thread scratch: up to 16 rows' quants interleaved (512 bytes a block),
 * their scales and (Q4_1, Q5_1) mins (16 floats a block each). */
#define MN__LQ_SCR_BYTES(nb) ((size_t)(nb) * (512 + 32 * sizeof(float)))

/* K-quant per-thread scratch: per super-block a record of up to 16 rows (4096 bytes of
 * unpacked quants, 16 scale vectors, 8 min or scale-pair vectors, d and dmin: 5760 bytes).
 * K = 14336 (nb = 56) takes 315 KiB, within a core's L2. */
#define MN__KQ_SCR_BYTES(nb) ((size_t)(nb) * 5760)

/* Quantized activations of one call. */
typedef struct mn__xq {
    const int8_t *qs;
    const float *d, *s;
    const int32_t *xc;     /* -128 * block sums (legacy quants) */
    const int16_t *bsums;
    int64_t nb;            /* blocks per row */
} mn__xq;

/* What one thread needs to compute output rows [n0, n1) for all tokens. */
typedef struct mn__mm_ctx {
    const mn_matmul_desc *d;
    mn__xq xq;
    float *scr;            /* this thread's scratch: MN__LQ_SCR_BYTES(nb) or MN__KQ_SCR_BYTES(nb) */
} mn__mm_ctx;

/* Final step shared by every level: add the bias, then store or accumulate. */
static inline void mn__mm_store(const mn_matmul_desc *d, int64_t t, int64_t n, float v) {
    if (d->bias) v += d->bias[n];
    float *y = d->y + t * d->y_stride + n;
    *y = d->accumulate ? *y + v : v;
}

/* Quantize one group of n (32 or 256) values: writes q, returns d = amax/127 (q = 0 if d = 0),
 * and when sum is not NULL the sum of the q (the scalar byte loop was 4% of a prefill).
 * All levels produce the same bits (division and round-to-nearest-even). */
float mn__quant_group_avx2(const float *x, int n, int8_t *q, int *sum);

/* Output rows [n0, n1) of c->d for every token, per SIMD level. */
void mn__mm_rows_avx2(const mn__mm_ctx *c, int64_t n0, int64_t n1);
void mn__mm_rows_avx512vnni(const mn__mm_ctx *c, int64_t n0, int64_t n1);

#endif
