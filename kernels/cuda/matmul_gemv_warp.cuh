/* kernels/cuda/matmul_gemv_warp.cuh — one warp's work in the fused GEMV, the source the
 * device kernels of kernels/cuda/matmul_gemv.cu run, and that tests/unit/test_gemv_warp.cu
 * runs on the host with 32 threads in lockstep (no GPU needed).
 *
 * Each function is a template over the warp W, which gives W::lane() (0..31) and
 * W::shfl_xor(v, o) (int and float: lane l gets lane l^o's v; every lane calls it). The
 * device warp (mn__gemv_dev_warp) is __shfl_xor_sync over the full mask. Schedule and per
 * lane arithmetic: kernels/cuda/matmul_gemv.h. CUDA C++ only.
 */
#ifndef MN_KERNELS_CUDA_MATMUL_GEMV_WARP_CUH
#define MN_KERNELS_CUDA_MATMUL_GEMV_WARP_CUH

#include "kernels/cuda/matmul_gemv.h"

/* Loop unrolling for the device pass only (the host compiler does not know the pragma).
 * Unrolling never reorders a float sum: each lane's sequence stays the one written. */
#ifdef __CUDA_ARCH__
#define MN__GEMV_UNROLL _Pragma("unroll")
#define MN__GEMV_UNROLL2 _Pragma("unroll 2")
#else
#define MN__GEMV_UNROLL
#define MN__GEMV_UNROLL2
#endif

struct mn__gemv_dev_warp {
    __device__ int lane() const { return (int)(threadIdx.x & 31); }
    __device__ int shfl_xor(int v, int o) const { return __shfl_xor_sync(0xffffffffu, v, o); }
    __device__ float shfl_xor(float v, int o) const { return __shfl_xor_sync(0xffffffffu, v, o); }
};

/* Activation block gi (of T * ng, token gi / ng, block gi % ng) of G values (32: q8_1,
 * 256: q8_K) into xq[gi]; lane owns G/32 consecutive values. amax (a max) and the sums
 * (integers) are exact in any order; each value is mn_q8_value, so the blocks equal
 * mn_ref_quantize_row_q8_1 / _q8_K's. */
#pragma nv_exec_check_disable
template <int G, class W>
__host__ __device__ inline void mn__gemv_quant_block(const float *x, int64_t x_stride, int64_t ng, int64_t gi,
                                                     void *xq, const W &w) {
    constexpr int E = G / 32;
    int lane = w.lane();
    const float *xs = x + (gi / ng) * x_stride + (gi % ng) * G + lane * E;
    float v[E], amax = 0.0f;
    for (int i = 0; i < E; i++) {
        v[i] = xs[i];
        amax = fmaxf(amax, fabsf(v[i]));
    }
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, w.shfl_xor(amax, o));
    float d = amax / 127.0f;
    int8_t q[E];
    int sum = 0;
    for (int i = 0; i < E; i++) {
        q[i] = mn_q8_value(v[i], d);
        sum += q[i];
    }
    if (G == MN_QK) {
        mn_block_q8_1 *o = (mn_block_q8_1 *)xq + gi;
        o->qs[lane] = q[0];
        for (int off = 16; off > 0; off >>= 1) sum += w.shfl_xor(sum, off);
        if (lane == 0) {
            o->d = d;
            o->s = d * (float)sum;
        }
    } else {
        mn_block_q8_K *o = (mn_block_q8_K *)xq + gi;
        for (int i = 0; i < E; i++) o->qs[lane * E + i] = q[i];
        int pair = sum + w.shfl_xor(sum, 1); /* a 16-value group: lanes 2g, 2g+1 */
        if ((lane & 1) == 0) o->bsums[lane >> 1] = (int16_t)pair;
        if (lane == 0) o->d = d;
    }
}

/* Float rows: the lane's chunks of 8, then its tail element (mn_gemv_lane_float per token). */
template <int NT>
__host__ __device__ inline void mn__gemv_rows_float(const mn_matmul_desc &d, const char *row, int lane, float *acc) {
    int T = (int)d.T;
    int64_t nc = d.K / 8;
    float w[8];
    MN__GEMV_UNROLL2
    for (int64_t c = lane; c < nc; c += 32) {
        mn_gemv_load8(d.w_type, row, c, w);
        MN__GEMV_UNROLL
        for (int t = 0; t < NT; t++)
            if (t < T) acc[t] = mn_gemv_chunk(w, d.x + t * d.x_stride + 8 * c, acc[t]);
    }
    int64_t k = 8 * nc + lane;
    if (k < d.K) {
        float wk = mn_gemv_weight(d.w_type, row, k);
        MN__GEMV_UNROLL
        for (int t = 0; t < NT; t++)
            if (t < T) acc[t] = acc[t] + d.x[t * d.x_stride + k] * wk;
    }
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 rows: block b to lane b % 32 (mn_gemv_lane_q8_1 per token). */
template <int NT, mn_dtype TY>
__host__ __device__ inline void mn__gemv_rows_q8_1(const mn_matmul_desc &d, const char *row, const mn_block_q8_1 *xq,
                                                   int lane, float *acc) {
    int T = (int)d.T;
    int64_t nb = d.K / MN_QK, bb = mn_dtype_block_bytes(TY);
    MN__GEMV_UNROLL2
    for (int64_t b = lane; b < nb; b += 32)
        MN__GEMV_UNROLL
        for (int t = 0; t < NT; t++)
            if (t < T) acc[t] = acc[t] + mn_gemv_block_q8_1(TY, row + b * bb, xq + t * nb + b);
}

/* K-quant rows: unit u to lane u % 32; the 8 lanes of a group sum their integer shares with
 * xor shuffles 4, 2, 1 and lane 8g adds the super-block's value (mn_gemv_group_kq per
 * token). Every lane runs the same steps, so each shuffle sees the whole warp. */
#pragma nv_exec_check_disable
template <int NT, mn_dtype TY, class W>
__host__ __device__ inline void mn__gemv_rows_kq(const mn_matmul_desc &d, const char *row, const mn_block_q8_K *xq,
                                                 float *acc, const W &w) {
    int T = (int)d.T, lane = w.lane();
    int64_t nb = d.K / MN_QK_K, bb = mn_dtype_block_bytes(TY), nu = nb * MN_GEMV_KQ_UNITS;
    int j = lane % MN_GEMV_KQ_UNITS;
    for (int64_t u0 = 0; u0 < nu; u0 += 32) {
        int64_t u = u0 + lane, b = u / MN_GEMV_KQ_UNITS;
        bool on = u < nu; /* nu is a multiple of 8: whole groups are on or off */
        const char *wb = row + (on ? b : 0) * bb;
        MN__GEMV_UNROLL
        for (int t = 0; t < NT; t++) {
            if (t >= T) continue;
            int isum = 0, imin = 0;
            if (on) mn_kq_unit(TY, wb, xq + t * nb + b, j, &isum, &imin);
            for (int o = MN_GEMV_KQ_UNITS / 2; o > 0; o >>= 1) {
                isum += w.shfl_xor(isum, o);
                if (TY != MN_Q6_K && TY != MN_Q3_K) imin += w.shfl_xor(imin, o);
            }
            if (on && j == 0) acc[t] = acc[t] + mn_kq_block_value(TY, wb, xq + t * nb + b, isum, imin);
        }
    }
}

/* Output row n for all d.T <= NT tokens: the lanes' sums, the xor butterfly 16, 8, 4, 2, 1
 * (mn_gemv_tree32), lane 0 stores as the reference does. */
#pragma nv_exec_check_disable
template <int NT, class W>
__host__ __device__ inline void mn__gemv_row(const mn_matmul_desc &d, int64_t n, const void *xq, const W &w) {
    int lane = w.lane();
    const char *row = (const char *)d.w + n * d.w_row_bytes;
    float acc[NT];
    MN__GEMV_UNROLL
    for (int t = 0; t < NT; t++) acc[t] = 0.0f;
    const mn_block_q8_1 *x1 = (const mn_block_q8_1 *)xq;
    const mn_block_q8_K *xk = (const mn_block_q8_K *)xq;
    switch (d.w_type) {
    case MN_Q4_0: mn__gemv_rows_q8_1<NT, MN_Q4_0>(d, row, x1, lane, acc); break;
    case MN_Q4_1: mn__gemv_rows_q8_1<NT, MN_Q4_1>(d, row, x1, lane, acc); break;
    case MN_Q5_0: mn__gemv_rows_q8_1<NT, MN_Q5_0>(d, row, x1, lane, acc); break;
    case MN_Q5_1: mn__gemv_rows_q8_1<NT, MN_Q5_1>(d, row, x1, lane, acc); break;
    case MN_Q8_0: mn__gemv_rows_q8_1<NT, MN_Q8_0>(d, row, x1, lane, acc); break;
    case MN_Q2_K: mn__gemv_rows_kq<NT, MN_Q2_K>(d, row, xk, acc, w); break;
    case MN_Q3_K: mn__gemv_rows_kq<NT, MN_Q3_K>(d, row, xk, acc, w); break;
    case MN_Q4_K: mn__gemv_rows_kq<NT, MN_Q4_K>(d, row, xk, acc, w); break;
    case MN_Q5_K: mn__gemv_rows_kq<NT, MN_Q5_K>(d, row, xk, acc, w); break;
    case MN_Q6_K: mn__gemv_rows_kq<NT, MN_Q6_K>(d, row, xk, acc, w); break;
    default: mn__gemv_rows_float<NT>(d, row, lane, acc); break; /* F32, F16, BF16 */
    }
    MN__GEMV_UNROLL
    for (int t = 0; t < NT; t++) {
        if (t >= (int)d.T) continue;
        float v = acc[t];
        for (int o = 16; o > 0; o >>= 1) v += w.shfl_xor(v, o);
        if (lane == 0) mn_gemv_store(&d, t, n, v);
    }
}

#endif
