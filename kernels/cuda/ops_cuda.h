/* kernels/cuda/ops_cuda.h — the CUDA implementations of the ops of kernels/ops.h, and
 * the one checking macro for CUDA / cuBLAS calls.
 *
 * Same names and contracts as mn_ref_<op> (kernels/ops.h): every pointer in a
 * descriptor (including ids, seq, pos, inv_freq and the KV block tables) is device
 * memory. Each mn_cuda_<op> only enqueues work on the given stream and returns; it
 * checks its launch (cudaGetLastError) and returns MN_EDEVICE with statement, file and
 * line in eb on failure, MN_EUNSUPPORTED for a shape it does not handle (a weight type
 * outside mn_dtype_is_weight_type, head_dim > MN_CUDA_MAX_HEAD_DIM, an F32 weight row
 * not a whole number of floats). Errors raised while a kernel runs surface at the next
 * synchronisation (mn_backend_synchronize).
 * Ownership: nothing here allocates; matmul's and attention's scratch is the caller's
 * (sized by mn_cuda_matmul_work_bytes / mn_cuda_attention_work_bytes, plan per batch).
 * Header usable from C and CUDA C++.
 */
#ifndef MN_KERNELS_OPS_CUDA_H
#define MN_KERNELS_OPS_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <cuda_runtime.h>
#include <cublas_v2.h>

#include "kernels/ops.h"

#ifdef __cplusplus
extern "C" {
#endif
#include "engine/err.h"

/* Run stmt (a cudaError_t expression); on failure fill eb and return MN_EDEVICE from the
 * enclosing function. Records the statement text, file and line, so a device error
 * names the call that raised it. */
#define MN_CUDA_CHECK(eb, stmt)                                                                       \
    do {                                                                                              \
        cudaError_t mn__ce = (stmt);                                                                  \
        if (mn__ce != cudaSuccess)                                                                    \
            return mn_errf((eb), MN_EDEVICE, "%s:%d: %s: %s (%s)", __FILE__, __LINE__, #stmt,         \
                           cudaGetErrorString(mn__ce), cudaGetErrorName(mn__ce));                     \
    } while (0)

/* The same for a cublasStatus_t expression. */
#define MN_CUBLAS_CHECK(eb, stmt)                                                                     \
    do {                                                                                              \
        cublasStatus_t mn__bs = (stmt);                                                               \
        if (mn__bs != CUBLAS_STATUS_SUCCESS)                                                          \
            return mn_errf((eb), MN_EDEVICE, "%s:%d: %s: %s", __FILE__, __LINE__, #stmt,              \
                           cublasGetStatusString(mn__bs));                                            \
    } while (0)

/* Check the kernel launch just made (bad configuration, no kernel image for this GPU);
 * name says which kernel. */
#define MN_CUDA_CHECK_LAUNCH(eb, name)                                                                \
    do {                                                                                              \
        cudaError_t mn__le = cudaGetLastError();                                                      \
        if (mn__le != cudaSuccess)                                                                    \
            return mn_errf((eb), MN_EDEVICE, "%s:%d: launch of %s: %s (%s)", __FILE__, __LINE__,      \
                           (name), cudaGetErrorString(mn__le), cudaGetErrorName(mn__le));             \
    } while (0)

/** Largest head_dim attention handles (the per-lane accumulators are registers). */
#define MN_CUDA_MAX_HEAD_DIM 256

/** Largest T of the fused GEMV (mn_cuda_matmul sends larger batches to bf16 + cuBLAS). Why 8:
 * the GEMV's weight traffic is one read of W whatever T is, but its arithmetic and its
 * activation reads (from L1/L2) grow with T, and each token keeps one f32 accumulator per
 * lane in registers (compile-time NT = 1, 2, 4, 8). The bf16 path writes and re-reads a
 * bf16 copy of W on every call (about 4.5 bytes per weight against 0.56 for Q4_0), so up
 * to 8 tokens the GEMV is expected to win by a wide margin at every type; past that the
 * per-token integer dots start to rival the memory time of a warp step. Not yet measured
 * on a GPU: tests/gpu prints both paths at T = 1 and 8 to move this cut-off. */
#define MN_CUDA_GEMV_MAX_T 8

/** Scratch bytes mn_cuda_matmul needs for d: T <= MN_CUDA_GEMV_MAX_T, the GEMV's (the
 *  quantized activations; 0 for float weights); else the bf16 path's (0 for F32 weights:
 *  cuBLAS reads them in place). */
size_t mn_cuda_matmul_work_bytes(const mn_matmul_desc *d);
/** Scratch bytes of mn_cuda_matmul_gemv: T * K/32 q8_1 blocks (Q4_0/1, Q5_0/1, Q8_0), T * K/256
 *  q8_K blocks (K-quants), 0 for F32 / F16 / BF16. */
size_t mn_cuda_matmul_gemv_work_bytes(const mn_matmul_desc *d);
/** Fused dequant GEMV (kernels/cuda/matmul_gemv.cu) for 1 <= T <= MN_CUDA_GEMV_MAX_T, any
 *  weight type: x quantized once (q8_1 / q8_K, the reference's blocks) into work, then one
 *  warp per output row reads the row once for all T tokens; integer block dots scaled as
 *  the reference does. A row's bits do not depend on T or the other tokens, and equal the
 *  host emulation mn_gemv_emulate (kernels/cuda/matmul_gemv.h). Within the ops.h
 *  tolerance 1e-4 * (sum|x w| + |b|) of the reference (only the f32 order over blocks
 *  differs). MN_EUNSUPPORTED for T > MN_CUDA_GEMV_MAX_T. */
mn_err mn_cuda_matmul_gemv(const mn_matmul_desc *d, void *work, size_t work_bytes, cudaStream_t s, mn_errbuf *eb);
/** n (1..3) GEMV matmuls that share x (the same x, x_stride, T and K, and weight types of
 *  one activation block size: q, k, v or gate, up) in one launch, each row with the bits
 *  mn_cuda_matmul_gemv gives it. quantize = false: work already holds x's blocks (as
 *  mn_cuda_matmul_gemv_reuse_x). The caller makes sure no y overlaps x or another y. */
mn_err mn_cuda_matmul_gemv_multi(const mn_matmul_desc *d, int n, void *work, size_t work_bytes, bool quantize,
                                 cudaStream_t s, mn_errbuf *eb);
/** x of d quantized to its activation blocks (q8_1 / q8_K, the reference's) at work, as the
 *  GEMV does first; mn_cuda_matmul_gemv_work_bytes(d) bytes. Nothing for float weights. */
mn_err mn_cuda_quantize_x(const mn_matmul_desc *d, void *work, size_t work_bytes, cudaStream_t s, mn_errbuf *eb);
/** Most tokens of the int8 tensor-core matmul (kernels/cuda/matmul_mmq.cu). */
#define MN_CUDA_MMQ_MAX_T 64
/** The int8 tensor-core matmul: Q4_0 / Q4_1 / Q8_0 weights, 1 <= T <= MN_CUDA_MMQ_MAX_T, x
 *  as q8_1 blocks, exact integer block dots, ops.h tolerance; scratch
 *  mn_cuda_matmul_mmq_work_bytes. Written without a GPU: mn_cuda_matmul uses it for
 *  9..MN_CUDA_MMQ_MAX_T tokens only when on (mn_cuda_matmul_mmq_enable(1) or
 *  $MNEME_CUDA_MMQ=1; off by default until a GPU run has checked and timed it). */
bool mn_cuda_matmul_mmq_supports(const mn_matmul_desc *d);
size_t mn_cuda_matmul_mmq_work_bytes(const mn_matmul_desc *d);
mn_err mn_cuda_matmul_mmq(const mn_matmul_desc *d, void *work, size_t work_bytes, cudaStream_t s, mn_errbuf *eb);
void mn_cuda_matmul_mmq_enable(int on);
bool mn_cuda_matmul_mmq_on(void);
/** mn_cuda_matmul_gemv without quantizing x: work already holds x's activation blocks,
 *  left by the mn_cuda_matmul_gemv just before on the same stream with the same x,
 *  x_stride, T, K and block size (q, k, v, or gate and up, share their input). */
mn_err mn_cuda_matmul_gemv_reuse_x(const mn_matmul_desc *d, void *work, size_t work_bytes, cudaStream_t s,
                                   mn_errbuf *eb);
/** The bf16 + cuBLAS path of mn_cuda_matmul for any T (mn_cuda_matmul uses it past
 *  MN_CUDA_GEMV_MAX_T); scratch mn_cuda_matmul_cublas_work_bytes. Kept callable for the
 *  timing comparison in tests/gpu. */
size_t mn_cuda_matmul_cublas_work_bytes(const mn_matmul_desc *d);
mn_err mn_cuda_matmul_cublas(const mn_matmul_desc *d, void *work, size_t work_bytes, cublasHandle_t blas,
                             cudaStream_t s, mn_errbuf *eb);

/** W [N][K] of type (rows row_bytes apart) as bf16 [N][K] into out, the values the bf16
 *  path uses (dequantized, rounded to bf16): done once at load (the backend's
 *  weights_matrix) so that a prefill does not dequantize on every call. Enqueued on s. */
mn_err mn_cuda_dequant_bf16(mn_dtype type, const void *w, int64_t N, int64_t K, int64_t row_bytes, uint16_t *out,
                            cudaStream_t s, mn_errbuf *eb);
/** The bf16 + cuBLAS path with W already in bf16 (wb, rows ldw >= K apart; a view of a
 *  prepared matrix may start inside it): the same bf16 values as mn_cuda_matmul_cublas, so
 *  the same result within the same tolerance (bit-identical when ldw == K: the same call).
 *  Scratch mn_cuda_matmul_prepared_work_bytes (x in bf16 only). Not for F32 weights. */
size_t mn_cuda_matmul_prepared_work_bytes(const mn_matmul_desc *d);
mn_err mn_cuda_matmul_prepared(const mn_matmul_desc *d, const uint16_t *wb, int64_t ldw, void *work, size_t work_bytes,
                               cublasHandle_t blas, cudaStream_t s, mn_errbuf *eb);

mn_err mn_cuda_get_rows(const mn_get_rows_desc *d, cudaStream_t s, mn_errbuf *eb);
mn_err mn_cuda_rmsnorm(const mn_rmsnorm_desc *d, cudaStream_t s, mn_errbuf *eb);
/** matmul: T <= MN_CUDA_GEMV_MAX_T runs the fused GEMV (mn_cuda_matmul_gemv: ops.h
 *  tolerance, batch invariant for T in that range). Larger T: quantized / F16 / BF16
 *  weights are dequantized to bf16 into work, x is rounded to bf16 (after the q8_1 / q8_K
 *  round trip of the contract for quantized weights), then one cublasGemmEx with f32
 *  accumulation; F32 weights: f32 GEMM in place. Precision there: f32 weights within the
 *  ops.h tolerance; others within (1e-4 + 2^-7) * (sum_k |x_k w_k| + |b|) of the reference
 *  (two bf16 roundings). blas must be bound to nothing else concurrently; it is set to
 *  stream s (only the cuBLAS path uses it). */
mn_err mn_cuda_matmul(const mn_matmul_desc *d, void *work, size_t work_bytes, cublasHandle_t blas,
                      cudaStream_t s, mn_errbuf *eb);
mn_err mn_cuda_rope(const mn_rope_desc *d, cudaStream_t s, mn_errbuf *eb);
mn_err mn_cuda_kv_store(const mn_kv_store_desc *d, cudaStream_t s, mn_errbuf *eb);
/** attention (kernels/cuda/attention.cu): one kernel for decode and prefill (tiles of
 *  consecutive tokens of one sequence share each K/V chunk; a KV group's heads share it
 *  too), split over segments of 256 positions when work holds
 *  mn_cuda_attention_work_bytes(d) bytes, else each block walks its segments itself. Both
 *  give the same bits for a token whatever else is in the batch. Within the ops.h
 *  tolerance (f32 online softmax). */
mn_err mn_cuda_attention(const mn_attention_desc *d, void *work, size_t work_bytes, cudaStream_t s, mn_errbuf *eb);
/** Scratch bytes for the split path of d: non-zero when d->max_pos spans two or more
 *  segments, d->T <= 64 and the states fit in 64 MiB. */
size_t mn_cuda_attention_work_bytes(const mn_attention_desc *d);
/** What the host side of mn_cuda_attention reads of d->max_pos (the split's segment count;
 *  the kernels read positions from d->pos): two descriptors equal but for max_pos launch
 *  the same kernels with the same arguments when their keys are equal (CUDA graphs). */
int32_t mn_cuda_attention_launch_key(const mn_attention_desc *d);
mn_err mn_cuda_silu_mul(const mn_silu_mul_desc *d, cudaStream_t s, mn_errbuf *eb);
mn_err mn_cuda_add(const mn_add_desc *d, cudaStream_t s, mn_errbuf *eb);

/** Device read bandwidth (benchmarks' floor): the best of reps passes that read n bytes at
 *  p (16-byte aligned; n a multiple of 16) with 16-byte loads and nothing else, in GB/s. */
mn_err mn_cuda_read_bandwidth(const void *p, size_t n, int reps, double *gbps, mn_errbuf *eb);
/** A kernel that spins for ns nanoseconds (the device's global timer) on s: a profiler
 *  queues it first so the host can queue every op behind it before any runs, and the
 *  ops then run back to back as they would from a graph. */
mn_err mn_cuda_spin(uint64_t ns, cudaStream_t s, mn_errbuf *eb);
/** lora (kernels/cuda/lora.cu): seg, rows and every a / b device memory; d->max_r (the
 *  plan's widest shrink, <= MN_CUDA_LORA_MAX_R) is required, MN_EUNSUPPORTED otherwise;
 *  d->max_rows == 1 runs the gathered decode kernels, anything else the segmented one.
 *  Gathered and fused with work holding mn_cuda_lora_work_bytes(d): the shrink once into
 *  the scratch, then the expand (same bits as without scratch). f32 sums: within the
 *  ops.h tolerance. */
mn_err mn_cuda_lora(const mn_lora_desc *d, void *work, size_t work_bytes, cudaStream_t s, mn_errbuf *eb);
/** Scratch bytes mn_cuda_lora uses for d: n_seg * max_r floats for a fused gathered op, else 0. */
size_t mn_cuda_lora_work_bytes(const mn_lora_desc *d);
/** sample (kernels/cuda/sample.cu, per-row code kernels/cuda/sample_block.cuh): one block
 *  per row, no scratch; params and every output device memory. Radix selects over the
 *  logits' float bits find the top-k and top-p thresholds (no sort), then one block scan
 *  in id order draws. Agrees with mn_ref_sample within the ops.h contract (MN_SAMPLE_TOL
 *  boundary cases); the double histograms use shared-memory atomics, so a token exactly
 *  at such a boundary may also differ from run to run. */
mn_err mn_cuda_sample(const mn_sample_desc *d, cudaStream_t s, mn_errbuf *eb);

#ifdef __cplusplus
}
#endif

#endif
