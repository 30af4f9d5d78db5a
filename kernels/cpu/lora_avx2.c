/* kernels/cpu/lora_avx2.c — kernels/cpu/lora_impl.h with AVX2 dots and expands (CMake gives
 * *_avx2.c files -mavx2 -mfma -mf16c). Multiplies and adds stay separate instructions, the
 * F16/BF16 -> f32 conversions are exact, and the lanes are reduced in the order the scalar
 * version uses, so the bits are the same. */
#include <immintrin.h>
#include <stdint.h>

#include "kernels/ops.h"

/* 8 elements of w from element i, as f32 */
static inline __m256 load8(const void *w, mn_dtype t, int64_t i) {
    if (t == MN_F32) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (t == MN_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float w_at(const void *w, mn_dtype t, int64_t i) {
    if (t == MN_F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    return t == MN_F16 ? mn_fp16_to_fp32(h) : mn_bf16_to_fp32(h);
}

/* The scalar version's reduction of 32 lanes (chain c holds lanes 8c..8c+7), in vector
 * adds that pair the same operands in the same order: s = (a0 + a1) + (a2 + a3) lane by
 * lane, then ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7)). */
static inline float lora_reduce32(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)); /* s0+s4 .. s3+s7 */
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));                                  /* (s0+s4)+(s2+s6), (s1+s5)+(s3+s7) */
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

static float lora_dot(const float *x, const void *w, mn_dtype t, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(x + k), load8(w, t, k)));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(x + k + 8), load8(w, t, k + 8)));
        a2 = _mm256_add_ps(a2, _mm256_mul_ps(_mm256_loadu_ps(x + k + 16), load8(w, t, k + 16)));
        a3 = _mm256_add_ps(a3, _mm256_mul_ps(_mm256_loadu_ps(x + k + 24), load8(w, t, k + 24)));
    }
    if (k == n) return lora_reduce32(a0, a1, a2, a3);
    float l[32];
    _mm256_storeu_ps(l, a0);
    _mm256_storeu_ps(l + 8, a1);
    _mm256_storeu_ps(l + 16, a2);
    _mm256_storeu_ps(l + 24, a3);
    for (; k < n; k++) l[k % 32] += x[k] * w_at(w, t, k);   /* lane k % 32, as the scalar version */
    float s[8];
    for (int i = 0; i < 8; i++) s[i] = (l[i] + l[8 + i]) + (l[16 + i] + l[24 + i]);
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

/* lora_dot of four rows sharing each load and conversion of w; per row the lanes and the
 * reduction of lora_dot, so each result has lora_dot's bits. One pass per 8-lane chain c
 * (elements k = 32 i + 8 c ..): four accumulators in registers (all sixteen would spill),
 * and the w row is re-read from L1 four times, not from L2 once per token. */
static void lora_dot4(const float *const x[4], const void *w, mn_dtype t, int64_t n, float out[4]) {
    float l[4][32];
    const int64_t full = n / 32 * 32;
    for (int c = 0; c < 4; c++) {
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t k = 8 * c; k < full; k += 32) {
            const __m256 wv = load8(w, t, k);
            s0 = _mm256_add_ps(s0, _mm256_mul_ps(_mm256_loadu_ps(x[0] + k), wv));
            s1 = _mm256_add_ps(s1, _mm256_mul_ps(_mm256_loadu_ps(x[1] + k), wv));
            s2 = _mm256_add_ps(s2, _mm256_mul_ps(_mm256_loadu_ps(x[2] + k), wv));
            s3 = _mm256_add_ps(s3, _mm256_mul_ps(_mm256_loadu_ps(x[3] + k), wv));
        }
        _mm256_storeu_ps(l[0] + 8 * c, s0);
        _mm256_storeu_ps(l[1] + 8 * c, s1);
        _mm256_storeu_ps(l[2] + 8 * c, s2);
        _mm256_storeu_ps(l[3] + 8 * c, s3);
    }
    for (int r = 0; r < 4; r++) {
        for (int64_t q = full; q < n; q++) l[r][q % 32] += x[r][q] * w_at(w, t, q);
        float s[8];
        for (int i = 0; i < 8; i++) s[i] = (l[r][i] + l[r][8 + i]) + (l[r][16 + i] + l[r][24 + i]);
        out[r] = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
    }
}

/* y[q][n] += sc * sum_j v[q][j] * bt[j][n] for n in [n0, n1) and the first nr (1..4) of
 * four rows: acc starts at 0 and takes j in order (multiply, then add), as the general
 * expand does, so the bits are the same; the accumulators stay in registers and each bt
 * element is loaded and converted once for the four rows. */
static void lora_expand4(float *const y[4], const float *const v[4], int nr, float sc, const void *bt, mn_dtype t,
                         int64_t ldb, int32_t r, int64_t n0, int64_t n1) {
    int64_t n = n0;
    const __m256 scv = _mm256_set1_ps(sc);
    for (; n + 8 <= n1; n += 8) {
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int32_t j = 0; j < r; j++) {
            const __m256 wv = load8(bt, t, (int64_t)j * ldb + n);
            s0 = _mm256_add_ps(s0, _mm256_mul_ps(_mm256_set1_ps(v[0][j]), wv));
            s1 = _mm256_add_ps(s1, _mm256_mul_ps(_mm256_set1_ps(v[1][j]), wv));
            s2 = _mm256_add_ps(s2, _mm256_mul_ps(_mm256_set1_ps(v[2][j]), wv));
            s3 = _mm256_add_ps(s3, _mm256_mul_ps(_mm256_set1_ps(v[3][j]), wv));
        }
        const __m256 acc[4] = {s0, s1, s2, s3};
        for (int q = 0; q < nr; q++)
            _mm256_storeu_ps(y[q] + n, _mm256_add_ps(_mm256_loadu_ps(y[q] + n), _mm256_mul_ps(scv, acc[q])));
    }
    for (; n < n1; n++)
        for (int q = 0; q < nr; q++) {
            float acc = 0.0f;
            for (int32_t j = 0; j < r; j++) acc += v[q][j] * w_at(bt, t, (int64_t)j * ldb + n);
            y[q][n] += sc * acc;
        }
}

/* y[n] += sc * sum_j v[j] * bt[j][n] for n in [n0, n1), one row: acc from 0 over j in order
 * (multiply, then add), the general expand's operations per element; 64 columns of
 * accumulators stay in registers while the r rows of bt stream past. */
static void lora_expand1(float *y, const float *v, float sc, const void *bt, mn_dtype t, int64_t ldb, int32_t r,
                         int64_t n0, int64_t n1) {
    const __m256 scv = _mm256_set1_ps(sc);
    int64_t n = n0;
    for (; n + 64 <= n1; n += 64) {
        __m256 s[8];
        for (int c = 0; c < 8; c++) s[c] = _mm256_setzero_ps();
        for (int32_t j = 0; j < r; j++) {
            const __m256 vj = _mm256_set1_ps(v[j]);
            const int64_t o = (int64_t)j * ldb + n;
            for (int c = 0; c < 8; c++) s[c] = _mm256_add_ps(s[c], _mm256_mul_ps(vj, load8(bt, t, o + 8 * c)));
        }
        for (int c = 0; c < 8; c++)
            _mm256_storeu_ps(y + n + 8 * c, _mm256_add_ps(_mm256_loadu_ps(y + n + 8 * c), _mm256_mul_ps(scv, s[c])));
    }
    for (; n + 8 <= n1; n += 8) {
        __m256 s = _mm256_setzero_ps();
        for (int32_t j = 0; j < r; j++) s = _mm256_add_ps(s, _mm256_mul_ps(_mm256_set1_ps(v[j]), load8(bt, t, (int64_t)j * ldb + n)));
        _mm256_storeu_ps(y + n, _mm256_add_ps(_mm256_loadu_ps(y + n), _mm256_mul_ps(scv, s)));
    }
    for (; n < n1; n++) {
        float acc = 0.0f;
        for (int32_t j = 0; j < r; j++) acc += v[j] * w_at(bt, t, (int64_t)j * ldb + n);
        y[n] += sc * acc;
    }
}

#include "kernels/cpu/lora_impl.h"

void mn__cpu_lora_avx2(const mn_lora_desc *d, void *work, const mn_par *par);

void mn__cpu_lora_avx2(const mn_lora_desc *d, void *work, const mn_par *par) { lora_body(d, work, par); }
