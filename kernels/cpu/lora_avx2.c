/* kernels/cpu/lora_avx2.c — kernels/cpu/lora_impl.h with AVX2 dot and axpy (CMake gives
 * *_avx2.c files -mavx2 -mfma -mf16c). Multiplies and adds stay separate instructions and
 * the lanes are reduced in the order the scalar version uses, so the bits are the same. */
#include <immintrin.h>
#include <stdint.h>

#include "kernels/ops.h"

static float lora_dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k)));
    float l[8];
    _mm256_storeu_ps(l, acc);
    for (int i = 0; k < n; k++, i++) l[i] += a[k] * b[k];
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

static void lora_axpy(float *acc, float v, const float *b, int64_t n) {
    const __m256 vv = _mm256_set1_ps(v);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), _mm256_mul_ps(vv, _mm256_loadu_ps(b + i))));
    for (; i < n; i++) acc[i] += v * b[i];
}

#include "kernels/cpu/lora_impl.h"

void mn__cpu_lora_avx2(const mn_lora_desc *d, void *work, const mn_par *par);

void mn__cpu_lora_avx2(const mn_lora_desc *d, void *work, const mn_par *par) { lora_body(d, work, par); }
