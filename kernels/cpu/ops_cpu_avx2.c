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

/* Sum of the 8 lanes of each of s[0..7], returned as lane p = sum of s[p]: a fixed
 * transpose-and-add tree (pairs of vectors, then 64-bit pairs, then the two halves), 3
 * instructions per result instead of a horizontal sum each. The order in which one
 * result's lanes are added depends only on the lane index. */
static inline __m256 reduce8x8(const __m256 s[8]) {
    __m256 c[4], e[2];
    for (int k = 0; k < 4; k++)
        c[k] = _mm256_add_ps(_mm256_unpacklo_ps(s[2 * k], s[2 * k + 1]), _mm256_unpackhi_ps(s[2 * k], s[2 * k + 1]));
    for (int k = 0; k < 2; k++) {
        __m256d a = _mm256_castps_pd(c[2 * k]), b = _mm256_castps_pd(c[2 * k + 1]);
        e[k] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(e[0], e[1], 0x20), _mm256_permute2f128_ps(e[0], e[1], 0x31));
}

/* Online softmax over chunks of MN__ATTN_CHUNK positions for tokens t0 .. t0+nt-1 (one
 * sequence) and heads h0 .. h0+nh-1 (one KV group). Each K/V chunk is converted to f32
 * (rows zero-padded to a multiple of 8) once and shared by every token and head of the
 * tile. Per (token, head) the float sequence is fixed: score of position p = scale *
 * tree-sum (reduce8x8) of the 8-lane FMA chain over head_dim; positions past the
 * token's own are -inf; chunk max, w = exp8(score - max), l = l*alpha + sum,
 * acc = acc*alpha + sum_p w_p V_p (p ascending), over the positions of one segment
 * [p0, p1); the caller folds segments (ops_cpu.c). None of it depends on nt, nh or the
 * other tokens, so a token alone (decode) gets the same bits as inside a prefill tile. */
static inline __attribute__((always_inline)) void attn_part(const mn_attention_desc *d, int64_t t0, int32_t nt,
                                                             int32_t h0, const int32_t nh, const int32_t nvc,
                                                             int32_t p0, int32_t p1, mn__attn_part *out) {
    const mn_kv_view *kv = &d->kv;
    const int32_t hd = d->head_dim, nv = nvc ? nvc : (hd + 7) / 8, g = h0 / (d->n_head / d->n_kv_head);
    const int32_t ld = nv * 8, s = d->seq[t0];
    float kf[MN__ATTN_CHUNK * MN__ATTN_MAX_HD] __attribute__((aligned(32)));
    float vf[MN__ATTN_CHUNK * MN__ATTN_MAX_HD] __attribute__((aligned(32)));
    float acc[MN__ATTN_TILE * MN__ATTN_MAX_HEADS * MN__ATTN_MAX_HD] __attribute__((aligned(32)));
    float qb[MN__ATTN_MAX_HD] __attribute__((aligned(32)));
    float sc[MN__ATTN_MAX_HEADS][MN__ATTN_CHUNK] __attribute__((aligned(32)));
    float m[MN__ATTN_TILE][MN__ATTN_MAX_HEADS], l[MN__ATTN_TILE][MN__ATTN_MAX_HEADS], alpha[MN__ATTN_MAX_HEADS];
    int32_t npos[MN__ATTN_TILE], max_pos = 0;
    const uint16_t *kp[MN__ATTN_CHUNK], *vp[MN__ATTN_CHUNK];
    const __m256 ninf = _mm256_set1_ps(-INFINITY), vscale = _mm256_set1_ps(d->scale);
    const int32_t nfull = hd / 8;
    for (int32_t i = 0; i < nt; i++) {
        npos[i] = d->pos[t0 + i] + 1;
        max_pos = npos[i] > max_pos ? npos[i] : max_pos;
        for (int32_t j = 0; j < nh; j++) {
            m[i][j] = -INFINITY;
            l[i][j] = 0.0f;
            for (int32_t x = 0; x < ld; x++) acc[(i * nh + j) * ld + x] = 0.0f;
        }
    }
    for (int32_t x = hd; x < ld; x++) qb[x] = 0.0f;
    if (max_pos > p1) max_pos = p1;
    for (int32_t c0 = p0; c0 < max_pos; c0 += MN__ATTN_CHUNK) {
        int32_t nc = max_pos - c0 < MN__ATTN_CHUNK ? max_pos - c0 : MN__ATTN_CHUNK;
        mn__kv_chunk_begin(kv, s, c0, nc, max_pos, g, kp, vp);
        for (int32_t p = 0; p < nc; p++) {
            for (int32_t v = 0; v < nfull; v++) {
                _mm256_store_ps(kf + p * ld + 8 * v, load_h8(kp[p] + 8 * v));
                _mm256_store_ps(vf + p * ld + 8 * v, load_h8(vp[p] + 8 * v));
            }
            for (int32_t x = nfull * 8; x < ld; x++) {
                kf[p * ld + x] = x < hd ? mn_fp16_to_fp32(kp[p][x]) : 0.0f;
                vf[p * ld + x] = x < hd ? mn_fp16_to_fp32(vp[p][x]) : 0.0f;
            }
        }
        /* rows up to the next multiple of 8 are scored (then masked): keep them finite */
        for (int32_t p = nc; p < ((nc + 7) & ~7); p++)
            for (int32_t v = 0; v < nv; v++) _mm256_store_ps(kf + p * ld + 8 * v, _mm256_setzero_ps());
        for (int32_t i = 0; i < nt; i++) {
            int32_t n = npos[i] - c0;
            if (n <= 0) continue;
            if (n > MN__ATTN_CHUNK) n = MN__ATTN_CHUNK;
            const float *q = d->q + (t0 + i) * d->q_stride + (int64_t)h0 * hd;
            float *ac = acc + (int64_t)i * nh * ld;
            for (int32_t j = 0; j < nh; j++) {
                for (int32_t x = 0; x < hd; x++) qb[x] = q[j * hd + x];
                __m256 qv[MN__ATTN_MAX_HD / 8];
                for (int32_t v = 0; v < nv; v++) qv[v] = _mm256_load_ps(qb + 8 * v);
                for (int32_t p0 = 0; p0 < MN__ATTN_CHUNK; p0 += 8) {
                    if (p0 >= n) {
                        _mm256_store_ps(&sc[j][p0], ninf);
                        continue;
                    }
                    __m256 sa[8];
                    for (int32_t pp = 0; pp < 8; pp++) {
                        const float *kr = kf + (p0 + pp) * ld;
                        __m256 a = _mm256_mul_ps(qv[0], _mm256_load_ps(kr));
                        for (int32_t v = 1; v < nv; v++) a = _mm256_fmadd_ps(qv[v], _mm256_load_ps(kr + 8 * v), a);
                        sa[pp] = a;
                    }
                    __m256 r = _mm256_mul_ps(reduce8x8(sa), vscale);
                    /* lanes at or past n (position p0 + lane) are masked to -inf */
                    __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
                    __m256 keep = _mm256_cmp_ps(lane, _mm256_set1_ps((float)(n - p0)), _CMP_LT_OQ);
                    _mm256_store_ps(&sc[j][p0], _mm256_blendv_ps(ninf, r, keep));
                }
                __m256 vm = _mm256_set1_ps(m[i][j]);
                for (int32_t p = 0; p < MN__ATTN_CHUNK; p += 8) vm = _mm256_max_ps(vm, _mm256_load_ps(&sc[j][p]));
                float cm = hmax8(vm);
                vm = _mm256_set1_ps(cm);
                __m256 vs = _mm256_setzero_ps();
                for (int32_t p = 0; p < MN__ATTN_CHUNK; p += 8) {
                    __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(&sc[j][p]), vm));
                    _mm256_store_ps(&sc[j][p], e);
                    vs = _mm256_add_ps(vs, e);
                }
                alpha[j] = m[i][j] == -INFINITY ? 0.0f : expf(m[i][j] - cm);
                l[i][j] = l[i][j] * alpha[j] + hsum8(vs);
                m[i][j] = cm;
            }
            for (int32_t v = 0; v < nv; v++) {
                __m256 a[MN__ATTN_MAX_HEADS];
                for (int32_t j = 0; j < nh; j++)
                    a[j] = _mm256_mul_ps(_mm256_load_ps(ac + j * ld + 8 * v), _mm256_set1_ps(alpha[j]));
                for (int32_t p = 0; p < n; p++) {
                    __m256 vv = _mm256_load_ps(vf + p * ld + 8 * v);
                    for (int32_t j = 0; j < nh; j++) a[j] = _mm256_fmadd_ps(_mm256_set1_ps(sc[j][p]), vv, a[j]);
                }
                for (int32_t j = 0; j < nh; j++) _mm256_store_ps(ac + j * ld + 8 * v, a[j]);
            }
        }
    }
    for (int32_t i = 0; i < nt; i++) {
        for (int32_t j = 0; j < nh; j++) {
            const float *ac = acc + (int64_t)(i * nh + j) * ld;
            float *o = out->acc + (int64_t)(i * nh + j) * hd;
            for (int32_t x = 0; x < hd; x++) o[x] = ac[x];
            out->m[i][j] = m[i][j];
            out->l[i][j] = l[i][j];
        }
    }
}

/* One instance per group size (and for head_dim 64 and 128 per vector count), so the
 * per-head accumulators live in registers and the loops unroll; every instance does the
 * same float operations per head, so the choice cannot change a result. */
#define ATTN_CASE(NH)                                                       \
    case NH:                                                                \
        if (d->head_dim == 64) attn_part(d, t0, nt, h0, NH, 64 / 8, p0, p1, out);         \
        else if (d->head_dim == 128) attn_part(d, t0, nt, h0, NH, 128 / 8, p0, p1, out);  \
        else attn_part(d, t0, nt, h0, NH, 0, p0, p1, out);                               \
        break;

void mn__attn_part_avx2(const mn_attention_desc *d, int64_t t0, int32_t nt, int32_t h0, int32_t nh, int32_t p0,
                       int32_t p1, mn__attn_part *out) {
    switch (nh) {
    ATTN_CASE(1)
    ATTN_CASE(2)
    ATTN_CASE(3)
    ATTN_CASE(4)
    ATTN_CASE(5)
    ATTN_CASE(6)
    ATTN_CASE(7)
    default: attn_part(d, t0, nt, h0, 8, d->head_dim == 64 ? 64 / 8 : d->head_dim == 128 ? 128 / 8 : 0, p0, p1, out); break;
    }
}
