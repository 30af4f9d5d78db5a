/* kernels/cuda/cuda_common.cuh — small device helpers shared by the kernels/cuda .cu
 * files: launch sizing, warp / block reductions, and decoding one weight block through
 * the host-and-device math of kernels/quant_math.h (so get_rows and the matmul dequant
 * give the reference's bits; the .cu files are built with -fmad=false for that).
 */
#ifndef MN_KERNELS_CUDA_COMMON_CUH
#define MN_KERNELS_CUDA_COMMON_CUH

#include "kernels/cuda/ops_cuda.h"
#include "kernels/quant_math.h"

enum { MN__CUDA_THREADS = 256 };

/* Blocks for a grid-stride loop over n items: enough to fill the GPU, never more than
 * the items need. */
static inline unsigned mn__cuda_blocks(int64_t n) {
    int64_t b = (n + MN__CUDA_THREADS - 1) / MN__CUDA_THREADS;
    if (b < 1) b = 1;
    if (b > (1 << 20)) b = 1 << 20;
    return (unsigned)b;
}

/* Sum over a warp with xor butterflies: every lane ends with the same bits (each step adds
 * the same two values in both partner lanes). */
__device__ static inline float mn__warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ static inline double mn__warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ static inline float mn__warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Decode block b of a weight row of type t into y (mn_dtype_block_elems(t) values).
 * Float types are one element per "block". */
__device__ static inline void mn__dequant_block(mn_dtype t, const char *row, int64_t b, float *y) {
    switch (t) {
    case MN_F32: y[0] = ((const float *)row)[b]; break;
    case MN_F16: y[0] = mn_fp16_to_fp32(((const uint16_t *)row)[b]); break;
    case MN_BF16: y[0] = mn_bf16_to_fp32(((const uint16_t *)row)[b]); break;
    case MN_Q4_0: mn_dequant_block_q4_0((const mn_block_q4_0 *)row + b, y); break;
    case MN_Q4_1: mn_dequant_block_q4_1((const mn_block_q4_1 *)row + b, y); break;
    case MN_Q5_0: mn_dequant_block_q5_0((const mn_block_q5_0 *)row + b, y); break;
    case MN_Q5_1: mn_dequant_block_q5_1((const mn_block_q5_1 *)row + b, y); break;
    case MN_Q8_0: mn_dequant_block_q8_0((const mn_block_q8_0 *)row + b, y); break;
    case MN_Q2_K: mn_dequant_block_q2_K((const mn_block_q2_K *)row + b, y); break;
    case MN_Q3_K: mn_dequant_block_q3_K((const mn_block_q3_K *)row + b, y); break;
    case MN_Q4_K: mn_dequant_block_q4_K((const mn_block_q4_K *)row + b, y); break;
    case MN_Q5_K: mn_dequant_block_q5_K((const mn_block_q5_K *)row + b, y); break;
    case MN_Q6_K: mn_dequant_block_q6_K((const mn_block_q6_K *)row + b, y); break;
    default:
        for (int64_t i = 0; i < mn_dtype_block_elems(t); i++) y[i] = __int_as_float(0x7fc00000);
        break;
    }
}

#endif
