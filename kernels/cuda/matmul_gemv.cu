/* kernels/cuda/matmul_gemv.cu — fused dequant GEMV for decode: y[t,n] (+)= x[t,:]·W[n,:]
 * (+ b[n]) for T <= MN_CUDA_GEMV_MAX_T tokens, every weight type, reading W once per call.
 *
 * Two launches:
 *   1. quantized weights only: x -> q8_1 blocks (Q4_0, Q4_1, Q8_0) or q8_K blocks (K-quants)
 *      in the scratch, one warp per activation block, the reference's formula (ops.h);
 *      xq layout [T][K / block] blocks;
 *   2. one warp per output row (GEMV_WARPS rows per CTA), all T tokens at once: lanes walk
 *      the row's blocks (schedule and arithmetic in kernels/cuda/matmul_gemv.h), integer
 *      block dots with __dp4a against xq (float types: f32 dots against x itself), one f32
 *      per lane and token, the warp's xor butterfly, the reference's bias / accumulate.
 * A row's result depends only on its weights and its token's x: the same bits for any T
 * and any other tokens (batch invariance), and the bits mn_gemv_emulate computes on the
 * host (tests/unit/test_gemv.c checks the emulation against mn_ref_matmul; tests/gpu checks
 * this kernel against both). Against the reference only the order of the f32 sum over
 * blocks (float types: elements) differs: well inside 1e-4 * sum|x w| (ops.h).
 * Activations are read through L1/L2 (the GEMV_WARPS rows of a CTA walk the same x).
 */
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/matmul_gemv.h"

enum { GEMV_WARPS = 8 };

size_t mn_cuda_matmul_gemv_work_bytes(const mn_matmul_desc *d) {
    int64_t be = mn_dtype_block_elems(d->w_type);
    if (be <= 1 || d->T <= 0 || d->K <= 0) return 0;
    size_t blk = be == MN_QK ? sizeof(mn_block_q8_1) : sizeof(mn_block_q8_K);
    return (size_t)d->T * (size_t)(d->K / be) * blk;
}

/* x -> activation blocks of G values (32: q8_1, 256: q8_K): one warp per block, lane owns
 * G/32 consecutive values. amax (a max) and the sums (integers) are exact in any order;
 * each value is mn_q8_value, so the blocks equal mn_ref_quantize_row_q8_1 / _q8_K's. */
template <int G>
__global__ static void __launch_bounds__(GEMV_WARPS * 32)
    gemv_quant_x(const float *x, int64_t x_stride, int64_t T, int64_t ng, void *xq) {
    constexpr int E = G / 32;
    int64_t gi = blockIdx.x * (int64_t)GEMV_WARPS + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (gi >= T * ng) return; /* whole warps */
    const float *xs = x + (gi / ng) * x_stride + (gi % ng) * G + lane * E;
    float v[E], amax = 0.0f;
#pragma unroll
    for (int i = 0; i < E; i++) {
        v[i] = xs[i];
        amax = fmaxf(amax, fabsf(v[i]));
    }
    float d = mn__warp_max(amax) / 127.0f;
    int8_t q[E];
    int sum = 0;
#pragma unroll
    for (int i = 0; i < E; i++) {
        q[i] = mn_q8_value(v[i], d);
        sum += q[i];
    }
    if (G == MN_QK) {
        mn_block_q8_1 *o = (mn_block_q8_1 *)xq + gi;
        o->qs[lane] = q[0];
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (lane == 0) {
            o->d = d;
            o->s = d * (float)sum;
        }
    } else {
        mn_block_q8_K *o = (mn_block_q8_K *)xq + gi;
#pragma unroll
        for (int i = 0; i < E; i++) o->qs[lane * E + i] = q[i];
        int pair = sum + __shfl_xor_sync(0xffffffffu, sum, 1); /* 16 values: lanes 2g, 2g+1 */
        if ((lane & 1) == 0) o->bsums[lane >> 1] = (int16_t)pair;
        if (lane == 0) o->d = d;
    }
}

/* Float rows: lane's chunks of 8, then its tail element (mn_gemv_lane_float per token). */
template <int NT>
__device__ static inline void gemv_rows_float(const mn_matmul_desc &d, const char *row, int lane, float *acc) {
    int T = (int)d.T;
    int64_t nc = d.K / 8;
    float w[8];
    for (int64_t c = lane; c < nc; c += 32) {
        mn_gemv_load8(d.w_type, row, c, w);
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (t < T) acc[t] = mn_gemv_chunk(w, d.x + t * d.x_stride + 8 * c, acc[t]);
    }
    int64_t k = 8 * nc + lane;
    if (k < d.K) {
        float wk = mn_gemv_weight(d.w_type, row, k);
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (t < T) acc[t] = acc[t] + d.x[t * d.x_stride + k] * wk;
    }
}

/* Q4_0 / Q4_1 / Q8_0 rows: block b to lane b % 32 (mn_gemv_lane_q8_1 per token). */
template <int NT, mn_dtype TY>
__device__ static inline void gemv_rows_q8_1(const mn_matmul_desc &d, const char *row, const mn_block_q8_1 *xq,
                                             int lane, float *acc) {
    int T = (int)d.T;
    int64_t nb = d.K / MN_QK, bb = mn_dtype_block_bytes(TY);
    for (int64_t b = lane; b < nb; b += 32) {
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (t < T) acc[t] = acc[t] + mn_gemv_block_q8_1(TY, row + b * bb, xq + t * nb + b);
    }
}

/* K-quant rows: unit u to lane u % 32, the group of 8 lanes sums its integer shares, lane
 * 8g adds the super-block's value (mn_gemv_group_kq per token). Every lane runs the same
 * number of steps so the shuffles see the whole warp. */
template <int NT, mn_dtype TY>
__device__ static inline void gemv_rows_kq(const mn_matmul_desc &d, const char *row, const mn_block_q8_K *xq,
                                           int lane, float *acc) {
    int T = (int)d.T;
    int64_t nb = d.K / MN_QK_K, bb = mn_dtype_block_bytes(TY), nu = nb * MN_GEMV_KQ_UNITS;
    int j = lane % MN_GEMV_KQ_UNITS;
    for (int64_t u0 = 0; u0 < nu; u0 += 32) {
        int64_t u = u0 + lane, b = u / MN_GEMV_KQ_UNITS;
        bool on = u < nu; /* nu is a multiple of 8: whole groups are on or off */
        const char *wb = row + b * bb;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t >= T) continue;
            int isum = 0, imin = 0;
            if (on) mn_kq_unit(TY, wb, xq + t * nb + b, j, &isum, &imin);
            for (int o = MN_GEMV_KQ_UNITS / 2; o > 0; o >>= 1) {
                isum += __shfl_xor_sync(0xffffffffu, isum, o);
                if (TY != MN_Q6_K) imin += __shfl_xor_sync(0xffffffffu, imin, o);
            }
            if (on && j == 0) acc[t] = acc[t] + mn_kq_block_value(TY, wb, xq + t * nb + b, isum, imin);
        }
    }
}

template <int NT>
__global__ static void __launch_bounds__(GEMV_WARPS * 32) gemv_kernel(mn_matmul_desc d, const void *xq) {
    int64_t n = blockIdx.x * (int64_t)GEMV_WARPS + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (n >= d.N) return; /* whole warps */
    const char *row = (const char *)d.w + n * d.w_row_bytes;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.0f;
    const mn_block_q8_1 *x1 = (const mn_block_q8_1 *)xq;
    const mn_block_q8_K *xk = (const mn_block_q8_K *)xq;
    switch (d.w_type) {
    case MN_Q4_0: gemv_rows_q8_1<NT, MN_Q4_0>(d, row, x1, lane, acc); break;
    case MN_Q4_1: gemv_rows_q8_1<NT, MN_Q4_1>(d, row, x1, lane, acc); break;
    case MN_Q8_0: gemv_rows_q8_1<NT, MN_Q8_0>(d, row, x1, lane, acc); break;
    case MN_Q4_K: gemv_rows_kq<NT, MN_Q4_K>(d, row, xk, lane, acc); break;
    case MN_Q5_K: gemv_rows_kq<NT, MN_Q5_K>(d, row, xk, lane, acc); break;
    case MN_Q6_K: gemv_rows_kq<NT, MN_Q6_K>(d, row, xk, lane, acc); break;
    default: gemv_rows_float<NT>(d, row, lane, acc); break; /* F32, F16, BF16 */
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        if (t >= (int)d.T) continue;
        float v = mn__warp_sum(acc[t]); /* xor 16, 8, 4, 2, 1: mn_gemv_tree32 */
        if (lane == 0) mn_gemv_store(&d, t, n, v);
    }
}

mn_err mn_cuda_matmul_gemv(const mn_matmul_desc *d, void *work, size_t work_bytes, cudaStream_t s, mn_errbuf *eb) {
    int64_t be = mn_dtype_block_elems(d->w_type);
    /* element / block alignment the loads assume: 4 bytes for F32, 2 for everything else */
    int64_t al = d->w_type == MN_F32 ? 4 : 2;
    if (!mn_dtype_is_weight_type(d->w_type) || d->K <= 0 || d->K % be != 0 || d->T > MN_CUDA_GEMV_MAX_T ||
        d->w_row_bytes % al != 0 || (uintptr_t)d->w % (uintptr_t)al != 0)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda gemv: weight type %s, T=%lld, K=%lld, row %lld bytes",
                       mn_dtype_name(d->w_type), (long long)d->T, (long long)d->K, (long long)d->w_row_bytes);
    if (d->T <= 0 || d->N <= 0) return MN_OK;
    size_t need = mn_cuda_matmul_gemv_work_bytes(d);
    if (work_bytes < need || (need && (!work || (uintptr_t)work % 4 != 0))) /* 4-byte reads of xq */
        return mn_errf(eb, MN_EINVALID, "cuda gemv: %zu scratch bytes given, %zu needed", work_bytes, need);
    if (be > 1) {
        int64_t ng = d->K / be;
        unsigned grid = (unsigned)((d->T * ng + GEMV_WARPS - 1) / GEMV_WARPS);
        if (be == MN_QK) gemv_quant_x<MN_QK><<<grid, GEMV_WARPS * 32, 0, s>>>(d->x, d->x_stride, d->T, ng, work);
        else gemv_quant_x<MN_QK_K><<<grid, GEMV_WARPS * 32, 0, s>>>(d->x, d->x_stride, d->T, ng, work);
        MN_CUDA_CHECK_LAUNCH(eb, "gemv_quant_x");
    }
    int64_t blocks = (d->N + GEMV_WARPS - 1) / GEMV_WARPS;
    if (blocks > 0x7fffffffLL) return mn_errf(eb, MN_EUNSUPPORTED, "cuda gemv: N=%lld", (long long)d->N);
    unsigned grid = (unsigned)blocks;
    if (d->T == 1) gemv_kernel<1><<<grid, GEMV_WARPS * 32, 0, s>>>(*d, work);
    else if (d->T == 2) gemv_kernel<2><<<grid, GEMV_WARPS * 32, 0, s>>>(*d, work);
    else if (d->T <= 4) gemv_kernel<4><<<grid, GEMV_WARPS * 32, 0, s>>>(*d, work);
    else gemv_kernel<8><<<grid, GEMV_WARPS * 32, 0, s>>>(*d, work);
    MN_CUDA_CHECK_LAUNCH(eb, "gemv_kernel");
    return MN_OK;
}
