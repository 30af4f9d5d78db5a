/* kernels/cpu/lora_avx512.c — kernels/cpu/lora_impl.h with AVX-512 dots and expands (CMake
 * gives *_avx512.c files -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c), chosen
 * by kernels/cpu/lora.c at the AVX-512 levels.
 *
 * Sixteen lanes and fused multiply-adds, so this level's bits differ from the plain and
 * AVX2 compilations' (which share theirs); each element still takes one fixed sequence of
 * operations, defined below, on every path of this level (per row or row-blocked, any
 * grouping, any thread count, any column window), so the batch invariance holds here too.
 *   shrink (lora_dot, lora_dot4): 64 lanes, element k fused into lane k % 64
 *       (acc[l] = fma(x[k], w[k], acc[l]), k ascending; four independent 16-lane chains);
 *       a tail of under 64 elements goes to the lanes it would have had, the other lanes
 *       untouched (masked fma); then s = (c0 + c1) + (c2 + c3) lane by lane and the 16
 *       lanes of s summed pairwise: l and l + 8, then l and l + 4, l and l + 2, l and l + 1.
 *   expand (lora_expand1, lora_expand4): per element, acc = 0, acc = fma(v[j], bt[j][n], acc)
 *       for j < r in order, then y[n] = fma(sc, acc, y[n]); tails are masked 16-column
 *       pieces, so a column's operations do not depend on where the window starts.
 * Elements past the end are never read (masked loads do not fault on masked-off lanes). */
#include <immintrin.h>
#include <stdint.h>

#include "kernels/ops.h"

/* 16 elements of w from element i, as f32 (F16 and BF16 convert exactly) */
static inline __m512 load16(const void *w, mn_dtype t, int64_t i) {
    if (t == MN_F32) return _mm512_loadu_ps((const float *)w + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    if (t == MN_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* load16 of the lanes in m, zero in the others (nothing read there) */
static inline __m512 load16m(const void *w, mn_dtype t, int64_t i, __mmask16 m) {
    if (t == MN_F32) return _mm512_maskz_loadu_ps(m, (const float *)w + i);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i);
    if (t == MN_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }

/* s = (a0 + a1) + (a2 + a3), then lanes l + 8, l + 4, l + 2, l + 1 folded onto l */
static inline float lora_reduce64(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 s = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
}

/* The tail [k, n) (under 64 elements) of one row: piece c (16 elements) into chain c. */
#define LORA_TAIL(xr, a0, a1, a2, a3)                                                               \
    for (int64_t kk = k, c = 0; kk < n; kk += 16, c++) {                                           \
        const __mmask16 m = tail_mask(n - kk);                                                      \
        const __m512 xv = _mm512_maskz_loadu_ps(m, (xr) + kk), wv = load16m(w, t, kk, m);           \
        if (c == 0) a0 = _mm512_mask3_fmadd_ps(xv, wv, a0, m);                                      \
        else if (c == 1) a1 = _mm512_mask3_fmadd_ps(xv, wv, a1, m);                                 \
        else if (c == 2) a2 = _mm512_mask3_fmadd_ps(xv, wv, a2, m);                                 \
        else a3 = _mm512_mask3_fmadd_ps(xv, wv, a3, m);                                             \
    }

static float lora_dot(const float *x, const void *w, mn_dtype t, int64_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= n; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), load16(w, t, k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), load16(w, t, k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), load16(w, t, k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), load16(w, t, k + 48), a3);
    }
    LORA_TAIL(x, a0, a1, a2, a3)
    return lora_reduce64(a0, a1, a2, a3);
}

/* lora_dot of four rows sharing each load and conversion of w: sixteen accumulators (four
 * chains of four rows) in registers, each row's lanes and reduction those of lora_dot. */
static void lora_dot4(const float *const x[4], const void *w, mn_dtype t, int64_t n, float out[4]) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    int64_t k = 0;
    for (; k + 64 <= n; k += 64) {
        const __m512 w0 = load16(w, t, k), w1 = load16(w, t, k + 16), w2 = load16(w, t, k + 32), w3 = load16(w, t, k + 48);
        a00 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + k), w0, a00);
        a01 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + k + 16), w1, a01);
        a02 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + k + 32), w2, a02);
        a03 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + k + 48), w3, a03);
        a10 = _mm512_fmadd_ps(_mm512_loadu_ps(x1 + k), w0, a10);
        a11 = _mm512_fmadd_ps(_mm512_loadu_ps(x1 + k + 16), w1, a11);
        a12 = _mm512_fmadd_ps(_mm512_loadu_ps(x1 + k + 32), w2, a12);
        a13 = _mm512_fmadd_ps(_mm512_loadu_ps(x1 + k + 48), w3, a13);
        a20 = _mm512_fmadd_ps(_mm512_loadu_ps(x2 + k), w0, a20);
        a21 = _mm512_fmadd_ps(_mm512_loadu_ps(x2 + k + 16), w1, a21);
        a22 = _mm512_fmadd_ps(_mm512_loadu_ps(x2 + k + 32), w2, a22);
        a23 = _mm512_fmadd_ps(_mm512_loadu_ps(x2 + k + 48), w3, a23);
        a30 = _mm512_fmadd_ps(_mm512_loadu_ps(x3 + k), w0, a30);
        a31 = _mm512_fmadd_ps(_mm512_loadu_ps(x3 + k + 16), w1, a31);
        a32 = _mm512_fmadd_ps(_mm512_loadu_ps(x3 + k + 32), w2, a32);
        a33 = _mm512_fmadd_ps(_mm512_loadu_ps(x3 + k + 48), w3, a33);
    }
    LORA_TAIL(x0, a00, a01, a02, a03)
    LORA_TAIL(x1, a10, a11, a12, a13)
    LORA_TAIL(x2, a20, a21, a22, a23)
    LORA_TAIL(x3, a30, a31, a32, a33)
    out[0] = lora_reduce64(a00, a01, a02, a03);
    out[1] = lora_reduce64(a10, a11, a12, a13);
    out[2] = lora_reduce64(a20, a21, a22, a23);
    out[3] = lora_reduce64(a30, a31, a32, a33);
}

/* y[q][n] = fma(sc, acc, y[q][n]), acc the fma chain over j of v[q][j] * bt[j][n], for the
 * first nr (1..4) of four rows and n in [n0, n1): 32 columns of four rows (eight chains) in
 * registers, each bt element loaded and converted once for the four rows. */
static void lora_expand4(float *const y[4], const float *const v[4], int nr, float sc, const void *bt, mn_dtype t,
                         int64_t ldb, int32_t r, int64_t n0, int64_t n1) {
    const __m512 scv = _mm512_set1_ps(sc);
    int64_t n = n0;
    for (; n + 32 <= n1; n += 32) {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, u0 = s0, u1 = s0, u2 = s0, u3 = s0;
        for (int32_t j = 0; j < r; j++) {
            const int64_t o = (int64_t)j * ldb + n;
            const __m512 w0 = load16(bt, t, o), w1 = load16(bt, t, o + 16);
            const __m512 v0 = _mm512_set1_ps(v[0][j]), v1 = _mm512_set1_ps(v[1][j]), v2 = _mm512_set1_ps(v[2][j]),
                         v3 = _mm512_set1_ps(v[3][j]);
            s0 = _mm512_fmadd_ps(v0, w0, s0), u0 = _mm512_fmadd_ps(v0, w1, u0);
            s1 = _mm512_fmadd_ps(v1, w0, s1), u1 = _mm512_fmadd_ps(v1, w1, u1);
            s2 = _mm512_fmadd_ps(v2, w0, s2), u2 = _mm512_fmadd_ps(v2, w1, u2);
            s3 = _mm512_fmadd_ps(v3, w0, s3), u3 = _mm512_fmadd_ps(v3, w1, u3);
        }
        const __m512 lo[4] = {s0, s1, s2, s3}, hi[4] = {u0, u1, u2, u3};
        for (int q = 0; q < nr; q++) {
            _mm512_storeu_ps(y[q] + n, _mm512_fmadd_ps(scv, lo[q], _mm512_loadu_ps(y[q] + n)));
            _mm512_storeu_ps(y[q] + n + 16, _mm512_fmadd_ps(scv, hi[q], _mm512_loadu_ps(y[q] + n + 16)));
        }
    }
    for (; n < n1; n += 16) {
        const __mmask16 m = tail_mask(n1 - n);
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int32_t j = 0; j < r; j++) {
            const __m512 wv = load16m(bt, t, (int64_t)j * ldb + n, m);
            s0 = _mm512_fmadd_ps(_mm512_set1_ps(v[0][j]), wv, s0);
            s1 = _mm512_fmadd_ps(_mm512_set1_ps(v[1][j]), wv, s1);
            s2 = _mm512_fmadd_ps(_mm512_set1_ps(v[2][j]), wv, s2);
            s3 = _mm512_fmadd_ps(_mm512_set1_ps(v[3][j]), wv, s3);
        }
        const __m512 acc[4] = {s0, s1, s2, s3};
        for (int q = 0; q < nr; q++)
            _mm512_mask_storeu_ps(y[q] + n, m, _mm512_fmadd_ps(scv, acc[q], _mm512_maskz_loadu_ps(m, y[q] + n)));
    }
}

/* One row, n in [n0, n1): 128 columns of accumulators (eight chains) stay in registers
 * while the r rows of bt stream past; the same operations per element as lora_expand4. */
static void lora_expand1(float *y, const float *v, float sc, const void *bt, mn_dtype t, int64_t ldb, int32_t r,
                         int64_t n0, int64_t n1) {
    const __m512 scv = _mm512_set1_ps(sc);
    int64_t n = n0;
    for (; n + 128 <= n1; n += 128) {
        __m512 s[8];
        for (int c = 0; c < 8; c++) s[c] = _mm512_setzero_ps();
        for (int32_t j = 0; j < r; j++) {
            const __m512 vj = _mm512_set1_ps(v[j]);
            const int64_t o = (int64_t)j * ldb + n;
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) s[c] = _mm512_fmadd_ps(vj, load16(bt, t, o + 16 * c), s[c]);
        }
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++)
            _mm512_storeu_ps(y + n + 16 * c, _mm512_fmadd_ps(scv, s[c], _mm512_loadu_ps(y + n + 16 * c)));
    }
    for (; n < n1; n += 16) {
        const __mmask16 m = tail_mask(n1 - n);
        __m512 s = _mm512_setzero_ps();
        for (int32_t j = 0; j < r; j++)
            s = _mm512_fmadd_ps(_mm512_set1_ps(v[j]), load16m(bt, t, (int64_t)j * ldb + n, m), s);
        _mm512_mask_storeu_ps(y + n, m, _mm512_fmadd_ps(scv, s, _mm512_maskz_loadu_ps(m, y + n)));
    }
}

#include "kernels/cpu/lora_impl.h"

void mn__cpu_lora_avx512(const mn_lora_desc *d, void *work, const mn_par *par);

void mn__cpu_lora_avx512(const mn_lora_desc *d, void *work, const mn_par *par) { lora_body(d, work, par); }
