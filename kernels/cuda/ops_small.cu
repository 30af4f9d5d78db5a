/* kernels/cuda/ops_small.cu — the memory-bound ops: get_rows, rmsnorm, rope, kv_store,
 * silu_mul, add. Each is a grid-stride loop (or one block per row for rmsnorm) written as
 * a straight port of the reference loop in kernels/ref/ref_ops.c, with the shared
 * host/device helpers (fp16, rope pair, KV addressing, block dequant), so get_rows,
 * kv_store and add are bit-exact; rmsnorm sums squares in double like the reference;
 * rope and silu_mul differ only by the device cosf/sinf/expf (<= 2 ulp).
 */
#include "kernels/cuda/cuda_common.cuh"

/* ---- get_rows: one thread per (token, weight block) -------------------------------- */
__global__ static void get_rows_kernel(mn_get_rows_desc d, int64_t be, int64_t nb) {
    float tmp[MN_QK_K];
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < d.T * nb; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / nb, b = i % nb;
        const char *row = (const char *)d.table + (int64_t)d.ids[t] * d.row_bytes;
        mn__dequant_block(d.type, row, b, tmp);
        float *y = d.y + t * d.y_stride + b * be;
        for (int64_t j = 0; j < be; j++) y[j] = tmp[j];
    }
}

mn_err mn_cuda_get_rows(const mn_get_rows_desc *d, cudaStream_t s, mn_errbuf *eb) {
    int64_t be = mn_dtype_block_elems(d->type);
    if (!mn_dtype_is_weight_type(d->type) || d->D % be != 0)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda get_rows: type %s with D=%lld", mn_dtype_name(d->type), (long long)d->D);
    if (d->T <= 0 || d->D <= 0) return MN_OK;
    int64_t nb = d->D / be;
    get_rows_kernel<<<mn__cuda_blocks(d->T * nb), MN__CUDA_THREADS, 0, s>>>(*d, be, nb);
    MN_CUDA_CHECK_LAUNCH(eb, "get_rows_kernel");
    return MN_OK;
}

/* ---- rmsnorm: one block per row; the sum of squares in double, then a fixed-shape tree,
 * so a row's result does not depend on the other rows. ---- */
__global__ static void rmsnorm_kernel(mn_rmsnorm_desc d) {
    __shared__ double part[MN__CUDA_THREADS / 32];
    for (int64_t t = blockIdx.x; t < d.T; t += gridDim.x) {
        const float *x = d.x + t * d.x_stride;
        float *y = d.y + t * d.y_stride;
        double ss = 0.0;
        for (int64_t i = threadIdx.x; i < d.D; i += blockDim.x) ss += (double)x[i] * (double)x[i];
        ss = mn__warp_sum_d(ss);
        if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
        __syncthreads();
        double tot = 0.0;
        for (int w = 0; w < MN__CUDA_THREADS / 32; w++) tot += part[w];
        float scale = (float)(1.0 / sqrt(tot / (double)d.D + (double)d.eps));
        __syncthreads(); /* part[] is reused by the next row; y may alias x */
        for (int64_t i = threadIdx.x; i < d.D; i += blockDim.x) y[i] = x[i] * scale * d.w[i];
    }
}

mn_err mn_cuda_rmsnorm(const mn_rmsnorm_desc *d, cudaStream_t s, mn_errbuf *eb) {
    if (d->T <= 0 || d->D <= 0) return MN_OK;
    unsigned blocks = d->T < 65535 ? (unsigned)d->T : 65535u;
    rmsnorm_kernel<<<blocks, MN__CUDA_THREADS, 0, s>>>(*d);
    MN_CUDA_CHECK_LAUNCH(eb, "rmsnorm_kernel");
    return MN_OK;
}

/* ---- rope: one thread per (token, head, pair) --------------------------------------- */
__global__ static void rope_kernel(mn_rope_desc d, int32_t half) {
    int64_t n = d.T * d.n_head * half;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        int32_t p = (int32_t)(i % half);
        int64_t th = i / half;
        int32_t h = (int32_t)(th % d.n_head);
        int64_t t = th / d.n_head;
        float *x = d.x + t * d.x_stride + (int64_t)h * d.head_dim;
        float theta = (float)d.pos[t] * d.inv_freq[p];
        float c = cosf(theta) * d.attn_factor, sn = sinf(theta) * d.attn_factor;
        if (d.mode == MN_ROPE_NEOX)
            mn_rope_rotate(&x[p], &x[p + half], c, sn);
        else
            mn_rope_rotate(&x[2 * p], &x[2 * p + 1], c, sn);
    }
}

mn_err mn_cuda_rope(const mn_rope_desc *d, cudaStream_t s, mn_errbuf *eb) {
    if (d->n_rot > d->head_dim || d->n_rot % 2 != 0)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda rope: n_rot %d with head_dim %d", d->n_rot, d->head_dim);
    int32_t half = d->n_rot / 2;
    if (d->T <= 0 || d->n_head <= 0 || half <= 0) return MN_OK;
    rope_kernel<<<mn__cuda_blocks(d->T * d->n_head * half), MN__CUDA_THREADS, 0, s>>>(*d, half);
    MN_CUDA_CHECK_LAUNCH(eb, "rope_kernel");
    return MN_OK;
}

/* ---- kv_store: one thread per (token, element of the K/V row) ----------------------- */
__global__ static void kv_store_kernel(mn_kv_store_desc d) {
    int64_t row = (int64_t)d.kv.n_kv_head * d.kv.head_dim;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < d.T * row; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / row, e = i % row;
        int32_t h = (int32_t)(e / d.kv.head_dim), j = (int32_t)(e % d.kv.head_dim);
        int64_t off = mn_kv_offset(&d.kv, d.seq[t], d.pos[t], h) + j;
        d.kv.k[off] = mn_fp32_to_fp16(d.k[t * d.k_stride + e]);
        d.kv.v[off] = mn_fp32_to_fp16(d.v[t * d.v_stride + e]);
    }
}

mn_err mn_cuda_kv_store(const mn_kv_store_desc *d, cudaStream_t s, mn_errbuf *eb) {
    int64_t row = (int64_t)d->kv.n_kv_head * d->kv.head_dim;
    if (d->T <= 0 || row <= 0) return MN_OK;
    kv_store_kernel<<<mn__cuda_blocks(d->T * row), MN__CUDA_THREADS, 0, s>>>(*d);
    MN_CUDA_CHECK_LAUNCH(eb, "kv_store_kernel");
    return MN_OK;
}

/* ---- silu_mul and add: one thread per element ---------------------------------------- */
__global__ static void silu_mul_kernel(mn_silu_mul_desc d) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < d.T * d.F; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / d.F, j = i % d.F;
        float g = d.gate[t * d.gate_stride + j];
        d.y[t * d.y_stride + j] = g / (1.0f + expf(-g)) * d.up[t * d.up_stride + j];
    }
}

mn_err mn_cuda_silu_mul(const mn_silu_mul_desc *d, cudaStream_t s, mn_errbuf *eb) {
    if (d->T <= 0 || d->F <= 0) return MN_OK;
    silu_mul_kernel<<<mn__cuda_blocks(d->T * d->F), MN__CUDA_THREADS, 0, s>>>(*d);
    MN_CUDA_CHECK_LAUNCH(eb, "silu_mul_kernel");
    return MN_OK;
}

__global__ static void add_kernel(mn_add_desc d) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < d.T * d.D; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / d.D, j = i % d.D;
        d.y[t * d.y_stride + j] += d.x[t * d.x_stride + j];
    }
}

mn_err mn_cuda_add(const mn_add_desc *d, cudaStream_t s, mn_errbuf *eb) {
    if (d->T <= 0 || d->D <= 0) return MN_OK;
    add_kernel<<<mn__cuda_blocks(d->T * d->D), MN__CUDA_THREADS, 0, s>>>(*d);
    MN_CUDA_CHECK_LAUNCH(eb, "add_kernel");
    return MN_OK;
}
