/* engine/backend.c — the backend-independent layer: budgets, argument checks, dispatch
 * to the vtable. */
#include "engine/backend.h"

#include <stdio.h>
#include <string.h>

#include "engine/alloc.h"
#ifdef MNEME_HAVE_CUDA
#include "engine/cuda/backend_cuda.h"
#endif

static const char *const op_names[MN_OP_COUNT] = {
    "get_rows", "rmsnorm", "matmul", "rope", "kv_store", "attention", "silu_mul", "add", "lora", "wait_copy", "sample",
};

const char *mn_op_name(mn_op_kind k) { return (unsigned)k < MN_OP_COUNT ? op_names[k] : "?"; }

mn_err mn_backend_new(const mn_backend_params *p, mn_backend **out, bool *fell_back, mn_errbuf *eb) {
    const char *dev = p->device ? p->device : "auto";
    if (fell_back) *fell_back = false;
    if (strcmp(dev, "cpu") == 0) return mn_backend_cpu_new(p, out, eb);
    if (strcmp(dev, "cuda") == 0) {
#ifdef MNEME_HAVE_CUDA
        return mn_backend_cuda_new(p, out, eb);
#else
        return mn_errf(eb, MN_EUNSUPPORTED, "--device cuda: this build has no CUDA backend (nvcc was not found at build time)");
#endif
    }
    if (strcmp(dev, "auto") == 0) {
        char why[600] = "this build has no CUDA backend";
#ifdef MNEME_HAVE_CUDA
        mn_errbuf ceb = {{0}};
        if (mn_backend_cuda_new(p, out, &ceb) == MN_OK) return MN_OK;
        snprintf(why, sizeof why, "%s", ceb.msg);
#endif
        if (fell_back) *fell_back = true;
        mn_err e = mn_backend_cpu_new(p, out, eb);
        if (e == MN_OK) mn_errf(eb, MN_OK, "%s: using the CPU backend", why);
        return e;
    }
    return mn_errf(eb, MN_EINVALID, "device must be cpu, cuda or auto, got '%s'", dev);
}

void mn_backend_free(mn_backend *be) {
    if (be) be->iface->destroy(be);
}

const char *mn_backend_name(const mn_backend *be) { return be->iface->name; }

mn_err mn_buffer_alloc(mn_backend *be, mn_mem_kind kind, size_t size, mn_buffer **out, mn_errbuf *eb) {
    if ((unsigned)kind > MN_MEM_HOST_PINNED) return mn_errf(eb, MN_EINVALID, "buffer kind %d unknown", (int)kind);
    size_t budget = be->budget[kind];
    if (budget && (size > budget || be->used[kind] > budget - size))
        return mn_errf(eb, MN_ELIMIT, "%s budget: %zu bytes asked, %zu of %zu in use",
                       kind == MN_MEM_DEVICE ? "device" : "pinned host", size, be->used[kind], budget);
    mn_buffer *b = mn_malloc(sizeof *b);
    if (!b) return mn_errf(eb, MN_ENOMEM, "buffer: out of host memory");
    void *ptr = NULL;
    mn_err e = be->iface->mem_alloc(be, kind, size, &ptr, eb);
    if (e != MN_OK) {
        mn_free(b);
        return e;
    }
    *b = (mn_buffer){be, kind, ptr, size};
    be->used[kind] += size;
    *out = b;
    return MN_OK;
}

void mn_buffer_free(mn_buffer *b) {
    if (!b) return;
    b->backend->iface->mem_free(b->backend, b->kind, b->ptr, b->size);
    b->backend->used[b->kind] -= b->size;
    mn_free(b);
}

size_t mn_backend_used(const mn_backend *be, mn_mem_kind kind) { return be->used[kind]; }

mn_err mn_backend_copy_async(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n, mn_errbuf *eb) {
    return be->iface->copy_async(be, dir, dst, src, n, eb);
}
mn_err mn_backend_copy_2d_async(mn_backend *be, mn_copy_dir dir, void *dst, size_t dpitch, const void *src,
                                size_t spitch, size_t width, size_t height, mn_errbuf *eb) {
    if (width == 0 || height == 0) return MN_OK;
    if (dpitch < width || spitch < width)
        return mn_errf(eb, MN_EINVALID, "2d copy: pitches %zu / %zu smaller than the row width %zu", dpitch, spitch, width);
    if (be->iface->copy_2d_async) return be->iface->copy_2d_async(be, dir, dst, dpitch, src, spitch, width, height, eb);
    for (size_t r = 0; r < height; r++) {
        mn_err err = be->iface->copy_async(be, dir, (char *)dst + r * dpitch, (const char *)src + r * spitch, width, eb);
        if (err != MN_OK) return err;
    }
    return MN_OK;
}
mn_err mn_backend_copy_compute_async(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n, mn_errbuf *eb) {
    if ((unsigned)dir > MN_COPY_D2D) return mn_errf(eb, MN_EINVALID, "copy direction %d unknown", (int)dir);
    if (be->iface->copy_compute_async) return be->iface->copy_compute_async(be, dir, dst, src, n, eb);
    /* without one: the copy queue, and the host waits (correct, but behind queued copies) */
    mn_event ev = {0};
    mn_err e = be->iface->copy_async(be, dir, dst, src, n, eb);
    if (e == MN_OK) e = be->iface->event_record(be, &ev, eb);
    if (e == MN_OK) e = be->iface->event_wait(be, &ev, eb);
    return e;
}

mn_err mn_backend_event_record(mn_backend *be, mn_event *ev, mn_errbuf *eb) { return be->iface->event_record(be, ev, eb); }
bool mn_backend_event_done(mn_backend *be, const mn_event *ev) { return be->iface->event_done(be, ev); }
mn_err mn_backend_event_wait(mn_backend *be, const mn_event *ev, mn_errbuf *eb) { return be->iface->event_wait(be, ev, eb); }

mn_err mn_backend_weights_map(mn_backend *be, const void *host, size_t n, void **dev, mn_errbuf *eb) {
    return be->iface->weights_map(be, host, n, dev, eb);
}

mn_err mn_backend_weights_matrix(mn_backend *be, const void *dev, mn_dtype type, int64_t N, int64_t K, int64_t row_bytes,
                                 mn_errbuf *eb) {
    return be->iface->weights_matrix ? be->iface->weights_matrix(be, dev, type, N, K, row_bytes, eb) : MN_OK;
}

bool mn_backend_supports_op(mn_backend *be, const mn_op *op) { return be->iface->supports_op(be, op); }

mn_err mn_backend_reserve(mn_backend *be, const mn_op *ops, int n_ops, mn_errbuf *eb) {
    size_t need = 0;
    for (int i = 0; i < n_ops; i++) {
        size_t w = be->iface->op_work_bytes(be, &ops[i]);
        if (w > need) need = w;
    }
    return be->iface->reserve_work(be, need, eb);
}

mn_err mn_backend_run(mn_backend *be, const mn_op *ops, int n_ops, mn_errbuf *eb) {
    for (int i = 0; i < n_ops; i++) {
        if (!be->iface->supports_op(be, &ops[i]))
            return mn_errf(eb, MN_EUNSUPPORTED, "backend %s does not support op %d (%s)", be->iface->name, i,
                           mn_op_name(ops[i].kind));
    }
    return be->iface->run(be, ops, n_ops, eb);
}

mn_err mn_backend_synchronize(mn_backend *be, mn_errbuf *eb) { return be->iface->synchronize(be, eb); }
