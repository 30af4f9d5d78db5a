/* kernels/cuda/matmul_gemv.h — the per-row arithmetic of the fused dequant GEMV
 * (kernels/cuda/matmul_gemv.cu, decode: T <= MN_CUDA_GEMV_MAX_T), host-and-device, and a
 * host emulation of the whole kernel built from it.
 *
 * One warp computes output row n for all T tokens of the call; each weight byte is read
 * once per call. The schedule depends on the weight type and K only, never on T or on the
 * other tokens, so a row's bits are batch invariant (kernels/ops.h):
 *   F32/F16/BF16  chunk c = 8 consecutive elements goes to lane c % 32, which adds x*w of
 *                 its chunks in k order into one f32 per token (mn_gemv_chunk); the K % 8
 *                 tail elements 8*(K/8) + i go to lane i, last.
 *   Q4_0/Q4_1/Q5_0/Q5_1/Q8_0  block b goes to lane b % 32, which adds the blocks' values
 *                 (mn_vdot_*_q8_1: the reference's bits per block) in order.
 *   Q2_K..Q6_K  unit u (32 elements, 8 per super-block) goes to lane u % 32: the 8 lanes
 *                 of group g = lane / 8 share super-block b = g + 4s at step s. Their integer
 *                 shares (mn_kq_unit) are summed over the group by xor shuffles 4, 2, 1
 *                 (integers: exact, so equal to summing j = 0..7 in one lane), and lane 8g
 *                 adds mn_kq_block_value (the reference's bits per super-block) to its f32;
 *                 the other lanes keep 0.
 *   Then the 32 lane values are summed by the xor butterfly 16, 8, 4, 2, 1 (the warp code
 *   of kernels/cuda/matmul_gemv_warp.cuh; mn_gemv_tree32 here), and the bias / accumulate
 *   store is the reference's.
 * For quantized weights x is first quantized once per call into q8_1 / q8_K blocks in the
 * scratch, with the reference's formula (amax and the integer sums are exact in any order,
 * the rounding is mn_q8_value), so those blocks equal mn_ref_quantize_row_q8_1 / _q8_K's.
 * The kernel computes token t's sums in the same sequence as the per-token functions
 * below (it only interleaves the tokens), and the build has no FMA contraction
 * (-fmad=false, -ffp-contract=off), so mn_gemv_emulate gives the kernel's bits.
 * Header-only; C and CUDA C++.
 */
#ifndef MN_KERNELS_CUDA_MATMUL_GEMV_H
#define MN_KERNELS_CUDA_MATMUL_GEMV_H

#include <stdint.h>
#include <string.h>
#include "kernels/ops.h"
#include "kernels/quant_math.h"

/* Units (of 32 elements) per K-quant super-block, and lanes per super-block at a step. */
#define MN_GEMV_KQ_UNITS 8

/* Token accumulators per lane the kernel is compiled for, for a call of T tokens
 * (1 <= T <= MN_CUDA_GEMV_MAX_T): 1, 2, 4 or 8. Tokens past T are skipped, never computed. */
MN_HD int mn_gemv_nt(int64_t T) { return T <= 1 ? 1 : T == 2 ? 2 : T <= 4 ? 4 : 8; }

/* Weight element k of a float row. */
MN_HD float mn_gemv_weight(mn_dtype t, const char *row, int64_t k) {
    if (t == MN_F32) return ((const float *)row)[k];
    if (t == MN_F16) return mn_fp16_to_fp32(((const uint16_t *)row)[k]);
    return mn_bf16_to_fp32(((const uint16_t *)row)[k]);
}

/* Elements 8c .. 8c+7 of a float row. The device reads them with 16-byte loads when the
 * row is 16-byte aligned; the values are the same either way. */
MN_HD void mn_gemv_load8(mn_dtype t, const char *row, int64_t c, float *w) {
#ifdef __CUDA_ARCH__
    if (((uintptr_t)row & 15) == 0) {
        if (t == MN_F32) {
            float4 a = ((const float4 *)row)[2 * c], b = ((const float4 *)row)[2 * c + 1];
            w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
        } else {
            uint4 v = ((const uint4 *)row)[c];
            uint32_t u[4] = {v.x, v.y, v.z, v.w};
            for (int i = 0; i < 4; i++) {
                uint16_t lo = (uint16_t)(u[i] & 0xffffu), hi = (uint16_t)(u[i] >> 16);
                w[2 * i] = t == MN_F16 ? mn_fp16_to_fp32(lo) : mn_bf16_to_fp32(lo);
                w[2 * i + 1] = t == MN_F16 ? mn_fp16_to_fp32(hi) : mn_bf16_to_fp32(hi);
            }
        }
        return;
    }
#endif
    for (int i = 0; i < 8; i++) w[i] = mn_gemv_weight(t, row, 8 * c + i);
}

/* acc + x[0]*w[0] + ... + x[7]*w[7], left to right, each product and sum rounded. */
MN_HD float mn_gemv_chunk(const float *w, const float *x, float acc) {
    for (int i = 0; i < 8; i++) acc = acc + x[i] * w[i];
    return acc;
}

/* Value of legacy block wb (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against activation block xb. */
MN_HD float mn_gemv_block_q8_1(mn_dtype t, const char *wb, const mn_block_q8_1 *xb) {
    if (t == MN_Q4_0) return mn_vdot_q4_0_q8_1((const mn_block_q4_0 *)wb, xb);
    if (t == MN_Q4_1) return mn_vdot_q4_1_q8_1((const mn_block_q4_1 *)wb, xb);
    if (t == MN_Q5_0) return mn_vdot_q5_0_q8_1((const mn_block_q5_0 *)wb, xb);
    if (t == MN_Q5_1) return mn_vdot_q5_1_q8_1((const mn_block_q5_1 *)wb, xb);
    return mn_vdot_q8_0_q8_1((const mn_block_q8_0 *)wb, xb);
}

/* ---- one lane, one token (the kernel runs these sequences, tokens interleaved) ---------- */

/* Lane `lane`'s f32 for a float row: its chunks, then its tail element. x: K floats. */
MN_HD float mn_gemv_lane_float(mn_dtype t, const char *row, const float *x, int64_t K, int lane) {
    float acc = 0.0f, w[8];
    int64_t nc = K / 8;
    for (int64_t c = lane; c < nc; c += 32) {
        mn_gemv_load8(t, row, c, w);
        acc = mn_gemv_chunk(w, x + 8 * c, acc);
    }
    int64_t k = 8 * nc + lane;
    if (k < K) acc = acc + x[k] * mn_gemv_weight(t, row, k);
    return acc;
}

/* Lane `lane`'s f32 for a Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 row of nb blocks; xq: the token's nb blocks. */
MN_HD float mn_gemv_lane_q8_1(mn_dtype t, const char *row, const mn_block_q8_1 *xq, int64_t nb, int lane) {
    int64_t bb = mn_dtype_block_bytes(t);
    float acc = 0.0f;
    for (int64_t b = lane; b < nb; b += 32) acc = acc + mn_gemv_block_q8_1(t, row + b * bb, xq + b);
    return acc;
}

/* The f32 of lane 8g (group g of 8 lanes) for a K-quant row of nb super-blocks: the
 * group's integer shares summed (the kernel's xor shuffles give the same integers). */
MN_HD float mn_gemv_group_kq(mn_dtype t, const char *row, const mn_block_q8_K *xq, int64_t nb, int g) {
    int64_t bb = mn_dtype_block_bytes(t);
    float acc = 0.0f;
    for (int64_t b = g; b < nb; b += 32 / MN_GEMV_KQ_UNITS) {
        int isum = 0, imin = 0;
        for (int j = 0; j < MN_GEMV_KQ_UNITS; j++) mn_kq_unit(t, row + b * bb, xq + b, j, &isum, &imin);
        acc = acc + mn_kq_block_value(t, row + b * bb, xq + b, isum, imin);
    }
    return acc;
}

/* The reference's store: y[t,n] = (accumulate ? y + v : v) with v = sum + bias[n]. */
MN_HD void mn_gemv_store(const mn_matmul_desc *d, int64_t t, int64_t n, float v) {
    if (d->bias) v = v + d->bias[n];
    float *y = d->y + t * d->y_stride + n;
    *y = d->accumulate ? *y + v : v;
}

/* ---- host emulation of the whole kernel (host code only) --------------------------------- */

/* The warp's xor butterfly on 32 lane values: at offset o lane l gets v[l] + v[l ^ o]. */
static inline float mn_gemv_tree32(float *v) {
    for (int o = 16; o > 0; o >>= 1) {
        float n[32];
        for (int l = 0; l < 32; l++) n[l] = v[l] + v[l ^ o];
        memcpy(v, n, sizeof n);
    }
    return v[0];
}

/* Bytes of host scratch mn_gemv_emulate needs for d (the quantized activations). */
static inline size_t mn_gemv_emulate_work_bytes(const mn_matmul_desc *d) {
    int64_t be = mn_dtype_block_elems(d->w_type);
    if (be == 1) return 0;
    return (size_t)(d->T * (d->K / be)) * (be == MN_QK ? sizeof(mn_block_q8_1) : sizeof(mn_block_q8_K));
}

/* What the CUDA GEMV writes for d (host pointers), given mn_gemv_emulate_work_bytes of work. */
static inline void mn_gemv_emulate(const mn_matmul_desc *d, void *work) {
    mn_dtype t = d->w_type;
    int64_t be = mn_dtype_block_elems(t), nb = d->K / be;
    for (int64_t ti = 0; ti < d->T; ti++) { /* the quantize kernel's blocks are the reference's */
        const float *x = d->x + ti * d->x_stride;
        if (be == MN_QK) mn_ref_quantize_row_q8_1(x, (mn_block_q8_1 *)work + ti * nb, d->K);
        if (be == MN_QK_K) mn_ref_quantize_row_q8_K(x, (mn_block_q8_K *)work + ti * nb, d->K);
    }
    for (int64_t n = 0; n < d->N; n++) {
        const char *row = (const char *)d->w + n * d->w_row_bytes;
        for (int64_t ti = 0; ti < d->T; ti++) {
            float v[32];
            for (int l = 0; l < 32; l++) {
                if (be == 1) v[l] = mn_gemv_lane_float(t, row, d->x + ti * d->x_stride, d->K, l);
                else if (be == MN_QK) v[l] = mn_gemv_lane_q8_1(t, row, (const mn_block_q8_1 *)work + ti * nb, nb, l);
                else v[l] = l % MN_GEMV_KQ_UNITS ? 0.0f
                                                 : mn_gemv_group_kq(t, row, (const mn_block_q8_K *)work + ti * nb, nb,
                                                                    l / MN_GEMV_KQ_UNITS);
            }
            mn_gemv_store(d, ti, n, mn_gemv_tree32(v));
        }
    }
}
#endif
