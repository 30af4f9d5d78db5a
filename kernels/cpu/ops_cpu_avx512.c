/* kernels/cpu/ops_cpu_avx512.c — AVX-512 (F/BW/VL/DQ) bodies of rmsnorm, silu_mul and
 * attention (see ops_cpu_impl.h). Built with the AVX-512 flags; only called when the CPU
 * has them. Row tails use masked loads/stores instead of scalar loops.
 *
 * As in the AVX2 file, each reduction has one fixed order that depends only on the
 * length of what is reduced, which keeps the ops batch-invariant.
 */
#include <immintrin.h>
#include <math.h>

#include "kernels/cpu/ops_cpu_impl.h"

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

/* exp(x) to ~2 ulp; the same reduction and polynomial as exp8 in ops_cpu_avx2.c. */
static inline __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f);
    __mmask16 ok = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(ok, p, _mm512_castsi512_ps(e));
}

void mn__rmsnorm_row_avx512(const float *x, const float *w, float *y, int64_t D, float eps) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 64 <= D; i += 64) {
        __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
        __m512 x2 = _mm512_loadu_ps(x + i + 32), x3 = _mm512_loadu_ps(x + i + 48);
        a0 = _mm512_fmadd_ps(x0, x0, a0);
        a1 = _mm512_fmadd_ps(x1, x1, a1);
        a2 = _mm512_fmadd_ps(x2, x2, a2);
        a3 = _mm512_fmadd_ps(x3, x3, a3);
    }
    for (; i < D; i += 16) {
        __m512 x0 = _mm512_maskz_loadu_ps(tail_mask(D - i), x + i);
        a0 = _mm512_fmadd_ps(x0, x0, a0);
    }
    float ss = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    float scale = 1.0f / sqrtf(ss / (float)D + eps);
    __m512 vs = _mm512_set1_ps(scale);
    for (i = 0; i < D; i += 16) {
        __mmask16 k = tail_mask(D - i);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), vs);
        _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, w + i)));
    }
}

void mn__silu_mul_row_avx512(const float *g, const float *u, float *y, int64_t F) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < F; i += 16) {
        __mmask16 k = tail_mask(F - i);
        __m512 vg = _mm512_maskz_loadu_ps(k, g + i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), vg));
        __m512 s = _mm512_div_ps(vg, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, u + i)));
    }
}

static inline __m512 load_h16(const uint16_t *p, __mmask16 k) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

/* Same algorithm as mn__attn_heads_avx2 with 16 lanes; a head_dim that is not a
 * multiple of 16 ends in one masked vector (zeros in the unused lanes). */
static inline __attribute__((always_inline)) void attn_heads(const mn_attention_desc *d, int64_t t,
                                                              int32_t h0, const int32_t nh, const int32_t nvc) {
    const mn_kv_view *kv = &d->kv;
    const int32_t hd = d->head_dim, nv = nvc ? nvc : (hd + 15) / 16, g = h0 / (d->n_head / d->n_kv_head);
    const int32_t s = d->seq[t], n_pos = d->pos[t] + 1;
    float acc[MN__ATTN_MAX_HEADS][MN__ATTN_MAX_HD] __attribute__((aligned(64)));
    float sc[MN__ATTN_MAX_HEADS][MN__ATTN_CHUNK] __attribute__((aligned(64)));
    float m[MN__ATTN_MAX_HEADS], l[MN__ATTN_MAX_HEADS], alpha[MN__ATTN_MAX_HEADS];
    const float *q[MN__ATTN_MAX_HEADS];
    const uint16_t *kp[MN__ATTN_CHUNK], *vp[MN__ATTN_CHUNK];
    for (int32_t j = 0; j < nh; j++) {
        q[j] = d->q + t * d->q_stride + (int64_t)(h0 + j) * hd;
        m[j] = -INFINITY;
        l[j] = 0.0f;
        for (int32_t i = 0; i < nv * 16; i++) acc[j][i] = 0.0f;
    }
    for (int32_t c0 = 0; c0 < n_pos; c0 += MN__ATTN_CHUNK) {
        int32_t n = n_pos - c0 < MN__ATTN_CHUNK ? n_pos - c0 : MN__ATTN_CHUNK;
        mn__kv_chunk_rows(kv, s, c0, n, g, kp, vp);
        for (int32_t p = 0; p < n; p++) {
            __m512 sa[MN__ATTN_MAX_HEADS];
            for (int32_t j = 0; j < nh; j++) sa[j] = _mm512_setzero_ps();
            for (int32_t v = 0; v < nv; v++) {
                __mmask16 k = tail_mask(hd - 16 * v);
                __m512 kf = load_h16(kp[p] + 16 * v, k);
                for (int32_t j = 0; j < nh; j++)
                    sa[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, q[j] + 16 * v), kf, sa[j]);
            }
            for (int32_t j = 0; j < nh; j++) sc[j][p] = _mm512_reduce_add_ps(sa[j]) * d->scale;
        }
        for (int32_t j = 0; j < nh; j++) {
            for (int32_t p = n; p < MN__ATTN_CHUNK; p++) sc[j][p] = -INFINITY;
            __m512 vm = _mm512_set1_ps(m[j]);
            for (int32_t p = 0; p < MN__ATTN_CHUNK; p += 16) vm = _mm512_max_ps(vm, _mm512_load_ps(&sc[j][p]));
            float cm = _mm512_reduce_max_ps(vm);
            vm = _mm512_set1_ps(cm);
            __m512 vs = _mm512_setzero_ps();
            for (int32_t p = 0; p < MN__ATTN_CHUNK; p += 16) {
                __m512 e = exp16(_mm512_sub_ps(_mm512_load_ps(&sc[j][p]), vm));
                _mm512_store_ps(&sc[j][p], e);
                vs = _mm512_add_ps(vs, e);
            }
            alpha[j] = m[j] == -INFINITY ? 0.0f : expf(m[j] - cm);
            l[j] = l[j] * alpha[j] + _mm512_reduce_add_ps(vs);
            m[j] = cm;
        }
        for (int32_t v = 0; v < nv; v++) {
            __mmask16 k = tail_mask(hd - 16 * v);
            __m512 a[MN__ATTN_MAX_HEADS];
            for (int32_t j = 0; j < nh; j++) a[j] = _mm512_mul_ps(_mm512_load_ps(&acc[j][16 * v]), _mm512_set1_ps(alpha[j]));
            for (int32_t p = 0; p < n; p++) {
                __m512 vf = load_h16(vp[p] + 16 * v, k);
                for (int32_t j = 0; j < nh; j++) a[j] = _mm512_fmadd_ps(_mm512_set1_ps(sc[j][p]), vf, a[j]);
            }
            for (int32_t j = 0; j < nh; j++) _mm512_store_ps(&acc[j][16 * v], a[j]);
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
        if (d->head_dim == 64) attn_heads(d, t, h0, NH, 64 / 16);         \
        else if (d->head_dim == 128) attn_heads(d, t, h0, NH, 128 / 16);  \
        else attn_heads(d, t, h0, NH, 0);                               \
        break;

void mn__attn_heads_avx512(const mn_attention_desc *d, int64_t t, int32_t h0, int32_t nh) {
    switch (nh) {
    ATTN_CASE(1)
    ATTN_CASE(2)
    ATTN_CASE(3)
    ATTN_CASE(4)
    ATTN_CASE(5)
    ATTN_CASE(6)
    ATTN_CASE(7)
    default: attn_heads(d, t, h0, 8, d->head_dim == 64 ? 64 / 16 : d->head_dim == 128 ? 128 / 16 : 0); break;
    }
}
