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
 */
#include "kernels/cuda/cuda_common.cuh"

enum { MN__LORA_TILE = 8 };

__device__ static inline float lora_elem(const void *p, mn_dtype t, int64_t i) {
    if (t == MN_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return t == MN_F16 ? mn_fp16_to_fp32(h) : mn_bf16_to_fp32(h);
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
        for (int32_t j = warp; d.phase != MN_LORA_EXPAND && j < g.r; j += n_warp) {
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

mn_err mn_cuda_lora(const mn_lora_desc *d, cudaStream_t s, mn_errbuf *eb) {
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
    if (gathered) {
        lora_kernel<1><<<grid, MN__CUDA_THREADS, 0, s>>>(*d);
        MN_CUDA_CHECK_LAUNCH(eb, "lora_kernel<1> (gathered)");
    } else {
        lora_kernel<MN__LORA_TILE><<<grid, MN__CUDA_THREADS, 0, s>>>(*d);
        MN_CUDA_CHECK_LAUNCH(eb, "lora_kernel<8> (segmented)");
    }
    return MN_OK;
}
