/* kernels/ref/ref_quant.c — reference dequantization of weight rows and quantization of
 * activation rows (q8_1, q8_K), as plain loops.
 *
 * Dequantization uses the per-block math of kernels/quant_math.h (exact GGML / gguf-py
 * float formulas). Activation quantization follows the matmul precision contract of
 * kernels/ops.h: d = amax/127, q = nearest integer of x/d with ties to even
 * (nearbyintf under the default rounding mode; the SIMD paths use cvtps_epi32, which
 * rounds the same way), d = 0 gives q = 0.
 */
#include <math.h>

#include "kernels/ops.h"
#include "kernels/quant_math.h"

void mn_ref_dequant_row(mn_dtype type, const void *src, float *y, int64_t n) {
    switch (type) {
    case MN_F32: memcpy(y, src, (size_t)n * sizeof(float)); break;
    case MN_F16: {
        const uint16_t *h = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) y[i] = mn_fp16_to_fp32(h[i]);
        break;
    }
    case MN_BF16: {
        const uint16_t *h = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) y[i] = mn_bf16_to_fp32(h[i]);
        break;
    }
    case MN_Q4_0: for (int64_t b = 0; b < n / MN_QK; b++) mn_dequant_block_q4_0((const mn_block_q4_0 *)src + b, y + b * MN_QK); break;
    case MN_Q4_1: for (int64_t b = 0; b < n / MN_QK; b++) mn_dequant_block_q4_1((const mn_block_q4_1 *)src + b, y + b * MN_QK); break;
    case MN_Q5_0: for (int64_t b = 0; b < n / MN_QK; b++) mn_dequant_block_q5_0((const mn_block_q5_0 *)src + b, y + b * MN_QK); break;
    case MN_Q5_1: for (int64_t b = 0; b < n / MN_QK; b++) mn_dequant_block_q5_1((const mn_block_q5_1 *)src + b, y + b * MN_QK); break;
    case MN_Q8_0: for (int64_t b = 0; b < n / MN_QK; b++) mn_dequant_block_q8_0((const mn_block_q8_0 *)src + b, y + b * MN_QK); break;
    case MN_Q2_K: for (int64_t b = 0; b < n / MN_QK_K; b++) mn_dequant_block_q2_K((const mn_block_q2_K *)src + b, y + b * MN_QK_K); break;
    case MN_Q3_K: for (int64_t b = 0; b < n / MN_QK_K; b++) mn_dequant_block_q3_K((const mn_block_q3_K *)src + b, y + b * MN_QK_K); break;
    case MN_Q4_K: for (int64_t b = 0; b < n / MN_QK_K; b++) mn_dequant_block_q4_K((const mn_block_q4_K *)src + b, y + b * MN_QK_K); break;
    case MN_Q5_K: for (int64_t b = 0; b < n / MN_QK_K; b++) mn_dequant_block_q5_K((const mn_block_q5_K *)src + b, y + b * MN_QK_K); break;
    case MN_Q6_K: for (int64_t b = 0; b < n / MN_QK_K; b++) mn_dequant_block_q6_K((const mn_block_q6_K *)src + b, y + b * MN_QK_K); break;
    case MN_Q8_1: {
        const mn_block_q8_1 *b = (const mn_block_q8_1 *)src;
        for (int64_t i = 0; i < n; i++) y[i] = b[i / MN_QK].d * (float)b[i / MN_QK].qs[i % MN_QK];
        break;
    }
    case MN_Q8_K: {
        const mn_block_q8_K *b = (const mn_block_q8_K *)src;
        for (int64_t i = 0; i < n; i++) y[i] = b[i / MN_QK_K].d * (float)b[i / MN_QK_K].qs[i % MN_QK_K];
        break;
    }
    default:
        /* unknown types are rejected where tensors are loaded; NaN makes a slip visible */
        for (int64_t i = 0; i < n; i++) y[i] = NAN;
        break;
    }
}

/* Quantize n values to int8 with one scale: returns d, writes q. */
static float quantize_group(const float *x, int8_t *q, int n) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    float d = amax / 127.0f;
    for (int i = 0; i < n; i++) q[i] = mn_q8_value(x[i], d); /* shared with the CUDA GEMV */
    return d;
}

void mn_ref_quantize_row_q8_1(const float *x, mn_block_q8_1 *y, int64_t n) {
    for (int64_t b = 0; b < n / MN_QK; b++) {
        y[b].d = quantize_group(x + b * MN_QK, y[b].qs, MN_QK);
        int sum = 0;
        for (int i = 0; i < MN_QK; i++) sum += y[b].qs[i];
        y[b].s = y[b].d * (float)sum;
    }
}

void mn_ref_quantize_row_q8_K(const float *x, mn_block_q8_K *y, int64_t n) {
    for (int64_t b = 0; b < n / MN_QK_K; b++) {
        y[b].d = quantize_group(x + b * MN_QK_K, y[b].qs, MN_QK_K);
        for (int g = 0; g < MN_QK_K / 16; g++) {
            int sum = 0;
            for (int i = 0; i < 16; i++) sum += y[b].qs[16 * g + i];
            y[b].bsums[g] = (int16_t)sum;
        }
    }
}
