/* kernels/quant_math.h — per-block dequantization math shared by host C and CUDA.
 *
 * One function per weight type decodes one block into floats with the exact float
 * operations of the GGML block formulas (the same as gguf-py's dequantize), so the
 * reference, the CPU fast paths and the CUDA kernels agree bit for bit. Each product
 * and sum is a separate rounding on purpose: compile users of this header without
 * FMA contraction (x86-64 baseline C cannot contract; nvcc callers should pass
 * -fmad=false or use __fmul_rn/__fadd_rn) to keep that property.
 * Header-only, allocation-free.
 */
#ifndef MN_KERNELS_QUANT_MATH_H
#define MN_KERNELS_QUANT_MATH_H

#include <stdint.h>
#include "kernels/common.h"
#include "kernels/dtype.h"

/* Q4_0: 32 values, y[j] = d*(lo(qs[j]) - 8), y[j+16] = d*(hi(qs[j]) - 8). */
MN_HD void mn_dequant_block_q4_0(const mn_block_q4_0 *b, float *y) {
    float d = mn_fp16_to_fp32(b->d);
    for (int j = 0; j < MN_QK / 2; j++) {
        y[j] = d * (float)((int)(b->qs[j] & 0x0f) - 8);
        y[j + MN_QK / 2] = d * (float)((int)(b->qs[j] >> 4) - 8);
    }
}

/* Q4_1: y = d*q + m (the product is rounded before the add). */
MN_HD void mn_dequant_block_q4_1(const mn_block_q4_1 *b, float *y) {
    float d = mn_fp16_to_fp32(b->d), m = mn_fp16_to_fp32(b->m);
    for (int j = 0; j < MN_QK / 2; j++) {
        float p0 = d * (float)(b->qs[j] & 0x0f);
        float p1 = d * (float)(b->qs[j] >> 4);
        y[j] = p0 + m;
        y[j + MN_QK / 2] = p1 + m;
    }
}

MN_HD void mn_dequant_block_q8_0(const mn_block_q8_0 *b, float *y) {
    float d = mn_fp16_to_fp32(b->d);
    for (int j = 0; j < MN_QK; j++) y[j] = d * (float)b->qs[j];
}

/* The 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K super-block:
 * bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; bytes 8-11 hold the
 * low 4 bits of scales/mins 4-7 and bytes 0-7 lend their top 2 bits as the high bits. */
MN_HD void mn_k4_scale_min(const uint8_t *q, int j, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* Q4_K: y = (d*sc)*q - (dmin*m) per sub-block of 32. */
MN_HD void mn_dequant_block_q4_K(const mn_block_q4_K *b, float *y) {
    float d = mn_fp16_to_fp32(b->d), dmin = mn_fp16_to_fp32(b->dmin);
    for (int c = 0; c < 4; c++) { /* 64-element chunk: low nibbles then high nibbles */
        const uint8_t *q = b->qs + 32 * c;
        uint8_t sc0, m0, sc1, m1;
        mn_k4_scale_min(b->scales, 2 * c, &sc0, &m0);
        mn_k4_scale_min(b->scales, 2 * c + 1, &sc1, &m1);
        float d0 = d * (float)sc0, dm0 = dmin * (float)m0;
        float d1 = d * (float)sc1, dm1 = dmin * (float)m1;
        for (int l = 0; l < 32; l++) {
            float p0 = d0 * (float)(q[l] & 0x0f);
            float p1 = d1 * (float)(q[l] >> 4);
            y[64 * c + l] = p0 - dm0;
            y[64 * c + 32 + l] = p1 - dm1;
        }
    }
}

/* Q5_K: as Q4_K with a fifth bit: element l of sub-block j has bit j of qh[l]. */
MN_HD void mn_dequant_block_q5_K(const mn_block_q5_K *b, float *y) {
    float d = mn_fp16_to_fp32(b->d), dmin = mn_fp16_to_fp32(b->dmin);
    for (int c = 0; c < 4; c++) {
        const uint8_t *q = b->qs + 32 * c;
        uint8_t sc0, m0, sc1, m1;
        mn_k4_scale_min(b->scales, 2 * c, &sc0, &m0);
        mn_k4_scale_min(b->scales, 2 * c + 1, &sc1, &m1);
        float d0 = d * (float)sc0, dm0 = dmin * (float)m0;
        float d1 = d * (float)sc1, dm1 = dmin * (float)m1;
        for (int l = 0; l < 32; l++) {
            int q0 = (q[l] & 0x0f) | (((b->qh[l] >> (2 * c)) & 1) << 4);
            int q1 = (q[l] >> 4) | (((b->qh[l] >> (2 * c + 1)) & 1) << 4);
            float p0 = d0 * (float)q0, p1 = d1 * (float)q1;
            y[64 * c + l] = p0 - dm0;
            y[64 * c + 32 + l] = p1 - dm1;
        }
    }
}

/* The 6-bit value (0..63) of element i (0..255) of a Q6_K block, before the -32.
 * Per 128-element half h: ql[64h + l] low nibble -> element l, ql[64h + 32 + l] low
 * nibble -> l+32, their high nibbles -> l+64, l+96; qh[32h + l] bits 0-1,2-3,4-5,6-7
 * are the high bits of l, l+32, l+64, l+96. */
MN_HD int mn_q6_K_value(const mn_block_q6_K *b, int i) {
    int h = i >> 7, r = i & 127, quad = r >> 5, l = r & 31;
    uint8_t lo = b->ql[64 * h + 32 * (quad & 1) + l];
    int low = (quad < 2) ? (lo & 0x0f) : (lo >> 4);
    int high = (b->qh[32 * h + l] >> (2 * quad)) & 3;
    return low | (high << 4);
}

/* Q6_K: y = (d*sc)*(q - 32), sc an int8 per 16 elements. */
MN_HD void mn_dequant_block_q6_K(const mn_block_q6_K *b, float *y) {
    float d = mn_fp16_to_fp32(b->d);
    for (int s = 0; s < MN_QK_K / 16; s++) {
        float ds = d * (float)b->scales[s];
        for (int l = 0; l < 16; l++) y[16 * s + l] = ds * (float)(mn_q6_K_value(b, 16 * s + l) - 32);
    }
}

#endif
