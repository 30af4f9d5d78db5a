/* kernels/cpu/ops_cpu_avx2.c — AVX2 + FMA + F16C bodies of rmsnorm, silu_mul, the f16
 * row conversions and attention (see ops_cpu_impl.h). Built with -mavx2 -mfma -mf16c;
 * only called when the CPU has them.
 *
 * Every reduction here runs in one fixed order that depends only on the length of the
 * row being reduced (a fixed set of vector accumulators, then one fixed horizontal
 * sum), never on the batch or the thread, which keeps the ops batch-invariant.
 */
#include <immintrin.h>
#include <math.h>

#include "kernels/cpu/ops_cpu_impl.h"

/* sum of the 8 lanes, in one fixed order */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp(x) to ~2 ulp: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact
 * product), a degree-7 polynomial in r, times 2^n built in the exponent bits. Inputs
 * above 88 are clamped (exp(88) ~ 1.65e38, still finite); below -87.3 the result is 0. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(tiny, y);
}

void mn__rmsnorm_row_avx2(const float *x, const float *w, float *y, int64_t D, float eps) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= D; i += 32) {
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        __m256 x2 = _mm256_loadu_ps(x + i + 16), x3 = _mm256_loadu_ps(x + i + 24);
        a0 = _mm256_fmadd_ps(x0, x0, a0);
        a1 = _mm256_fmadd_ps(x1, x1, a1);
        a2 = _mm256_fmadd_ps(x2, x2, a2);
        a3 = _mm256_fmadd_ps(x3, x3, a3);
    }
    for (; i + 8 <= D; i += 8) {
        __m256 x0 = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(x0, x0, a0);
    }
    float tail = 0.0f;
    for (; i < D; i++) tail += x[i] * x[i];
    float ss = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + tail;
    float scale = 1.0f / sqrtf(ss / (float)D + eps);
    __m256 vs = _mm256_set1_ps(scale);
    for (i = 0; i + 8 <= D; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs), _mm256_loadu_ps(w + i)));
    for (; i < D; i++) y[i] = x[i] * scale * w[i];
}

void mn__silu_mul_row_avx2(const float *g, const float *u, float *y, int64_t F) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= F; i += 8) {
        __m256 vg = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_xor_ps(vg, sign));
        __m256 s = _mm256_div_ps(vg, _mm256_add_ps(one, e));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    for (; i < F; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void mn__f32_to_f16_row_avx2(const float *x, uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(void *)(y + i), h);
    }
    for (; i < n; i++) y[i] = mn_fp32_to_fp16(x[i]);
}

void mn__f16_to_f32_row_avx2(const uint16_t *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(x + i))));
    for (; i < n; i++) y[i] = mn_fp16_to_fp32(x[i]);
}

static inline __m256 load_h8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
}

/* Online softmax over chunks of MN__ATTN_CHUNK positions. Per head j the sequence is:
 * scores of the chunk (8-lane FMA over head_dim, fixed hsum, scalar tail), chunk max,
 * weights = exp8(score - max), l = l*alpha + sum, acc = acc*alpha + sum_p w_p V_p
 * (positions ascending). Nothing in it depends on nh or on other heads. */
static inline __attribute__((always_inline)) void attn_heads(const mn_attention_desc *d, int64_t t,
                                                              int32_t h0, const int32_t nh, const int32_t nvc) {
    const mn_kv_view *kv = &d->kv;
    const int32_t hd = d->head_dim, nv = nvc ? nvc : hd / 8, g = h0 / (d->n_head / d->n_kv_head);
    const int32_t s = d->seq[t], n_pos = d->pos[t] + 1;
    float acc[MN__ATTN_MAX_HEADS][MN__ATTN_MAX_HD] __attribute__((aligned(32)));
    float sc[MN__ATTN_MAX_HEADS][MN__ATTN_CHUNK] __attribute__((aligned(32)));
    float m[MN__ATTN_MAX_HEADS], l[MN__ATTN_MAX_HEADS], alpha[MN__ATTN_MAX_HEADS];
    const float *q[MN__ATTN_MAX_HEADS];
    const uint16_t *kp[MN__ATTN_CHUNK], *vp[MN__ATTN_CHUNK];
    for (int32_t j = 0; j < nh; j++) {
        q[j] = d->q + t * d->q_stride + (int64_t)(h0 + j) * hd;
        m[j] = -INFINITY;
        l[j] = 0.0f;
        for (int32_t i = 0; i < hd; i++) acc[j][i] = 0.0f;
    }
    for (int32_t c0 = 0; c0 < n_pos; c0 += MN__ATTN_CHUNK) {
        int32_t n = n_pos - c0 < MN__ATTN_CHUNK ? n_pos - c0 : MN__ATTN_CHUNK;
        mn__kv_chunk_rows(kv, s, c0, n, g, kp, vp);
        /* scores: each K row converted once per 8 dims, used by all nh heads */
        for (int32_t p = 0; p < n; p++) {
            __m256 sa[MN__ATTN_MAX_HEADS];
            for (int32_t j = 0; j < nh; j++) sa[j] = _mm256_setzero_ps();
            for (int32_t v = 0; v < nv; v++) {
                __m256 kf = load_h8(kp[p] + 8 * v);
                for (int32_t j = 0; j < nh; j++) sa[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q[j] + 8 * v), kf, sa[j]);
            }
            for (int32_t j = 0; j < nh; j++) {
                float dot = hsum8(sa[j]);
                for (int32_t i = nv * 8; i < hd; i++) dot += q[j][i] * mn_fp16_to_fp32(kp[p][i]);
                sc[j][p] = dot * d->scale;
            }
        }
        /* softmax step; padding past n is -inf so it weighs exactly 0 */
        for (int32_t j = 0; j < nh; j++) {
            for (int32_t p = n; p < MN__ATTN_CHUNK; p++) sc[j][p] = -INFINITY;
            __m256 vm = _mm256_set1_ps(m[j]);
            for (int32_t p = 0; p < MN__ATTN_CHUNK; p += 8) vm = _mm256_max_ps(vm, _mm256_load_ps(&sc[j][p]));
            float cm = hmax8(vm);
            vm = _mm256_set1_ps(cm);
            __m256 vs = _mm256_setzero_ps();
            for (int32_t p = 0; p < MN__ATTN_CHUNK; p += 8) {
                __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(&sc[j][p]), vm));
                _mm256_store_ps(&sc[j][p], e);
                vs = _mm256_add_ps(vs, e);
            }
            alpha[j] = m[j] == -INFINITY ? 0.0f : expf(m[j] - cm);
            l[j] = l[j] * alpha[j] + hsum8(vs);
            m[j] = cm;
        }
        /* acc = acc*alpha + sum_p w_p V_p: each V row converted once per 8 dims */
        for (int32_t v = 0; v < nv; v++) {
            __m256 a[MN__ATTN_MAX_HEADS];
            for (int32_t j = 0; j < nh; j++) a[j] = _mm256_mul_ps(_mm256_load_ps(&acc[j][8 * v]), _mm256_set1_ps(alpha[j]));
            for (int32_t p = 0; p < n; p++) {
                __m256 vf = load_h8(vp[p] + 8 * v);
                for (int32_t j = 0; j < nh; j++) a[j] = _mm256_fmadd_ps(_mm256_set1_ps(sc[j][p]), vf, a[j]);
            }
            for (int32_t j = 0; j < nh; j++) _mm256_store_ps(&acc[j][8 * v], a[j]);
        }
        for (int32_t i = nv * 8; i < hd; i++) {
            for (int32_t j = 0; j < nh; j++) {
                float a = acc[j][i] * alpha[j];
                for (int32_t p = 0; p < n; p++) a += sc[j][p] * mn_fp16_to_fp32(vp[p][i]);
                acc[j][i] = a;
            }
        }
    }
    for (int32_t j = 0; j < nh; j++) {
        float *o = d->out + t * d->out_stride + (int64_t)(h0 + j) * hd;
        float inv = 1.0f / l[j];
        for (int32_t i = 0; i < hd; i++) o[i] = acc[j][i] * inv;
    }
}

/* One instance per group size (and for head_dim 64 and 128 per vector count), so the
 * per-head accumulators live in registers and the loops unroll; every instance does the
 * same float operations per head, so the choice cannot change a result. */
#define ATTN_CASE(NH)                                                   \
    case NH:                                                            \
        if (d->head_dim == 64) attn_heads(d, t, h0, NH, 64 / 8);         \
        else if (d->head_dim == 128) attn_heads(d, t, h0, NH, 128 / 8);  \
        else attn_heads(d, t, h0, NH, 0);                               \
        break;

void mn__attn_heads_avx2(const mn_attention_desc *d, int64_t t, int32_t h0, int32_t nh) {
    switch (nh) {
    ATTN_CASE(1)
    ATTN_CASE(2)
    ATTN_CASE(3)
    ATTN_CASE(4)
    ATTN_CASE(5)
    ATTN_CASE(6)
    ATTN_CASE(7)
    default: attn_heads(d, t, h0, 8, d->head_dim == 64 ? 64 / 8 : d->head_dim == 128 ? 128 / 8 : 0); break;
    }
}
