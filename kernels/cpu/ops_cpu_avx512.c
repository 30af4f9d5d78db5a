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

/* ---- attention --------------------------------------------------------------------------
 * Per (row = token, head) the float sequence is fixed, whichever of the two layouts below
 * computes it (so a token decoded alone gets the bits it gets inside a prefill tile):
 *   score_p = scale * reduce16x16-tree over l < 16 of P_l, P_l = q[l]*k_p[l] then
 *     fma(q[d], k_p[d], P_l) for d = l+16, l+32, ... (head_dim zero-padded to 16s);
 *     positions past the token's own are -inf
 *   per chunk of 32 positions: mx = max(m, max_p score_p); alpha = exp16(m - mx);
 *     e_p = exp16(score_p - mx); z = pairwise tree over the 32 e_p (p + 16, + 8, + 4,
 *     + 2, + 1); l = l*alpha + z; acc[d] = acc[d]*alpha, then acc[d] = fma(e_p, v_p[d],
 *     acc[d]) for each valid p ascending; m = mx
 * Layout "head dims in lanes" suits decode, where a unit has only a KV group's few heads:
 * P_l are the lanes of one FMA chain, and the tree is a transpose-and-add over 16
 * positions. Layout "rows in lanes" (16 rows of a unit per vector) suits prefill and
 * appends: P_l are 16 vectors and every softmax step is vertical, with no shuffles. */

#define CH MN__ATTN_CHUNK

/* K and V rows of positions c0 .. c0+nc-1 as f32, row stride ld (zero past hd and for
 * rows nc .. CH-1, so every row that is read is finite). */
static inline void convert_chunk(const uint16_t *const *kp, const uint16_t *const *vp, int32_t nc, int32_t hd,
                                 int32_t nv, float *kf, float *vf) {
    const int32_t ld = nv * 16;
    for (int32_t p = 0; p < nc; p++) {
        for (int32_t v = 0; v < nv; v++) {
            __mmask16 k = tail_mask(hd - 16 * v);
            _mm512_store_ps(kf + p * ld + 16 * v, load_h16(kp[p] + 16 * v, k));
            _mm512_store_ps(vf + p * ld + 16 * v, load_h16(vp[p] + 16 * v, k));
        }
    }
    for (int32_t p = nc; p < CH; p++)
        for (int32_t v = 0; v < nv; v++) {
            _mm512_store_ps(kf + p * ld + 16 * v, _mm512_setzero_ps());
            _mm512_store_ps(vf + p * ld + 16 * v, _mm512_setzero_ps());
        }
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

/* The sum of 32 softmax weights given as t[i] = e[i] + e[i+16] (one vector): the
 * pairwise tree (+8, +4, +2, +1) both layouts use. */
static inline float sum_tree16(__m512 t16) {
    /* in registers (a store then 16 scalar loads stalls store forwarding) */
    __m512 u = _mm512_add_ps(t16, _mm512_shuffle_f32x4(t16, t16, _MM_SHUFFLE(3, 2, 3, 2))); /* t_i + t_{i+8} */
    __m512 v = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, _MM_SHUFFLE(1, 1, 1, 1)));       /* u_i + u_{i+4} */
    __m512 w = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(3, 2, 3, 2)));             /* v_i + v_{i+2} */
    __m512 z = _mm512_add_ps(w, _mm512_permute_ps(w, _MM_SHUFFLE(1, 1, 1, 1)));             /* w_0 + w_1 */
    return _mm512_cvtss_f32(z);
}

/* One chunk's softmax step for one head in the heads-in-lanes layouts: sc[0..CH) holds the
 * chunk's scores (-inf past the token) and becomes the weights e_p; the running max *m and
 * sum *l move on; returns alpha, the factor for the running V sum (see the contract above). */
static inline float lanes_softmax_step(float *sc, float *m, float *l) {
    __m512 vm = _mm512_set1_ps(*m);
    for (int32_t p = 0; p < CH; p += 16) vm = _mm512_max_ps(vm, _mm512_load_ps(sc + p));
    float cm = _mm512_reduce_max_ps(vm);
    vm = _mm512_set1_ps(cm);
    __m512 vs = _mm512_setzero_ps();
    for (int32_t p = 0; p < CH; p += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_load_ps(sc + p), vm));
        _mm512_store_ps(sc + p, e);
        vs = _mm512_add_ps(vs, e);
    }
    float alpha = _mm512_cvtss_f32(exp16(_mm512_set1_ps(*m - cm)));
    *l = *l * alpha + sum_tree16(vs);
    *m = cm;
    return alpha;
}

/* Head dims in lanes (decode: a unit holds a KV group's few heads). Each K/V chunk is
 * converted to f32 once and shared by every token and head of the unit; a score is the
 * 16-lane FMA chain over head_dim, then reduce16x16. */
static inline __attribute__((always_inline)) void part_lanes(const mn_attention_desc *d, int64_t t0, int32_t nt,
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
        mn__kv_chunk_begin(kv, s, c0, nc, max_pos, g, kp, vp);
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
#ifdef ABL_LNOSC
                    for (int32_t pp = 0; pp < 16; pp++) sa[pp] = _mm512_load_ps(kf + (p0 + pp) * ld);
                    for (int32_t pp = 0; pp < 0; pp++) {
#else
                    for (int32_t pp = 0; pp < 16; pp++) {
#endif
                        const float *kr = kf + (p0 + pp) * ld;
                        __m512 a = _mm512_mul_ps(qv[0], _mm512_load_ps(kr));
                        for (int32_t v = 1; v < nv; v++) a = _mm512_fmadd_ps(qv[v], _mm512_load_ps(kr + 16 * v), a);
                        sa[pp] = a;
                    }
                    __m512 r = _mm512_mul_ps(reduce16x16(sa), vscale);
                    _mm512_store_ps(&sc[j][p0], _mm512_mask_mov_ps(ninf, tail_mask(n - p0), r));
                }
            }
            /* the heads' softmax steps side by side: each is a chain of dependent steps
             * (max, exp, sum), which one head at a time left exposed */
            for (int32_t j = 0; j < nh; j++) alpha[j] = lanes_softmax_step(sc[j], &m[i][j], &l[i][j]);
#ifndef ABL_LNOPV
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
#endif
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

/* One decode token whose heads x head-dim blocks fit in registers (nh * nv <= 12, head_dim
 * a multiple of 16): the same float operations as part_lanes, arranged so that nothing is
 * staged through memory but the partial score vectors. Each K row is converted once into
 * registers and scored against every head (q held in registers); each V row is converted
 * once and added into accumulators that stay in registers for the whole segment. */
static inline __attribute__((always_inline)) void part_decode_regs(const mn_attention_desc *d, int64_t t0, int32_t h0,
                                                                   const int32_t nh, const int32_t nv, int32_t p0,
                                                                   int32_t p1, mn__attn_part *out) {
    const mn_kv_view *kv = &d->kv;
    const int32_t hd = d->head_dim, g = h0 / (d->n_head / d->n_kv_head), s = d->seq[t0];
    float part[MN__ATTN_MAX_HEADS][16][16] __attribute__((aligned(64)));
    float sc[MN__ATTN_MAX_HEADS][CH] __attribute__((aligned(64)));
    const uint16_t *kp[CH], *vp[CH];
    const __m512 ninf = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(d->scale);
    __m512 qv[12], a[12];
    float m[MN__ATTN_MAX_HEADS], l[MN__ATTN_MAX_HEADS], alpha[MN__ATTN_MAX_HEADS];
    const float *q = d->q + t0 * d->q_stride + (int64_t)h0 * hd;
    for (int32_t j = 0; j < nh; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
        for (int32_t v = 0; v < nv; v++) {
            qv[j * nv + v] = _mm512_loadu_ps(q + j * hd + 16 * v);
            a[j * nv + v] = _mm512_setzero_ps();
        }
    }
    int32_t end = d->pos[t0] + 1 < p1 ? d->pos[t0] + 1 : p1;
    for (int32_t c0 = p0; c0 < end; c0 += CH) {
        const int32_t nc = end - c0 < CH ? end - c0 : CH;
        mn__kv_chunk_begin(kv, s, c0, nc, end, g, kp, vp);
        for (int32_t pb = 0; pb < CH; pb += 16) {
            if (pb >= nc) {
                for (int32_t j = 0; j < nh; j++) _mm512_store_ps(&sc[j][pb], ninf);
                continue;
            }
            for (int32_t pp = 0; pp < 16; pp++) {
                __m512 k[MN__ATTN_MAX_HD / 16];
                for (int32_t v = 0; v < nv; v++)
                    k[v] = pb + pp < nc ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kp[pb + pp] + 16 * v)))
                                        : _mm512_setzero_ps();
                for (int32_t j = 0; j < nh; j++) {
                    __m512 x = _mm512_mul_ps(qv[j * nv], k[0]);
                    for (int32_t v = 1; v < nv; v++) x = _mm512_fmadd_ps(qv[j * nv + v], k[v], x);
                    _mm512_store_ps(part[j][pp], x);
                }
            }
            for (int32_t j = 0; j < nh; j++) {
                __m512 sa[16];
                for (int32_t pp = 0; pp < 16; pp++) sa[pp] = _mm512_load_ps(part[j][pp]);
                __m512 r = _mm512_mul_ps(reduce16x16(sa), vscale);
                _mm512_store_ps(&sc[j][pb], _mm512_mask_mov_ps(ninf, tail_mask(nc - pb), r));
            }
        }
        for (int32_t j = 0; j < nh; j++) alpha[j] = lanes_softmax_step(sc[j], &m[j], &l[j]);
        for (int32_t j = 0; j < nh; j++)
            for (int32_t v = 0; v < nv; v++) a[j * nv + v] = _mm512_mul_ps(a[j * nv + v], _mm512_set1_ps(alpha[j]));
        for (int32_t p = 0; p < nc; p++) {
            for (int32_t v = 0; v < nv; v++) {
                __m512 vv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vp[p] + 16 * v)));
                for (int32_t j = 0; j < nh; j++) a[j * nv + v] = _mm512_fmadd_ps(_mm512_set1_ps(sc[j][p]), vv, a[j * nv + v]);
            }
        }
    }
    for (int32_t j = 0; j < nh; j++) {
        for (int32_t v = 0; v < nv; v++) _mm512_storeu_ps(out->acc + (int64_t)j * hd + 16 * v, a[j * nv + v]);
        out->m[0][j] = m[j];
        out->l[0][j] = l[j];
    }
}

/* Rows in lanes: up to 64 rows (token i = r / nh, head h0 + r % nh) in groups of 16. */
static inline __attribute__((always_inline)) void part_rows(const mn_attention_desc *d, int64_t t0, int32_t nt,
                                                             int32_t h0, int32_t nh, int32_t p0, int32_t p1,
                                                             mn__attn_part *out, const int32_t nvc) {
    const mn_kv_view *kv = &d->kv;
    const int32_t hd = d->head_dim, nv = nvc ? nvc : (hd + 15) / 16, ld = nv * 16;
    const int32_t g = h0 / (d->n_head / d->n_kv_head), s = d->seq[t0], R = nt * nh, ng = (R + 15) / 16;
    float kf[CH * MN__ATTN_MAX_HD] __attribute__((aligned(64)));
    float vf[CH * MN__ATTN_MAX_HD] __attribute__((aligned(64)));
    float qt[4][MN__ATTN_MAX_HD * 16] __attribute__((aligned(64)));  /* [group][d][lane] */
    float acct[4][MN__ATTN_MAX_HD * 16] __attribute__((aligned(64))); /* [group][d][lane] */
    __m512 m[4], l[4];
    __m512i npos[4];
    const uint16_t *kp[CH], *vp[CH];
    int32_t max_pos = 0;
    for (int32_t i = 0; i < nt; i++) max_pos = d->pos[t0 + i] + 1 > max_pos ? d->pos[t0 + i] + 1 : max_pos;
    for (int32_t G = 0; G < ng; G++) {
        int32_t np[16];
        for (int32_t k = 0; k < 16; k++) {
            int32_t r = G * 16 + k;
            np[k] = r < R ? d->pos[t0 + r / nh] + 1 : 0;
            const float *q = r < R ? d->q + (t0 + r / nh) * d->q_stride + (int64_t)(h0 + r % nh) * hd : NULL;
            for (int32_t x = 0; x < ld; x++) qt[G][x * 16 + k] = q && x < hd ? q[x] : 0.0f;
        }
        npos[G] = _mm512_loadu_si512(np);
        m[G] = _mm512_set1_ps(-INFINITY);
        l[G] = _mm512_setzero_ps();
        for (int32_t x = 0; x < ld * 16; x++) acct[G][x] = 0.0f;
    }
    const __m512 vscale = _mm512_set1_ps(d->scale), ninf = _mm512_set1_ps(-INFINITY);
    if (max_pos > p1) max_pos = p1;
    for (int32_t c0 = p0; c0 < max_pos; c0 += CH) {
        int32_t nc = max_pos - c0 < CH ? max_pos - c0 : CH;
        mn__kv_chunk_begin(kv, s, c0, nc, max_pos, g, kp, vp);
#ifndef ABL_NOCONV
        convert_chunk(kp, vp, nc, hd, nv, kf, vf);
#endif
        for (int32_t G = 0; G < ng; G++) {
            __m512 e[CH];
            __mmask16 valid[CH];
            /* valid[p]: rows whose token reaches position c0 + p */
            __m512i rel = _mm512_sub_epi32(npos[G], _mm512_set1_epi32(c0));
            for (int32_t p = 0; p < CH; p++) valid[p] = _mm512_cmpgt_epi32_mask(rel, _mm512_set1_epi32(p));
            /* score of position p for the 16 rows: 16 partial chains P_l over d = l, l+16,
             * ... (the lanes of the other layout), then reduce16x16's tree */
            const float *qg = qt[G];
            /* two positions per pass share each load of a Q column; per group of 4 partial
             * chains the first tree level is taken at once, which keeps the live vectors
             * within the register file (the operations per position are unchanged) */
            int32_t p = 0;
            for (; p + 2 <= nc; p += 2) {
                const float *k0 = kf + p * ld, *k1 = k0 + ld;
                __m512 Q0[4], Q1[4];
#pragma GCC unroll 4
                for (int32_t j = 0; j < 4; j++) {
                    __m512 A[4], B[4];
#pragma GCC unroll 4
                    for (int32_t i = 0; i < 4; i++) {
                        const int32_t x = 4 * j + i;
                        __m512 q = _mm512_load_ps(qg + x * 16);
                        A[i] = _mm512_mul_ps(q, _mm512_set1_ps(k0[x]));
                        B[i] = _mm512_mul_ps(q, _mm512_set1_ps(k1[x]));
                        for (int32_t v = 1; v < nv; v++) {
                            q = _mm512_load_ps(qg + (16 * v + x) * 16);
                            A[i] = _mm512_fmadd_ps(q, _mm512_set1_ps(k0[16 * v + x]), A[i]);
                            B[i] = _mm512_fmadd_ps(q, _mm512_set1_ps(k1[16 * v + x]), B[i]);
                        }
                    }
                    Q0[j] = _mm512_add_ps(_mm512_add_ps(A[0], A[2]), _mm512_add_ps(A[1], A[3]));
                    Q1[j] = _mm512_add_ps(_mm512_add_ps(B[0], B[2]), _mm512_add_ps(B[1], B[3]));
                }
                __m512 s0 = _mm512_add_ps(_mm512_add_ps(Q0[0], Q0[1]), _mm512_add_ps(Q0[2], Q0[3]));
                __m512 s1 = _mm512_add_ps(_mm512_add_ps(Q1[0], Q1[1]), _mm512_add_ps(Q1[2], Q1[3]));
                e[p] = _mm512_mask_mov_ps(ninf, valid[p], _mm512_mul_ps(s0, vscale));
                e[p + 1] = _mm512_mask_mov_ps(ninf, valid[p + 1], _mm512_mul_ps(s1, vscale));
            }
            for (; p < nc; p++) {
                const float *kr = kf + p * ld;
                __m512 P[16];
#pragma GCC unroll 16
                for (int32_t x = 0; x < 16; x++) P[x] = _mm512_mul_ps(_mm512_load_ps(qg + x * 16), _mm512_set1_ps(kr[x]));
                for (int32_t v = 1; v < nv; v++) {
#pragma GCC unroll 16
                    for (int32_t x = 0; x < 16; x++)
                        P[x] = _mm512_fmadd_ps(_mm512_load_ps(qg + (16 * v + x) * 16), _mm512_set1_ps(kr[16 * v + x]), P[x]);
                }
                __m512 Q[4];
#pragma GCC unroll 4
                for (int32_t j = 0; j < 4; j++)
                    Q[j] = _mm512_add_ps(_mm512_add_ps(P[4 * j], P[4 * j + 2]), _mm512_add_ps(P[4 * j + 1], P[4 * j + 3]));
                __m512 sc = _mm512_add_ps(_mm512_add_ps(Q[0], Q[1]), _mm512_add_ps(Q[2], Q[3]));
                e[p] = _mm512_mask_mov_ps(ninf, valid[p], _mm512_mul_ps(sc, vscale));
            }
            for (int32_t p = nc; p < CH; p++) e[p] = ninf;
            /* max as a tree (exact in any order; a chain of 32 dependent maxes stalled) */
            __m512 mt[16];
            for (int32_t i = 0; i < 16; i++) mt[i] = _mm512_max_ps(e[i], e[i + 16]);
            for (int32_t w = 8; w >= 1; w /= 2)
                for (int32_t i = 0; i < w; i++) mt[i] = _mm512_max_ps(mt[i], mt[i + w]);
            __m512 mx = _mm512_max_ps(m[G], mt[0]);
            __m512 alpha = exp16(_mm512_sub_ps(m[G], mx));
            for (int32_t p = 0; p < CH; p++) e[p] = exp16(_mm512_sub_ps(e[p], mx));
            __m512 t[16];
            for (int32_t p = 0; p < 16; p++) t[p] = _mm512_add_ps(e[p], e[p + 16]);
            for (int32_t w = 8; w >= 1; w /= 2)
                for (int32_t p = 0; p < w; p++) t[p] = _mm512_add_ps(t[p], t[p + w]);
            l[G] = _mm512_add_ps(_mm512_mul_ps(l[G], alpha), t[0]);
            m[G] = mx;
#ifndef ABL_NOPV
            for (int32_t v = 0; v < nv; v++) {
                __m512 a[16];
                float *at = &acct[G][v * 16 * 16];
#pragma GCC unroll 16
                for (int32_t k = 0; k < 16; k++) a[k] = _mm512_mul_ps(_mm512_load_ps(at + k * 16), alpha);
                for (int32_t p = 0; p < nc; p++) {
                    const float *vr = vf + p * ld + v * 16;
                    __m512 ep = e[p];
                    __mmask16 vp_ = valid[p];
#pragma GCC unroll 16
                    for (int32_t k = 0; k < 16; k++) a[k] = _mm512_mask3_fmadd_ps(ep, _mm512_set1_ps(vr[k]), a[k], vp_);
                }
#pragma GCC unroll 16
                for (int32_t k = 0; k < 16; k++) _mm512_store_ps(at + k * 16, a[k]);
            }
#endif
        }
    }
    for (int32_t G = 0; G < ng; G++) {
        float mm[16], ll[16];
        _mm512_storeu_ps(mm, m[G]);
        _mm512_storeu_ps(ll, l[G]);
        for (int32_t k = 0; k < 16 && G * 16 + k < R; k++) {
            int32_t r = G * 16 + k, i = r / nh, j = r % nh;
            float *o = out->acc + (int64_t)r * hd;
            for (int32_t x = 0; x < hd; x++) o[x] = acct[G][x * 16 + k];
            out->m[i][j] = mm[k];
            out->l[i][j] = ll[k];
        }
    }
}

/* Units of fewer rows (tokens x heads) than this take the head-dims-in-lanes layout. */
#define ROWS_LAYOUT_MIN 8

void mn__attn_part_avx512(const mn_attention_desc *d, int64_t t0, int32_t nt, int32_t h0, int32_t nh, int32_t p0,
                          int32_t p1, mn__attn_part *out) {
    int32_t nvc = d->head_dim == 64 ? 4 : d->head_dim == 128 ? 8 : 0;
    if (nt * nh >= ROWS_LAYOUT_MIN) {
        if (nvc == 4) part_rows(d, t0, nt, h0, nh, p0, p1, out, 4);
        else if (nvc == 8) part_rows(d, t0, nt, h0, nh, p0, p1, out, 8);
        else part_rows(d, t0, nt, h0, nh, p0, p1, out, 0);
    } else {
        switch (nh) {
#define LANES_CASE(NH)                                                           \
    case NH:                                                                     \
        if (nt == 1 && nvc == 4 && NH * 4 <= 12) part_decode_regs(d, t0, h0, NH, 4, p0, p1, out); \
        else if (nt == 1 && nvc == 8 && NH * 8 <= 12) part_decode_regs(d, t0, h0, NH, 8, p0, p1, out); \
        else if (nvc == 4) part_lanes(d, t0, nt, h0, NH, 4, p0, p1, out);        \
        else if (nvc == 8) part_lanes(d, t0, nt, h0, NH, 8, p0, p1, out);        \
        else part_lanes(d, t0, nt, h0, NH, 0, p0, p1, out);                      \
        break;
        LANES_CASE(1)
        LANES_CASE(2)
        LANES_CASE(3)
        LANES_CASE(4)
        LANES_CASE(5)
        LANES_CASE(6)
        LANES_CASE(7)
        default: LANES_CASE(8)
#undef LANES_CASE
        }
    }
}
