/* kernels/cuda/attention.cu — causal attention over the paged KV cache (mn_kv_view).
 *
 * Version 1, a straight port of the reference with an online softmax:
 *   one thread block per (token t, head h), ATT_WARPS warps;
 *   warp w walks positions p = w, w + ATT_WARPS, ... <= pos[t]; for each p the lanes
 *   split the head dims, the dot q·K is a warp butterfly sum (same bits in every lane),
 *   and the warp keeps a running max m, a running sum l of exp(s - m) and per-lane
 *   accumulators of exp(s - m) * V (dims lane, lane+32, ...);
 *   the warps' partials are merged in shared memory: M = max m_w,
 *   out = sum_w acc_w * exp(m_w - M) / sum_w l_w * exp(m_w - M).
 * The walk order per (t, h) is fixed, so an output never depends on the other tokens of
 * the batch. K and V rows are read through mn_kv_offset, the host/device block-table rule
 * the reference uses.
 */
#include "kernels/cuda/cuda_common.cuh"

enum { ATT_WARPS = 4, ATT_PER_LANE = MN_CUDA_MAX_HEAD_DIM / 32 };

__global__ static void attention_kernel(mn_attention_desc d) {
    __shared__ float q_s[MN_CUDA_MAX_HEAD_DIM];
    __shared__ float acc_s[ATT_WARPS][MN_CUDA_MAX_HEAD_DIM];
    __shared__ float m_s[ATT_WARPS], l_s[ATT_WARPS];
    int64_t t = blockIdx.x / d.n_head;
    int32_t h = (int32_t)(blockIdx.x % d.n_head);
    int32_t hd = d.head_dim, g = h / (d.n_head / d.n_kv_head);
    int32_t seq = d.seq[t], last = d.pos[t];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    const float *q = d.q + t * d.q_stride + (int64_t)h * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) q_s[i] = q[i];
    __syncthreads();

    float m = -INFINITY, l = 0.0f, acc[ATT_PER_LANE];
    for (int j = 0; j < ATT_PER_LANE; j++) acc[j] = 0.0f;
    for (int32_t p = warp; p <= last; p += ATT_WARPS) {
        int64_t off = mn_kv_offset(&d.kv, seq, p, g);
        const uint16_t *k = d.kv.k + off, *v = d.kv.v + off;
        float dot = 0.0f;
        for (int i = lane; i < hd; i += 32) dot += q_s[i] * mn_fp16_to_fp32(k[i]);
        float sc = mn__warp_sum(dot) * d.scale;
        float m_new = fmaxf(m, sc);
        float corr = expf(m - m_new), e = expf(sc - m_new);
        l = l * corr + e;
        for (int j = 0; j < ATT_PER_LANE; j++) {
            int i = lane + 32 * j;
            if (i < hd) acc[j] = acc[j] * corr + e * mn_fp16_to_fp32(v[i]);
        }
        m = m_new;
    }
    for (int j = 0; j < ATT_PER_LANE; j++) {
        int i = lane + 32 * j;
        if (i < hd) acc_s[warp][i] = acc[j];
    }
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
    __syncthreads();

    /* merge: a warp that saw no position has m = -inf and contributes exp(-inf) = 0 */
    float mx = m_s[0];
    for (int w = 1; w < ATT_WARPS; w++) mx = fmaxf(mx, m_s[w]);
    float f[ATT_WARPS], sum = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = expf(m_s[w] - mx);
        sum += l_s[w] * f[w];
    }
    float *out = d.out + t * d.out_stride + (int64_t)h * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) o += acc_s[w][i] * f[w];
        out[i] = o / sum;
    }
}

mn_err mn_cuda_attention(const mn_attention_desc *d, cudaStream_t s, mn_errbuf *eb) {
    if (d->head_dim <= 0 || d->head_dim > MN_CUDA_MAX_HEAD_DIM || d->n_kv_head <= 0 || d->n_head % d->n_kv_head != 0)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda attention: head_dim %d (max %d), n_head %d, n_kv_head %d",
                       d->head_dim, MN_CUDA_MAX_HEAD_DIM, d->n_head, d->n_kv_head);
    if (d->T <= 0 || d->n_head <= 0) return MN_OK;
    int64_t blocks = d->T * d->n_head;
    if (blocks > 0x7fffffffLL) return mn_errf(eb, MN_EUNSUPPORTED, "cuda attention: T*n_head = %lld too large", (long long)blocks);
    attention_kernel<<<(unsigned)blocks, ATT_WARPS * 32, 0, s>>>(*d);
    MN_CUDA_CHECK_LAUNCH(eb, "attention_kernel");
    return MN_OK;
}
