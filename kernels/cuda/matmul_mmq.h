/* kernels/cuda/matmul_mmq.h — one lane's share of the int8 tensor-core matmul
 * (kernels/cuda/matmul_mmq.cu), host-and-device, so tests/unit/test_mmq_frag.c can build
 * every lane's fragments on the host, multiply them as mma.sync.m16n8k32 (s8) does, and
 * check the products against the reference's block dots (no GPU needed).
 *
 * The mma's fragments (PTX ISA; lane = 4 g + t, g = lane / 4, t = lane % 4):
 *   A (16 x 32 s8, row-major): a[0] = A[g][4t .. 4t+3], a[1] = A[g+8][4t ..],
 *                               a[2] = A[g][16+4t ..], a[3] = A[g+8][16+4t ..]
 *   B (32 x 8 s8, column-major): b[0] = B[4t .. 4t+3][g], b[1] = B[16+4t ..][g]
 *   C (16 x 8 s32): c[0] = C[g][2t], c[1] = C[g][2t+1], c[2] = C[g+8][2t], c[3] = C[g+8][2t+1]
 * (byte i of a register is element i of its run of four). Here A is 16 rows of W's block b
 * as int8 (Q4_0: nibble - 8, Q4_1: the nibble, Q8_0: the byte), B the q8_1 blocks of 8
 * tokens: C[row][token] = the exact integer dot of the block. A Q4 block's byte i holds
 * element i (low nibble) and element i + 16 (high nibble), so a[0] and a[2] come from the
 * same four bytes. Header-only; C and CUDA C++.
 */
#ifndef MN_KERNELS_CUDA_MATMUL_MMQ_H
#define MN_KERNELS_CUDA_MATMUL_MMQ_H

#include <stdint.h>
#include "kernels/ops.h"
#include "kernels/quant_math.h"

/* Each byte n (0..15) of v's low nibbles as the int8 n - 8. */
MN_HD uint32_t mn_mmq_nib_minus8(uint32_t v) {
    const uint32_t n = v & 0x0f0f0f0fu;
    return (n ^ 0x08080808u) | (((~n >> 3) & 0x01010101u) * 0xf0u);
}

/* The A fragment of block b for rows row0 (g) and row8 (g + 8), lane column t, and the
 * rows' scales: dm = {d of row g, d of row g+8, m of row g, m of row g+8} (m: Q4_1 only). */
MN_HD void mn_mmq_wfrag(mn_dtype ty, const char *row0, const char *row8, int64_t b, int t, uint32_t a[4], float dm[4]) {
    dm[2] = dm[3] = 0.0f;
    if (ty == MN_Q4_0) {
        const mn_block_q4_0 *p0 = (const mn_block_q4_0 *)row0 + b, *p8 = (const mn_block_q4_0 *)row8 + b;
        const uint32_t q0 = mn_ld4_a2(p0->qs + 4 * t), q8 = mn_ld4_a2(p8->qs + 4 * t);
        a[0] = mn_mmq_nib_minus8(q0), a[1] = mn_mmq_nib_minus8(q8);
        a[2] = mn_mmq_nib_minus8(q0 >> 4), a[3] = mn_mmq_nib_minus8(q8 >> 4);
        dm[0] = mn_fp16_to_fp32(p0->d), dm[1] = mn_fp16_to_fp32(p8->d);
    } else if (ty == MN_Q4_1) {
        const mn_block_q4_1 *p0 = (const mn_block_q4_1 *)row0 + b, *p8 = (const mn_block_q4_1 *)row8 + b;
        const uint32_t q0 = mn_ld4_a2(p0->qs + 4 * t), q8 = mn_ld4_a2(p8->qs + 4 * t);
        a[0] = q0 & 0x0f0f0f0fu, a[1] = q8 & 0x0f0f0f0fu;
        a[2] = (q0 >> 4) & 0x0f0f0f0fu, a[3] = (q8 >> 4) & 0x0f0f0f0fu;
        dm[0] = mn_fp16_to_fp32(p0->d), dm[1] = mn_fp16_to_fp32(p8->d);
        dm[2] = mn_fp16_to_fp32(p0->m), dm[3] = mn_fp16_to_fp32(p8->m);
    } else { /* MN_Q8_0 */
        const mn_block_q8_0 *p0 = (const mn_block_q8_0 *)row0 + b, *p8 = (const mn_block_q8_0 *)row8 + b;
        a[0] = mn_ld4_a2(p0->qs + 4 * t), a[1] = mn_ld4_a2(p8->qs + 4 * t);
        a[2] = mn_ld4_a2(p0->qs + 16 + 4 * t), a[3] = mn_ld4_a2(p8->qs + 16 + 4 * t);
        dm[0] = mn_fp16_to_fp32(p0->d), dm[1] = mn_fp16_to_fp32(p8->d);
    }
}

/* The B fragment: the q8_1 block xb of token g, lane column t. */
MN_HD void mn_mmq_xfrag(const mn_block_q8_1 *xb, int t, uint32_t *b0, uint32_t *b1) {
    *b0 = mn_ld4(xb->qs + 4 * t);
    *b1 = mn_ld4(xb->qs + 16 + 4 * t);
}

/* One block's value for one (row, token) from its integer dot: the reference's formula
 * (mn_vdot_q4_0_q8_1 etc.: (d * dx) * sumi, plus m * s for Q4_1), so equal to it bit for bit. */
MN_HD float mn_mmq_value(mn_dtype ty, int sumi, float dw, float mw, const mn_block_q8_1 *xb) {
    if (ty == MN_Q4_1) return (dw * xb->d) * (float)sumi + mw * xb->s;
    return (dw * xb->d) * (float)sumi;
}

#endif
