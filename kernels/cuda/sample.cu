/* kernels/cuda/sample.cu — the sample op on the device (contract: kernels/ops.h): one block
 * of MN__SMP_THREADS per row, the per-row code of kernels/cuda/sample_block.cuh (which
 * tests/unit/test_sample_block.cu runs on the host in lockstep). Only token ids and
 * logprobs are written; the caller copies those few bytes back.
 */
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/sample_block.cuh"

enum { MN__SMP_THREADS = 512 };

struct mn__smp_dev_block {
    __device__ int tid() const { return (int)threadIdx.x; }
    __device__ int n() const { return (int)blockDim.x; }
    __device__ void sync() const { __syncthreads(); }
    __device__ void atomic_add(double *p, double v) const { atomicAdd(p, v); }
};

__global__ static void __launch_bounds__(MN__SMP_THREADS) sample_kernel(mn_sample_desc d) {
    __shared__ mn__smp_smem sh;
    mn__smp_dev_block b;
    for (int32_t r = blockIdx.x; r < d.n_rows; r += gridDim.x) mn__sample_row(d, r, &sh, b);
}

mn_err mn_cuda_sample(const mn_sample_desc *d, cudaStream_t s, mn_errbuf *eb) {
    if (d->n_rows <= 0) return MN_OK;
    if (d->V <= 0) return mn_errf(eb, MN_EUNSUPPORTED, "cuda sample: V=%d", (int)d->V);
    unsigned blocks = d->n_rows < 65535 ? (unsigned)d->n_rows : 65535u;
    sample_kernel<<<blocks, MN__SMP_THREADS, 0, s>>>(*d);
    MN_CUDA_CHECK_LAUNCH(eb, "sample_kernel");
    return MN_OK;
}
