/* tests/gpu/test_cuda_backend.c — the CUDA backend through engine/backend.h, end to end on
 * a small layer piece: pinned buffer -> H2D copy -> event wait -> run [rmsnorm, matmul
 * (Q4_1 weights mapped with weights_map)] -> D2H copy (which must see the compute) ->
 * compare with mn_ref_rmsnorm + mn_ref_matmul. Then the event ring past its size, and the
 * device budget (weights_map and mn_buffer_alloc refused with MN_ELIMIT).
 * Called by test_cuda_ops.c's main once a device is known to exist.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cuda/backend_cuda.h"
#include "kernels/cuda/ops_cuda.h"
#include "tests/gpu/gpu_test_util.h"

int gt_backend_smoke(void);

#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            printf("backend   FAIL: " __VA_ARGS__);        \
            printf(" (%s:%d)\n", __FILE__, __LINE__);      \
            goto out;                                      \
        }                                                  \
    } while (0)

enum { BT = 3, BK = 576, BN = 100 };

static int layer_piece(mn_backend *be) {
    int ok = 0;
    mn_errbuf eb = {{0}};
    gt_arena a;
    gt_arena_init(&a);
    gt_seed(777);
    mn_buffer *dx = NULL, *dh = NULL, *dy = NULL, *pin = NULL;
    float *x = gt_matrix(&a, BT, BK, BK, -2, 2, NULL);
    float *g = gt_matrix(&a, 1, BK, BK, 0.5f, 1.5f, NULL);
    int64_t row_bytes = mn_dtype_row_bytes(MN_Q4_1, BK);
    uint8_t *w = gt_host(&a, (size_t)(BN * row_bytes), NULL);
    for (int64_t i = 0; i < BN * row_bytes; i++) w[i] = (uint8_t)gt_rnd_int(256);
    for (int64_t b = 0; b < BN * row_bytes / (int64_t)sizeof(mn_block_q4_1); b++) {
        mn_block_q4_1 *blk = (mn_block_q4_1 *)w + b;
        blk->d = mn_fp32_to_fp16(gt_unif(0.002f, 0.05f));
        blk->m = mn_fp32_to_fp16(gt_unif(-0.1f, 0.1f));
    }
    float *h = gt_host(&a, BT * BK * sizeof(float), NULL), *y = gt_host(&a, BT * BN * sizeof(float), NULL);

    void *dw = NULL, *dg = NULL;
    CHECK(mn_backend_weights_map(be, w, (size_t)(BN * row_bytes), &dw, &eb) == MN_OK, "weights_map: %s", eb.msg);
    CHECK(mn_backend_weights_map(be, g, BK * sizeof(float), &dg, &eb) == MN_OK, "weights_map: %s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_DEVICE, BT * BK * sizeof(float), &dx, &eb) == MN_OK, "alloc: %s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_DEVICE, BT * BK * sizeof(float), &dh, &eb) == MN_OK, "alloc: %s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_DEVICE, BT * BN * sizeof(float), &dy, &eb) == MN_OK, "alloc: %s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_HOST_PINNED, BT * BK * sizeof(float), &pin, &eb) == MN_OK, "pinned: %s", eb.msg);
    memcpy(pin->ptr, x, BT * BK * sizeof(float));

    mn_event ev = {0};
    CHECK(mn_backend_copy_async(be, MN_COPY_H2D, dx->ptr, pin->ptr, BT * BK * sizeof(float), &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_backend_event_record(be, &ev, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_backend_event_wait(be, &ev, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_backend_event_done(be, &ev), "event not done after wait");

    mn_op ops[2] = {{.kind = MN_OP_RMSNORM}, {.kind = MN_OP_MATMUL}};
    ops[0].u.rmsnorm = (mn_rmsnorm_desc){.T = BT, .D = BK, .x = dx->ptr, .x_stride = BK, .w = dg, .eps = 1e-5f,
                                         .y = dh->ptr, .y_stride = BK};
    ops[1].u.matmul = (mn_matmul_desc){.T = BT, .N = BN, .K = BK, .x = dh->ptr, .x_stride = BK, .w = dw,
                                       .w_type = MN_Q4_1, .w_row_bytes = row_bytes, .y = dy->ptr, .y_stride = BN};
    CHECK(mn_backend_reserve(be, ops, 2, &eb) == MN_OK, "reserve: %s", eb.msg);
    CHECK(mn_backend_run(be, ops, 2, &eb) == MN_OK, "run: %s", eb.msg);
    /* no synchronize on purpose: the D2H copy must wait for the compute by itself */
    CHECK(mn_backend_copy_async(be, MN_COPY_D2H, pin->ptr, dy->ptr, BT * BN * sizeof(float), &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_backend_event_record(be, &ev, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_backend_event_wait(be, &ev, &eb) == MN_OK, "%s", eb.msg);

    mn_rmsnorm_desc rn = ops[0].u.rmsnorm;
    rn.x = x, rn.w = g, rn.y = h;
    mn_ref_rmsnorm(&rn);
    mn_matmul_desc mm = ops[1].u.matmul;
    mm.x = h, mm.w = w, mm.y = y;
    mn_ref_matmul(&mm);
    float wrow[BK];
    double worst = 0;
    for (int n = 0; n < BN; n++) {
        mn_ref_dequant_row(MN_Q4_1, w + n * row_bytes, wrow, BK);
        for (int t = 0; t < BT; t++) {
            double s = 0;
            for (int k = 0; k < BK; k++) s += fabs((double)h[t * BK + k] * wrow[k]);
            float got = ((float *)pin->ptr)[t * BN + n];
            double err = fabs((double)got - y[t * BN + n]), tol = (1e-4 + 1.0 / 128.0) * s;
            CHECK(isfinite(got) && err <= tol, "[%d,%d] got %.9g want %.9g tol %.3g", t, n, got, y[t * BN + n], tol);
            if (err / tol > worst) worst = err / tol;
        }
    }
    printf("backend   layer piece (copy, event, rmsnorm+matmul Q4_1, copy back): err/tol %.3f  ok\n", worst);
    ok = 1;
out:
    mn_buffer_free(dx);
    mn_buffer_free(dh);
    mn_buffer_free(dy);
    mn_buffer_free(pin);
    gt_arena_free(&a);
    return ok;
}

/* bf16 weights prepared at load (weights_matrix): a prefill-sized matmul through the
 * backend uses them and must give the same bits as the per-call dequantization (the same
 * bf16 values, the same cuBLAS call), the copy is counted in the device budget, and a
 * row view (what tensor parallelism makes) gives the same bits as its rows of the whole. */
static int prepared_weights(mn_backend *be) {
    int ok = 0;
    mn_errbuf eb = {{0}};
    gt_arena a;
    gt_arena_init(&a);
    gt_seed(4242);
    enum { PT = 40, PK = 512, PN = 96 };
    mn_buffer *dx = NULL, *dy = NULL, *dz = NULL;
    float *x = gt_matrix(&a, PT, PK, PK, -2, 2, NULL);
    int64_t rb = mn_dtype_row_bytes(MN_Q4_K, PK);
    uint8_t *w = gt_host(&a, (size_t)(PN * rb), NULL);
    for (int64_t i = 0; i < PN * rb; i++) w[i] = (uint8_t)gt_rnd_int(256);
    for (int64_t b = 0; b < PN * rb / (int64_t)sizeof(mn_block_q4_K); b++) {
        mn_block_q4_K *blk = (mn_block_q4_K *)w + b;
        blk->d = mn_fp32_to_fp16(gt_unif(0.001f, 0.01f));
        blk->dmin = mn_fp32_to_fp16(gt_unif(0.001f, 0.01f));
    }
    float *y1 = gt_host(&a, PT * PN * sizeof(float), NULL), *y2 = gt_host(&a, PT * PN * sizeof(float), NULL);
    void *dw = NULL;
    CHECK(mn_backend_weights_map(be, w, (size_t)(PN * rb), &dw, &eb) == MN_OK, "weights_map: %s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_DEVICE, PT * PK * sizeof(float), &dx, &eb) == MN_OK, "alloc: %s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_DEVICE, PT * PN * sizeof(float), &dy, &eb) == MN_OK, "alloc: %s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_DEVICE, PT * PN * sizeof(float), &dz, &eb) == MN_OK, "alloc: %s", eb.msg);
    CHECK(cudaMemcpy(dx->ptr, x, PT * PK * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess, "copy x");
    mn_op op = {.kind = MN_OP_MATMUL};
    op.u.matmul = (mn_matmul_desc){.T = PT, .N = PN, .K = PK, .x = dx->ptr, .x_stride = PK, .w = dw, .w_type = MN_Q4_K,
                                   .w_row_bytes = rb, .y = dy->ptr, .y_stride = PN};
    /* before weights_matrix: the per-call dequantization */
    CHECK(mn_backend_reserve(be, &op, 1, &eb) == MN_OK && mn_backend_run(be, &op, 1, &eb) == MN_OK, "run: %s", eb.msg);
    CHECK(mn_backend_synchronize(be, &eb) == MN_OK, "%s", eb.msg);
    CHECK(cudaMemcpy(y1, dy->ptr, PT * PN * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess, "copy y");
    size_t used0 = mn_backend_used(be, MN_MEM_DEVICE);
    setenv("MNEME_CUDA_BF16_WEIGHTS", "1", 1);
    CHECK(mn_backend_weights_matrix(be, dw, MN_Q4_K, PN, PK, rb, &eb) == MN_OK, "weights_matrix: %s", eb.msg);
    unsetenv("MNEME_CUDA_BF16_WEIGHTS");
    CHECK(mn_backend_used(be, MN_MEM_DEVICE) == used0 + (size_t)PN * PK * 2, "bf16 copy not counted: %zu -> %zu", used0,
          mn_backend_used(be, MN_MEM_DEVICE));
    op.u.matmul.y = dz->ptr;
    CHECK(mn_backend_reserve(be, &op, 1, &eb) == MN_OK && mn_backend_run(be, &op, 1, &eb) == MN_OK, "run: %s", eb.msg);
    CHECK(mn_backend_synchronize(be, &eb) == MN_OK, "%s", eb.msg);
    CHECK(cudaMemcpy(y2, dz->ptr, PT * PN * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess, "copy y");
    CHECK(memcmp(y1, y2, PT * PN * sizeof(float)) == 0, "prepared bf16 weights give other bits than per-call dequantization");
    /* rows [32, 96) as a view: the same rows of the whole (ldw = K: the same values; cuBLAS
     * may order a smaller N differently, so within 1e-6 relative rather than bits) */
    op.u.matmul.w = (const char *)dw + 32 * rb;
    op.u.matmul.N = PN - 32;
    op.u.matmul.y_stride = PN - 32;
    CHECK(mn_backend_reserve(be, &op, 1, &eb) == MN_OK && mn_backend_run(be, &op, 1, &eb) == MN_OK, "run: %s", eb.msg);
    CHECK(mn_backend_synchronize(be, &eb) == MN_OK, "%s", eb.msg);
    CHECK(cudaMemcpy(y2, dz->ptr, PT * (PN - 32) * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess, "copy y");
    for (int t = 0; t < PT; t++)
        for (int n = 32; n < PN; n++) {
            float want = y1[t * PN + n], got = y2[t * (PN - 32) + n - 32];
            CHECK(fabsf(got - want) <= 1e-6f * (fabsf(want) + 1.0f), "view [%d,%d]: %.9g vs %.9g", t, n, got, want);
        }
    printf("backend   bf16 weights prepared at load: same bits as per-call dequant, row view  ok\n");
    ok = 1;
out:
    mn_buffer_free(dx);
    mn_buffer_free(dy);
    mn_buffer_free(dz);
    gt_arena_free(&a);
    return ok;
}

/* More events than the ring has slots: every ticket must still resolve. */
static int event_ring(mn_backend *be) {
    int ok = 0;
    mn_errbuf eb = {{0}};
    mn_buffer *d = NULL, *p = NULL;
    mn_event first = {0}, last = {0};
    CHECK(mn_buffer_alloc(be, MN_MEM_DEVICE, 4096, &d, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_HOST_PINNED, 4096, &p, &eb) == MN_OK, "%s", eb.msg);
    for (int i = 0; i < 600; i++) {
        memset(p->ptr, i & 0xff, 16); /* fine: each copy is waited for below before the next write */
        CHECK(mn_backend_copy_async(be, MN_COPY_H2D, d->ptr, p->ptr, 4096, &eb) == MN_OK, "%s", eb.msg);
        mn_event ev;
        CHECK(mn_backend_event_record(be, &ev, &eb) == MN_OK, "%s", eb.msg);
        if (i == 0) first = ev;
        last = ev;
        CHECK(mn_backend_event_wait(be, &ev, &eb) == MN_OK, "%s", eb.msg);
    }
    CHECK(mn_backend_event_done(be, &first) && mn_backend_event_done(be, &last), "old or last event not done");
    CHECK(mn_backend_copy_async(be, MN_COPY_D2H, (char *)p->ptr + 2048, d->ptr, 16, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_backend_synchronize(be, &eb) == MN_OK, "%s", eb.msg);
    CHECK(((unsigned char *)p->ptr)[2048] == (599 & 0xff), "copies out of order: %u", ((unsigned char *)p->ptr)[2048]);
    printf("backend   600 events through a 256-slot ring, copy order kept  ok\n");
    ok = 1;
out:
    mn_buffer_free(d);
    mn_buffer_free(p);
    return ok;
}

/* Layer-wise restore's device side: a large H2D copy on the copy stream, its event, then
 * a compute list [WAIT_COPY(event), ADD y += x]: y must see the copied x although the host
 * never waited; and the per-step table copy (copy_compute_async) does not queue behind. */
static int wait_copy_op(mn_backend *be) {
    int ok = 0;
    mn_errbuf eb = {{0}};
    enum { N = 16 << 20 }; /* 64 MB: long enough on PCIe that compute would overtake it */
    mn_buffer *x = NULL, *y = NULL, *p = NULL, *m = NULL;
    CHECK(mn_buffer_alloc(be, MN_MEM_DEVICE, N * sizeof(float), &x, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_DEVICE, N * sizeof(float), &y, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_HOST_PINNED, N * sizeof(float), &p, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_DEVICE, 64, &m, &eb) == MN_OK, "%s", eb.msg);
    float *h = p->ptr;
    for (int64_t i = 0; i < N; i++) h[i] = (float)(i % 1000);
    CHECK(cudaMemset(x->ptr, 0, N * sizeof(float)) == cudaSuccess && cudaMemset(y->ptr, 0, N * sizeof(float)) == cudaSuccess,
          "memset");
    CHECK(cudaDeviceSynchronize() == cudaSuccess, "sync");
    mn_event ev = {0};
    CHECK(mn_backend_copy_async(be, MN_COPY_H2D, x->ptr, h, N * sizeof(float), &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_backend_event_record(be, &ev, &eb) == MN_OK, "%s", eb.msg);
    static int32_t table[16] = {42};
    CHECK(mn_backend_copy_compute_async(be, MN_COPY_H2D, m->ptr, table, sizeof table, &eb) == MN_OK, "%s", eb.msg);
    mn_op ops[2] = {{MN_OP_WAIT_COPY, .u.wait_copy = ev},
                    {MN_OP_ADD, .u.add = {.T = 1, .D = N, .y = y->ptr, .y_stride = N, .x = x->ptr, .x_stride = N}}};
    CHECK(mn_backend_reserve(be, ops, 2, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_backend_run(be, ops, 2, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_backend_synchronize(be, &eb) == MN_OK, "%s", eb.msg);
    static float back[4096];
    CHECK(cudaMemcpy(back, (float *)y->ptr + (N - 4096), sizeof back, cudaMemcpyDeviceToHost) == cudaSuccess, "copy back");
    for (int i = 0; i < 4096; i++) CHECK(back[i] == (float)((N - 4096 + i) % 1000), "y[%d] = %g: the add ran before the copy", N - 4096 + i, back[i]);
    int32_t t0 = 0;
    CHECK(cudaMemcpy(&t0, m->ptr, 4, cudaMemcpyDeviceToHost) == cudaSuccess && t0 == 42, "compute-ordered copy: %d", t0);
    printf("backend   compute waits for a copy event on the device (MN_OP_WAIT_COPY), 64 MB  ok\n");
    ok = 1;
out:
    mn_buffer_free(x);
    mn_buffer_free(y);
    mn_buffer_free(p);
    mn_buffer_free(m);
    return ok;
}

static int budget(void) {
    int ok = 0;
    mn_errbuf eb = {{0}};
    mn_backend *be = NULL;
    mn_buffer *b = NULL;
    static uint8_t bytes[4096];
    void *dev = NULL;
    mn_backend_params p = {.device = "cuda", .device_budget = 3000};
    CHECK(mn_backend_cuda_new(&p, &be, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_backend_weights_map(be, bytes, sizeof bytes, &dev, &eb) == MN_ELIMIT, "weights past budget: %s", eb.msg);
    CHECK(mn_backend_weights_map(be, bytes, 2000, &dev, &eb) == MN_OK, "%s", eb.msg);
    CHECK(mn_buffer_alloc(be, MN_MEM_DEVICE, 2000, &b, &eb) == MN_ELIMIT, "buffer past budget: %s", eb.msg);
    CHECK(mn_backend_used(be, MN_MEM_DEVICE) == 2000, "used %zu", mn_backend_used(be, MN_MEM_DEVICE));
    printf("backend   device budget: %s  ok\n", eb.msg);
    ok = 1;
out:
    mn_buffer_free(b);
    mn_backend_free(be);
    return ok;
}

int gt_backend_smoke(void) {
    mn_errbuf eb = {{0}};
    mn_backend *be = NULL;
    mn_backend_params p = {.device = "cuda"};
    if (mn_backend_cuda_new(&p, &be, &eb) != MN_OK) {
        printf("backend   FAIL: mn_backend_cuda_new: %s\n", eb.msg);
        return 0;
    }
    int ok = layer_piece(be);
    ok &= event_ring(be);
    ok &= wait_copy_op(be);
    ok &= prepared_weights(be);
    mn_backend_free(be);
    ok &= budget();
    return ok;
}
