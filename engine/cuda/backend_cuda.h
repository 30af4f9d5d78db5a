/* engine/cuda/backend_cuda.h — creating the CUDA backend (engine/backend.h vtable over
 * cudaMalloc'ed memory, cudaHostAlloc'ed pinned memory, a compute stream, a copy stream,
 * cuBLAS and kernels/cuda). Built only when CMake finds nvcc (MNEME_HAVE_CUDA=1).
 *
 * Semantics beyond engine/backend.h:
 *   - copies (copy stream) start only after all compute enqueued before them
 *     (a device-side wait, the host does not block), so a swap-out reads finished KV;
 *   - compute does NOT wait for copies: wait on the copy's event (mn_backend_event_wait,
 *     which blocks the host) before running ops that read what was copied in;
 *   - mn_backend_run only enqueues; kernel faults surface at mn_backend_synchronize or
 *     at the next event wait;
 *   - weights_map copies the bytes to the device synchronously; the copy counts against
 *     the device budget and lives until the backend is freed; so does the scratch area.
 * Ownership: the backend owns its streams, events, cuBLAS handle, scratch and mapped
 * weights and frees them in mn_backend_free; buffers stay the caller's.
 */
#ifndef MN_BACKEND_CUDA_H
#define MN_BACKEND_CUDA_H

#include "engine/backend.h"

/** Create the CUDA backend on device p->device_index (MN_ERANGE naming the device count if
 *  there is no such device); every entry point selects that device on the calling thread,
 *  so backends of several GPUs can be driven from different threads. Without a usable device (no driver, no GPU) it
 *  returns MN_EUNSUPPORTED with the CUDA error text in eb; MN_EDEVICE / MN_ENOMEM if
 *  creating streams, events or the cuBLAS handle fails. */
mn_err mn_backend_cuda_new(const mn_backend_params *p, mn_backend **out, mn_errbuf *eb);

/** The compute stream (a cudaStream_t) and the device: what an NCCL communicator of a
 *  tensor-parallel rank enqueues its collectives on. be must be a CUDA backend. */
void *mn_backend_cuda_stream(mn_backend *be);
int mn_backend_cuda_device(const mn_backend *be);

/** Matmuls of at least t tokens whose W has a prepared bf16 form (weights_matrix) run on
 *  cuBLAS with it; fewer tokens run the fused dequant GEMV (T <= MN_CUDA_GEMV_MAX_T).
 *  Default MN_CUDA_PREPARED_MIN_T, or $MNEME_CUDA_PREPARED_MIN_T. For bench_gpu's
 *  crossover table. */
#define MN_CUDA_PREPARED_MIN_T 5
void mn_backend_cuda_set_prepared_min_t(mn_backend *be, int64_t t);
/** CUDA graphs of decode runs (backend_cuda.c): on by default ($MNEME_CUDA_GRAPHS=0: off);
 *  how many runs were captured and how many replayed a captured graph. */
void mn_backend_cuda_set_graphs(mn_backend *be, bool on);
/** Consecutive GEMV matmuls on one x (q, k, v; gate, up) in one launch: an A/B switch for
 *  benchmarks, results unchanged. Default off ($MNEME_CUDA_GEMV_FUSE=1: on) until a GPU run
 *  has checked and timed it. */
void mn_backend_cuda_set_gemv_fuse(mn_backend *be, bool on);
/** The int8 tensor-core matmul (kernels/cuda/matmul_mmq.cu) for 9..64-token batches of
 *  Q4_0 / Q4_1 / Q8_0 instead of cuBLAS on the bf16 copies (process-wide; default off,
 *  $MNEME_CUDA_MMQ=1: on): an A/B switch for benchmarks until a GPU run has checked it. */
void mn_backend_cuda_set_mmq(mn_backend *be, bool on);
void mn_backend_cuda_graph_stats(const mn_backend *be, uint64_t *captures, uint64_t *replays);

#endif
