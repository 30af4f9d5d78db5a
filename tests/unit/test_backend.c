/* tests/unit/test_backend.c — thread pool, barrier, buffer budgets, KV pool accounting. */
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
    mn_kv_pool_free(p);
    mn_backend_free(be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threadpool_barrier),
        cmocka_unit_test(test_budget),
        cmocka_unit_test(test_kv_pool),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
