/* kernels/cpu/lora_avx2.c — kernels/cpu/lora_impl.h with AVX2 dot and axpy (CMake gives
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

static float lora_dot(const float *x, const void *w, mn_dtype t, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(x + k), load8(w, t, k)));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(x + k + 8), load8(w, t, k + 8)));
        a2 = _mm256_add_ps(a2, _mm256_mul_ps(_mm256_loadu_ps(x + k + 16), load8(w, t, k + 16)));
        a3 = _mm256_add_ps(a3, _mm256_mul_ps(_mm256_loadu_ps(x + k + 24), load8(w, t, k + 24)));
    }
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

static void lora_axpy(float *acc, float v, const void *w, mn_dtype t, int64_t n) {
    const __m256 vv = _mm256_set1_ps(v);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), _mm256_mul_ps(vv, load8(w, t, i))));
    for (; i < n; i++) acc[i] += v * w_at(w, t, i);
}

#include "kernels/cpu/lora_impl.h"

void mn__cpu_lora_avx2(const mn_lora_desc *d, void *work, const mn_par *par);

void mn__cpu_lora_avx2(const mn_lora_desc *d, void *work, const mn_par *par) { lora_body(d, work, par); }
