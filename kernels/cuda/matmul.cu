/* kernels/cuda/matmul.cu — y[t,n] (+)= sum_k x[t,k] W[n,k] (+ b[n]).
 *
 * mn_cuda_matmul: T <= MN_CUDA_GEMV_MAX_T (decode) runs the fused dequant GEMV of
 * kernels/cuda/matmul_gemv.cu (W read once, ops.h tolerance, batch invariant); up to
 * MN_CUDA_MMQ_MAX_T tokens of Q4_0 / Q4_1 / Q8_0 the int8 tensor-core matmul of
 * kernels/cuda/matmul_mmq.cu when it is on (off by default until a GPU run has checked it);
 * otherwise the cuBLAS path below.
 *
 * cuBLAS path (mn_cuda_matmul_cublas), simple and correct first:
 *   F32 weights: one cublasGemmEx, f32 inputs, f32 compute (no TF32), W read in place.
 *   every other weight type:
 *     1. W is dequantized block by block (kernels/quant_math.h, the reference's bits) and
 *        rounded to bf16 into the caller's scratch: Wb [N][K];
 *     2. x is rounded to bf16 into the scratch: xb [T][K]. For quantized weights x first
 *        goes through the q8_1 / q8_K round trip of the ops.h contract (d = amax/127,
 *        q = nearest-even of x/d, x' = d*q), so the only difference to the reference's
 *        integer block dots is the two bf16 roundings: |err| <= ~2^-8 * sum|x w|;
 *     3. one cublasGemmEx bf16 x bf16 -> f32 with f32 accumulation;
 *   then the bias, if any, is added by a small kernel.
 * Scratch layout: [Wb: N*K bf16, padded to 256 bytes][xb: T*K bf16].
 * Known limit: cuBLAS picks its algorithm by shape, so past MN_CUDA_GEMV_MAX_T a row's
 * result may depend on T, and it differs from the GEMV's bits for the same row (the
 * batch-invariance contract of ops.h holds for 1 <= T <= MN_CUDA_GEMV_MAX_T only).
 */
#include <string.h>

#include "kernels/cuda/cuda_common.cuh"

static size_t pad256(size_t n) { return (n + 255) & ~(size_t)255; }

size_t mn_cuda_matmul_cublas_work_bytes(const mn_matmul_desc *d) {
    if (d->w_type == MN_F32 || d->T <= 0 || d->N <= 0 || d->K <= 0) return 0;
    return pad256((size_t)d->N * (size_t)d->K * 2) + pad256((size_t)d->T * (size_t)d->K * 2);
}

/* Wb[n][k] = bf16(W[n][k]): one thread per (row, block). */
__global__ static void dequant_w_kernel(mn_matmul_desc d, int64_t be, int64_t nb, uint16_t *wb) {
    float tmp[MN_QK_K];
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < d.N * nb; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t n = i / nb, b = i % nb;
        mn__dequant_block(d.w_type, (const char *)d.w + n * d.w_row_bytes, b, tmp);
        uint16_t *o = wb + n * d.K + b * be;
        for (int64_t j = 0; j < be; j++) o[j] = mn_fp32_to_bf16(tmp[j]);
    }
}

/* xb[t][k] = bf16(x'[t][k]) where x' is x itself (group == 1) or its round trip through
 * an int8 group of `group` values with d = amax/127 (the reference's quantize_group).
 * One thread per (token, group). */
__global__ static void quant_x_kernel(mn_matmul_desc d, int64_t group, uint16_t *xb) {
    int64_t ng = d.K / group;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < d.T * ng; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / ng, g0 = (i % ng) * group;
        const float *x = d.x + t * d.x_stride + g0;
        uint16_t *o = xb + t * d.K + g0;
        if (group == 1) {
            o[0] = mn_fp32_to_bf16(x[0]);
            continue;
        }
        float amax = 0.0f;
        for (int64_t j = 0; j < group; j++) amax = fmaxf(amax, fabsf(x[j]));
        float dq = amax / 127.0f;
        for (int64_t j = 0; j < group; j++) {
            o[j] = mn_fp32_to_bf16(dq * (float)mn_q8_value(x[j], dq));
        }
    }
}

__global__ static void bias_kernel(mn_matmul_desc d) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < d.T * d.N; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / d.N, n = i % d.N;
        d.y[t * d.y_stride + n] += d.bias[n];
    }
}

size_t mn_cuda_matmul_work_bytes(const mn_matmul_desc *d) {
    return d->T <= MN_CUDA_GEMV_MAX_T ? mn_cuda_matmul_gemv_work_bytes(d) : mn_cuda_matmul_cublas_work_bytes(d);
}

mn_err mn_cuda_matmul(const mn_matmul_desc *d, void *work, size_t work_bytes, cublasHandle_t blas,
                      cudaStream_t s, mn_errbuf *eb) {
    if (d->T > 0 && d->T <= MN_CUDA_GEMV_MAX_T) return mn_cuda_matmul_gemv(d, work, work_bytes, s, eb);
    if (mn_cuda_matmul_mmq_on() && mn_cuda_matmul_mmq_supports(d)) return mn_cuda_matmul_mmq(d, work, work_bytes, s, eb);
    return mn_cuda_matmul_cublas(d, work, work_bytes, blas, s, eb);
}

mn_err mn_cuda_dequant_bf16(mn_dtype type, const void *w, int64_t N, int64_t K, int64_t row_bytes, uint16_t *out,
                            cudaStream_t s, mn_errbuf *eb) {
    int64_t be = mn_dtype_block_elems(type);
    if (!mn_dtype_is_weight_type(type) || K % be != 0)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda dequant: weight type %s with K=%lld", mn_dtype_name(type), (long long)K);
    if (N <= 0 || K <= 0) return MN_OK;
    mn_matmul_desc d;
    memset(&d, 0, sizeof d);
    d.N = N;
    d.K = K;
    d.w = w;
    d.w_type = type;
    d.w_row_bytes = row_bytes;
    int64_t nb = K / be;
    dequant_w_kernel<<<mn__cuda_blocks(N * nb), MN__CUDA_THREADS, 0, s>>>(d, be, nb, out);
    MN_CUDA_CHECK_LAUNCH(eb, "dequant_w_kernel");
    return MN_OK;
}

size_t mn_cuda_matmul_prepared_work_bytes(const mn_matmul_desc *d) {
    return d->T > 0 && d->K > 0 ? pad256((size_t)d->T * (size_t)d->K * 2) : 0;
}

static mn_err cublas_path(const mn_matmul_desc *d, const uint16_t *wprep, int64_t ldw, void *work, size_t work_bytes,
                          cublasHandle_t blas, cudaStream_t s, mn_errbuf *eb);

mn_err mn_cuda_matmul_cublas(const mn_matmul_desc *d, void *work, size_t work_bytes, cublasHandle_t blas,
                             cudaStream_t s, mn_errbuf *eb) {
    return cublas_path(d, NULL, 0, work, work_bytes, blas, s, eb);
}

mn_err mn_cuda_matmul_prepared(const mn_matmul_desc *d, const uint16_t *wb, int64_t ldw, void *work, size_t work_bytes,
                               cublasHandle_t blas, cudaStream_t s, mn_errbuf *eb) {
    if (!wb || ldw < d->K) return mn_errf(eb, MN_EINVALID, "cuda matmul: prepared bf16 weights need ldw >= K");
    return cublas_path(d, wb, ldw, work, work_bytes, blas, s, eb);
}

/* wprep: the bf16 form of W prepared at load (rows ldw apart), or NULL: dequantize W into
 * work on this call. Either way cuBLAS sees the same bf16 values. */
static mn_err cublas_path(const mn_matmul_desc *d, const uint16_t *wprep, int64_t ldw, void *work, size_t work_bytes,
                          cublasHandle_t blas, cudaStream_t s, mn_errbuf *eb) {
    int64_t be = mn_dtype_block_elems(d->w_type);
    if (!mn_dtype_is_weight_type(d->w_type) || d->K % be != 0)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda matmul: weight type %s with K=%lld", mn_dtype_name(d->w_type),
                       (long long)d->K);
    if (d->T <= 0 || d->N <= 0) return MN_OK;
    if (d->K <= 0) return mn_errf(eb, MN_EUNSUPPORTED, "cuda matmul: K=%lld (an empty dot)", (long long)d->K);
    if (d->T > 0x7fffffffLL || d->N > 0x7fffffffLL || d->K > 0x7fffffffLL || d->x_stride > 0x7fffffffLL ||
        d->y_stride > 0x7fffffffLL)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda matmul: a dimension or stride past 2^31");
    size_t need = wprep ? mn_cuda_matmul_prepared_work_bytes(d) : mn_cuda_matmul_cublas_work_bytes(d);
    if (work_bytes < need || (need && !work))
        return mn_errf(eb, MN_EINVALID, "cuda matmul: %zu scratch bytes given, %zu needed", work_bytes, need);
    MN_CUBLAS_CHECK(eb, cublasSetStream(blas, s));

    int m = (int)d->N, n = (int)d->T, k = (int)d->K;
    float alpha = 1.0f, beta = d->accumulate ? 1.0f : 0.0f;
    if (d->w_type == MN_F32) {
        if (d->w_row_bytes % 4 != 0)
            return mn_errf(eb, MN_EUNSUPPORTED, "cuda matmul: F32 row stride %lld bytes is not whole floats",
                           (long long)d->w_row_bytes);
        /* column-major view: C[N x T] = op(A)[N x K] * B[K x T], A = W^T stored K x N */
        MN_CUBLAS_CHECK(eb, cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, d->w, CUDA_R_32F,
                                         (int)(d->w_row_bytes / 4), d->x, CUDA_R_32F, (int)d->x_stride, &beta, d->y,
                                         CUDA_R_32F, (int)d->y_stride, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    } else {
        const uint16_t *wb = wprep;
        uint16_t *xb = (uint16_t *)work;
        int lda = wprep ? (int)ldw : k;
        if (!wprep) {
            uint16_t *wtmp = (uint16_t *)work;
            xb = (uint16_t *)((char *)work + pad256((size_t)d->N * (size_t)d->K * 2));
            int64_t nb = d->K / be;
            dequant_w_kernel<<<mn__cuda_blocks(d->N * nb), MN__CUDA_THREADS, 0, s>>>(*d, be, nb, wtmp);
            MN_CUDA_CHECK_LAUNCH(eb, "dequant_w_kernel");
            wb = wtmp;
        }
        int64_t group = be; /* q8_1 groups of 32 for the legacy quants, q8_K of 256 for K-quants */
        quant_x_kernel<<<mn__cuda_blocks(d->T * (d->K / group)), MN__CUDA_THREADS, 0, s>>>(*d, group, xb);
        MN_CUDA_CHECK_LAUNCH(eb, "quant_x_kernel");
        MN_CUBLAS_CHECK(eb, cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, wb, CUDA_R_16BF, lda, xb,
                                         CUDA_R_16BF, k, &beta, d->y, CUDA_R_32F, (int)d->y_stride,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    if (d->bias) {
        bias_kernel<<<mn__cuda_blocks(d->T * d->N), MN__CUDA_THREADS, 0, s>>>(*d);
        MN_CUDA_CHECK_LAUNCH(eb, "bias_kernel");
    }
    return MN_OK;
}
