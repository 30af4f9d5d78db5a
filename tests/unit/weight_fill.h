/* tests/unit/weight_fill.h — random weight matrices for the matmul tests (C and C++: the
 * cmocka tests, the nvcc-built host test and tests/gpu share it).
 *
 * Random bytes, then each block's scales made sane (fp16 scales of both signs, like real
 * files) so dequantized values stay finite. The caller passes its own generators, so each
 * test keeps its own random stream: next_byte() for every byte (its low 8 bits are used),
 * then per block unif(lo, hi) twice for the scales and once more for float types. */
#ifndef MN_TESTS_WEIGHT_FILL_H
#define MN_TESTS_WEIGHT_FILL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kernels/dtype.h"

static inline void mn_test_fill_weights(mn_dtype t, void *w, int64_t N, int64_t K, uint32_t (*next_byte)(void),
                                        float (*unif)(float, float)) {
    int64_t rb = mn_dtype_row_bytes(t, K), bb = mn_dtype_block_bytes(t);
    uint8_t *p = (uint8_t *)w;
    for (int64_t i = 0; i < N * rb; i++) p[i] = (uint8_t)next_byte();
    for (int64_t b = 0; b < N * rb / bb; b++) {
        uint8_t *blk = p + b * bb;
        uint16_t h1 = mn_fp32_to_fp16(unif(-0.02f, 0.02f)), h2 = mn_fp32_to_fp16(unif(0.0f, 0.02f));
        switch (t) {
        case MN_F32: { float f = unif(-1, 1); memcpy(blk, &f, 4); break; }
        case MN_F16: { uint16_t h = mn_fp32_to_fp16(unif(-1, 1)); memcpy(blk, &h, 2); break; }
        case MN_BF16: { uint16_t h = mn_fp32_to_bf16(unif(-1, 1)); memcpy(blk, &h, 2); break; }
        case MN_Q4_0: case MN_Q5_0: case MN_Q8_0: memcpy(blk, &h1, 2); break;
        case MN_Q4_1: case MN_Q5_1: case MN_Q4_K: case MN_Q5_K: memcpy(blk, &h1, 2); memcpy(blk + 2, &h2, 2); break;
        case MN_Q6_K: memcpy(blk + offsetof(mn_block_q6_K, d), &h1, 2); break;
        case MN_Q3_K: memcpy(blk + offsetof(mn_block_q3_K, d), &h1, 2); break;
        case MN_Q2_K: memcpy(blk + offsetof(mn_block_q2_K, d), &h1, 2); memcpy(blk + offsetof(mn_block_q2_K, dmin), &h2, 2); break;
        default: break;
        }
    }
}

#endif
