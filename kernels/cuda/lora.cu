/* kernels/cuda/lora.cu — the batched LoRA apply (MN_OP_LORA, contract in kernels/ops.h)
 * on the GPU: shrink v = x A^T (f32 v) and expand y_o += scale_o v B_o^T per segment of
 * rows grouped by adapter, fused in one kernel so v never leaves shared memory.
 *
 * Launch: grid.x = one block column per segment (its rank, type and pointers are read by
 * the block from the device seg array, so mixed ranks need no padding and rows in no
 * segment cost nothing), grid.y = tiles of rows inside the segment, grid.z = slices of
 * the expand's output columns (each slice recomputes the shrink: cheap next to B, and it
 * keeps enough blocks in flight when a decode batch has few segments). Two variants:
 *   - gathered (decode: every segment one row, each its own adapter): ROWS = 1;
 *   - segmented (prefill runs): ROWS = MN__LORA_TILE rows per block share every A and B
 *     element they load, so a segment of n rows reads its weights n / ROWS times.
 * Inside a block each warp shrinks rows j of A (lanes stride K, a butterfly sum); then
 * each thread expands columns n, reading one row of B^T at a time (coalesced).
 * Split phases (tensor parallelism, ops.h): SHRINK stores v from shared memory to d.v
 * and stops; EXPAND loads v from d.v instead of computing it. a_ld / b_ld are the row
 * strides of sharded views of A and B^T.
 * Sums are f32 (the reference's are double): within the ops.h tolerance for the K and r
 * the models have (see tests/gpu/test_cuda_ops.c).
 *
 * Gathered decode with scratch (mn_cuda_lora_work_bytes): the fused kernel's column slices
 * each recomputed the shrink, so 32 adapters read every A ~16 times, one 2-byte load per
 * lane at a time (first H200 run: 1093 us for one layer's LoRA ops against 305 us of base
 * matmuls). Instead lora_shrink_gathered computes v once, one warp per (segment, rank
 * row), 16-byte loads, into the scratch, and the expand phase of lora_kernel<1> reads it.
 * Both the gathered shrink and lora_kernel<1>'s own shrink go through lora_dot_warp, so
 * the fused, the two-kernel and the split-phase paths give the same bits.
 */
#include "kernels/cuda/cuda_common.cuh"

enum { MN__LORA_TILE = 8 };

__device__ static inline float lora_elem(const void *p, mn_dtype t, int64_t i) {
    if (t == MN_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return t == MN_F16 ? mn_fp16_to_fp32(h) : mn_bf16_to_fp32(h);
}

/* One warp's dot of x[0..K) with row a of type t: lanes take 8 consecutive elements at a
 * time (16-byte loads) when both rows are 16-byte aligned, then the tail one by one; a
 * butterfly sum. Every lane returns the sum. */
__device__ static inline float lora_dot_warp(const float *x, const void *a, mn_dtype t, int64_t K, int lane) {
    float acc = 0.0f;
    int64_t k0 = 0;
    if ((((uintptr_t)x | (uintptr_t)a) & 15) == 0) {
        const int64_t n8 = K / 8;
        k0 = n8 * 8;
#pragma unroll 2
        for (int64_t c = lane; c < n8; c += 32) {
            const float4 x0 = ((const float4 *)x)[2 * c], x1 = ((const float4 *)x)[2 * c + 1];
            float w[8];
            if (t == MN_F32) {
                const float4 a0 = ((const float4 *)a)[2 * c], a1 = ((const float4 *)a)[2 * c + 1];
                w[0] = a0.x, w[1] = a0.y, w[2] = a0.z, w[3] = a0.w, w[4] = a1.x, w[5] = a1.y, w[6] = a1.z, w[7] = a1.w;
            } else {
                const uint4 h = ((const uint4 *)a)[c];
                const uint32_t u[4] = {h.x, h.y, h.z, h.w};
                for (int i = 0; i < 4; i++) {
                    uint16_t lo = (uint16_t)(u[i] & 0xffff), hi = (uint16_t)(u[i] >> 16);
                    w[2 * i] = t == MN_F16 ? mn_fp16_to_fp32(lo) : mn_bf16_to_fp32(lo);
                    w[2 * i + 1] = t == MN_F16 ? mn_fp16_to_fp32(hi) : mn_bf16_to_fp32(hi);
                }
            }
            acc += x0.x * w[0] + x0.y * w[1] + x0.z * w[2] + x0.w * w[3] + x1.x * w[4] + x1.y * w[5] + x1.z * w[6] +
                   x1.w * w[7];
        }
    }
    for (int64_t k = k0 + lane; k < K; k += 32) acc += x[k] * lora_elem(a, t, k);
    return mn__warp_sum(acc);
}

/* The gathered shrink alone: v[seg row i][j] = x_t . A_j for every row of every segment,
 * one warp per rank row j (blockIdx.y * warps + warp), segments on blockIdx.x; v laid out
 * as the split phases' (mn_lora_v_floats). */
__global__ static void lora_shrink_gathered(mn_lora_desc d) {
    const mn_lora_seg g = d.seg[blockIdx.x];
    const int warp = (int)(threadIdx.x >> 5), lane = (int)(threadIdx.x & 31);
    const int32_t j = (int32_t)blockIdx.y * (int32_t)(blockDim.x >> 5) + warp;
    if (j >= g.r) return;
    const int64_t lda = d.a_ld ? d.a_ld : d.K;
    const size_t es = g.type == MN_F32 ? 4 : 2;
    const void *arow = (const char *)g.a + (size_t)j * (size_t)lda * es;
    float *vg = d.v + mn_lora_v_floats(d.seg, (int32_t)blockIdx.x);
    for (int32_t i = 0; i < g.n_rows; i++) {
        const float *x = d.x + (int64_t)d.rows[g.start + i] * d.x_stride;
        float sum = lora_dot_warp(x, arow, g.type, d.K, lane);
        if (lane == 0) vg[(int64_t)i * g.r + j] = sum;
    }
}

template <int ROWS>
__global__ static void lora_kernel(mn_lora_desc d) {
    __shared__ float v[ROWS][MN_CUDA_LORA_MAX_R];
    const mn_lora_seg g = d.seg[blockIdx.x];
    if (g.r > MN_CUDA_LORA_MAX_R) __trap(); /* the launcher checked the plan's max_r; a bad seg array is a bug */
    const int warp = (int)(threadIdx.x >> 5), lane = (int)(threadIdx.x & 31), n_warp = (int)(blockDim.x >> 5);
    const int64_t lda = d.a_ld ? d.a_ld : d.K;
    /* split phases: this segment's v in d.v (segments in order, [n_rows, r] each) */
    float *vg = d.phase != MN_LORA_FUSED ? d.v + mn_lora_v_floats(d.seg, (int32_t)blockIdx.x) : NULL;
    for (int32_t base = (int32_t)blockIdx.y * ROWS; base < g.n_rows; base += (int32_t)gridDim.y * ROWS) {
        const int nr = g.n_rows - base < ROWS ? g.n_rows - base : ROWS;
        int64_t t[ROWS];
        for (int i = 0; i < ROWS; i++) t[i] = i < nr ? d.rows[g.start + base + i] : 0;
        if (d.phase == MN_LORA_EXPAND) {
            /* v from the shrink phase (summed over ranks): this tile's rows */
            for (int i = 0; i < nr; i++)
                for (int32_t j = (int32_t)threadIdx.x; j < g.r; j += (int32_t)blockDim.x) v[i][j] = vg[(int64_t)(base + i) * g.r + j];
        }
        for (int32_t j = warp; ROWS == 1 && d.phase != MN_LORA_EXPAND && j < g.r; j += n_warp) {
            const size_t es = g.type == MN_F32 ? 4 : 2;
            const float s = lora_dot_warp(d.x + t[0] * d.x_stride, (const char *)g.a + (size_t)j * (size_t)lda * es,
                                          g.type, d.K, lane);
            if (lane == 0) v[0][j] = s;
            if (lane == 0 && d.phase == MN_LORA_SHRINK && blockIdx.z == 0) vg[(int64_t)base * g.r + j] = s;
        }
        for (int32_t j = warp; ROWS > 1 && d.phase != MN_LORA_EXPAND && j < g.r; j += n_warp) {
            float acc[ROWS];
            for (int i = 0; i < ROWS; i++) acc[i] = 0.0f;
            for (int64_t k = lane; k < d.K; k += 32) {
                float a = lora_elem(g.a, g.type, (int64_t)j * lda + k);
                for (int i = 0; i < ROWS; i++)
                    if (i < nr) acc[i] += d.x[t[i] * d.x_stride + k] * a;
            }
            for (int i = 0; i < ROWS; i++) {
                float s = mn__warp_sum(acc[i]);
                if (lane == 0) v[i][j] = s;
                /* shrink phase: one column slice stores v for the expand phase */
                if (lane == 0 && d.phase == MN_LORA_SHRINK && blockIdx.z == 0 && i < nr) vg[(int64_t)(base + i) * g.r + j] = s;
            }
        }
        __syncthreads();
        for (int o = 0; d.phase != MN_LORA_SHRINK && o < d.n_out; o++) {
            if (!g.b[o]) continue;
            const int64_t N = d.N[o], ldb = d.b_ld[o] ? d.b_ld[o] : N;
            const int64_t step = (int64_t)gridDim.z * blockDim.x;
            for (int64_t n = (int64_t)blockIdx.z * blockDim.x + threadIdx.x; n < N; n += step) {
                float acc[ROWS];
                for (int i = 0; i < ROWS; i++) acc[i] = 0.0f;
                for (int32_t j = 0; j < g.r_out[o]; j++) {
                    float b = lora_elem(g.b[o], g.type, (int64_t)j * ldb + n);
                    for (int i = 0; i < ROWS; i++)
                        if (i < nr) acc[i] += v[i][g.r_off[o] + j] * b;
                }
                for (int i = 0; i < nr; i++) d.y[o][t[i] * d.y_stride[o] + n] += g.scale[o] * acc[i];
            }
        }
        __syncthreads(); /* v is reused by the next tile */
    }
}

size_t mn_cuda_lora_work_bytes(const mn_lora_desc *d) {
    if (d->phase != MN_LORA_FUSED || d->max_rows != 1 || d->n_seg <= 0 || d->max_r <= 0) return 0;
    size_t bytes = (size_t)d->n_seg * (size_t)d->max_r * sizeof(float);
    return bytes <= ((size_t)64 << 20) ? bytes : 0;
}

mn_err mn_cuda_lora(const mn_lora_desc *d, void *work, size_t work_bytes, cudaStream_t s, mn_errbuf *eb) {
    if (d->n_seg <= 0) return MN_OK;
    if (d->n_out < 1 || d->n_out > MN_LORA_MAX_OUT)
        return mn_errf(eb, MN_EINVALID, "cuda lora: n_out %d not in 1..%d", d->n_out, MN_LORA_MAX_OUT);
    if (d->max_r <= 0 || d->max_r > MN_CUDA_LORA_MAX_R)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda lora: plan max_r %d not in 1..%d (the shrink width is kept in "
                       "shared memory)", d->max_r, MN_CUDA_LORA_MAX_R);
    if (d->phase != MN_LORA_FUSED && ((d->phase != MN_LORA_SHRINK && d->phase != MN_LORA_EXPAND) || !d->v))
        return mn_errf(eb, MN_EINVALID, "cuda lora: phase %d needs a v buffer (1 shrink, 2 expand)", d->phase);
    if (d->n_seg > 65535 * 1024)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda lora: %d segments", d->n_seg);
    int64_t n_max = 1;
    for (int o = 0; o < d->n_out; o++) n_max = d->N[o] > n_max ? d->N[o] : n_max;
    /* max_rows 0 = unknown: tiles stride the segment, any length is covered */
    int32_t rows = d->max_rows > 0 ? d->max_rows : 64;
    bool gathered = d->max_rows == 1;
    int64_t tiles = gathered ? 1 : (rows + MN__LORA_TILE - 1) / MN__LORA_TILE;
    if (tiles > 65535) tiles = 65535;
    /* enough column slices for ~4 blocks per SM of a large GPU, never more than the columns */
    int64_t blocks = (int64_t)d->n_seg * tiles, zmax = (n_max + MN__CUDA_THREADS - 1) / MN__CUDA_THREADS;
    int64_t z = blocks >= 512 ? 1 : (512 + blocks - 1) / blocks;
    if (z > zmax) z = zmax;
    if (z > 64) z = 64;
    if (d->phase == MN_LORA_SHRINK) z = 1;   /* no columns to share out */
    dim3 grid((unsigned)d->n_seg, (unsigned)tiles, (unsigned)z);
    const size_t need = mn_cuda_lora_work_bytes(d);
    if (gathered && (d->phase == MN_LORA_SHRINK || (need && work && work_bytes >= need))) {
        /* v once per (segment, rank row), then (fused) the expand from it */
        mn_lora_desc dv = *d;
        if (d->phase == MN_LORA_FUSED) dv.v = (float *)work;
        const int warps = MN__CUDA_THREADS / 32;
        dim3 sgrid((unsigned)d->n_seg, (unsigned)((d->max_r + warps - 1) / warps));
        lora_shrink_gathered<<<sgrid, MN__CUDA_THREADS, 0, s>>>(dv);
        MN_CUDA_CHECK_LAUNCH(eb, "lora_shrink_gathered");
        if (d->phase == MN_LORA_SHRINK) return MN_OK;
        dv.phase = MN_LORA_EXPAND;
        lora_kernel<1><<<grid, MN__CUDA_THREADS, 0, s>>>(dv);
        MN_CUDA_CHECK_LAUNCH(eb, "lora_kernel<1> (gathered expand)");
        return MN_OK;
    }
    if (gathered) {
        lora_kernel<1><<<grid, MN__CUDA_THREADS, 0, s>>>(*d);
        MN_CUDA_CHECK_LAUNCH(eb, "lora_kernel<1> (gathered)");
    } else {
        lora_kernel<MN__LORA_TILE><<<grid, MN__CUDA_THREADS, 0, s>>>(*d);
        MN_CUDA_CHECK_LAUNCH(eb, "lora_kernel<8> (segmented)");
    }
    return MN_OK;
}
