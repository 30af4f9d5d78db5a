/* engine/cuda/backend_cuda.c — the CUDA backend: the engine/backend.h vtable over device
 * memory, two streams and the kernels of kernels/cuda.
 *
 * Streams: `compute` runs the ops of mn_backend_run in order; `copy` runs the copy queue.
 * Before each copy the copy stream waits (on the device) for an event recorded on the
 * compute stream, so a copy sees every op enqueued before it; compute never waits for the
 * copy stream by itself (callers wait on the copy's event), so a layer-wise restore can
 * overlap with compute of the layers already there.
 *
 * Events: mn_event holds only a ticket (1, 2, 3, ...). Ticket n uses cudaEvent
 * ring[n % EV_RING]. Copies are ordered on one stream, so ticket n done means every
 * ticket <= n is done: `done_ticket` is that watermark. Reusing a ring slot first waits
 * for the ticket it held, so an old ticket whose slot was reused is always <= done_ticket.
 *
 * Pinned host memory: cudaHostAlloc pins and maps every page (on the H200 machine a 537 MB
 * T1 image cost more than its own copy), and cudaFreeHost waits for the whole device. So
 * freed pinned buffers go to a small cache (PINNED_CACHE_DEFAULT bytes, or
 * $MNEME_CUDA_PINNED_CACHE) and are handed out again for requests of 1/2 to 1 their size;
 * each cached buffer carries events on both streams, waited for before it is reused, in
 * case a queued copy still reads or writes it (cudaFreeHost used to wait for those).
 *
 * CUDA graphs: a decode step is ~700 small launches; launched one by one the GPU idles
 * between them. A run of at least GRAPH_MIN_OPS ops, all of at most GRAPH_MAX_T tokens and
 * none a WAIT_COPY, is captured into a graph keyed by the ops themselves (each op's kind
 * and descriptor bytes, attention's max_pos reduced to what the launch reads of it:
 * mn_cuda_attention_launch_key) plus the scratch area; a later run with the same key
 * replays the graph. Equal keys mean equal kernel arguments, so a replay does exactly
 * what launching the ops would. Positions, block tables, sampling parameters and LoRA
 * segments live in device memory that the forward rewrites before each run, so steady
 * decoding hits the same key step after step. $MNEME_CUDA_GRAPHS=0 turns this off.
 */
#include "engine/cuda/backend_cuda.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/alloc.h"
#include "kernels/cuda/ops_cuda.h"

enum { EV_RING = 256, PINNED_CACHE_SLOTS = 64, GRAPH_SLOTS = 4, GRAPH_MIN_OPS = 16, GRAPH_MAX_T = 64 };

/* A captured run: its key (normalised copies of the ops, the scratch area) and the graph. */
typedef struct graph_slot {
    mn_op *key;
    int n, cap;
    void *work;
    size_t work_size;
    cudaGraphExec_t exec;
    uint64_t last_use;
} graph_slot;
#define PINNED_CACHE_DEFAULT ((size_t)4 << 30)
#define BLAS_WS_BYTES ((size_t)32 << 20) /* cuBLAS's advice for Hopper */

typedef struct pinned_slot {
    void *ptr;
    size_t size;
    cudaEvent_t copy_done, compute_done; /* recorded when the buffer was freed */
} pinned_slot;

/* A weight matrix in device memory with its bf16 form for the cuBLAS path: a copy made
 * at load (owned, counted in the device budget), or the weights themselves when they are
 * bf16 rows already. */
typedef struct prepared_mat {
    const char *base;
    mn_dtype type;
    int64_t N, K, row_bytes;
    uint16_t *bf16;     /* [N][K] */
    bool owned;
} prepared_mat;

typedef struct cuda_impl {
    int device;
    cudaStream_t compute, copy;
    cudaEvent_t compute_mark;       /* recorded on compute before each copy; the copy waits on it */
    cublasHandle_t blas;
    void *blas_ws;                  /* cuBLAS workspace (BLAS_WS_BYTES) */
    void *work;                     /* matmul / attention scratch (device), work_size bytes */
    size_t work_size;
    cudaEvent_t ring[EV_RING];
    uint64_t ring_ticket[EV_RING];  /* ticket recorded in each slot, 0 = never */
    uint64_t next_ticket, done_ticket;
    void **weights;                 /* device copies made by weights_map */
    size_t *weight_bytes;
    size_t n_weights, cap_weights;
    prepared_mat *mats;             /* bf16 forms of weight matrices (weights_matrix) */
    size_t n_mats, cap_mats;
    int64_t prepared_min_t;         /* matmuls of at least this many tokens use a prepared bf16 W */
    struct {                        /* x blocks the last op (a GEMV) left at the start of work */
        bool valid;
        const float *x;
        int64_t x_stride, T, K, block;
    } xq;
    bool graphs_on;
    bool gemv_fuse;                 /* consecutive GEMV matmuls on one x in one launch ($MNEME_CUDA_GEMV_FUSE=1: on) */
    graph_slot graphs[GRAPH_SLOTS];
    mn_op *key_scratch;             /* the incoming run's key */
    int key_cap;
    uint64_t graph_clock, graph_captures, graph_replays;
    int graph_misses;               /* captures in a row not replayed since: past 3, capture rarely */
    pinned_slot pinned[PINNED_CACHE_SLOTS]; /* freed pinned buffers kept for reuse */
    int n_pinned;
    size_t pinned_bytes, pinned_cap;
} cuda_impl;

static void graphs_flush(cuda_impl *c);

/* Release everything impl holds (tolerates a half-built impl); errors are ignored, there
 * is nobody left to report them to. */
static void impl_release(mn_backend *be, cuda_impl *c) {
    if (c->compute) cudaStreamSynchronize(c->compute);
    if (c->copy) cudaStreamSynchronize(c->copy);
    for (size_t i = 0; i < c->n_weights; i++) {
        cudaFree(c->weights[i]);
        if (be) be->used[MN_MEM_DEVICE] -= c->weight_bytes[i];
    }
    mn_free(c->weights);
    mn_free(c->weight_bytes);
    for (size_t i = 0; i < c->n_mats; i++)
        if (c->mats[i].owned) {
            cudaFree(c->mats[i].bf16);
            if (be) be->used[MN_MEM_DEVICE] -= (size_t)c->mats[i].N * (size_t)c->mats[i].K * 2;
        }
    mn_free(c->mats);
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        if (c->graphs[i].exec) cudaGraphExecDestroy(c->graphs[i].exec);
        mn_free(c->graphs[i].key);
    }
    mn_free(c->key_scratch);
    for (int i = 0; i < c->n_pinned; i++) {
        cudaFreeHost(c->pinned[i].ptr);
        cudaEventDestroy(c->pinned[i].copy_done);
        cudaEventDestroy(c->pinned[i].compute_done);
    }
    if (c->work) {
        cudaFree(c->work);
        if (be) be->used[MN_MEM_DEVICE] -= c->work_size;
    }
    for (int i = 0; i < EV_RING; i++)
        if (c->ring[i]) cudaEventDestroy(c->ring[i]);
    if (c->compute_mark) cudaEventDestroy(c->compute_mark);
    if (c->blas) cublasDestroy(c->blas);
    if (c->blas_ws) cudaFree(c->blas_ws);
    if (c->copy) cudaStreamDestroy(c->copy);
    if (c->compute) cudaStreamDestroy(c->compute);
    mn_free(c);
}

/* The CUDA runtime's current device is per host thread, and tensor-parallel ranks drive
 * their backends from threads of their own: every entry point selects this backend's
 * device first (cheap when it already is current). */
static void on_device(const mn_backend *be) { cudaSetDevice(((const cuda_impl *)be->impl)->device); }

static void cuda_destroy(mn_backend *be) {
    on_device(be);
    impl_release(be, be->impl);
    mn_free(be);
}

/* Budget check for memory the backend takes for itself (weights, scratch). */
static mn_err charge(mn_backend *be, size_t n, const char *what, mn_errbuf *eb) {
    size_t budget = be->budget[MN_MEM_DEVICE];
    if (budget && (n > budget || be->used[MN_MEM_DEVICE] > budget - n))
        return mn_errf(eb, MN_ELIMIT, "device budget: %s needs %zu bytes, %zu of %zu in use", what, n,
                       be->used[MN_MEM_DEVICE], budget);
    return MN_OK;
}

/* The smallest cached pinned buffer of n to 2n bytes, taken out of the cache; NULL if none. */
static void *pinned_take(cuda_impl *c, size_t n) {
    int best = -1;
    for (int i = 0; i < c->n_pinned; i++)
        if (c->pinned[i].size >= n && c->pinned[i].size / 2 <= n && (best < 0 || c->pinned[i].size < c->pinned[best].size))
            best = i;
    if (best < 0) return NULL;
    pinned_slot s = c->pinned[best];
    c->pinned[best] = c->pinned[--c->n_pinned];
    c->pinned_bytes -= s.size;
    cudaEventSynchronize(s.copy_done); /* a copy queued before the free may still use it */
    cudaEventSynchronize(s.compute_done);
    cudaEventDestroy(s.copy_done);
    cudaEventDestroy(s.compute_done);
    return s.ptr;
}

/* Keep a freed pinned buffer for reuse; false if the cache is full (the caller frees it). */
static bool pinned_keep(cuda_impl *c, void *ptr, size_t size) {
    if (c->n_pinned == PINNED_CACHE_SLOTS || size > c->pinned_cap || c->pinned_bytes > c->pinned_cap - size) return false;
    pinned_slot s = {ptr, size, NULL, NULL};
    if (cudaEventCreateWithFlags(&s.copy_done, cudaEventDisableTiming) != cudaSuccess) return false;
    if (cudaEventCreateWithFlags(&s.compute_done, cudaEventDisableTiming) != cudaSuccess ||
        cudaEventRecord(s.copy_done, c->copy) != cudaSuccess || cudaEventRecord(s.compute_done, c->compute) != cudaSuccess) {
        cudaEventDestroy(s.copy_done);
        if (s.compute_done) cudaEventDestroy(s.compute_done);
        cudaGetLastError();
        return false;
    }
    c->pinned[c->n_pinned++] = s;
    c->pinned_bytes += size;
    return true;
}

static mn_err cuda_mem_alloc(mn_backend *be, mn_mem_kind kind, size_t size, void **ptr, mn_errbuf *eb) {
    on_device(be);
    size_t n = size ? size : 256;
    *ptr = NULL;
    if (kind == MN_MEM_HOST_PINNED) {
        if ((*ptr = pinned_take(be->impl, n))) return MN_OK;
        MN_CUDA_CHECK(eb, cudaHostAlloc(ptr, n, cudaHostAllocPortable));
    } else {
        MN_CUDA_CHECK(eb, cudaMalloc(ptr, n));
    }
    return MN_OK;
}

/* size is what was asked of mem_alloc; a cached buffer handed out again may be larger,
 * and it goes back to the cache under the smaller size (the rest is only unused). */
static void cuda_mem_free(mn_backend *be, mn_mem_kind kind, void *ptr, size_t size) {
    on_device(be);
    if (!ptr) return;
    if (kind == MN_MEM_HOST_PINNED) {
        if (!pinned_keep(be->impl, ptr, size ? size : 256)) cudaFreeHost(ptr);
    } else {
        cudaFree(ptr);
    }
}

static mn_err cuda_copy_async(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n, mn_errbuf *eb) {
    on_device(be);
    cuda_impl *c = be->impl;
    if ((unsigned)dir > MN_COPY_D2D) return mn_errf(eb, MN_EINVALID, "copy direction %d unknown", (int)dir);
    if (n == 0) return MN_OK;
    static const enum cudaMemcpyKind kinds[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                                cudaMemcpyDeviceToDevice};
    MN_CUDA_CHECK(eb, cudaEventRecord(c->compute_mark, c->compute));
    MN_CUDA_CHECK(eb, cudaStreamWaitEvent(c->copy, c->compute_mark, 0));
    MN_CUDA_CHECK(eb, cudaMemcpyAsync(dst, src, n, kinds[dir], c->copy));
    return MN_OK;
}

static mn_err cuda_copy_2d_async(mn_backend *be, mn_copy_dir dir, void *dst, size_t dpitch, const void *src,
                                 size_t spitch, size_t width, size_t height, mn_errbuf *eb) {
    on_device(be);
    cuda_impl *c = be->impl;
    if ((unsigned)dir > MN_COPY_D2D) return mn_errf(eb, MN_EINVALID, "copy direction %d unknown", (int)dir);
    static const enum cudaMemcpyKind kinds[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                                cudaMemcpyDeviceToDevice};
    MN_CUDA_CHECK(eb, cudaEventRecord(c->compute_mark, c->compute));
    MN_CUDA_CHECK(eb, cudaStreamWaitEvent(c->copy, c->compute_mark, 0));
    MN_CUDA_CHECK(eb, cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kinds[dir], c->copy));
    return MN_OK;
}

/* On the compute stream: ordered with the ops, never behind the copy queue. */
static mn_err cuda_copy_compute_async(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n,
                                      mn_errbuf *eb) {
    on_device(be);
    cuda_impl *c = be->impl;
    if (n == 0) return MN_OK;
    static const enum cudaMemcpyKind kinds[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                                cudaMemcpyDeviceToDevice};
    MN_CUDA_CHECK(eb, cudaMemcpyAsync(dst, src, n, kinds[dir], c->compute));
    return MN_OK;
}

/* MN_OP_WAIT_COPY: the compute stream waits (on the device) for ticket t of the copy
 * stream. The wait binds to the slot's record as of now, so a later reuse of the slot
 * cannot change what it waits for. */
static mn_err wait_copy(cuda_impl *c, uint64_t t, mn_errbuf *eb) {
    if (t > c->next_ticket) return mn_errf(eb, MN_EINVALID, "wait_copy: event ticket %llu was never recorded", (unsigned long long)t);
    if (t <= c->done_ticket) return MN_OK;
    MN_CUDA_CHECK(eb, cudaStreamWaitEvent(c->compute, c->ring[t % EV_RING], 0));
    return MN_OK;
}

static mn_err cuda_event_record(mn_backend *be, mn_event *ev, mn_errbuf *eb) {
    on_device(be);
    cuda_impl *c = be->impl;
    uint64_t t = c->next_ticket + 1;
    int slot = (int)(t % EV_RING);
    if (c->ring_ticket[slot] > c->done_ticket) { /* slot still holds a live ticket: finish it */
        MN_CUDA_CHECK(eb, cudaEventSynchronize(c->ring[slot]));
        c->done_ticket = c->ring_ticket[slot];
    }
    MN_CUDA_CHECK(eb, cudaEventRecord(c->ring[slot], c->copy));
    c->ring_ticket[slot] = t;
    c->next_ticket = t;
    ev->ticket = t;
    return MN_OK;
}

/* A query error counts as done, so no caller polls forever; event_wait reports it. */
static bool cuda_event_done(mn_backend *be, const mn_event *ev) {
    on_device(be);
    cuda_impl *c = be->impl;
    uint64_t t = ev->ticket;
    if (t <= c->done_ticket || t > c->next_ticket) return true;
    int slot = (int)(t % EV_RING);
    cudaError_t e = cudaEventQuery(c->ring[slot]);
    if (e == cudaErrorNotReady) return false;
    if (e == cudaSuccess) c->done_ticket = t;
    return true;
}

static mn_err cuda_event_wait(mn_backend *be, const mn_event *ev, mn_errbuf *eb) {
    on_device(be);
    cuda_impl *c = be->impl;
    uint64_t t = ev->ticket;
    if (t > c->next_ticket) return mn_errf(eb, MN_EINVALID, "event ticket %llu was never recorded", (unsigned long long)t);
    if (t <= c->done_ticket) return MN_OK;
    MN_CUDA_CHECK(eb, cudaEventSynchronize(c->ring[t % EV_RING]));
    c->done_ticket = t;
    return MN_OK;
}

static mn_err cuda_weights_map(mn_backend *be, const void *host, size_t n, void **dev, mn_errbuf *eb) {
    on_device(be);
    cuda_impl *c = be->impl;
    mn_err e = charge(be, n, "weights", eb);
    if (e != MN_OK) return e;
    if (c->n_weights == c->cap_weights) {
        size_t cap = c->cap_weights ? 2 * c->cap_weights : 64;
        void **w = mn_realloc(c->weights, cap * sizeof *w);
        if (!w) return mn_errf(eb, MN_ENOMEM, "cuda weights_map: out of host memory");
        c->weights = w;
        size_t *wb = mn_realloc(c->weight_bytes, cap * sizeof *wb);
        if (!wb) return mn_errf(eb, MN_ENOMEM, "cuda weights_map: out of host memory");
        c->weight_bytes = wb;
        c->cap_weights = cap;
    }
    void *p = NULL;
    MN_CUDA_CHECK(eb, cudaMalloc(&p, n ? n : 256));
    cudaError_t ce = cudaMemcpy(p, host, n, cudaMemcpyHostToDevice);
    if (ce != cudaSuccess) {
        cudaFree(p);
        return mn_errf(eb, MN_EDEVICE, "cuda weights_map: copying %zu bytes: %s", n, cudaGetErrorString(ce));
    }
    c->weights[c->n_weights] = p;
    c->weight_bytes[c->n_weights++] = n;
    be->used[MN_MEM_DEVICE] += n;
    *dev = p;
    return MN_OK;
}

/* Whether to keep bf16 copies of quantized / f16 matrices: MNEME_CUDA_BF16_WEIGHTS=1
 * always (within the budget), 0 never; unset: while the copy leaves at least half of the
 * device's memory free (an 8B model's 16 GB of bf16 fit an H100 beside its KV, not a
 * 24 GB card, which keeps dequantizing per call). */
static bool want_bf16_copy(size_t bytes) {
    const char *env = getenv("MNEME_CUDA_BF16_WEIGHTS");
    if (env && *env) return env[0] != '0';
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) return false;
    return free_b > bytes && free_b - bytes >= total_b / 2;
}

static mn_err cuda_weights_matrix(mn_backend *be, const void *dev, mn_dtype type, int64_t N, int64_t K, int64_t row_bytes,
                                  mn_errbuf *eb) {
    on_device(be);
    cuda_impl *c = be->impl;
    if (type == MN_F32 || N <= 0 || K <= 0 || !mn_dtype_is_weight_type(type)) return MN_OK; /* cuBLAS reads F32 in place */
    bool in_place = type == MN_BF16 && row_bytes == K * 2;
    size_t bytes = (size_t)N * (size_t)K * 2;
    if (!in_place && (!want_bf16_copy(bytes) || charge(be, bytes, "bf16 weights", eb) != MN_OK))
        return MN_OK; /* no room: the per-call dequantization stays */
    if (c->n_mats == c->cap_mats) {
        size_t cap = c->cap_mats ? 2 * c->cap_mats : 64;
        prepared_mat *m = mn_realloc(c->mats, cap * sizeof *m);
        if (!m) return mn_errf(eb, MN_ENOMEM, "cuda weights_matrix: out of host memory");
        c->mats = m;
        c->cap_mats = cap;
    }
    uint16_t *bf = (uint16_t *)dev;
    if (!in_place) {
        MN_CUDA_CHECK(eb, cudaMalloc((void **)&bf, bytes));
        mn_err e = mn_cuda_dequant_bf16(type, dev, N, K, row_bytes, bf, c->compute, eb);
        if (e == MN_OK && cudaStreamSynchronize(c->compute) != cudaSuccess)
            e = mn_errf(eb, MN_EDEVICE, "cuda weights_matrix: dequantizing %lld x %lld failed", (long long)N, (long long)K);
        if (e != MN_OK) {
            cudaFree(bf);
            return e;
        }
        be->used[MN_MEM_DEVICE] += bytes;
    }
    c->mats[c->n_mats++] = (prepared_mat){(const char *)dev, type, N, K, row_bytes, bf, !in_place};
    graphs_flush(c); /* runs over this matrix launch cuBLAS now */
    return MN_OK;
}

/* The prepared bf16 form of d's W (a whole matrix or a view of rows / whole blocks of one,
 * as tensor parallelism makes), *ldw its row pitch; NULL if none. */
static const uint16_t *prepared_bf16(const cuda_impl *c, const mn_matmul_desc *d, int64_t *ldw) {
    const char *w = d->w;
    for (size_t i = 0; i < c->n_mats; i++) {
        const prepared_mat *m = &c->mats[i];
        if (w < m->base || w >= m->base + m->N * m->row_bytes || m->type != d->w_type || m->row_bytes != d->w_row_bytes)
            continue;
        int64_t off = w - m->base, n0 = off / m->row_bytes, col = off % m->row_bytes;
        int64_t bb = mn_dtype_block_bytes(m->type), be = mn_dtype_block_elems(m->type);
        if (col % bb != 0) return NULL;
        int64_t k0 = col / bb * be;
        if (n0 + d->N > m->N || k0 + d->K > m->K) return NULL;
        *ldw = m->K;
        return m->bf16 + n0 * m->K + k0;
    }
    return NULL;
}

/* The bf16 W a matmul of d's size runs on (cuBLAS), or NULL: the GEMV / per-call path. */
static const uint16_t *matmul_bf16(const cuda_impl *c, const mn_matmul_desc *d, int64_t *ldw) {
    /* the int8 tensor-core matmul, when on, takes 9..MN_CUDA_MMQ_MAX_T tokens of its types
     * in place of cuBLAS on the bf16 copy (mn_cuda_matmul runs it) */
    if (d->T > MN_CUDA_GEMV_MAX_T && mn_cuda_matmul_mmq_on() && mn_cuda_matmul_mmq_supports(d)) return NULL;
    return d->T >= c->prepared_min_t && d->w_type != MN_F32 ? prepared_bf16(c, d, ldw) : NULL;
}

static bool cuda_supports_op(mn_backend *be, const mn_op *op) {
    switch (op->kind) {
    case MN_OP_GET_ROWS: {
        const mn_get_rows_desc *d = &op->u.get_rows;
        return mn_dtype_is_weight_type(d->type) && d->D % mn_dtype_block_elems(d->type) == 0;
    }
    case MN_OP_MATMUL: {
        const mn_matmul_desc *d = &op->u.matmul;
        return mn_dtype_is_weight_type(d->w_type) && d->K > 0 && d->K % mn_dtype_block_elems(d->w_type) == 0 &&
               (d->w_type != MN_F32 || d->w_row_bytes % 4 == 0);
    }
    case MN_OP_ATTENTION: {
        const mn_attention_desc *d = &op->u.attention;
        return d->head_dim > 0 && d->head_dim <= MN_CUDA_MAX_HEAD_DIM && d->n_kv_head > 0 &&
               d->n_head % d->n_kv_head == 0;
    }
    case MN_OP_ROPE: return op->u.rope.n_rot <= op->u.rope.head_dim && op->u.rope.n_rot % 2 == 0;
    case MN_OP_RMSNORM: case MN_OP_KV_STORE: case MN_OP_SILU_MUL: case MN_OP_ADD: return true;
    case MN_OP_LORA: return op->u.lora.max_r > 0 && op->u.lora.max_r <= MN_CUDA_LORA_MAX_R;
    case MN_OP_WAIT_COPY: return true;
    case MN_OP_SAMPLE: return op->u.sample.V > 0;
    case MN_OP_COUNT: break;
    }
    return false;
}

static size_t cuda_op_work_bytes(mn_backend *be, const mn_op *op) {
    int64_t ldw;
    if (op->kind == MN_OP_MATMUL && matmul_bf16(be->impl, &op->u.matmul, &ldw))
        return mn_cuda_matmul_prepared_work_bytes(&op->u.matmul);
    if (op->kind == MN_OP_MATMUL) return mn_cuda_matmul_work_bytes(&op->u.matmul);
    if (op->kind == MN_OP_ATTENTION) return mn_cuda_attention_work_bytes(&op->u.attention);
    if (op->kind == MN_OP_LORA) return mn_cuda_lora_work_bytes(&op->u.lora);
    return 0;
}

static mn_err cuda_reserve_work(mn_backend *be, size_t bytes, mn_errbuf *eb) {
    on_device(be);
    cuda_impl *c = be->impl;
    if (bytes <= c->work_size) return MN_OK;
    /* the old area may still be read by enqueued ops; cudaFree waits for the device */
    be->used[MN_MEM_DEVICE] -= c->work_size;
    mn_err e = charge(be, bytes, "scratch", eb);
    if (e != MN_OK) {
        be->used[MN_MEM_DEVICE] += c->work_size;
        return e;
    }
    void *w = NULL;
    cudaError_t ce = cudaMalloc(&w, bytes);
    if (ce != cudaSuccess) {
        be->used[MN_MEM_DEVICE] += c->work_size;
        return mn_errf(eb, MN_ENOMEM, "cuda backend: %zu bytes of scratch: %s", bytes, cudaGetErrorString(ce));
    }
    if (c->work) cudaFree(c->work);
    c->work = w;
    c->work_size = bytes;
    be->used[MN_MEM_DEVICE] += bytes;
    return MN_OK;
}

/* A GEMV matmul; x's activation blocks are quantized only when the previous op did not
 * leave the same ones in work (q, k, v and gate, up read one x). */
static mn_err run_gemv(cuda_impl *c, const mn_matmul_desc *d, mn_errbuf *eb) {
    const int64_t blk = mn_dtype_block_elems(d->w_type);
    const bool same = c->xq.valid && c->xq.x == d->x && c->xq.x_stride == d->x_stride && c->xq.T == d->T &&
                      c->xq.K == d->K && c->xq.block == blk;
    mn_err e = same ? mn_cuda_matmul_gemv_reuse_x(d, c->work, c->work_size, c->compute, eb)
                    : mn_cuda_matmul_gemv(d, c->work, c->work_size, c->compute, eb);
    if (e == MN_OK && blk > 1) {
        c->xq.valid = true;
        c->xq.x = d->x, c->xq.x_stride = d->x_stride, c->xq.T = d->T, c->xq.K = d->K, c->xq.block = blk;
    }
    return e;
}

/* One flat switch: op kind -> kernel launcher (enqueue only). */
/* Whether matmul d runs the fused GEMV (not cuBLAS on a bf16 copy, not the per-call path). */
static bool gemv_path(const cuda_impl *c, const mn_matmul_desc *d) {
    int64_t ldw;
    return d->T > 0 && d->T <= MN_CUDA_GEMV_MAX_T && !matmul_bf16(c, d, &ldw);
}

/* Byte ranges of a matmul's x and y, and whether two ranges meet. */
static void matmul_x_range(const mn_matmul_desc *d, uintptr_t *lo, uintptr_t *hi) {
    *lo = (uintptr_t)d->x;
    *hi = *lo + (uintptr_t)(((d->T - 1) * d->x_stride + d->K) * (int64_t)sizeof(float));
}
static void matmul_y_range(const mn_matmul_desc *d, uintptr_t *lo, uintptr_t *hi) {
    *lo = (uintptr_t)d->y;
    *hi = *lo + (uintptr_t)(((d->T - 1) * d->y_stride + d->N) * (int64_t)sizeof(float));
}
static bool ranges_meet(uintptr_t a0, uintptr_t a1, uintptr_t b0, uintptr_t b1) { return a0 < b1 && b0 < a1; }

/* How many ops from ops[i] run as one multi-GEMV launch (mn_cuda_matmul_gemv_multi): ops[i]
 * and the matmuls right after it on the GEMV path with its x, T, K and activation block
 * size, as long as no output overlaps x or an earlier output (then running them at once
 * is what running them in order does). 1: ops[i] runs alone. */
static int gemv_fuse_length(const cuda_impl *c, const mn_op *ops, int n_ops, int i) {
    if (!c->gemv_fuse || ops[i].kind != MN_OP_MATMUL || !gemv_path(c, &ops[i].u.matmul)) return 1;
    const mn_matmul_desc *a = &ops[i].u.matmul;
    uintptr_t x0, x1, y0[3], y1[3];
    matmul_x_range(a, &x0, &x1);
    matmul_y_range(a, &y0[0], &y1[0]);
    if (ranges_meet(x0, x1, y0[0], y1[0])) return 1;
    int n = 1;
    while (n < 3 && i + n < n_ops && ops[i + n].kind == MN_OP_MATMUL) {
        const mn_matmul_desc *b = &ops[i + n].u.matmul;
        if (!gemv_path(c, b) || b->x != a->x || b->x_stride != a->x_stride || b->T != a->T || b->K != a->K ||
            mn_dtype_block_elems(b->w_type) != mn_dtype_block_elems(a->w_type))
            break;
        matmul_y_range(b, &y0[n], &y1[n]);
        bool clash = ranges_meet(x0, x1, y0[n], y1[n]);
        for (int j = 0; j < n && !clash; j++) clash = ranges_meet(y0[j], y1[j], y0[n], y1[n]);
        if (clash) break;
        n++;
    }
    return n;
}

static mn_err run_op(cuda_impl *c, const mn_op *op, mn_errbuf *eb);

/* Runs ops[i], or ops[i..i+*used) fused (gemv_fuse_length); *used: how many ran. */
static mn_err run_ops_at(cuda_impl *c, const mn_op *ops, int n_ops, int i, int *used, mn_errbuf *eb) {
    const int n = gemv_fuse_length(c, ops, n_ops, i);
    *used = n;
    if (n == 1) return run_op(c, &ops[i], eb);
    mn_matmul_desc d[3];
    for (int j = 0; j < n; j++) d[j] = ops[i + j].u.matmul;
    const int64_t blk = mn_dtype_block_elems(d[0].w_type);
    const bool same = c->xq.valid && c->xq.x == d[0].x && c->xq.x_stride == d[0].x_stride && c->xq.T == d[0].T &&
                      c->xq.K == d[0].K && c->xq.block == blk;
    mn_err e = mn_cuda_matmul_gemv_multi(d, n, c->work, c->work_size, !same, c->compute, eb);
    c->xq.valid = e == MN_OK && blk > 1;
    if (c->xq.valid) c->xq.x = d[0].x, c->xq.x_stride = d[0].x_stride, c->xq.T = d[0].T, c->xq.K = d[0].K, c->xq.block = blk;
    return e;
}

static mn_err run_op(cuda_impl *c, const mn_op *op, mn_errbuf *eb) {
    cudaStream_t s = c->compute;
    const bool was_valid = c->xq.valid;
    c->xq.valid = false; /* any op but a GEMV may overwrite work */
    switch (op->kind) {
    case MN_OP_GET_ROWS: return mn_cuda_get_rows(&op->u.get_rows, s, eb);
    case MN_OP_RMSNORM: return mn_cuda_rmsnorm(&op->u.rmsnorm, s, eb);
    case MN_OP_MATMUL: {
        const mn_matmul_desc *d = &op->u.matmul;
        int64_t ldw;
        const uint16_t *wb = matmul_bf16(c, d, &ldw);
        if (wb) return mn_cuda_matmul_prepared(d, wb, ldw, c->work, c->work_size, c->blas, s, eb);
        if (d->T > 0 && d->T <= MN_CUDA_GEMV_MAX_T) {
            c->xq.valid = was_valid;
            return run_gemv(c, d, eb);
        }
        return mn_cuda_matmul(d, c->work, c->work_size, c->blas, s, eb);
    }
    case MN_OP_ROPE: return mn_cuda_rope(&op->u.rope, s, eb);
    case MN_OP_KV_STORE: return mn_cuda_kv_store(&op->u.kv_store, s, eb);
    case MN_OP_ATTENTION: return mn_cuda_attention(&op->u.attention, c->work, c->work_size, s, eb);
    case MN_OP_SILU_MUL: return mn_cuda_silu_mul(&op->u.silu_mul, s, eb);
    case MN_OP_ADD: return mn_cuda_add(&op->u.add, s, eb);
    case MN_OP_LORA: return mn_cuda_lora(&op->u.lora, c->work, c->work_size, s, eb);
    case MN_OP_WAIT_COPY: return wait_copy(c, op->u.wait_copy.ticket, eb);
    case MN_OP_SAMPLE: return mn_cuda_sample(&op->u.sample, s, eb);
    case MN_OP_COUNT: break;
    }
    return mn_errf(eb, MN_EINVALID, "op kind %d unknown", (int)op->kind);
}

/* Forget every captured graph: what a run launches changed for the same ops (a matrix
 * got its bf16 form, the GEMV / cuBLAS switch moved). */
static void graphs_flush(cuda_impl *c) {
    for (int i = 0; i < GRAPH_SLOTS; i++) c->graphs[i].n = 0; /* the execs stay for cudaGraphExecUpdate */
}

/* Can ops be captured into a graph? */
static bool graph_eligible(const mn_backend *be, const cuda_impl *c, const mn_op *ops, int n_ops) {
    if (!c->graphs_on || be->op_seconds || n_ops < GRAPH_MIN_OPS) return false;
    for (int i = 0; i < n_ops; i++) {
        if (ops[i].kind == MN_OP_WAIT_COPY) return false;
        if (ops[i].kind == MN_OP_MATMUL && ops[i].u.matmul.T > GRAPH_MAX_T) return false;
    }
    return true;
}

/* The key of ops in c->key_scratch: each op zeroed, then its kind and its own descriptor
 * (the union's other bytes stay zero), attention's max_pos replaced by its launch key. */
static bool graph_key(cuda_impl *c, const mn_op *ops, int n_ops) {
    if (n_ops > c->key_cap) {
        mn_op *k = mn_realloc(c->key_scratch, (size_t)n_ops * sizeof *k);
        if (!k) return false;
        c->key_scratch = k;
        c->key_cap = n_ops;
    }
    for (int i = 0; i < n_ops; i++) {
        mn_op *k = &c->key_scratch[i];
        memset(k, 0, sizeof *k);
        k->kind = ops[i].kind;
        switch (ops[i].kind) {
        case MN_OP_GET_ROWS: k->u.get_rows = ops[i].u.get_rows; break;
        case MN_OP_RMSNORM: k->u.rmsnorm = ops[i].u.rmsnorm; break;
        case MN_OP_MATMUL: k->u.matmul = ops[i].u.matmul; break;
        case MN_OP_ROPE: k->u.rope = ops[i].u.rope; break;
        case MN_OP_KV_STORE: k->u.kv_store = ops[i].u.kv_store; break;
        case MN_OP_ATTENTION:
            k->u.attention = ops[i].u.attention;
            k->u.attention.max_pos = mn_cuda_attention_launch_key(&ops[i].u.attention);
            break;
        case MN_OP_SILU_MUL: k->u.silu_mul = ops[i].u.silu_mul; break;
        case MN_OP_ADD: k->u.add = ops[i].u.add; break;
        case MN_OP_LORA: k->u.lora = ops[i].u.lora; break;
        case MN_OP_SAMPLE: k->u.sample = ops[i].u.sample; break;
        default: return false;
        }
    }
    return true;
}

/* Replay the graph of ops, capturing it first when no slot holds its key. Returns false
 * when the run must go the plain way (nothing was enqueued then). */
static bool run_graph(mn_backend *be, cuda_impl *c, const mn_op *ops, int n_ops) {
    if (!graph_key(c, ops, n_ops)) return false;
    const size_t key_bytes = (size_t)n_ops * sizeof(mn_op);
    graph_slot *hit = NULL, *victim = &c->graphs[0];
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        graph_slot *g = &c->graphs[i];
        if (g->exec && g->n == n_ops && g->work == c->work && g->work_size == c->work_size &&
            memcmp(g->key, c->key_scratch, key_bytes) == 0) {
            hit = g;
            break;
        }
        if (!g->exec || g->last_use < victim->last_use) victim = g;
    }
    c->graph_clock++;
    if (hit) {
        if (cudaGraphLaunch(hit->exec, c->compute) != cudaSuccess) {
            cudaGetLastError();
            return false;
        }
        hit->last_use = c->graph_clock;
        c->graph_replays++;
        c->graph_misses = 0;
        return true;
    }
    /* keys that never come back (prefill chunks, changing batches): stop paying for
     * captures, try again now and then */
    if (c->graph_misses >= 3 && c->graph_clock % 64 != 0) return false;
    if (n_ops > victim->cap) {
        mn_op *k = mn_realloc(victim->key, key_bytes);
        if (!k) return false;
        victim->key = k;
        victim->cap = n_ops;
    }
    cudaGraph_t graph = NULL;
    if (cudaStreamBeginCapture(c->compute, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    mn_errbuf ignore;
    mn_err e = MN_OK;
    for (int i = 0, used = 1; i < n_ops && e == MN_OK; i += used) e = run_ops_at(c, ops, n_ops, i, &used, &ignore);
    cudaError_t ce = cudaStreamEndCapture(c->compute, &graph);
    if (e != MN_OK || ce != cudaSuccess || !graph) {
        /* an op that cannot be captured: no graphs on this backend from now on */
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError();
        c->graphs_on = false;
        return false;
    }
    bool ok = false;
    if (victim->exec) {
        cudaGraphExecUpdateResultInfo info;
        ok = cudaGraphExecUpdate(victim->exec, graph, &info) == cudaSuccess;
        if (!ok) {
            cudaGetLastError();
            cudaGraphExecDestroy(victim->exec);
            victim->exec = NULL;
        }
    }
    if (!ok && cudaGraphInstantiate(&victim->exec, graph, 0) != cudaSuccess) {
        cudaGetLastError();
        victim->exec = NULL;
    }
    cudaGraphDestroy(graph);
    if (!victim->exec) return false;
    memcpy(victim->key, c->key_scratch, key_bytes);
    victim->n = n_ops;
    victim->work = c->work;
    victim->work_size = c->work_size;
    victim->last_use = c->graph_clock;
    c->graph_captures++;
    c->graph_misses++;
    if (cudaGraphLaunch(victim->exec, c->compute) != cudaSuccess) {
        cudaGetLastError();
        victim->n = 0; /* never matched again */
        return false;
    }
    return true;
}

/* Profiled run: each op's device time, from events recorded between the ops. The host
 * first queues a spin kernel (PROFILE_GATE_NS) and then every op behind it, so the ops run
 * back to back once it ends, as in a graph, and a launch's host cost does not count as the
 * op's time (syncing after each op, as this did until 2026-11-30, added ~10 us to each). */
enum { PROFILE_GATE_NS = 50 * 1000 * 1000 };
static mn_err run_profiled(mn_backend *be, cuda_impl *c, const mn_op *ops, int n_ops, mn_errbuf *eb) {
    cudaEvent_t *ev = mn_calloc((size_t)n_ops + 1, sizeof *ev);
    if (!ev) return mn_errf(eb, MN_ENOMEM, "cuda profile: %d events", n_ops + 1);
    mn_err e = MN_OK;
    int made = 0;
    for (; made <= n_ops; made++)
        if (cudaEventCreate(&ev[made]) != cudaSuccess) {
            e = mn_errf(eb, MN_EDEVICE, "cuda profile: cudaEventCreate failed");
            goto done;
        }
    if ((e = mn_cuda_spin(PROFILE_GATE_NS, c->compute, eb)) != MN_OK) goto done;
    /* ev[i + 1] ends the launch that ran ops[i] (fused matmuls: the first of them gets the
     * time, all of them count as calls; the others' events stay unrecorded) */
    cudaEventRecord(ev[0], c->compute);
    int last = 0;
    for (int i = 0, used = 1; i < n_ops && e == MN_OK; i += used) {
        e = run_ops_at(c, ops, n_ops, i, &used, eb);
        cudaEventRecord(ev[i + 1], c->compute);
        last = i + 1;
    }
    if (e != MN_OK) goto done;
    if (cudaEventSynchronize(ev[last]) != cudaSuccess) {
        e = mn_errf(eb, MN_EDEVICE, "cuda profile: %s", cudaGetErrorString(cudaGetLastError()));
        goto done;
    }
    for (int i = 0, prev = 0, used = 1; i < n_ops; i += used) {
        used = gemv_fuse_length(c, ops, n_ops, i);
        float ms = 0;
        cudaEventElapsedTime(&ms, ev[prev], ev[i + 1]);
        prev = i + 1;
        be->op_seconds[ops[i].kind] += ms * 1e-3;
        if (be->op_calls) be->op_calls[ops[i].kind] += used;
    }
done:
    for (int i = 0; i < made; i++) cudaEventDestroy(ev[i]);
    mn_free(ev);
    return e;
}

static mn_err cuda_run(mn_backend *be, const mn_op *ops, int n_ops, mn_errbuf *eb) {
    on_device(be);
    cuda_impl *c = be->impl;
    for (int i = 0; i < n_ops; i++) {
        if (!cuda_supports_op(be, &ops[i]))
            return mn_errf(eb, MN_EUNSUPPORTED, "op %d (%s): not supported by the cuda backend", i,
                           mn_op_name(ops[i].kind));
        if (cuda_op_work_bytes(be, &ops[i]) > c->work_size)
            return mn_errf(eb, MN_EINVALID, "op %d (%s): scratch not reserved (call mn_backend_reserve)", i,
                           mn_op_name(ops[i].kind));
    }
    c->xq.valid = false; /* work may have been rewritten since the last run */
    if (graph_eligible(be, c, ops, n_ops) && run_graph(be, c, ops, n_ops)) return MN_OK;
    c->xq.valid = false;
    if (be->op_seconds) return run_profiled(be, c, ops, n_ops, eb);
    for (int i = 0, used = 1; i < n_ops; i += used) {
        mn_err e = run_ops_at(c, ops, n_ops, i, &used, eb);
        if (e != MN_OK) return e;
    }
    return MN_OK;
}

static mn_err cuda_synchronize(mn_backend *be, mn_errbuf *eb) {
    on_device(be);
    cuda_impl *c = be->impl;
    MN_CUDA_CHECK(eb, cudaStreamSynchronize(c->compute));
    MN_CUDA_CHECK(eb, cudaStreamSynchronize(c->copy));
    return MN_OK;
}

static const mn_backend_iface cuda_iface = {
    .name = "cuda",
    .destroy = cuda_destroy,
    .mem_alloc = cuda_mem_alloc,
    .mem_free = cuda_mem_free,
    .copy_async = cuda_copy_async,
    .copy_2d_async = cuda_copy_2d_async,
    .copy_compute_async = cuda_copy_compute_async,
    .event_record = cuda_event_record,
    .event_done = cuda_event_done,
    .event_wait = cuda_event_wait,
    .weights_map = cuda_weights_map,
    .weights_matrix = cuda_weights_matrix,
    .supports_op = cuda_supports_op,
    .op_work_bytes = cuda_op_work_bytes,
    .reserve_work = cuda_reserve_work,
    .run = cuda_run,
    .synchronize = cuda_synchronize,
};

/* Streams, events and the cuBLAS handle of a fresh impl. */
static mn_err impl_init(cuda_impl *c, mn_errbuf *eb) {
    MN_CUDA_CHECK(eb, cudaSetDevice(c->device));
    MN_CUDA_CHECK(eb, cudaStreamCreateWithFlags(&c->compute, cudaStreamNonBlocking));
    MN_CUDA_CHECK(eb, cudaStreamCreateWithFlags(&c->copy, cudaStreamNonBlocking));
    MN_CUDA_CHECK(eb, cudaEventCreateWithFlags(&c->compute_mark, cudaEventDisableTiming));
    for (int i = 0; i < EV_RING; i++) MN_CUDA_CHECK(eb, cudaEventCreateWithFlags(&c->ring[i], cudaEventDisableTiming));
    MN_CUBLAS_CHECK(eb, cublasCreate(&c->blas));
    MN_CUBLAS_CHECK(eb, cublasSetStream(c->blas, c->compute));
    /* a workspace of our own: cuBLAS must not allocate while a CUDA graph is captured */
    MN_CUDA_CHECK(eb, cudaMalloc(&c->blas_ws, BLAS_WS_BYTES));
    MN_CUBLAS_CHECK(eb, cublasSetWorkspace(c->blas, c->blas_ws, BLAS_WS_BYTES));
    /* f32 GEMMs stay f32: no TF32 tensor-op shortcut */
    MN_CUBLAS_CHECK(eb, cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH));
    return MN_OK;
}

void mn_backend_cuda_graph_stats(const mn_backend *be, uint64_t *captures, uint64_t *replays) {
    const cuda_impl *c = be->impl;
    *captures = c->graph_captures;
    *replays = c->graph_replays;
}

void mn_backend_cuda_set_graphs(mn_backend *be, bool on) { ((cuda_impl *)be->impl)->graphs_on = on; }

void mn_backend_cuda_set_mmq(mn_backend *be, bool on) {
    if (mn_cuda_matmul_mmq_on() != on) graphs_flush(be->impl); /* captured graphs hold the other path */
    mn_cuda_matmul_mmq_enable(on);
}

void mn_backend_cuda_set_gemv_fuse(mn_backend *be, bool on) {
    cuda_impl *c = be->impl;
    if (c->gemv_fuse != on) graphs_flush(c); /* captured graphs hold the other launches */
    c->gemv_fuse = on;
}

void mn_backend_cuda_set_prepared_min_t(mn_backend *be, int64_t t) {
    cuda_impl *c = be->impl;
    c->prepared_min_t = t < 1 ? 1 : t;
    graphs_flush(c);
}

void *mn_backend_cuda_stream(mn_backend *be) { return ((cuda_impl *)be->impl)->compute; }
int mn_backend_cuda_device(const mn_backend *be) { return ((const cuda_impl *)be->impl)->device; }

mn_err mn_backend_cuda_new(const mn_backend_params *p, mn_backend **out, mn_errbuf *eb) {
    int count = 0;
    cudaError_t ce = cudaGetDeviceCount(&count);
    if (ce != cudaSuccess)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda backend: no usable CUDA device: %s (%s)", cudaGetErrorString(ce),
                       cudaGetErrorName(ce));
    if (count == 0) return mn_errf(eb, MN_EUNSUPPORTED, "cuda backend: no CUDA device found");
    if (p->device_index < 0 || p->device_index >= count)
        return mn_errf(eb, MN_ERANGE, "cuda backend: device index %d, but %d device%s found", p->device_index, count,
                       count == 1 ? "" : "s");
    mn_backend *be = mn_calloc(1, sizeof *be);
    cuda_impl *c = mn_calloc(1, sizeof *c);
    if (!be || !c) {
        mn_free(be);
        mn_free(c);
        return mn_errf(eb, MN_ENOMEM, "cuda backend: out of host memory");
    }
    c->device = p->device_index;
    const char *gr = getenv("MNEME_CUDA_GRAPHS");
    c->graphs_on = !(gr && !strcmp(gr, "0"));
    /* off by default until a GPU run has checked and timed it (written 2026-11-30 after the
     * session's device time was spent): $MNEME_CUDA_GEMV_FUSE=1 turns it on */
    const char *fu = getenv("MNEME_CUDA_GEMV_FUSE");
    c->gemv_fuse = fu && !strcmp(fu, "1");
    const char *pmt = getenv("MNEME_CUDA_PREPARED_MIN_T");
    /* measured on an H200 (bench_gpu's crossover table, Q4_0 14336 x 4096): the GEMV
     * 52.3 us at T = 4, cuBLAS on the bf16 copy 52.1; at T = 5 65.2 against 52.0 */
    c->prepared_min_t = pmt && *pmt ? strtoll(pmt, NULL, 10) : MN_CUDA_PREPARED_MIN_T;
    if (c->prepared_min_t < 1) c->prepared_min_t = 1;
    const char *cap = getenv("MNEME_CUDA_PINNED_CACHE");
    c->pinned_cap = cap && *cap ? (size_t)strtoull(cap, NULL, 10) : PINNED_CACHE_DEFAULT;
    mn_err e = impl_init(c, eb);
    if (e != MN_OK) {
        impl_release(NULL, c);
        mn_free(be);
        return e;
    }
    be->iface = &cuda_iface;
    be->impl = c;
    be->n_threads = 1;
    be->budget[MN_MEM_DEVICE] = p->device_budget;
    be->budget[MN_MEM_HOST_PINNED] = p->pinned_budget;
    *out = be;
    return MN_OK;
}
