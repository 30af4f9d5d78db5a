/* engine/backend.h — the interface every compute backend implements (CPU now, CUDA next).
 *
 * Everything above it (model, KV pool, sessions, tiering, LoRA paging, scheduler) is
 * written once against this header, so it is tested for real on CPU-only machines.
 * A backend provides:
 *   - memory: buffers in device memory (host memory for the CPU backend) under a byte
 *     budget, and pinned host buffers (tier T1) under their own budget;
 *   - a copy queue: asynchronous host<->device copies ordered on the queue, with events
 *     to wait on or poll (host side), or to make compute wait for (MN_OP_WAIT_COPY), so
 *     swapping overlaps compute. The CPU backend runs it on its own thread too;
 *   - compute: mn_backend_run executes a list of ops (kernels/ops.h descriptors whose
 *     pointers are backend memory) in order. The CPU backend runs them on its thread pool
 *     and returns when done; the CUDA backend enqueues them on its compute stream.
 * Ownership: the caller owns each mn_buffer it allocates and frees it with
 * mn_buffer_free before mn_backend_free. Ops never allocate: the backend keeps one
 * scratch area sized by mn_backend_reserve (plan per batch, run per layer).
 * A backend is used from one thread at a time (the engine thread).
 */
#ifndef MN_BACKEND_H
#define MN_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"
#include "kernels/ops.h"

/* Completion marker of copies enqueued before it on the copy queue. Caller-owned storage;
 * zero-initialise (ticket 0: nothing to wait for). */
typedef struct mn_event { uint64_t ticket; } mn_event;

typedef enum mn_op_kind {
    MN_OP_GET_ROWS, MN_OP_RMSNORM, MN_OP_MATMUL, MN_OP_ROPE,
    MN_OP_KV_STORE, MN_OP_ATTENTION, MN_OP_SILU_MUL, MN_OP_ADD, MN_OP_LORA,
    /* ops after it wait until the copy queue has passed the event: how a layer-wise
     * restore lets layer l compute once layer l's KV is back (CUDA: cudaStreamWaitEvent,
     * the host does not wait; CPU: the pool waits for the copy thread) */
    MN_OP_WAIT_COPY,
    /* logits to tokens (kernels/ops.h mn_sample_desc): only token ids and logprobs are
     * outputs, so only they need to cross PCIe */
    MN_OP_SAMPLE,
    MN_OP_COUNT
} mn_op_kind;

/* One op of a compute list: a kind and its descriptor (kernels/ops.h). */
typedef struct mn_op {
    mn_op_kind kind;
    union {
        mn_get_rows_desc get_rows;
        mn_rmsnorm_desc rmsnorm;
        mn_matmul_desc matmul;
        mn_rope_desc rope;
        mn_kv_store_desc kv_store;
        mn_attention_desc attention;
        mn_silu_mul_desc silu_mul;
        mn_add_desc add;
        mn_lora_desc lora;
        mn_event wait_copy;
        mn_sample_desc sample;
    } u;
} mn_op;

const char *mn_op_name(mn_op_kind k);

typedef enum mn_mem_kind {
    MN_MEM_DEVICE = 0,       /* compute memory (HBM; host memory on the CPU backend) */
    MN_MEM_HOST_PINNED = 1,  /* page-locked host memory, DMA-able (tier T1) */
} mn_mem_kind;

typedef struct mn_backend mn_backend;

/* A buffer of backend memory. ptr is a device address: dereferenceable on the host only
 * for the CPU backend and for MN_MEM_HOST_PINNED. */
typedef struct mn_buffer {
    mn_backend *backend;
    mn_mem_kind kind;
    void *ptr;
    size_t size;
} mn_buffer;

typedef enum mn_copy_dir { MN_COPY_H2D, MN_COPY_D2H, MN_COPY_D2D } mn_copy_dir;

/* ---- the vtable a backend implements (private to engine/backend*.c) ---- */
typedef struct mn_backend_iface {
    const char *name;
    void (*destroy)(mn_backend *be);
    /* Allocate/free raw memory of a kind; budgets are enforced by the common layer. */
    mn_err (*mem_alloc)(mn_backend *be, mn_mem_kind kind, size_t size, void **ptr, mn_errbuf *eb);
    void (*mem_free)(mn_backend *be, mn_mem_kind kind, void *ptr, size_t size);
    /* Enqueue a copy on the copy queue; record an event after everything enqueued. */
    mn_err (*copy_async)(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n, mn_errbuf *eb);
    /* Enqueue height rows of width bytes, rows dpitch / spitch bytes apart (optional: NULL
     * means one copy_async per row). */
    mn_err (*copy_2d_async)(mn_backend *be, mn_copy_dir dir, void *dst, size_t dpitch, const void *src, size_t spitch,
                            size_t width, size_t height, mn_errbuf *eb);
    /* Enqueue a copy ordered with compute rather than on the copy queue: after the ops run
     * before it, before the ops run after it. For the small per-step tables (token ids,
     * positions, block tables), which must not wait behind a restore in flight. */
    mn_err (*copy_compute_async)(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n, mn_errbuf *eb);
    mn_err (*event_record)(mn_backend *be, mn_event *ev, mn_errbuf *eb);
    bool (*event_done)(mn_backend *be, const mn_event *ev);
    mn_err (*event_wait)(mn_backend *be, const mn_event *ev, mn_errbuf *eb);
    /* Make device memory hold the bytes of a weight tensor; may return host directly
     * (CPU: zero-copy from the mmapped file). */
    mn_err (*weights_map)(mn_backend *be, const void *host, size_t n, void **dev, mn_errbuf *eb);
    /* Optional: dev (from weights_map) holds an [N][K] matrix of type, rows row_bytes
     * apart; the backend may prepare a faster form for its matmuls (CUDA: a bf16 copy for
     * cuBLAS, so a prefill does not dequantize W on every call). */
    mn_err (*weights_matrix)(mn_backend *be, const void *dev, mn_dtype type, int64_t N, int64_t K, int64_t row_bytes,
                             mn_errbuf *eb);
    bool (*supports_op)(mn_backend *be, const mn_op *op);
    /* Scratch bytes the op needs (0 if none). */
    size_t (*op_work_bytes)(mn_backend *be, const mn_op *op);
    mn_err (*reserve_work)(mn_backend *be, size_t bytes, mn_errbuf *eb);
    mn_err (*run)(mn_backend *be, const mn_op *ops, int n_ops, mn_errbuf *eb);
    mn_err (*synchronize)(mn_backend *be, mn_errbuf *eb);
} mn_backend_iface;

struct mn_backend {
    const mn_backend_iface *iface;
    size_t budget[2], used[2];   /* per mn_mem_kind; budget 0 = unlimited */
    int n_threads;
    void *impl;
    /* Optional per-op-kind profile: when op_seconds is non-NULL the backend adds each op's
     * wall time (and count) to op_seconds[kind] / op_calls[kind]. Caller-owned arrays of
     * MN_OP_COUNT. For `mneme bench --profile`: says where the time goes. */
    double *op_seconds;
    int64_t *op_calls;
};

/* ---- creating backends ---- */
typedef struct mn_backend_params {
    const char *device;          /* "cpu", "cuda", or "auto" (cuda if a GPU exists, else cpu) */
    int device_index;            /* cuda: which GPU (0-based; tensor parallelism puts rank r on r) */
    int n_threads;               /* CPU backend threads; <= 0: number of cores */
    size_t device_budget;        /* bytes of MN_MEM_DEVICE; 0 = unlimited */
    size_t pinned_budget;        /* bytes of MN_MEM_HOST_PINNED; 0 = unlimited */
} mn_backend_params;

/** Create a backend. "cuda" where none is built or no device exists is MN_EUNSUPPORTED
 *  with a message saying why; "auto" falls back to cpu (and says so in eb->msg with
 *  MN_OK returned and *fell_back set, if fell_back is not NULL). */
mn_err mn_backend_new(const mn_backend_params *p, mn_backend **out, bool *fell_back, mn_errbuf *eb);
mn_err mn_backend_cpu_new(const mn_backend_params *p, mn_backend **out, mn_errbuf *eb);
/** Tests: with usec > 0 every copy of the CPU backend's queue runs on its copy thread, usec
 *  late, so compute that does not wait for a copy it needs reads the old bytes (and a test
 *  fails) instead of winning the race. 0 restores normal operation. */
void mn_backend_cpu_slow_copies(mn_backend *be, unsigned usec);
/** CPU backend counters: copies enqueued, and MN_OP_WAIT_COPY ops that found their copy
 *  unfinished and blocked (compute had overtaken the copy queue). */
void mn_backend_cpu_copy_stats(mn_backend *be, uint64_t *copies, uint64_t *waits_blocked);
void mn_backend_free(mn_backend *be);
const char *mn_backend_name(const mn_backend *be);

/* ---- memory ---- */
/** Allocate a buffer; MN_ELIMIT (naming budget and request) if it would exceed the budget. */
mn_err mn_buffer_alloc(mn_backend *be, mn_mem_kind kind, size_t size, mn_buffer **out, mn_errbuf *eb);
void mn_buffer_free(mn_buffer *b);
size_t mn_backend_used(const mn_backend *be, mn_mem_kind kind);

/* ---- copy queue ---- */
mn_err mn_backend_copy_async(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n, mn_errbuf *eb);
/** Strided copy: height rows of width bytes from src (rows spitch bytes apart) to dst (rows
 *  dpitch apart), one enqueue instead of height: what makes a session's KV move in
 *  megabyte units rather than one block at a time. */
mn_err mn_backend_copy_2d_async(mn_backend *be, mn_copy_dir dir, void *dst, size_t dpitch, const void *src,
                                size_t spitch, size_t width, size_t height, mn_errbuf *eb);
/** A copy ordered with compute (see the vtable): the source may change once the next
 *  mn_backend_synchronize returns. */
mn_err mn_backend_copy_compute_async(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n, mn_errbuf *eb);
mn_err mn_backend_event_record(mn_backend *be, mn_event *ev, mn_errbuf *eb);
bool mn_backend_event_done(mn_backend *be, const mn_event *ev);
mn_err mn_backend_event_wait(mn_backend *be, const mn_event *ev, mn_errbuf *eb);

/* ---- compute ---- */
mn_err mn_backend_weights_map(mn_backend *be, const void *host, size_t n, void **dev, mn_errbuf *eb);
/** Say that weights_map's dev is an [N][K] matrix (see the vtable); MN_OK when the backend
 *  has nothing to prepare. Results do not change, only speed and device memory. */
mn_err mn_backend_weights_matrix(mn_backend *be, const void *dev, mn_dtype type, int64_t N, int64_t K, int64_t row_bytes,
                                 mn_errbuf *eb);
bool mn_backend_supports_op(mn_backend *be, const mn_op *op);
/** Make the scratch area big enough for every op of the list (call when planning a batch). */
mn_err mn_backend_reserve(mn_backend *be, const mn_op *ops, int n_ops, mn_errbuf *eb);
/** Run ops in order. Scratch must have been reserved for them. */
mn_err mn_backend_run(mn_backend *be, const mn_op *ops, int n_ops, mn_errbuf *eb);
mn_err mn_backend_synchronize(mn_backend *be, mn_errbuf *eb);

#endif
