/* engine/alloc.c — allocation wrappers with a failure-injection counter.
 * The counters are atomics so the engine's threads may allocate concurrently. */
#include "engine/alloc.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* jemalloc's compile-time options (read when jemalloc is the malloc; ignored otherwise).
 * oversize_threshold:0 keeps large allocations (KV images of tens of MB, made and freed
 * on every tier move) in the ordinary arenas, whose freed pages are reused for a while,
 * instead of a dedicated arena that returns them at once: otherwise every restore page-
 * faults a fresh image in (24 ms of a 2K-token T2 resume on SmolLM2, about a third). */
const char *malloc_conf = "oversize_threshold:0";

static atomic_long fail_after = -1;
static atomic_long live = 0;

static int should_fail(void) {
    long n = atomic_load(&fail_after);
    if (n < 0) return 0;
    while (n > 0) {
        if (atomic_compare_exchange_weak(&fail_after, &n, n - 1)) return 0;
    }
    return 1;
}

void mn_alloc_fail_after(long n) { atomic_store(&fail_after, n); }
long mn_alloc_live(void) { return atomic_load(&live); }

void *mn_malloc(size_t n) {
    if (should_fail()) return NULL;
    void *p = malloc(n ? n : 1);
    if (p) atomic_fetch_add(&live, 1);
    return p;
}

void *mn_calloc(size_t count, size_t size) {
    if (size && count > SIZE_MAX / size) return NULL;
    if (should_fail()) return NULL;
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (p) atomic_fetch_add(&live, 1);
    return p;
}

void *mn_realloc(void *p, size_t n) {
    if (!p) return mn_malloc(n);
    if (should_fail()) return NULL;
    return realloc(p, n ? n : 1);
}

void mn_free(void *p) {
    if (!p) return;
    atomic_fetch_sub(&live, 1);
    free(p);
}

void *mn_aligned_alloc(size_t align, size_t n) {
    if (should_fail()) return NULL;
    void *p = NULL;
    if (posix_memalign(&p, align, n ? n : 1) != 0) return NULL;
    atomic_fetch_add(&live, 1);
    return p;
}

char *mn_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = mn_malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}
