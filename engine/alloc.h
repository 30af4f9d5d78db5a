/* engine/alloc.h — the one host allocator of mneme.
 *
 * Every host allocation of mneme's own code goes through these (jemalloc underneath,
 * linked as the process malloc), so tests can make the N-th allocation fail
 * (mn_alloc_fail_after) and check that nothing leaks or corrupts. Memory from
 * mn_malloc/mn_calloc/mn_realloc is freed with mn_free; NULL is a valid argument to mn_free.
 */
#ifndef MN_ALLOC_H
#define MN_ALLOC_H

#include <stddef.h>

void *mn_malloc(size_t n);
void *mn_calloc(size_t count, size_t size);   /* NULL on overflow of count*size */
void *mn_realloc(void *p, size_t n);
void mn_free(void *p);
/** Aligned allocation (align a power of two >= sizeof(void*)); free with mn_free. */
void *mn_aligned_alloc(size_t align, size_t n);
char *mn_strdup(const char *s);

/** Test hook: the next n allocations succeed and every one after fails (n < 0: never fail).
 *  Per-process; not for use outside tests. */
void mn_alloc_fail_after(long n);
/** Number of live allocations made through this module (for leak checks in tests). */
long mn_alloc_live(void);

#endif
