/* kernels/ref/ref_matmul.c — reference matmul, plain loops over the precision contract
 * of kernels/ops.h:
 *   float weights: f32 dot in k order on the dequantized values;
 *   quantized weights: x row quantized (q8_1 or q8_K), then per block an exact integer
 *   dot, scaled by the block scales in f32 and added to one f32 accumulator in block order.
 * The scratch rows are on the stack in chunks so the reference allocates nothing.
 */
#include "kernels/ops.h"
#include "kernels/quant_math.h"

/* One (weight block, activation block) product for the legacy 32-element types. */
static float dot_block_q8_1(mn_dtype t, const void *wb, const mn_block_q8_1 *xb) {
    int isum = 0;
    switch (t) {
    case MN_Q4_0: {
        const mn_block_q4_0 *b = (const mn_block_q4_0 *)wb;
        for (int j = 0; j < MN_QK / 2; j++)
            isum += ((b->qs[j] & 0x0f) - 8) * xb->qs[j] + ((b->qs[j] >> 4) - 8) * xb->qs[j + 16];
        return (mn_fp16_to_fp32(b->d) * xb->d) * (float)isum;
    }
    case MN_Q4_1: {
        const mn_block_q4_1 *b = (const mn_block_q4_1 *)wb;
        for (int j = 0; j < MN_QK / 2; j++) isum += (b->qs[j] & 0x0f) * xb->qs[j] + (b->qs[j] >> 4) * xb->qs[j + 16];
        return (mn_fp16_to_fp32(b->d) * xb->d) * (float)isum + mn_fp16_to_fp32(b->m) * xb->s;
    }
    case MN_Q5_0: {
        const mn_block_q5_0 *b = (const mn_block_q5_0 *)wb;
        uint32_t qh = mn_q5_qh(b->qh);
        for (int j = 0; j < MN_QK / 2; j++) {
            int q0 = (b->qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
            int q1 = (b->qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
            isum += (q0 - 16) * xb->qs[j] + (q1 - 16) * xb->qs[j + 16];
        }
        return (mn_fp16_to_fp32(b->d) * xb->d) * (float)isum;
    }
    case MN_Q5_1: {
        const mn_block_q5_1 *b = (const mn_block_q5_1 *)wb;
        uint32_t qh = mn_q5_qh(b->qh);
        for (int j = 0; j < MN_QK / 2; j++) {
            int q0 = (b->qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
            int q1 = (b->qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
            isum += q0 * xb->qs[j] + q1 * xb->qs[j + 16];
        }
        return (mn_fp16_to_fp32(b->d) * xb->d) * (float)isum + mn_fp16_to_fp32(b->m) * xb->s;
    }
    default: { /* MN_Q8_0 */
        const mn_block_q8_0 *b = (const mn_block_q8_0 *)wb;
        for (int j = 0; j < MN_QK; j++) isum += b->qs[j] * xb->qs[j];
        return (mn_fp16_to_fp32(b->d) * xb->d) * (float)isum;
    }
    }
}

/* One K-quant super-block times one q8_K block. */
static float dot_block_q8_K(mn_dtype t, const void *wb, const mn_block_q8_K *xb) {
    int isum = 0, imin = 0;
    if (t == MN_Q6_K) {
        const mn_block_q6_K *b = (const mn_block_q6_K *)wb;
        for (int s = 0; s < MN_QK_K / 16; s++) {
            int ss = 0;
            for (int l = 0; l < 16; l++) ss += (mn_q6_K_value(b, 16 * s + l) - 32) * xb->qs[16 * s + l];
            isum += b->scales[s] * ss;
        }
        return (mn_fp16_to_fp32(b->d) * xb->d) * (float)isum;
    }
    if (t == MN_Q2_K) {
        const mn_block_q2_K *b = (const mn_block_q2_K *)wb;
        for (int s = 0; s < MN_QK_K / 16; s++) {
            int ss = 0;
            for (int l = 0; l < 16; l++) ss += mn_q2_K_value(b, 16 * s + l) * xb->qs[16 * s + l];
            isum += (b->scales[s] & 0x0f) * ss;
            imin += (b->scales[s] >> 4) * xb->bsums[s];
        }
        return (mn_fp16_to_fp32(b->d) * xb->d) * (float)isum - (mn_fp16_to_fp32(b->dmin) * xb->d) * (float)imin;
    }
    if (t == MN_Q3_K) {
        const mn_block_q3_K *b = (const mn_block_q3_K *)wb;
        for (int s = 0; s < MN_QK_K / 16; s++) {
            int ss = 0;
            for (int l = 0; l < 16; l++) ss += mn_q3_K_value(b, 16 * s + l) * xb->qs[16 * s + l];
            isum += mn_q3_K_scale(b->scales, s) * ss;
        }
        return (mn_fp16_to_fp32(b->d) * xb->d) * (float)isum;
    }
    /* Q4_K / Q5_K share the header (d, dmin, scales) and the 4-bit qs */
    const mn_block_q4_K *b4 = (const mn_block_q4_K *)wb;
    const mn_block_q5_K *b5 = (const mn_block_q5_K *)wb;
    const uint8_t *scales = t == MN_Q4_K ? b4->scales : b5->scales;
    const uint8_t *qs = t == MN_Q4_K ? b4->qs : b5->qs;
    for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        mn_k4_scale_min(scales, j, &sc, &m);
        const uint8_t *q = qs + 32 * (j / 2);
        int ss = 0;
        for (int l = 0; l < 32; l++) {
            int v = (j & 1) ? (q[l] >> 4) : (q[l] & 0x0f);
            if (t == MN_Q5_K) v |= ((b5->qh[l] >> j) & 1) << 4;
            ss += v * xb->qs[32 * j + l];
        }
        isum += sc * ss;
        imin += m * (xb->bsums[2 * j] + xb->bsums[2 * j + 1]);
    }
    float dx = xb->d;
    return (mn_fp16_to_fp32(b4->d) * dx) * (float)isum - (mn_fp16_to_fp32(b4->dmin) * dx) * (float)imin;
}

static float weight_value(mn_dtype t, const void *row, int64_t k) {
    if (t == MN_F32) return ((const float *)row)[k];
    if (t == MN_F16) return mn_fp16_to_fp32(((const uint16_t *)row)[k]);
    return mn_bf16_to_fp32(((const uint16_t *)row)[k]);
}

static void store(const mn_matmul_desc *d, int64_t t, int64_t n, float acc) {
    if (d->bias) acc += d->bias[n];
    float *y = d->y + t * d->y_stride + n;
    *y = d->accumulate ? *y + acc : acc;
}

enum { CHUNK_BLOCKS = 16 }; /* activation blocks quantized at a time (stack scratch) */

void mn_ref_matmul(const mn_matmul_desc *d) {
    mn_dtype t = d->w_type;
    int64_t be = mn_dtype_block_elems(t), bb = mn_dtype_block_bytes(t), nb = d->K / be;
    for (int64_t ti = 0; ti < d->T; ti++) {
        const float *x = d->x + ti * d->x_stride;
        for (int64_t n = 0; n < d->N; n++) {
            const char *row = (const char *)d->w + n * d->w_row_bytes;
            float acc = 0.0f;
            if (be == 1) {
                for (int64_t k = 0; k < d->K; k++) acc += x[k] * weight_value(t, row, k);
            } else if (be == MN_QK) {
                mn_block_q8_1 xq[CHUNK_BLOCKS];
                for (int64_t b0 = 0; b0 < nb; b0 += CHUNK_BLOCKS) {
                    int64_t cnt = nb - b0 < CHUNK_BLOCKS ? nb - b0 : CHUNK_BLOCKS;
                    mn_ref_quantize_row_q8_1(x + b0 * MN_QK, xq, cnt * MN_QK);
                    for (int64_t b = 0; b < cnt; b++) acc += dot_block_q8_1(t, row + (b0 + b) * bb, &xq[b]);
                }
            } else {
                mn_block_q8_K xq;
                for (int64_t b = 0; b < nb; b++) {
                    mn_ref_quantize_row_q8_K(x + b * MN_QK_K, &xq, MN_QK_K);
                    acc += dot_block_q8_K(t, row + b * bb, &xq);
                }
            }
            store(d, ti, n, acc);
        }
    }
}
