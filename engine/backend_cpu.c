/* engine/backend_cpu.c — the CPU backend: host memory, a thread pool, kernels/cpu.
 *
 * Device memory is ordinary host memory (64-byte aligned); weights are used in place
 * from the mmapped model file (zero copy). The copy queue executes copies at enqueue
 * time, so every event is complete when recorded; this keeps the contract (copies are
 * ordered, events say when they are done) that the CUDA backend fulfils asynchronously. */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/backend.h"
#include "engine/threadpool.h"

typedef struct cpu_impl {
    mn_threadpool *pool;
    void *work;
    size_t work_size;
    uint64_t tickets;
    /* the op list of the current run, read by every pool thread */
    const mn_op *ops;
    int n_ops;
    double *op_seconds;   /* copied from the backend for the duration of a run */
    int64_t *op_calls;
} cpu_impl;

static void cpu_destroy(mn_backend *be) {
    cpu_impl *c = be->impl;
    mn_threadpool_free(c->pool);
    mn_free(c->work);
    mn_free(c);
    mn_free(be);
}

static mn_err cpu_mem_alloc(mn_backend *be, mn_mem_kind kind, size_t size, void **ptr, mn_errbuf *eb) {
    size_t rounded = (size + 63) & ~(size_t)63;
    void *p = mn_aligned_alloc(64, rounded ? rounded : 64);
    if (!p) return mn_errf(eb, MN_ENOMEM, "cpu backend: cannot allocate %zu bytes", size);
    *ptr = p;
    return MN_OK;
}

static void cpu_mem_free(mn_backend *be, mn_mem_kind kind, void *ptr, size_t size) { mn_free(ptr); }

static mn_err cpu_copy_async(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n, mn_errbuf *eb) {
    if (n) memmove(dst, src, n);
    return MN_OK;
}

static mn_err cpu_copy_2d_async(mn_backend *be, mn_copy_dir dir, void *dst, size_t dpitch, const void *src, size_t spitch,
                                size_t width, size_t height, mn_errbuf *eb) {
    if (dpitch == width && spitch == width) {
        memmove(dst, src, width * height);
        return MN_OK;
    }
    for (size_t r = 0; r < height; r++) memmove((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
    return MN_OK;
}

static mn_err cpu_event_record(mn_backend *be, mn_event *ev, mn_errbuf *eb) {
    cpu_impl *c = be->impl;
    ev->ticket = ++c->tickets;
    return MN_OK;
}

static bool cpu_event_done(mn_backend *be, const mn_event *ev) { return true; }
static mn_err cpu_event_wait(mn_backend *be, const mn_event *ev, mn_errbuf *eb) { return MN_OK; }

static mn_err cpu_weights_map(mn_backend *be, const void *host, size_t n, void **dev, mn_errbuf *eb) {
    *dev = (void *)host;
    return MN_OK;
}

static bool cpu_supports_op(mn_backend *be, const mn_op *op) { return (unsigned)op->kind < MN_OP_COUNT; }

static size_t cpu_op_work_bytes(mn_backend *be, const mn_op *op) {
    if (op->kind == MN_OP_MATMUL) return mn_cpu_matmul_work_bytes(&op->u.matmul, be->n_threads);
    if (op->kind == MN_OP_LORA) return mn_cpu_lora_work_bytes(&op->u.lora);
    if (op->kind == MN_OP_ATTENTION) return mn_cpu_attention_work_bytes(&op->u.attention, be->n_threads);
    return 0;
}

static mn_err cpu_reserve_work(mn_backend *be, size_t bytes, mn_errbuf *eb) {
    cpu_impl *c = be->impl;
    if (bytes <= c->work_size) return MN_OK;
    void *w = mn_aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!w) return mn_errf(eb, MN_ENOMEM, "cpu backend: cannot allocate %zu bytes of scratch", bytes);
    mn_free(c->work);
    c->work = w;
    c->work_size = bytes;
    return MN_OK;
}

/* One flat switch: op kind -> kernel. */
static void run_op(const mn_op *op, void *work, const mn_par *par) {
    switch (op->kind) {
    case MN_OP_GET_ROWS: mn_cpu_get_rows(&op->u.get_rows, work, par); break;
    case MN_OP_RMSNORM: mn_cpu_rmsnorm(&op->u.rmsnorm, work, par); break;
    case MN_OP_MATMUL: mn_cpu_matmul(&op->u.matmul, work, par); break;
    case MN_OP_ROPE: mn_cpu_rope(&op->u.rope, work, par); break;
    case MN_OP_KV_STORE: mn_cpu_kv_store(&op->u.kv_store, work, par); break;
    case MN_OP_ATTENTION: mn_cpu_attention(&op->u.attention, work, par); break;
    case MN_OP_SILU_MUL: mn_cpu_silu_mul(&op->u.silu_mul, work, par); break;
    case MN_OP_ADD: mn_cpu_add(&op->u.add, work, par); break;
    case MN_OP_LORA: mn_cpu_lora(&op->u.lora, work, par); break;
    case MN_OP_COUNT: break;
    }
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void run_task(void *arg, const mn_par *par) {
    cpu_impl *c = arg;
    double *prof = par->ith == 0 ? c->op_seconds : NULL;
    double t = prof ? now_s() : 0;
    for (int i = 0; i < c->n_ops; i++) {
        run_op(&c->ops[i], c->work, par);
        mn_par_barrier(par);
        if (prof) {
            double t2 = now_s();
            prof[c->ops[i].kind] += t2 - t;
            c->op_calls[c->ops[i].kind]++;
            t = t2;
        }
    }
}

static mn_err cpu_run(mn_backend *be, const mn_op *ops, int n_ops, mn_errbuf *eb) {
    cpu_impl *c = be->impl;
    for (int i = 0; i < n_ops; i++) {
        if (cpu_op_work_bytes(be, &ops[i]) > c->work_size)
            return mn_errf(eb, MN_EINVALID, "op %d (%s): scratch not reserved (call mn_backend_reserve)", i,
                           mn_op_name(ops[i].kind));
    }
    c->ops = ops;
    c->n_ops = n_ops;
    c->op_seconds = be->op_seconds;
    c->op_calls = be->op_calls;
    mn_threadpool_run(c->pool, run_task, c);
    c->ops = NULL;
    c->n_ops = 0;
    return MN_OK;
}

static mn_err cpu_synchronize(mn_backend *be, mn_errbuf *eb) { return MN_OK; }

static const mn_backend_iface cpu_iface = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .mem_alloc = cpu_mem_alloc,
    .mem_free = cpu_mem_free,
    .copy_async = cpu_copy_async,
    .copy_2d_async = cpu_copy_2d_async,
    .event_record = cpu_event_record,
    .event_done = cpu_event_done,
    .event_wait = cpu_event_wait,
    .weights_map = cpu_weights_map,
    .supports_op = cpu_supports_op,
    .op_work_bytes = cpu_op_work_bytes,
    .reserve_work = cpu_reserve_work,
    .run = cpu_run,
    .synchronize = cpu_synchronize,
};

mn_err mn_backend_cpu_new(const mn_backend_params *p, mn_backend **out, mn_errbuf *eb) {
    mn_cpu_init();
    int n = p->n_threads;
    if (n <= 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        n = cores > 0 ? (int)cores : 1;
    }
    mn_backend *be = mn_calloc(1, sizeof *be);
    cpu_impl *c = mn_calloc(1, sizeof *c);
    if (!be || !c) {
        mn_free(be);
        mn_free(c);
        return mn_errf(eb, MN_ENOMEM, "cpu backend: out of memory");
    }
    mn_err e = mn_threadpool_new(n, &c->pool, eb);
    if (e != MN_OK) {
        mn_free(be);
        mn_free(c);
        return e;
    }
    be->iface = &cpu_iface;
    be->impl = c;
    be->n_threads = n;
    be->budget[MN_MEM_DEVICE] = p->device_budget;
    be->budget[MN_MEM_HOST_PINNED] = p->pinned_budget;
    *out = be;
    return MN_OK;
}
