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

/* The 32 fifth bits of a Q5_0 / Q5_1 block: bit i is element i's (qh is 2-byte aligned). */
MN_HD uint32_t mn_q5_qh(const uint8_t *qh) {
    return (uint32_t)qh[0] | ((uint32_t)qh[1] << 8) | ((uint32_t)qh[2] << 16) | ((uint32_t)qh[3] << 24);
}

/* Q5_0: 32 values, y[j] = d*(q - 16) with q = lo(qs[j]) | bit j of qh << 4, and
 * y[j+16] the same with hi(qs[j]) and bit j+16. */
MN_HD void mn_dequant_block_q5_0(const mn_block_q5_0 *b, float *y) {
    float d = mn_fp16_to_fp32(b->d);
    uint32_t qh = mn_q5_qh(b->qh);
    for (int j = 0; j < MN_QK / 2; j++) {
        int q0 = (b->qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
        int q1 = (b->qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
        y[j] = d * (float)(q0 - 16);
        y[j + MN_QK / 2] = d * (float)(q1 - 16);
    }
}

/* Q5_1: y = d*q + m (the product rounded before the add), q as Q5_0's without the -16. */
MN_HD void mn_dequant_block_q5_1(const mn_block_q5_1 *b, float *y) {
    float d = mn_fp16_to_fp32(b->d), m = mn_fp16_to_fp32(b->m);
    uint32_t qh = mn_q5_qh(b->qh);
    for (int j = 0; j < MN_QK / 2; j++) {
        int q0 = (b->qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
        int q1 = (b->qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
        float p0 = d * (float)q0, p1 = d * (float)q1;
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

/* The value (0..3) of element i (0..255) of a Q2_K block (layout in dtype.h). */
MN_HD int mn_q2_K_value(const mn_block_q2_K *b, int i) {
    int h = i >> 7, j = (i >> 5) & 3, l = i & 31;
    return (b->qs[32 * h + l] >> (2 * j)) & 3;
}

/* Q2_K: y = (d*sc)*q - (dmin*m) per sub-block of 16. */
MN_HD void mn_dequant_block_q2_K(const mn_block_q2_K *b, float *y) {
    float d = mn_fp16_to_fp32(b->d), dmin = mn_fp16_to_fp32(b->dmin);
    for (int s = 0; s < MN_QK_K / 16; s++) {
        float dl = d * (float)(b->scales[s] & 0x0f), ml = dmin * (float)(b->scales[s] >> 4);
        for (int l = 0; l < 16; l++) {
            float p = dl * (float)mn_q2_K_value(b, 16 * s + l);
            y[16 * s + l] = p - ml;
        }
    }
}

/* The scale (-32..31) of sub-block s (0..15) of a Q3_K block: low 4 bits in the nibbles of
 * bytes 0..7 (s < 8 low nibble of byte s, else high nibble of byte s - 8), high 2 bits in
 * bytes 8..11 (byte 8 + s % 4, bits 2*(s/4)), minus 32. */
MN_HD int mn_q3_K_scale(const uint8_t *q, int s) {
    int lo = s < 8 ? (q[s] & 0x0f) : (q[s - 8] >> 4);
    int hi = (q[8 + (s & 3)] >> (2 * (s >> 2))) & 3;
    return (lo | (hi << 4)) - 32;
}

/* The value (-4..3) of element i (0..255) of a Q3_K block (layout in dtype.h). */
MN_HD int mn_q3_K_value(const mn_block_q3_K *b, int i) {
    int h = i >> 7, j = (i >> 5) & 3, l = i & 31;
    int low = (b->qs[32 * h + l] >> (2 * j)) & 3;
    return low - (((b->hmask[l] >> (4 * h + j)) & 1) ? 0 : 4);
}

/* Q3_K: y = (d*sc)*q per sub-block of 16. */
MN_HD void mn_dequant_block_q3_K(const mn_block_q3_K *b, float *y) {
    float d = mn_fp16_to_fp32(b->d);
    for (int s = 0; s < MN_QK_K / 16; s++) {
        float ds = d * (float)mn_q3_K_scale(b->scales, s);
        for (int l = 0; l < 16; l++) y[16 * s + l] = ds * (float)mn_q3_K_value(b, 16 * s + l);
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

/* ---- integer block dots for the fused GEMV (kernels/cuda/matmul_gemv.cu) ---------------
 * The matmul contract (kernels/ops.h) with the reference's arithmetic, block by block:
 * the integer dot is exact in any order, the float scaling is the reference's sequence of
 * roundings (kernels/ref/ref_matmul.c), so a block's value here has the reference's bits.
 * Four bytes at a time (__dp4a on the device). Blocks of every weight type are at least
 * 2-byte aligned, so 4 quant bytes are read as two 16-bit halves. */

/* One activation value of a q8 group: nearest integer of x/d, ties to even (nearbyintf
 * under the default rounding mode, rint on the device); d == 0 gives 0. */
MN_HD int8_t mn_q8_value(float x, float d) { return d == 0.0f ? (int8_t)0 : (int8_t)nearbyintf(x / d); }

/* c + sum over the 4 bytes of a and b taken as signed int8 (CUDA's __dp4a). */
MN_HD int mn_dp4a(uint32_t a, uint32_t b, int c) {
#ifdef __CUDA_ARCH__
    return __dp4a((int)a, (int)b, c);
#else
    for (int i = 0; i < 4; i++) c += (int)(int8_t)(uint8_t)(a >> (8 * i)) * (int)(int8_t)(uint8_t)(b >> (8 * i));
    return c;
#endif
}

/* 4 bytes at p (p 2-byte aligned), little-endian. */
MN_HD uint32_t mn_ld4_a2(const void *p) {
#ifdef __CUDA_ARCH__
    const uint16_t *h = (const uint16_t *)p;
    return (uint32_t)h[0] | ((uint32_t)h[1] << 16);
#else
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
#endif
}

/* 4 bytes at p (p 4-byte aligned: activation blocks). */
MN_HD uint32_t mn_ld4(const void *p) {
#ifdef __CUDA_ARCH__
    return *(const uint32_t *)p;
#else
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
#endif
}

/* Q4_0 x q8_1: (d*dx) * sum (q-8)*xq, with sum (q-8)*xq = sum q*xq - 8*sum xq. */
MN_HD float mn_vdot_q4_0_q8_1(const mn_block_q4_0 *b, const mn_block_q8_1 *x) {
    int si = 0, sx = 0;
    for (int i = 0; i < 4; i++) {
        uint32_t q = mn_ld4_a2(b->qs + 4 * i), x0 = mn_ld4(x->qs + 4 * i), x1 = mn_ld4(x->qs + 16 + 4 * i);
        si = mn_dp4a(q & 0x0f0f0f0fu, x0, si);
        si = mn_dp4a((q >> 4) & 0x0f0f0f0fu, x1, si);
        sx = mn_dp4a(0x01010101u, x0, sx);
        sx = mn_dp4a(0x01010101u, x1, sx);
    }
    return (mn_fp16_to_fp32(b->d) * x->d) * (float)(si - 8 * sx);
}

/* Q4_1 x q8_1: (d*dx) * sum q*xq + m * s (s = dx * sum xq, from the activation block). */
MN_HD float mn_vdot_q4_1_q8_1(const mn_block_q4_1 *b, const mn_block_q8_1 *x) {
    int si = 0;
    for (int i = 0; i < 4; i++) {
        uint32_t q = mn_ld4_a2(b->qs + 4 * i);
        si = mn_dp4a(q & 0x0f0f0f0fu, mn_ld4(x->qs + 4 * i), si);
        si = mn_dp4a((q >> 4) & 0x0f0f0f0fu, mn_ld4(x->qs + 16 + 4 * i), si);
    }
    return (mn_fp16_to_fp32(b->d) * x->d) * (float)si + mn_fp16_to_fp32(b->m) * x->s;
}

/* Bits 0..3 of v moved to bit 4 of bytes 0..3 (Q5's fifth bits, four elements at a time). */
MN_HD uint32_t mn_q5_spread4(uint32_t v) {
    return ((v & 1u) << 4) | ((v & 2u) << 11) | ((v & 4u) << 18) | ((v & 8u) << 25);
}

/* Sum over the block of q*xq with q the 5-bit value (0..31) of a Q5_0 / Q5_1 block. */
MN_HD int mn_q5_isum(const uint8_t *qs, uint32_t qh, const mn_block_q8_1 *x) {
    int si = 0;
    for (int i = 0; i < 4; i++) {
        uint32_t q = mn_ld4_a2(qs + 4 * i);
        uint32_t lo = (q & 0x0f0f0f0fu) | mn_q5_spread4(qh >> (4 * i));
        uint32_t hi = ((q >> 4) & 0x0f0f0f0fu) | mn_q5_spread4(qh >> (16 + 4 * i));
        si = mn_dp4a(lo, mn_ld4(x->qs + 4 * i), si);
        si = mn_dp4a(hi, mn_ld4(x->qs + 16 + 4 * i), si);
    }
    return si;
}

/* Q5_0 x q8_1: (d*dx) * sum (q-16)*xq, with sum (q-16)*xq = sum q*xq - 16*sum xq. */
MN_HD float mn_vdot_q5_0_q8_1(const mn_block_q5_0 *b, const mn_block_q8_1 *x) {
    int sx = 0;
    for (int i = 0; i < 8; i++) sx = mn_dp4a(0x01010101u, mn_ld4(x->qs + 4 * i), sx);
    int si = mn_q5_isum(b->qs, mn_q5_qh(b->qh), x);
    return (mn_fp16_to_fp32(b->d) * x->d) * (float)(si - 16 * sx);
}

/* Q5_1 x q8_1: (d*dx) * sum q*xq + m * s, as Q4_1. */
MN_HD float mn_vdot_q5_1_q8_1(const mn_block_q5_1 *b, const mn_block_q8_1 *x) {
    int si = mn_q5_isum(b->qs, mn_q5_qh(b->qh), x);
    return (mn_fp16_to_fp32(b->d) * x->d) * (float)si + mn_fp16_to_fp32(b->m) * x->s;
}

MN_HD float mn_vdot_q8_0_q8_1(const mn_block_q8_0 *b, const mn_block_q8_1 *x) {
    int si = 0;
    for (int i = 0; i < 8; i++) si = mn_dp4a(mn_ld4_a2(b->qs + 4 * i), mn_ld4(x->qs + 4 * i), si);
    return (mn_fp16_to_fp32(b->d) * x->d) * (float)si;
}

/* A K-quant super-block as 8 units of 32 elements (unit j = elements 32j .. 32j+31).
 * Unit j's integer share of the super-block dot: *isum += sc_j * sum q*xq (Q6_K, Q3_K: the
 * two 16-element groups of the unit, each with its own scale, q - 32 / q in -4..3), *imin += m_j *
 * (bsums of the unit) (Q4_K / Q5_K; Q2_K: a 4-bit scale and min per 16-element group). Summed over j = 0..7 in any order these are the
 * reference's isum / imin exactly; mn_kq_block_value scales them as the reference does. */
MN_HD void mn_kq_unit(mn_dtype t, const void *wb, const mn_block_q8_K *x, int j, int *isum, int *imin) {
    const int8_t *xq = x->qs + 32 * j;
    if (t == MN_Q2_K) { /* unit j = 4h + jj: q at qs[32h..] >> 2jj; sub-blocks 2j, 2j+1 */
        const mn_block_q2_K *b = (const mn_block_q2_K *)wb;
        const uint8_t *qs = b->qs + 32 * (j >> 2);
        int sh = 2 * (j & 3), ss[2] = {0, 0};
        for (int i = 0; i < 8; i++)
            ss[i >> 2] = mn_dp4a((mn_ld4_a2(qs + 4 * i) >> sh) & 0x03030303u, mn_ld4(xq + 4 * i), ss[i >> 2]);
        for (int g = 0; g < 2; g++) {
            *isum += (b->scales[2 * j + g] & 0x0f) * ss[g];
            *imin += (b->scales[2 * j + g] >> 4) * x->bsums[2 * j + g];
        }
        return;
    }
    if (t == MN_Q3_K) { /* unit j = 4h + jj: low bits at qs[32h..] >> 2jj, high bits bit j of hmask */
        const mn_block_q3_K *b = (const mn_block_q3_K *)wb;
        const uint8_t *qs = b->qs + 32 * (j >> 2);
        int sh = 2 * (j & 3), ss[2] = {0, 0}, sx[2] = {0, 0};
        for (int i = 0; i < 8; i++) {
            uint32_t lo = (mn_ld4_a2(qs + 4 * i) >> sh) & 0x03030303u;
            uint32_t hi = ((mn_ld4_a2(b->hmask + 4 * i) >> j) & 0x01010101u) << 2;
            uint32_t xv = mn_ld4(xq + 4 * i);
            ss[i >> 2] = mn_dp4a(lo | hi, xv, ss[i >> 2]); /* q + 4 in 0..7 */
            sx[i >> 2] = mn_dp4a(0x01010101u, xv, sx[i >> 2]);
        }
        *isum += mn_q3_K_scale(b->scales, 2 * j) * (ss[0] - 4 * sx[0]) +
                 mn_q3_K_scale(b->scales, 2 * j + 1) * (ss[1] - 4 * sx[1]);
        return;
    }
    if (t == MN_Q6_K) {
        const mn_block_q6_K *b = (const mn_block_q6_K *)wb;
        int h = j >> 2, quad = j & 3;
        const uint8_t *ql = b->ql + 64 * h + 32 * (quad & 1), *qh = b->qh + 32 * h;
        int lsh = 4 * (quad >> 1), hsh = 2 * quad, ss[2] = {0, 0}, sx[2] = {0, 0};
        for (int i = 0; i < 8; i++) {
            uint32_t lo = (mn_ld4_a2(ql + 4 * i) >> lsh) & 0x0f0f0f0fu;
            uint32_t hi = ((mn_ld4_a2(qh + 4 * i) >> hsh) & 0x03030303u) << 4;
            uint32_t xv = mn_ld4(xq + 4 * i);
            ss[i >> 2] = mn_dp4a(lo | hi, xv, ss[i >> 2]); /* q in 0..63: a non-negative int8 */
            sx[i >> 2] = mn_dp4a(0x01010101u, xv, sx[i >> 2]);
        }
        *isum += b->scales[2 * j] * (ss[0] - 32 * sx[0]) + b->scales[2 * j + 1] * (ss[1] - 32 * sx[1]);
        return;
    }
    /* Q4_K / Q5_K: header (d, dmin, scales[12]) shared; qs at different offsets */
    const mn_block_q4_K *b4 = (const mn_block_q4_K *)wb;
    const mn_block_q5_K *b5 = (const mn_block_q5_K *)wb;
    const uint8_t *qs = (t == MN_Q4_K ? b4->qs : b5->qs) + 32 * (j >> 1);
    int sh = 4 * (j & 1), ss = 0;
    for (int i = 0; i < 8; i++) {
        uint32_t v = (mn_ld4_a2(qs + 4 * i) >> sh) & 0x0f0f0f0fu;
        if (t == MN_Q5_K) v |= ((mn_ld4_a2(b5->qh + 4 * i) >> j) & 0x01010101u) << 4;
        ss = mn_dp4a(v, mn_ld4(xq + 4 * i), ss);
    }
    uint8_t sc, m;
    mn_k4_scale_min(b4->scales, j, &sc, &m);
    *isum += sc * ss;
    *imin += m * (x->bsums[2 * j] + x->bsums[2 * j + 1]);
}

/* The super-block's value from the summed unit shares (the reference's scaling). */
MN_HD float mn_kq_block_value(mn_dtype t, const void *wb, const mn_block_q8_K *x, int isum, int imin) {
    float dx = x->d;
    if (t == MN_Q6_K) return (mn_fp16_to_fp32(((const mn_block_q6_K *)wb)->d) * dx) * (float)isum;
    if (t == MN_Q3_K) return (mn_fp16_to_fp32(((const mn_block_q3_K *)wb)->d) * dx) * (float)isum;
    if (t == MN_Q2_K) {
        const mn_block_q2_K *b2 = (const mn_block_q2_K *)wb;
        return (mn_fp16_to_fp32(b2->d) * dx) * (float)isum - (mn_fp16_to_fp32(b2->dmin) * dx) * (float)imin;
    }
    const mn_block_q4_K *b = (const mn_block_q4_K *)wb;
    return (mn_fp16_to_fp32(b->d) * dx) * (float)isum - (mn_fp16_to_fp32(b->dmin) * dx) * (float)imin;
}

#endif
