/* engine/backend_cpu.c — the CPU backend: host memory, a thread pool, kernels/cpu.
 *
 * Device memory is ordinary host memory (64-byte aligned); weights are used in place
 * from the mmapped model file (zero copy).
 *
 * The copy queue is asynchronous, as on a GPU: a copy thread runs the copies in order,
 * and an event is the number of copies enqueued before it. So a restore's copies of
 * layer l+1.. go on while the pool computes layer l (the copy thread is the core a
 * 1-thread engine leaves idle), and a caller that forgets to wait for a copy reads
 * stale bytes here too, not only on the GPU. A small copy with nothing queued runs at
 * once on the caller's thread (same order, no hand-off cost). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/backend.h"
#include "engine/threadpool.h"

enum { INLINE_COPY_BYTES = 256 << 10 };

typedef struct cpu_copy {
    char *dst;
    const char *src;
    size_t dpitch, spitch, width, height;
} cpu_copy;

/* FIFO of copies and the thread that runs them. enqueued / completed count copies;
 * ticket n is done when completed >= n. */
typedef struct copy_queue {
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    pthread_t thread;
    bool started, stop;
    cpu_copy *q;
    size_t cap, head, tail;  /* q[head, tail) waiting; the running copy is already taken */
    uint64_t enqueued, completed;
    unsigned slow_usec;      /* mn_backend_cpu_slow_copies */
    uint64_t waits_blocked;
} copy_queue;

typedef struct cpu_impl {
    mn_threadpool *pool;
    void *work;
    size_t work_size;
    copy_queue cq;
    /* the op list of the current run, read by every pool thread */
    const mn_op *ops;
    int n_ops;
    double *op_seconds;   /* copied from the backend for the duration of a run */
    int64_t *op_calls;
    bool lora_prefetch;   /* matmuls prefetch the head of the next LoRA op's weights (MNEME_LORA_PREFETCH=0: off, to measure) */
} cpu_impl;

static void run_copy(const cpu_copy *c) {
    if (c->dpitch == c->width && c->spitch == c->width) {
        memmove(c->dst, c->src, c->width * c->height);
        return;
    }
    for (size_t r = 0; r < c->height; r++) memmove(c->dst + r * c->dpitch, c->src + r * c->spitch, c->width);
}

static void *copy_thread(void *arg) {
    copy_queue *cq = arg;
    pthread_mutex_lock(&cq->mu);
    for (;;) {
        while (cq->head == cq->tail && !cq->stop) pthread_cond_wait(&cq->work, &cq->mu);
        if (cq->head == cq->tail) break; /* stop, and nothing left */
        cpu_copy c = cq->q[cq->head++];
        if (cq->head == cq->tail) cq->head = cq->tail = 0;
        unsigned slow = cq->slow_usec;
        pthread_mutex_unlock(&cq->mu);
        if (slow) usleep(slow);
        run_copy(&c);
        pthread_mutex_lock(&cq->mu);
        cq->completed++;
        pthread_cond_broadcast(&cq->done);
    }
    pthread_mutex_unlock(&cq->mu);
    return NULL;
}

static void wait_ticket(copy_queue *cq, uint64_t ticket) {
    pthread_mutex_lock(&cq->mu);
    while (cq->completed < ticket) pthread_cond_wait(&cq->done, &cq->mu);
    pthread_mutex_unlock(&cq->mu);
}

/* MN_OP_WAIT_COPY on the pool's thread 0 */
static void wait_op(copy_queue *cq, uint64_t ticket) {
    pthread_mutex_lock(&cq->mu);
    if (cq->completed < ticket) cq->waits_blocked++;
    while (cq->completed < ticket) pthread_cond_wait(&cq->done, &cq->mu);
    pthread_mutex_unlock(&cq->mu);
}

static mn_err enqueue(copy_queue *cq, const cpu_copy *c, mn_errbuf *eb) {
    if (!c->width || !c->height) return MN_OK;
    pthread_mutex_lock(&cq->mu);
    if (cq->completed == cq->enqueued && c->width * c->height <= INLINE_COPY_BYTES && !cq->slow_usec) {
        /* nothing ahead of it: run it here, in order by construction */
        cq->enqueued++;
        pthread_mutex_unlock(&cq->mu);
        run_copy(c);
        pthread_mutex_lock(&cq->mu);
        cq->completed++;
        pthread_cond_broadcast(&cq->done);
        pthread_mutex_unlock(&cq->mu);
        return MN_OK;
    }
    mn_err e = MN_OK;
    if (!cq->started) {
        if (pthread_create(&cq->thread, NULL, copy_thread, cq) != 0)
            e = mn_errf(eb, MN_ENOMEM, "cpu backend: cannot start the copy thread");
        else
            cq->started = true;
    }
    if (e == MN_OK && cq->tail == cq->cap) {
        size_t cap = cq->cap ? cq->cap * 2 : 64;
        cpu_copy *q = mn_realloc(cq->q, cap * sizeof *q);
        if (!q) e = mn_errf(eb, MN_ENOMEM, "cpu backend: copy queue out of memory");
        else {
            cq->q = q;
            cq->cap = cap;
        }
    }
    if (e == MN_OK) {
        cq->q[cq->tail++] = *c;
        cq->enqueued++;
        pthread_cond_signal(&cq->work);
    }
    pthread_mutex_unlock(&cq->mu);
    return e;
}

static void copy_queue_init(copy_queue *cq) {
    pthread_mutex_init(&cq->mu, NULL);
    pthread_cond_init(&cq->work, NULL);
    pthread_cond_init(&cq->done, NULL);
}

/* Runs what is queued, then stops the thread. */
static void copy_queue_free(copy_queue *cq) {
    if (cq->started) {
        pthread_mutex_lock(&cq->mu);
        cq->stop = true;
        pthread_cond_signal(&cq->work);
        pthread_mutex_unlock(&cq->mu);
        pthread_join(cq->thread, NULL);
    }
    mn_free(cq->q);
    pthread_mutex_destroy(&cq->mu);
    pthread_cond_destroy(&cq->work);
    pthread_cond_destroy(&cq->done);
}

static void drain(copy_queue *cq) {
    pthread_mutex_lock(&cq->mu);
    uint64_t all = cq->enqueued;
    pthread_mutex_unlock(&cq->mu);
    wait_ticket(cq, all);
}

static void cpu_destroy(mn_backend *be) {
    cpu_impl *c = be->impl;
    copy_queue_free(&c->cq);
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

/* Like cudaFree, freeing waits for the queued copies (one may still touch the memory). */
static void cpu_mem_free(mn_backend *be, mn_mem_kind kind, void *ptr, size_t size) {
    drain(&((cpu_impl *)be->impl)->cq);
    mn_free(ptr);
}

static mn_err cpu_copy_async(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n, mn_errbuf *eb) {
    cpu_copy c = {dst, src, n, n, n, 1};
    return enqueue(&((cpu_impl *)be->impl)->cq, &c, eb);
}

static mn_err cpu_copy_2d_async(mn_backend *be, mn_copy_dir dir, void *dst, size_t dpitch, const void *src, size_t spitch,
                                size_t width, size_t height, mn_errbuf *eb) {
    cpu_copy c = {dst, src, dpitch, spitch, width, height};
    return enqueue(&((cpu_impl *)be->impl)->cq, &c, eb);
}

/* Compute has finished whenever the engine thread runs (cpu_run returns when done). */
static mn_err cpu_copy_compute_async(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n, mn_errbuf *eb) {
    if (n) memmove(dst, src, n);
    return MN_OK;
}

static mn_err cpu_event_record(mn_backend *be, mn_event *ev, mn_errbuf *eb) {
    copy_queue *cq = &((cpu_impl *)be->impl)->cq;
    pthread_mutex_lock(&cq->mu);
    ev->ticket = cq->enqueued;
    pthread_mutex_unlock(&cq->mu);
    return MN_OK;
}

static bool cpu_event_done(mn_backend *be, const mn_event *ev) {
    copy_queue *cq = &((cpu_impl *)be->impl)->cq;
    pthread_mutex_lock(&cq->mu);
    bool done = cq->completed >= ev->ticket;
    pthread_mutex_unlock(&cq->mu);
    return done;
}

static mn_err cpu_event_wait(mn_backend *be, const mn_event *ev, mn_errbuf *eb) {
    copy_queue *cq = &((cpu_impl *)be->impl)->cq;
    pthread_mutex_lock(&cq->mu);
    uint64_t enq = cq->enqueued;
    pthread_mutex_unlock(&cq->mu);
    if (ev->ticket > enq)
        return mn_errf(eb, MN_EINVALID, "event ticket %llu was never recorded", (unsigned long long)ev->ticket);
    wait_ticket(cq, ev->ticket);
    return MN_OK;
}

void mn_backend_cpu_slow_copies(mn_backend *be, unsigned usec) {
    copy_queue *cq = &((cpu_impl *)be->impl)->cq;
    pthread_mutex_lock(&cq->mu);
    cq->slow_usec = usec;
    pthread_mutex_unlock(&cq->mu);
}

void mn_backend_cpu_copy_stats(mn_backend *be, uint64_t *copies, uint64_t *waits_blocked) {
    copy_queue *cq = &((cpu_impl *)be->impl)->cq;
    pthread_mutex_lock(&cq->mu);
    *copies = cq->enqueued;
    *waits_blocked = cq->waits_blocked;
    pthread_mutex_unlock(&cq->mu);
}

static mn_err cpu_weights_map(mn_backend *be, const void *host, size_t n, void **dev, mn_errbuf *eb) {
    *dev = (void *)host;
    return MN_OK;
}

static bool cpu_supports_op(mn_backend *be, const mn_op *op) { return (unsigned)op->kind < MN_OP_COUNT; }

static size_t cpu_op_work_bytes(mn_backend *be, const mn_op *op) {
    if (op->kind == MN_OP_MATMUL) return mn_cpu_matmul_work_bytes(&op->u.matmul, be->n_threads);
    if (op->kind == MN_OP_LORA) return mn_cpu_lora_work_bytes(&op->u.lora);
    if (op->kind == MN_OP_SAMPLE) return mn_cpu_sample_work_bytes(&op->u.sample, be->n_threads);
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
    case MN_OP_SAMPLE: mn_cpu_sample(&op->u.sample, work, par); break;
    case MN_OP_WAIT_COPY: case MN_OP_COUNT: break; /* the wait is run_task's */
    }
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The LoRA op that ops[i], a matmul, is the part [*f0, *f1) of: the next op after a run of
 * matmuls (the q/k/v or gate/up of a layer, or one linear), each matmul's part in
 * proportion to its output rows; NULL if the run ends in anything else. */
static const mn_lora_desc *lora_after(const mn_op *ops, int n_ops, int i, double *f0, double *f1) {
    int first = i, end = i;
    while (first > 0 && ops[first - 1].kind == MN_OP_MATMUL) first--;
    while (end < n_ops && ops[end].kind == MN_OP_MATMUL) end++;
    if (end == n_ops || ops[end].kind != MN_OP_LORA) return NULL;
    int64_t before = 0, total = 0;
    for (int j = first; j < end; j++) {
        if (j < i) before += ops[j].u.matmul.N;
        total += ops[j].u.matmul.N;
    }
    *f0 = (double)before / (double)total;
    *f1 = (double)(before + ops[i].u.matmul.N) / (double)total;
    return &ops[end].u.lora;
}

static void run_task(void *arg, const mn_par *par) {
    cpu_impl *c = arg;
    double *prof = par->ith == 0 ? c->op_seconds : NULL;
    double t = prof ? now_s() : 0;
    for (int i = 0; i < c->n_ops; i++) {
        if (c->ops[i].kind == MN_OP_WAIT_COPY) {
            if (par->ith == 0) wait_op(&c->cq, c->ops[i].u.wait_copy.ticket); /* the others wait at the barrier */
        } else if (c->ops[i].kind == MN_OP_MATMUL && c->lora_prefetch) {
            double f0 = 0, f1 = 0;
            const mn_lora_desc *next = lora_after(c->ops, c->n_ops, i, &f0, &f1);
            mn_cpu_matmul_prefetch_lora(&c->ops[i].u.matmul, next, f0, f1, c->work, par);
        } else {
            run_op(&c->ops[i], c->work, par);
        }
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

static mn_err cpu_synchronize(mn_backend *be, mn_errbuf *eb) {
    drain(&((cpu_impl *)be->impl)->cq);
    return MN_OK;
}

static const mn_backend_iface cpu_iface = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .mem_alloc = cpu_mem_alloc,
    .mem_free = cpu_mem_free,
    .copy_async = cpu_copy_async,
    .copy_2d_async = cpu_copy_2d_async,
    .copy_compute_async = cpu_copy_compute_async,
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
    copy_queue_init(&c->cq);
    const char *pf = getenv("MNEME_LORA_PREFETCH");
    c->lora_prefetch = !(pf && strcmp(pf, "0") == 0);
    mn_err e = mn_threadpool_new(n, &c->pool, eb);
    if (e != MN_OK) {
        copy_queue_free(&c->cq);
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
