/* kernels/cpu/matmul_avx2.c — AVX2 + FMA + F16C matmul (levels avx2 and avx512) and the
 * SIMD activation quantizer used by every SIMD level. The kernels are in matmul_x86.h;
 * the integer dot here is maddubs (u8*s8 pairs to i16, no saturation for our ranges:
 * |w| <= 128, |x| <= 127 gives at most 2*128*127 = 32512) then madd with ones (to i32);
 * the K-quants madd with the sub-block scale instead (matmul_x86_kq.h).
 */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/matmul_impl.h"
#include "kernels/quant_math.h"


#define MN__DOT(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1))
#define MN__Q8_VNNI 0
#define MN__Q8_CT 4
#define MN__ROWS_FN mn__mm_rows_avx2
#include "kernels/cpu/matmul_x86.h"

float mn__quant_group_avx2(const float *x, int n, int8_t *q, int *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float d = _mm_cvtss_f32(m4) / 127.0f;
    if (d == 0.0f) {
        memset(q, 0, (size_t)n);
        if (sum) *sum = 0;
        return d;
    }
    /* x/d, not x*(1/d): the contract's rounding, same bits as the scalar nearbyintf(x/d) */
    const __m256 dv = _mm256_set1_ps(d);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i s16 = _mm256_setzero_si256(); /* pairs of q as i16: at most 8*2*127 per lane */
    for (int i = 0; i < n; i += 32) {
        __m256i q0 = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + i), dv));
        __m256i q1 = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + i + 8), dv));
        __m256i q2 = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + i + 16), dv));
        __m256i q3 = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + i + 24), dv));
        /* packs work per 128-bit lane; the permute puts the 4-byte groups back in order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(p, perm));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_set1_epi8(1), p));
    }
    if (sum) {
        __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
        *sum = _mm_cvtsi128_si32(s);
    }
    return d;
}
