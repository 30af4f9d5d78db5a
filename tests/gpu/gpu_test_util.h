/* tests/gpu/gpu_test_util.h — helpers of the self-contained GPU tests: a seeded RNG and an
 * arena of host allocations, each with a device twin made by gt_upload.
 *
 * Every arena allocation carries GT_GUARD trailing bytes of 0xff that the tests compare
 * too, so a kernel writing past an output is caught. gt_dev_of maps a host pointer
 * (anywhere inside an allocation) to the same offset in its device twin.
 * Ownership: the arena owns everything; gt_arena_free releases host and device memory.
 */
#ifndef MN_TESTS_GPU_TEST_UTIL_H
#define MN_TESTS_GPU_TEST_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cuda_runtime.h>

#include "kernels/cuda/ops_cuda.h"

enum { GT_MAX_ALLOC = 32, GT_GUARD = 64 };

typedef struct gt_arena {
    int n;
    void *host[GT_MAX_ALLOC];
    void *dev[GT_MAX_ALLOC];
    size_t bytes[GT_MAX_ALLOC]; /* including the guard */
} gt_arena;

static uint64_t gt__rng = 1;

static inline void gt_seed(uint32_t s) { gt__rng = 0x9e3779b97f4a7c15ull * (s + 1); }

static inline uint64_t gt_next(void) { /* xorshift64* */
    gt__rng ^= gt__rng >> 12;
    gt__rng ^= gt__rng << 25;
    gt__rng ^= gt__rng >> 27;
    return gt__rng * 0x2545f4914f6cdd1dull;
}

static inline int32_t gt_rnd_int(int n) { return (int32_t)((gt_next() >> 33) % (uint64_t)n); }
static inline float gt_unif(float lo, float hi) { return lo + (hi - lo) * (float)((gt_next() >> 40) * (1.0 / 16777216.0)); }

/* Values around f16's edges: normal, subnormal, past the largest f16 (-> inf), ties. */
static inline float gt_f16_edge(void) {
    switch (gt_rnd_int(6)) {
    case 0: return gt_unif(-1e-6f, 1e-6f);
    case 1: return gt_unif(-7e4f, 7e4f);
    case 2: return mn_fp16_to_fp32((uint16_t)gt_rnd_int(0x7c00)) + 0x1p-25f; /* near a rounding tie */
    default: return gt_unif(-4, 4);
    }
}

static inline void gt_arena_init(gt_arena *a) { memset(a, 0, sizeof *a); }

/* bytes of host memory (plus the guard), zeroed; *idx gets its arena index if idx. Aborts
 * the test program on exhaustion: this is test scaffolding, not engine code. */
static inline void *gt_host(gt_arena *a, size_t bytes, int *idx) {
    if (a->n == GT_MAX_ALLOC) {
        fprintf(stderr, "gt_host: more than %d allocations\n", GT_MAX_ALLOC);
        exit(2);
    }
    uint8_t *p = calloc(1, bytes + GT_GUARD);
    if (!p) {
        fprintf(stderr, "gt_host: out of memory (%zu bytes)\n", bytes);
        exit(2);
    }
    memset(p + bytes, 0xff, GT_GUARD);
    if (idx) *idx = a->n;
    a->host[a->n] = p;
    a->bytes[a->n++] = bytes + GT_GUARD;
    return p;
}

/* A random permutation of 0 .. n-1 in arena a (block ids scattered through a pool). */
static inline int32_t *gt_shuffled(gt_arena *a, int32_t n) {
    int32_t *perm = (int32_t *)gt_host(a, (size_t)n * sizeof(int32_t), NULL);
    for (int32_t i = 0; i < n; i++) perm[i] = i;
    for (int32_t i = n - 1; i > 0; i--) {
        int32_t j = gt_rnd_int(i + 1), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    return perm;
}

/* rows x cols floats with row stride `stride`, uniform in [lo, hi); stride gaps are NaN. */
static inline float *gt_matrix(gt_arena *a, int64_t rows, int64_t cols, int64_t stride, float lo, float hi, int *idx) {
    float *m = gt_host(a, (size_t)(rows * stride) * sizeof(float), idx);
    memset(m, 0xff, (size_t)(rows * stride) * sizeof(float));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) m[r * stride + c] = gt_unif(lo, hi);
    return m;
}

/* An output matrix: all 0xff (NaN), so an element nobody writes stays visible. */
static inline float *gt_out(gt_arena *a, int64_t rows, int64_t cols, int64_t stride, int *idx) {
    (void)cols;
    float *m = gt_host(a, (size_t)(rows * stride) * sizeof(float), idx);
    memset(m, 0xff, (size_t)(rows * stride) * sizeof(float));
    return m;
}

/* Copy every allocation to a fresh device twin. */
static inline mn_err gt_upload(gt_arena *a, mn_errbuf *eb) {
    for (int i = 0; i < a->n; i++) {
        MN_CUDA_CHECK(eb, cudaMalloc(&a->dev[i], a->bytes[i]));
        MN_CUDA_CHECK(eb, cudaMemcpy(a->dev[i], a->host[i], a->bytes[i], cudaMemcpyHostToDevice));
    }
    return MN_OK;
}

/* The device address of host pointer p (NULL stays NULL; an unknown pointer is a bug). */
#define gt_dev_of(a, p) ((__typeof__(p))gt__dev_of((a), (const void *)(p)))
static inline void *gt__dev_of(gt_arena *a, const void *p) {
    if (!p) return NULL;
    for (int i = 0; i < a->n; i++) {
        const uint8_t *h = a->host[i];
        if ((const uint8_t *)p >= h && (const uint8_t *)p < h + a->bytes[i])
            return (uint8_t *)a->dev[i] + ((const uint8_t *)p - h);
    }
    fprintf(stderr, "gt_dev_of: %p is not an arena pointer\n", p);
    exit(2);
}

static inline void gt_arena_free(gt_arena *a) {
    for (int i = 0; i < a->n; i++) {
        free(a->host[i]);
        if (a->dev[i]) cudaFree(a->dev[i]);
    }
    memset(a, 0, sizeof *a);
}

#endif
