/* kernels/cpu/ops_cpu_impl.h — internal to kernels/cpu: the per-row / per-head work
 * functions of the elementwise, normalisation and attention ops, one set per SIMD level.
 *
 * ops_cpu.c owns the public mn_cpu_<op> entry points: it splits the work over threads
 * (by rows, or by (tile of tokens of one sequence, head-group) units for attention,
 * never inside a reduction) and calls one of
 * these for each unit according to mn__cpu_simd(). The _avx2 variants live in
 * ops_cpu_avx2.c (AVX2+FMA+F16C), the _avx512 ones in ops_cpu_avx512.c.
 * Each function's float operation sequence for one row / one head depends only on that
 * row's / head's inputs, which is what makes the ops batch-invariant.
 */
#ifndef MN_OPS_CPU_IMPL_H
#define MN_OPS_CPU_IMPL_H

#include <stdint.h>
#include "kernels/ops.h"

/* Heads of one KV group processed together (they share each K/V row conversion). */
#define MN__ATTN_MAX_HEADS 8
/* Positions scored per softmax step; step boundaries are multiples of this from 0,
 * whatever the batch, so every head sees the same float sequence. */
#define MN__ATTN_CHUNK 32
#define MN__ATTN_MAX_HD 256
/* Tokens of one sequence whose attention shares each converted K/V chunk (SIMD paths),
 * at most; a unit (tokens x heads of one KV group) holds at most MN__ATTN_UNIT_ROWS rows,
 * so a unit of nh heads takes min(MN__ATTN_TILE, MN__ATTN_UNIT_ROWS / nh) tokens: with 3
 * heads per group 16 tokens fill three 16-lane groups of avx512's rows layout, where 8
 * tokens left the second group half empty. */
#define MN__ATTN_TILE 16
#define MN__ATTN_UNIT_ROWS 64

/* y[0:D] = x / sqrt(mean(x^2) + eps) * w; y may equal x. */
void mn__rmsnorm_row_avx2(const float *x, const float *w, float *y, int64_t D, float eps);
void mn__rmsnorm_row_avx512(const float *x, const float *w, float *y, int64_t D, float eps);

/* y[0:F] = silu(g) * u; y may equal g. */
void mn__silu_mul_row_avx2(const float *g, const float *u, float *y, int64_t F);
void mn__silu_mul_row_avx512(const float *g, const float *u, float *y, int64_t F);

/* f32 -> f16 with round to nearest even (bit-equal to mn_fp32_to_fp16 except NaN payloads). */
void mn__f32_to_f16_row_avx2(const float *x, uint16_t *y, int64_t n);
/* f16 -> f32 (exact). */
void mn__f16_to_f32_row_avx2(const uint16_t *x, float *y, int64_t n);

/* Positions per attention segment. A token's positions are cut into segments
 * [k*SEG, (k+1)*SEG) at fixed boundaries; each segment's softmax state (max, sum,
 * unnormalised V sum) is computed on its own, and the states are folded in segment order.
 * Decode spreads one token's segments over threads (flash-decoding); prefill folds them
 * as it goes. Both run the same float operations, so the bits never depend on which. */
#define MN__ATTN_SEG 256

/* The softmax state of one segment for the tokens and heads of a unit: for token i and
 * head j of the unit, acc[(i*nh + j)*head_dim ..] = sum_p w_p V_p (unnormalised),
 * m = max score, l = sum_p w_p with w_p = exp(score_p - m). A token with no position in
 * the segment has m = -inf, l = 0. */
typedef struct mn__attn_part {
    float *acc; /* [nt * nh][head_dim] */
    float m[MN__ATTN_TILE][MN__ATTN_MAX_HEADS];
    float l[MN__ATTN_TILE][MN__ATTN_MAX_HEADS];
} mn__attn_part;

/* The segment state over positions [p0, min(p1, pos+1)) for tokens t0 .. t0+nt-1
 * (nt <= MN__ATTN_TILE, all of one sequence) and heads h0 .. h0+nh-1 of one KV group;
 * p0 and p1 are multiples of MN__ATTN_CHUNK. Each token's state is independent of the
 * others in the unit. */
void mn__attn_part_avx2(const mn_attention_desc *d, int64_t t0, int32_t nt, int32_t h0, int32_t nh, int32_t p0,
                        int32_t p1, mn__attn_part *out);
void mn__attn_part_avx512(const mn_attention_desc *d, int64_t t0, int32_t nt, int32_t h0, int32_t nh, int32_t p0,
                          int32_t p1, mn__attn_part *out);

/* Cache row pointers of positions p0 .. p0+n-1 of sequence s, KV head g: walks the block
 * table once per block instead of dividing once per position. */
static inline void mn__kv_chunk_rows(const mn_kv_view *kv, int32_t s, int32_t p0, int32_t n, int32_t g,
                                     const uint16_t **kp, const uint16_t **vp) {
    int64_t row = (int64_t)kv->n_kv_head * kv->head_dim;
    int32_t i = 0;
    while (i < n) {
        int64_t off = mn_kv_offset(kv, s, p0 + i, g);
        int32_t left = kv->block_size - (p0 + i) % kv->block_size;
        for (; left > 0 && i < n; left--, i++, off += row) {
            kp[i] = kv->k + off;
            vp[i] = kv->v + off;
        }
    }
}

/* Asks for the K and V rows of positions p0 .. p0+n-1 (sequence s, KV head g) to be
 * brought into cache while the current chunk computes: blocks sit in pool order, not
 * position order, so the hardware prefetcher cannot follow a long context. */
static inline void mn__kv_prefetch_rows(const mn_kv_view *kv, int32_t s, int32_t p0, int32_t n, int32_t g) {
    int64_t row = (int64_t)kv->n_kv_head * kv->head_dim, bytes = (int64_t)kv->head_dim * 2;
    int32_t i = 0;
    while (i < n) {
        int64_t off = mn_kv_offset(kv, s, p0 + i, g);
        int32_t left = kv->block_size - (p0 + i) % kv->block_size;
        for (; left > 0 && i < n; left--, i++, off += row) {
            for (int64_t b = 0; b < bytes; b += 64) {
                __builtin_prefetch((const char *)(kv->k + off) + b);
                __builtin_prefetch((const char *)(kv->v + off) + b);
            }
        }
    }
}

/* The rows of chunk [c0, c0+nc) (into kp/vp) and a prefetch of the next chunk's rows up
 * to end: what every SIMD attention does at the top of a chunk. */
static inline void mn__kv_chunk_begin(const mn_kv_view *kv, int32_t s, int32_t c0, int32_t nc, int32_t end, int32_t g,
                                      const uint16_t **kp, const uint16_t **vp) {
    mn__kv_chunk_rows(kv, s, c0, nc, g, kp, vp);
    if (c0 + MN__ATTN_CHUNK < end) {
        int32_t nn = end - c0 - MN__ATTN_CHUNK;
        mn__kv_prefetch_rows(kv, s, c0 + MN__ATTN_CHUNK, nn < MN__ATTN_CHUNK ? nn : MN__ATTN_CHUNK, g);
    }
}

#endif
