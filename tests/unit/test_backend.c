/* tests/unit/test_backend.c — thread pool, barrier, buffer budgets, KV pool accounting,
 * the CPU backend's asynchronous copy queue. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <string.h>

#include "engine/backend.h"
#include "engine/kv.h"
#include "engine/threadpool.h"

typedef struct { atomic_int counter; int rounds; int errors; int seen[8][64]; } pool_task;

/* Each round every thread adds 1, then after a barrier every thread checks the total:
 * a barrier that lets a thread through early makes the check fail. */
static void barrier_task(void *arg, const mn_par *par) {
    pool_task *t = arg;
    for (int r = 0; r < t->rounds; r++) {
        atomic_fetch_add(&t->counter, 1);
        mn_par_barrier(par);
        if (atomic_load(&t->counter) != (r + 1) * par->nth) t->errors++;
        t->seen[par->ith][r] = 1;
        mn_par_barrier(par);
    }
}

static void test_threadpool_barrier(void **state) {
    for (int n = 1; n <= 4; n++) {
        mn_threadpool *p;
        mn_errbuf eb;
        assert_int_equal(mn_threadpool_new(n, &p, &eb), MN_OK);
        for (int run = 0; run < 50; run++) {
            pool_task t;
            memset(&t, 0, sizeof t);
            t.rounds = 64;
            mn_threadpool_run(p, barrier_task, &t);
            assert_int_equal(t.errors, 0);
            assert_int_equal(atomic_load(&t.counter), 64 * n);
            for (int i = 0; i < n; i++)
                for (int r = 0; r < 64; r++) assert_int_equal(t.seen[i][r], 1);
        }
        mn_threadpool_free(p);
    }
    mn_threadpool *p;
    mn_errbuf eb;
    assert_int_equal(mn_threadpool_new(0, &p, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "threads"));
}

static void test_budget(void **state) {
    mn_backend *be;
    mn_errbuf eb;
    mn_backend_params bp = {.device = "cpu", .n_threads = 1, .device_budget = 1000};
    assert_int_equal(mn_backend_cpu_new(&bp, &be, &eb), MN_OK);
    mn_buffer *a, *b;
    assert_int_equal(mn_buffer_alloc(be, MN_MEM_DEVICE, 600, &a, &eb), MN_OK);
    assert_int_equal(mn_backend_used(be, MN_MEM_DEVICE), 600);
    assert_int_equal(mn_buffer_alloc(be, MN_MEM_DEVICE, 401, &b, &eb), MN_ELIMIT);
    assert_non_null(strstr(eb.msg, "device budget"));
    assert_non_null(strstr(eb.msg, "401"));
    assert_int_equal(mn_buffer_alloc(be, MN_MEM_DEVICE, 400, &b, &eb), MN_OK);
    mn_buffer_free(a);
    assert_int_equal(mn_backend_used(be, MN_MEM_DEVICE), 400);
    /* copies land, events complete */
    char src[400];
    for (int i = 0; i < 400; i++) src[i] = (char)i;
    mn_event ev = {0};
    assert_int_equal(mn_backend_copy_async(be, MN_COPY_H2D, b->ptr, src, 400, &eb), MN_OK);
    assert_int_equal(mn_backend_event_record(be, &ev, &eb), MN_OK);
    assert_int_equal(mn_backend_event_wait(be, &ev, &eb), MN_OK);
    assert_true(mn_backend_event_done(be, &ev));
    assert_memory_equal(b->ptr, src, 400);
    mn_buffer_free(b);
    assert_int_equal(mn_backend_used(be, MN_MEM_DEVICE), 0);
    mn_backend_free(be);

    bp.device = "cuda";
    assert_int_equal(mn_backend_new(&bp, &be, NULL, &eb), MN_EUNSUPPORTED);
    assert_non_null(strstr(eb.msg, "cuda"));
    bp.device = "tpu";
    assert_int_equal(mn_backend_new(&bp, &be, NULL, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "tpu"));
}

static void test_kv_pool(void **state) {
    mn_backend *be;
    mn_errbuf eb;
    mn_backend_params bp = {.device = "cpu", .n_threads = 1};
    assert_int_equal(mn_backend_cpu_new(&bp, &be, &eb), MN_OK);
    mn_kv_pool *p;
    assert_int_equal(mn_kv_pool_new(be, 2, 3, 8, 4, 5, &p, &eb), MN_OK);
    assert_int_equal(mn_kv_bytes_per_token(p), 2 * 2 * 3 * 8 * 2);
    mn_kv_seq a = {0}, b = {0};
    assert_int_equal(mn_kv_seq_reserve(p, &a, 9, &eb), MN_OK);   /* 3 blocks */
    assert_int_equal(a.n_blocks, 3);
    assert_int_equal(mn_kv_seq_reserve(p, &b, 12, &eb), MN_ELIMIT); /* needs 3, 2 free */
    assert_int_equal(b.n_blocks, 0);
    assert_int_equal(mn_kv_seq_reserve(p, &b, 8, &eb), MN_OK);
    assert_int_equal(p->n_free, 0);
    /* distinct blocks, and views address disjoint memory per layer and per K/V */
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 2; j++) assert_int_not_equal(a.blocks[i], b.blocks[j]);
    int32_t indptr[2] = {0, 3};
    mn_kv_view v0 = mn_kv_pool_view(p, 0, indptr, a.blocks), v1 = mn_kv_pool_view(p, 1, indptr, a.blocks);
    assert_true(v0.v > v0.k && v1.k > v0.v);
    assert_int_equal(mn_kv_offset(&v0, 0, 5, 2), (int64_t)a.blocks[1] * v0.block_stride + (1 * 3 + 2) * 8);
    mn_kv_seq_release(p, &a);
    assert_int_equal(p->n_free, 3);
    mn_kv_seq_release(p, &b);
    assert_int_equal(p->n_free, 5);
    /* after churn the free list is in any order; sorting it makes the next reservation one
     * run of ascending ids (what a restore copies in one piece per layer) */
    mn_kv_seq c = {0};
    assert_int_equal(mn_kv_seq_reserve(p, &c, 20, &eb), MN_OK);
    mn_kv_block_release(p, c.blocks[3]);
    mn_kv_block_release(p, c.blocks[0]);
    mn_kv_block_release(p, c.blocks[4]);
    mn_kv_block_release(p, c.blocks[1]);
    mn_kv_block_release(p, c.blocks[2]);
    c.n_blocks = 0;
    mn_kv_seq_release(p, &c);
    mn_kv_seq d = {0};
    assert_int_equal(p->free_ids[p->n_free - 1], 2); /* stack order after churn: not ascending */
    mn_kv_pool_sort_free(p);
    assert_int_equal(mn_kv_seq_reserve(p, &d, 20, &eb), MN_OK);
    for (int i = 0; i < 5; i++) assert_int_equal(d.blocks[i], i);
    mn_kv_seq_release(p, &d);
    mn_kv_pool_free(p);
    mn_backend_free(be);
}

/* Strided copies: rows of width bytes between pitches, both directions, and a pitch
 * smaller than the width refused. */
static void test_copy_2d(void **state) {
    mn_backend *be;
    mn_errbuf eb;
    mn_backend_params bp = {.device = "cpu", .n_threads = 1};
    assert_int_equal(mn_backend_cpu_new(&bp, &be, &eb), MN_OK);
    uint8_t src[7 * 10], dst[5 * 12], back[7 * 10];
    for (int i = 0; i < (int)sizeof src; i++) src[i] = (uint8_t)(i * 7 + 1);
    memset(dst, 0xee, sizeof dst);
    memset(back, 0, sizeof back);
    /* 5 rows of 6 bytes: src rows 10 apart (from byte 3), dst rows 12 apart */
    assert_int_equal(mn_backend_copy_2d_async(be, MN_COPY_H2D, dst, 12, src + 3, 10, 6, 5, &eb), MN_OK);
    for (int r = 0; r < 5; r++)
        for (int x = 0; x < 12; x++)
            assert_int_equal(dst[r * 12 + x], x < 6 ? src[3 + r * 10 + x] : 0xee);
    assert_int_equal(mn_backend_copy_2d_async(be, MN_COPY_D2H, back + 3, 10, dst, 12, 6, 5, &eb), MN_OK);
    for (int r = 0; r < 5; r++) assert_memory_equal(back + 3 + r * 10, src + 3 + r * 10, 6);
    /* contiguous on both sides: one piece */
    assert_int_equal(mn_backend_copy_2d_async(be, MN_COPY_D2D, back, 6, src, 6, 6, 7, &eb), MN_OK);
    assert_memory_equal(back, src, 42);
    assert_int_equal(mn_backend_copy_2d_async(be, MN_COPY_H2D, dst, 4, src, 10, 6, 2, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "pitches"));
    assert_int_equal(mn_backend_copy_2d_async(be, MN_COPY_H2D, dst, 4, src, 10, 6, 0, &eb), MN_OK); /* nothing to do */
    mn_backend_synchronize(be, &eb);
    mn_backend_free(be);
}

/* The CPU copy queue runs on its own thread: with slow copies an event is not done right
 * after its copy is enqueued, copies land in order (the later of two to the same bytes
 * wins), event_wait / synchronize wait for them, a compute list's MN_OP_WAIT_COPY holds
 * the ops after it until the copy landed, and copy_compute_async does not queue behind. */
static void test_copy_queue_async(void **state) {
    mn_backend *be;
    mn_errbuf eb;
    mn_backend_params bp = {.device = "cpu", .n_threads = 2};
    assert_int_equal(mn_backend_cpu_new(&bp, &be, &eb), MN_OK);
    enum { N = 1024 };
    mn_buffer *y, *x;
    assert_int_equal(mn_buffer_alloc(be, MN_MEM_DEVICE, N * sizeof(float), &y, &eb), MN_OK);
    assert_int_equal(mn_buffer_alloc(be, MN_MEM_DEVICE, N * sizeof(float), &x, &eb), MN_OK);
    static float ones[N], twos[N], out[N], meta[4], meta_dev[4];
    for (int i = 0; i < N; i++) { ones[i] = 1.0f; twos[i] = 2.0f; }
    memset(y->ptr, 0, N * sizeof(float));
    memset(x->ptr, 0, N * sizeof(float));
    mn_backend_cpu_slow_copies(be, 20000);
    mn_event first = {0}, second = {0}, none = {0};
    assert_true(mn_backend_event_done(be, &none));  /* ticket 0: nothing to wait for */
    assert_int_equal(mn_backend_copy_async(be, MN_COPY_H2D, x->ptr, ones, sizeof ones, &eb), MN_OK);
    assert_int_equal(mn_backend_event_record(be, &first, &eb), MN_OK);
    assert_int_equal(mn_backend_copy_async(be, MN_COPY_H2D, x->ptr, twos, sizeof twos, &eb), MN_OK);
    assert_int_equal(mn_backend_event_record(be, &second, &eb), MN_OK);
    assert_false(mn_backend_event_done(be, &second));           /* 40 ms of copies still queued */
    meta[0] = 7.0f;
    assert_int_equal(mn_backend_copy_compute_async(be, MN_COPY_H2D, meta_dev, meta, sizeof meta, &eb), MN_OK);
    assert_true(meta_dev[0] == 7.0f);                           /* not behind the queue */
    assert_false(mn_backend_event_done(be, &second));
    /* y += x after waiting for the second copy: y must be all 2 */
    mn_op ops[2] = {{MN_OP_WAIT_COPY, .u.wait_copy = second},
                    {MN_OP_ADD, .u.add = {.T = 1, .D = N, .y = y->ptr, .y_stride = N, .x = x->ptr, .x_stride = N}}};
    assert_int_equal(mn_backend_reserve(be, ops, 2, &eb), MN_OK);
    assert_int_equal(mn_backend_run(be, ops, 2, &eb), MN_OK);
    assert_true(mn_backend_event_done(be, &first) && mn_backend_event_done(be, &second));
    for (int i = 0; i < N; i++) assert_true(((float *)y->ptr)[i] == 2.0f);
    uint64_t copies, blocked;
    mn_backend_cpu_copy_stats(be, &copies, &blocked);
    assert_int_equal(copies, 2);
    assert_int_equal(blocked, 1);
    /* D2H, then a wait on its event */
    assert_int_equal(mn_backend_copy_async(be, MN_COPY_D2H, out, y->ptr, sizeof out, &eb), MN_OK);
    mn_event back = {0};
    assert_int_equal(mn_backend_event_record(be, &back, &eb), MN_OK);
    assert_false(mn_backend_event_done(be, &back));
    assert_int_equal(mn_backend_event_wait(be, &back, &eb), MN_OK);
    assert_true(out[0] == 2.0f && out[N - 1] == 2.0f);
    /* synchronize drains the queue */
    assert_int_equal(mn_backend_copy_async(be, MN_COPY_D2D, y->ptr, ones, sizeof ones, &eb), MN_OK);
    assert_int_equal(mn_backend_synchronize(be, &eb), MN_OK);
    assert_true(((float *)y->ptr)[N - 1] == 1.0f);
    mn_event bogus = {.ticket = 1000};
    assert_int_equal(mn_backend_event_wait(be, &bogus, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "never recorded"));
    /* freeing waits for a queued copy that still reads the buffer */
    assert_int_equal(mn_backend_copy_async(be, MN_COPY_D2H, out, x->ptr, sizeof out, &eb), MN_OK);
    mn_buffer_free(x);
    assert_true(out[5] == 2.0f);
    mn_backend_cpu_slow_copies(be, 0);
    mn_buffer_free(y);
    mn_backend_free(be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threadpool_barrier),
        cmocka_unit_test(test_budget),
        cmocka_unit_test(test_kv_pool),
        cmocka_unit_test(test_copy_2d),
        cmocka_unit_test(test_copy_queue_async),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
