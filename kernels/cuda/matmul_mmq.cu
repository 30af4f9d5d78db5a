/* kernels/cuda/matmul_mmq.cu — quantized matmul on int8 tensor cores for batches of 9 to
 * MN_CUDA_MMQ_MAX_T tokens (decode of 16-64 sequences, short appends): W stays in its
 * quantized form (Q4_0, Q4_1, Q8_0), x is quantized to q8_1 blocks exactly as for the GEMV
 * (the reference's blocks), and each (W row, token, block) integer dot is exact, as in the
 * reference; only the f32 sum over blocks differs in order. So it meets the ops.h
 * tolerance 1e-4 * (sum|x w| + |b|), not only the bf16 allowance of the cuBLAS path, and it
 * reads the quantized W (4.5 bits a weight for Q4_0) instead of a bf16 copy (16 bits).
 *
 * WRITTEN WITHOUT A GPU (2026-11-30), off unless enabled (mn_cuda_matmul_mmq_enable /
 * $MNEME_CUDA_MMQ=1): tests/gpu/test_cuda_gemv.c ("mmq" lines) checks it against the
 * reference, its batch invariance, and times it; the next GPU run decides whether it
 * becomes the default for these batch sizes.
 *
 * One mma.sync.m16n8k32 (s8 x s8 -> s32) is one 32-element block for 16 W rows x 8 tokens;
 * each lane's fragments and the block value come from kernels/cuda/matmul_mmq.h (the
 * layouts are written there), which tests/unit/test_mmq_frag.c runs on the host with the
 * mma emulated: every lane's products equal the reference's block dots, bit for bit.
 * Per element the block's value is the reference's: (d_w * d_x) * (float)sumi, plus
 * m_w * s_x for Q4_1 (s_x = d_x * sum of the block's x quants), added to an f32.
 *
 * Work split: a CTA owns MMQ_ROWS = 16 rows of W and every token; its MMQ_KSPLIT = 8 warps
 * take contiguous eighths of the K blocks (so N = 4096 still gives 2048 warps), each
 * summing its blocks in ascending order, all its tokens' 8-token tiles per block. The
 * eight partial sums are then added in warp order through shared memory, and the bias /
 * accumulate store is the reference's. Every element's operations depend only on its row,
 * its token and K: the same bits whatever T or the other tokens (batch invariance within
 * this kernel; its bits differ from the GEMV's, which sums the blocks in another order).
 */
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/matmul_mmq.h"

enum {
    MMQ_ROWS = 16,                      /* W rows a CTA owns (the mma's M) */
    MMQ_KSPLIT = 8,                     /* warps of a CTA, each an eighth of K */
    MMQ_UNROLL = 2,                     /* blocks whose W fragments are loaded at once */
};

static int mmq_enabled = -1;
void mn_cuda_matmul_mmq_enable(int on) { mmq_enabled = on ? 1 : 0; }
bool mn_cuda_matmul_mmq_on(void) {
    if (mmq_enabled < 0) {
        const char *e = getenv("MNEME_CUDA_MMQ");
        mmq_enabled = e && strcmp(e, "1") == 0;
    }
    return mmq_enabled == 1;
}

bool mn_cuda_matmul_mmq_supports(const mn_matmul_desc *d) {
    return (d->w_type == MN_Q4_0 || d->w_type == MN_Q4_1 || d->w_type == MN_Q8_0) && d->T >= 1 &&
           d->T <= MN_CUDA_MMQ_MAX_T && d->K > 0 && d->K % MN_QK == 0 && d->N > 0 && d->w_row_bytes % 2 == 0 &&
           (uintptr_t)d->w % 2 == 0;
}

size_t mn_cuda_matmul_mmq_work_bytes(const mn_matmul_desc *d) { return mn_cuda_matmul_gemv_work_bytes(d); }

__device__ static inline void mmq_mma(int c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%10,%10,%10};\n"
                 : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
#else
    c[0] = c[1] = c[2] = c[3] = 0; /* never launched below sm_80 (mn_cuda_matmul_mmq checks) */
#endif
}

/* NT: 8-token tiles the kernel is compiled for (2, 4 or 8: T <= 16, 32, 64), so a 16-token
 * batch does not hold 64 tokens' sums in registers */
template <mn_dtype TY, int NT>
__global__ static void __launch_bounds__(MMQ_KSPLIT * 32, 2) mmq_kernel(mn_matmul_desc d, const mn_block_q8_1 *xq) {
    __shared__ float part[MMQ_KSPLIT][MMQ_ROWS][MN_CUDA_MMQ_MAX_T];
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane / 4, t = lane % 4;
    const int T = (int)d.T, nt = (T + 7) / 8;
    const int64_t nb = d.K / MN_QK, n0 = (int64_t)blockIdx.x * MMQ_ROWS;
    /* rows past N read row N - 1 (their results are dropped) */
    const int64_t r0 = min(n0 + g, d.N - 1), r8 = min(n0 + g + 8, d.N - 1);
    const char *row0 = (const char *)d.w + r0 * d.w_row_bytes, *row8 = (const char *)d.w + r8 * d.w_row_bytes;
    /* this warp's blocks: a contiguous eighth of K */
    const int64_t per = (nb + MMQ_KSPLIT - 1) / MMQ_KSPLIT, b_lo = min((int64_t)warp * per, nb),
                  b_hi = min(b_lo + per, nb);
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    for (int64_t b0 = b_lo; b0 < b_hi; b0 += MMQ_UNROLL) {
        uint32_t wa[MMQ_UNROLL][4];
        float wd[MMQ_UNROLL][4];
#pragma unroll
        for (int u = 0; u < MMQ_UNROLL; u++)
            if (b0 + u < b_hi) mn_mmq_wfrag(TY, row0, row8, b0 + u, t, wa[u], wd[u]);
#pragma unroll
        for (int u = 0; u < MMQ_UNROLL; u++) {
            const int64_t b = b0 + u;
            if (b >= b_hi) break;
#pragma unroll
            for (int j = 0; j < NT; j++) {
                if (j >= nt) break;
                /* B fragment: token 8j + g (a token past T loads token T - 1: its column is dropped) */
                const int tb = min(8 * j + g, T - 1);
                uint32_t xb0, xb1;
                mn_mmq_xfrag(xq + (int64_t)tb * nb + b, t, &xb0, &xb1);
                int c[4];
                mmq_mma(c, wa[u], xb0, xb1);
                /* this lane's elements: tokens 8j + 2t and 8j + 2t + 1 */
                const int ta = min(8 * j + 2 * t, T - 1), tc = min(8 * j + 2 * t + 1, T - 1);
                const mn_block_q8_1 *xa = xq + (int64_t)ta * nb + b, *xc = xq + (int64_t)tc * nb + b;
                acc[j][0] = acc[j][0] + mn_mmq_value(TY, c[0], wd[u][0], wd[u][2], xa);
                acc[j][1] = acc[j][1] + mn_mmq_value(TY, c[1], wd[u][0], wd[u][2], xc);
                acc[j][2] = acc[j][2] + mn_mmq_value(TY, c[2], wd[u][1], wd[u][3], xa);
                acc[j][3] = acc[j][3] + mn_mmq_value(TY, c[3], wd[u][1], wd[u][3], xc);
            }
        }
    }
    /* the warp's partial sums to shared memory: row (g, g + 8), token 8j + 2t (+1) */
#pragma unroll
    for (int j = 0; j < NT; j++) {
        if (j >= nt) break;
        const int ta = 8 * j + 2 * t;
        part[warp][g][ta] = acc[j][0];
        part[warp][g][ta + 1] = acc[j][1];
        part[warp][g + 8][ta] = acc[j][2];
        part[warp][g + 8][ta + 1] = acc[j][3];
    }
    __syncthreads();
    /* sum the eighths in warp order, then the reference's bias / accumulate store */
    for (int e = threadIdx.x; e < MMQ_ROWS * T; e += MMQ_KSPLIT * 32) {
        const int row = e % MMQ_ROWS, tok = e / MMQ_ROWS;
        const int64_t n = n0 + row;
        if (n >= d.N) continue;
        float v = part[0][row][tok];
        for (int k = 1; k < MMQ_KSPLIT; k++) v = v + part[k][row][tok];
        if (d.bias) v = v + d.bias[n];
        float *y = d.y + (int64_t)tok * d.y_stride + n;
        *y = d.accumulate ? *y + v : v;
    }
}

mn_err mn_cuda_matmul_mmq(const mn_matmul_desc *d, void *work, size_t work_bytes, cudaStream_t s, mn_errbuf *eb) {
    if (!mn_cuda_matmul_mmq_supports(d))
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda mmq: weight type %s, T=%lld (1..%d), K=%lld, N=%lld",
                       mn_dtype_name(d->w_type), (long long)d->T, MN_CUDA_MMQ_MAX_T, (long long)d->K, (long long)d->N);
    int dev = 0, major = 0;
    MN_CUDA_CHECK(eb, cudaGetDevice(&dev));
    MN_CUDA_CHECK(eb, cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (major < 8) return mn_errf(eb, MN_EUNSUPPORTED, "cuda mmq: int8 mma needs sm_80 or newer (device: sm_%d)", major * 10);
    mn_err e = mn_cuda_quantize_x(d, work, work_bytes, s, eb);
    if (e != MN_OK) return e;
    const int64_t ctas = (d->N + MMQ_ROWS - 1) / MMQ_ROWS;
    if (ctas > 0x7fffffffLL) return mn_errf(eb, MN_EUNSUPPORTED, "cuda mmq: N=%lld", (long long)d->N);
    const mn_block_q8_1 *xq = (const mn_block_q8_1 *)work;
    const unsigned grid = (unsigned)ctas, thr = MMQ_KSPLIT * 32;
    const int nt = (int)((d->T + 7) / 8);
#define MMQ_LAUNCH(TY)                                                                      \
    (nt <= 2 ? mmq_kernel<TY, 2><<<grid, thr, 0, s>>>(*d, xq)                               \
             : nt <= 4 ? mmq_kernel<TY, 4><<<grid, thr, 0, s>>>(*d, xq) : mmq_kernel<TY, 8><<<grid, thr, 0, s>>>(*d, xq))
    switch (d->w_type) {
    case MN_Q4_0: MMQ_LAUNCH(MN_Q4_0); break;
    case MN_Q4_1: MMQ_LAUNCH(MN_Q4_1); break;
    default: MMQ_LAUNCH(MN_Q8_0); break;
    }
#undef MMQ_LAUNCH
    MN_CUDA_CHECK_LAUNCH(eb, "mmq_kernel");
    return MN_OK;
}
