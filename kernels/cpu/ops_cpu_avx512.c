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

/* Sum of the 16 lanes of each of s[0..15], returned as lane p = sum of s[p]: a fixed
 * transpose-and-add tree (pairs of vectors, then 64-bit pairs, then 128-bit quarters
 * twice), about 3 instructions per result instead of a full horizontal reduction each.
 * The order in which one result's lanes are added depends only on the lane index. */
static inline __m512 reduce16x16(const __m512 s[16]) {
    __m512 c[8], e[4], f[2];
    for (int k = 0; k < 8; k++)
        c[k] = _mm512_add_ps(_mm512_unpacklo_ps(s[2 * k], s[2 * k + 1]), _mm512_unpackhi_ps(s[2 * k], s[2 * k + 1]));
    for (int k = 0; k < 4; k++) {
        __m512d a = _mm512_castps_pd(c[2 * k]), b = _mm512_castps_pd(c[2 * k + 1]);
        e[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int k = 0; k < 2; k++)
        f[k] = _mm512_add_ps(_mm512_shuffle_f32x4(e[2 * k], e[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(e[2 * k], e[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(f[0], f[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(f[0], f[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Online softmax over chunks of MN__ATTN_CHUNK positions for tokens t0 .. t0+nt-1 (one
 * sequence) and heads h0 .. h0+nh-1 (one KV group). Each K/V chunk is converted to f32
 * once and shared by every token and head of the tile. Per (token, head) the float
 * sequence is fixed: score of position p = scale * tree-sum (reduce16x16) of the
 * 16-lane FMA chain over head_dim; positions past the token's own are -inf; chunk max,
 * w = exp16(score - max), l = l*alpha + sum, acc = acc*alpha + sum_p w_p V_p (p
 * ascending), over the positions of one segment [p0, p1); the caller folds segments
 * (ops_cpu.c). None of it depends on nt, nh or the other tokens, so a token alone
 * (decode) gets the same bits as inside a prefill tile. */
static inline __attribute__((always_inline)) void attn_part(const mn_attention_desc *d, int64_t t0, int32_t nt,
                                                             int32_t h0, const int32_t nh, const int32_t nvc,
                                                             int32_t p0, int32_t p1, mn__attn_part *out) {
    const mn_kv_view *kv = &d->kv;
    const int32_t hd = d->head_dim, nv = nvc ? nvc : (hd + 15) / 16, g = h0 / (d->n_head / d->n_kv_head);
    const int32_t ld = nv * 16, s = d->seq[t0];
    float kf[MN__ATTN_CHUNK * MN__ATTN_MAX_HD] __attribute__((aligned(64)));
    float vf[MN__ATTN_CHUNK * MN__ATTN_MAX_HD] __attribute__((aligned(64)));
    float acc[MN__ATTN_TILE * MN__ATTN_MAX_HEADS * MN__ATTN_MAX_HD] __attribute__((aligned(64)));
    float sc[MN__ATTN_MAX_HEADS][MN__ATTN_CHUNK] __attribute__((aligned(64)));
    float m[MN__ATTN_TILE][MN__ATTN_MAX_HEADS], l[MN__ATTN_TILE][MN__ATTN_MAX_HEADS], alpha[MN__ATTN_MAX_HEADS];
    int32_t npos[MN__ATTN_TILE], max_pos = 0;
    const uint16_t *kp[MN__ATTN_CHUNK], *vp[MN__ATTN_CHUNK];
    const __m512 ninf = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(d->scale);
    for (int32_t i = 0; i < nt; i++) {
        npos[i] = d->pos[t0 + i] + 1;
        max_pos = npos[i] > max_pos ? npos[i] : max_pos;
        for (int32_t j = 0; j < nh; j++) {
            m[i][j] = -INFINITY;
            l[i][j] = 0.0f;
            for (int32_t x = 0; x < ld; x++) acc[(i * nh + j) * ld + x] = 0.0f;
        }
    }
    if (max_pos > p1) max_pos = p1;
    for (int32_t c0 = p0; c0 < max_pos; c0 += MN__ATTN_CHUNK) {
        int32_t nc = max_pos - c0 < MN__ATTN_CHUNK ? max_pos - c0 : MN__ATTN_CHUNK;
        mn__kv_chunk_rows(kv, s, c0, nc, g, kp, vp);
        if (c0 + MN__ATTN_CHUNK < max_pos) {
            int32_t nn = max_pos - c0 - MN__ATTN_CHUNK;
            mn__kv_prefetch_rows(kv, s, c0 + MN__ATTN_CHUNK, nn < MN__ATTN_CHUNK ? nn : MN__ATTN_CHUNK, g);
        }
        for (int32_t p = 0; p < nc; p++) {
            for (int32_t v = 0; v < nv; v++) {
                __mmask16 k = tail_mask(hd - 16 * v);
                _mm512_store_ps(kf + p * ld + 16 * v, load_h16(kp[p] + 16 * v, k));
                _mm512_store_ps(vf + p * ld + 16 * v, load_h16(vp[p] + 16 * v, k));
            }
        }
        /* rows up to the next multiple of 16 are scored (then masked): keep them finite */
        for (int32_t p = nc; p < ((nc + 15) & ~15); p++)
            for (int32_t v = 0; v < nv; v++) _mm512_store_ps(kf + p * ld + 16 * v, _mm512_setzero_ps());
        for (int32_t i = 0; i < nt; i++) {
            int32_t n = npos[i] - c0;
            if (n <= 0) continue;
            if (n > MN__ATTN_CHUNK) n = MN__ATTN_CHUNK;
            const float *q = d->q + (t0 + i) * d->q_stride + (int64_t)h0 * hd;
            float *ac = acc + (int64_t)i * nh * ld;
            for (int32_t j = 0; j < nh; j++) {
                __m512 qv[MN__ATTN_MAX_HD / 16];
                for (int32_t v = 0; v < nv; v++) qv[v] = _mm512_maskz_loadu_ps(tail_mask(hd - 16 * v), q + j * hd + 16 * v);
                for (int32_t p0 = 0; p0 < MN__ATTN_CHUNK; p0 += 16) {
                    if (p0 >= n) {
                        _mm512_store_ps(&sc[j][p0], ninf);
                        continue;
                    }
                    __m512 sa[16];
                    for (int32_t pp = 0; pp < 16; pp++) {
                        const float *kr = kf + (p0 + pp) * ld;
                        __m512 a = _mm512_mul_ps(qv[0], _mm512_load_ps(kr));
                        for (int32_t v = 1; v < nv; v++) a = _mm512_fmadd_ps(qv[v], _mm512_load_ps(kr + 16 * v), a);
                        sa[pp] = a;
                    }
                    __m512 r = _mm512_mul_ps(reduce16x16(sa), vscale);
                    _mm512_store_ps(&sc[j][p0], _mm512_mask_mov_ps(ninf, tail_mask(n - p0), r));
                }
                __m512 vm = _mm512_set1_ps(m[i][j]);
                for (int32_t p = 0; p < MN__ATTN_CHUNK; p += 16) vm = _mm512_max_ps(vm, _mm512_load_ps(&sc[j][p]));
                float cm = _mm512_reduce_max_ps(vm);
                vm = _mm512_set1_ps(cm);
                __m512 vs = _mm512_setzero_ps();
                for (int32_t p = 0; p < MN__ATTN_CHUNK; p += 16) {
                    __m512 e = exp16(_mm512_sub_ps(_mm512_load_ps(&sc[j][p]), vm));
                    _mm512_store_ps(&sc[j][p], e);
                    vs = _mm512_add_ps(vs, e);
                }
                alpha[j] = m[i][j] == -INFINITY ? 0.0f : expf(m[i][j] - cm);
                l[i][j] = l[i][j] * alpha[j] + _mm512_reduce_add_ps(vs);
                m[i][j] = cm;
            }
            for (int32_t v = 0; v < nv; v++) {
                __m512 a[MN__ATTN_MAX_HEADS];
                for (int32_t j = 0; j < nh; j++)
                    a[j] = _mm512_mul_ps(_mm512_load_ps(ac + j * ld + 16 * v), _mm512_set1_ps(alpha[j]));
                for (int32_t p = 0; p < n; p++) {
                    __m512 vv = _mm512_load_ps(vf + p * ld + 16 * v);
                    for (int32_t j = 0; j < nh; j++) a[j] = _mm512_fmadd_ps(_mm512_set1_ps(sc[j][p]), vv, a[j]);
                }
                for (int32_t j = 0; j < nh; j++) _mm512_store_ps(ac + j * ld + 16 * v, a[j]);
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
#define ATTN_CASE(NH)                                                        \
    case NH:                                                                 \
        if (d->head_dim == 64) attn_part(d, t0, nt, h0, NH, 64 / 16, p0, p1, out);         \
        else if (d->head_dim == 128) attn_part(d, t0, nt, h0, NH, 128 / 16, p0, p1, out);  \
        else attn_part(d, t0, nt, h0, NH, 0, p0, p1, out);                                \
        break;

void mn__attn_part_avx512(const mn_attention_desc *d, int64_t t0, int32_t nt, int32_t h0, int32_t nh, int32_t p0,
                       int32_t p1, mn__attn_part *out) {
    switch (nh) {
    ATTN_CASE(1)
    ATTN_CASE(2)
    ATTN_CASE(3)
    ATTN_CASE(4)
    ATTN_CASE(5)
    ATTN_CASE(6)
    ATTN_CASE(7)
    default: attn_part(d, t0, nt, h0, 8, d->head_dim == 64 ? 64 / 16 : d->head_dim == 128 ? 128 / 16 : 0, p0, p1, out); break;
    }
}
