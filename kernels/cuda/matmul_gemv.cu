/* kernels/cuda/matmul_gemv.cu — fused dequant GEMV for decode: y[t,n] (+)= x[t,:]·W[n,:]
 * (+ b[n]) for T <= MN_CUDA_GEMV_MAX_T tokens, every weight type, reading W once per call.
 *
 * Two launches:
 *   1. quantized weights only: x -> q8_1 blocks (Q4_0/1, Q5_0/1, Q8_0) or q8_K blocks (K-quants)
 *      in the scratch, one warp per activation block, the reference's formula (ops.h);
 *      xq layout [T][K / block] blocks;
 *   2. one warp per output row (GEMV_WARPS rows per CTA), all T tokens at once: lanes walk
 *      the row's blocks (the warp's code: kernels/cuda/matmul_gemv_warp.cuh; schedule and
 *      per-lane arithmetic: kernels/cuda/matmul_gemv.h), integer
 *      block dots with __dp4a against xq (float types: f32 dots against x itself), one f32
 *      per lane and token, the warp's xor butterfly, the reference's bias / accumulate.
 * A row's result depends only on its weights and its token's x: the same bits for any T
 * and any other tokens (batch invariance), and the bits mn_gemv_emulate computes on the
 * host. tests/unit/test_gemv.c checks that emulation against mn_ref_matmul;
 * tests/unit/test_gemv_warp.cu runs this file's warp code (matmul_gemv_warp.cuh) on 32
 * host threads in lockstep against both; tests/gpu checks the kernel against both. Against the reference only the order of the f32 sum over
 * blocks (float types: elements) differs: well inside 1e-4 * sum|x w| (ops.h).
 * Activations are read through L1/L2 (the GEMV_WARPS rows of a CTA walk the same x).
 */
#include <stdio.h>

#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/matmul_gemv_warp.cuh"

enum { GEMV_WARPS = 8 };

size_t mn_cuda_matmul_gemv_work_bytes(const mn_matmul_desc *d) {
    int64_t be = mn_dtype_block_elems(d->w_type);
    if (be <= 1 || d->T <= 0 || d->K <= 0) return 0;
    size_t blk = be == MN_QK ? sizeof(mn_block_q8_1) : sizeof(mn_block_q8_K);
    return (size_t)d->T * (size_t)(d->K / be) * blk;
}

/* x -> activation blocks: one warp per block (mn__gemv_quant_block). */
template <int G>
__global__ static void __launch_bounds__(GEMV_WARPS * 32)
    gemv_quant_x(const float *x, int64_t x_stride, int64_t T, int64_t ng, void *xq) {
    int64_t gi = blockIdx.x * (int64_t)GEMV_WARPS + threadIdx.x / 32;
    if (gi >= T * ng) return; /* whole warps */
    mn__gemv_quant_block<G>(x, x_stride, ng, gi, xq, mn__gemv_dev_warp());
}

/* One warp per output row (mn__gemv_row), GEMV_WARPS rows per CTA. */
template <int NT>
__global__ static void __launch_bounds__(GEMV_WARPS * 32) gemv_kernel(mn_matmul_desc d, const void *xq) {
    int64_t n = blockIdx.x * (int64_t)GEMV_WARPS + threadIdx.x / 32;
    if (n >= d.N) return; /* whole warps */
    mn__gemv_row<NT>(d, n, xq, mn__gemv_dev_warp());
}

/* Whether the GEMV takes d's weights (type, T, K, the alignment its loads assume: 4 bytes
 * for F32, 2 for everything else); MN_EUNSUPPORTED naming `what` otherwise. */
static mn_err gemv_check(const mn_matmul_desc *d, const char *what, mn_errbuf *eb) {
    const int64_t be = mn_dtype_block_elems(d->w_type), al = d->w_type == MN_F32 ? 4 : 2;
    if (!mn_dtype_is_weight_type(d->w_type) || d->K <= 0 || d->K % be != 0 || d->T > MN_CUDA_GEMV_MAX_T ||
        d->w_row_bytes % al != 0 || (uintptr_t)d->w % (uintptr_t)al != 0)
        return mn_errf(eb, MN_EUNSUPPORTED, "%s: weight type %s, T=%lld, K=%lld, row %lld bytes", what,
                       mn_dtype_name(d->w_type), (long long)d->T, (long long)d->K, (long long)d->w_row_bytes);
    return MN_OK;
}

/* Whether work holds d's activation blocks (size, 4-byte reads of xq). */
static mn_err gemv_check_work(const mn_matmul_desc *d, const void *work, size_t work_bytes, const char *what,
                              mn_errbuf *eb) {
    const size_t need = mn_cuda_matmul_gemv_work_bytes(d);
    if (work_bytes < need || (need && (!work || (uintptr_t)work % 4 != 0)))
        return mn_errf(eb, MN_EINVALID, "%s: %zu scratch bytes given, %zu needed", what, work_bytes, need);
    return MN_OK;
}

/* x of d to its activation blocks at work (nothing for float weights); checked by the caller. */
static mn_err gemv_quantize(const mn_matmul_desc *d, void *work, cudaStream_t s, mn_errbuf *eb) {
    const int64_t be = mn_dtype_block_elems(d->w_type);
    if (be <= 1 || d->T <= 0) return MN_OK;
    const int64_t ng = d->K / be;
    const unsigned grid = (unsigned)((d->T * ng + GEMV_WARPS - 1) / GEMV_WARPS);
    if (be == MN_QK) gemv_quant_x<MN_QK><<<grid, GEMV_WARPS * 32, 0, s>>>(d->x, d->x_stride, d->T, ng, work);
    else gemv_quant_x<MN_QK_K><<<grid, GEMV_WARPS * 32, 0, s>>>(d->x, d->x_stride, d->T, ng, work);
    MN_CUDA_CHECK_LAUNCH(eb, "gemv_quant_x");
    return MN_OK;
}

/* Several matmuls that share x (q, k, v; gate, up) in one launch: CTA c belongs to the desc
 * whose block range holds it. A row runs exactly as in gemv_kernel (the same bits); one
 * launch instead of several fills the GPU with the small ones (k and v: 1024 rows, 128 CTAs)
 * and saves their launch gaps. */
enum { GEMV_MULTI_MAX = 3 };
typedef struct gemv_multi {
    mn_matmul_desc d[GEMV_MULTI_MAX];
    int64_t first[GEMV_MULTI_MAX + 1]; /* CTA ranges: desc k owns [first[k], first[k + 1]) */
    int n;
} gemv_multi;

template <int NT>
__global__ static void __launch_bounds__(GEMV_WARPS * 32) gemv_multi_kernel(gemv_multi m, const void *xq) {
    int k = 0;
    while (k + 1 < m.n && (int64_t)blockIdx.x >= m.first[k + 1]) k++;
    int64_t n = ((int64_t)blockIdx.x - m.first[k]) * GEMV_WARPS + threadIdx.x / 32;
    if (n >= m.d[k].N) return; /* whole warps */
    mn__gemv_row<NT>(m.d[k], n, xq, mn__gemv_dev_warp());
}

static mn_err gemv_run(const mn_matmul_desc *d, void *work, size_t work_bytes, bool quantize, cudaStream_t s,
                       mn_errbuf *eb) {
    mn_err e = gemv_check(d, "cuda gemv", eb);
    if (e != MN_OK) return e;
    if (d->T <= 0 || d->N <= 0) return MN_OK;
    if ((e = gemv_check_work(d, work, work_bytes, "cuda gemv", eb)) != MN_OK) return e;
    if (quantize && (e = gemv_quantize(d, work, s, eb)) != MN_OK) return e;
    int64_t blocks = (d->N + GEMV_WARPS - 1) / GEMV_WARPS;
    if (blocks > 0x7fffffffLL) return mn_errf(eb, MN_EUNSUPPORTED, "cuda gemv: N=%lld", (long long)d->N);
    unsigned grid = (unsigned)blocks;
    switch (mn_gemv_nt(d->T)) {
    case 1: gemv_kernel<1><<<grid, GEMV_WARPS * 32, 0, s>>>(*d, work); break;
    case 2: gemv_kernel<2><<<grid, GEMV_WARPS * 32, 0, s>>>(*d, work); break;
    case 4: gemv_kernel<4><<<grid, GEMV_WARPS * 32, 0, s>>>(*d, work); break;
    default: gemv_kernel<8><<<grid, GEMV_WARPS * 32, 0, s>>>(*d, work); break;
    }
    MN_CUDA_CHECK_LAUNCH(eb, "gemv_kernel");
    return MN_OK;
}

mn_err mn_cuda_quantize_x(const mn_matmul_desc *d, void *work, size_t work_bytes, cudaStream_t s, mn_errbuf *eb) {
    const int64_t be = mn_dtype_block_elems(d->w_type);
    if (be <= 1 || d->T <= 0 || d->K <= 0) return MN_OK;
    if (d->K % be != 0)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda quantize x: K=%lld is not a multiple of %lld", (long long)d->K, (long long)be);
    mn_err e = gemv_check_work(d, work, work_bytes, "cuda quantize x", eb);
    return e != MN_OK ? e : gemv_quantize(d, work, s, eb);
}

mn_err mn_cuda_matmul_gemv(const mn_matmul_desc *d, void *work, size_t work_bytes, cudaStream_t s, mn_errbuf *eb) {
    return gemv_run(d, work, work_bytes, true, s, eb);
}

mn_err mn_cuda_matmul_gemv_reuse_x(const mn_matmul_desc *d, void *work, size_t work_bytes, cudaStream_t s,
                                   mn_errbuf *eb) {
    return gemv_run(d, work, work_bytes, false, s, eb);
}

mn_err mn_cuda_matmul_gemv_multi(const mn_matmul_desc *d, int n, void *work, size_t work_bytes, bool quantize,
                                 cudaStream_t s, mn_errbuf *eb) {
    if (n < 1 || n > GEMV_MULTI_MAX) return mn_errf(eb, MN_EINVALID, "cuda gemv multi: %d matmuls (1..%d)", n, GEMV_MULTI_MAX);
    gemv_multi m = {};
    m.n = n;
    const int64_t be0 = mn_dtype_block_elems(d[0].w_type);
    for (int k = 0; k < n; k++) {
        const mn_matmul_desc *a = &d[k];
        if (a->x != d[0].x || a->x_stride != d[0].x_stride || a->T != d[0].T || a->K != d[0].K ||
            mn_dtype_block_elems(a->w_type) != be0)
            return mn_errf(eb, MN_EINVALID, "cuda gemv multi: matmul %d does not share matmul 0's x (T, K, block)", k);
        char what[40];
        snprintf(what, sizeof what, "cuda gemv multi: matmul %d", k);
        mn_err e = gemv_check(a, what, eb);
        if (e != MN_OK) return e;
        m.d[k] = *a;
        m.first[k + 1] = m.first[k] + (a->N > 0 ? (a->N + GEMV_WARPS - 1) / GEMV_WARPS : 0);
    }
    if (d[0].T <= 0 || m.first[n] == 0) return MN_OK;
    if (m.first[n] > 0x7fffffffLL) return mn_errf(eb, MN_EUNSUPPORTED, "cuda gemv multi: %lld CTAs", (long long)m.first[n]);
    mn_err e = gemv_check_work(&d[0], work, work_bytes, "cuda gemv multi", eb);
    if (e != MN_OK) return e;
    if (quantize && (e = gemv_quantize(&d[0], work, s, eb)) != MN_OK) return e;
    unsigned grid = (unsigned)m.first[n];
    switch (mn_gemv_nt(d[0].T)) {
    case 1: gemv_multi_kernel<1><<<grid, GEMV_WARPS * 32, 0, s>>>(m, work); break;
    case 2: gemv_multi_kernel<2><<<grid, GEMV_WARPS * 32, 0, s>>>(m, work); break;
    case 4: gemv_multi_kernel<4><<<grid, GEMV_WARPS * 32, 0, s>>>(m, work); break;
    default: gemv_multi_kernel<8><<<grid, GEMV_WARPS * 32, 0, s>>>(m, work); break;
    }
    MN_CUDA_CHECK_LAUNCH(eb, "gemv_multi_kernel");
    return MN_OK;
}
