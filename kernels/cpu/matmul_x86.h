/* kernels/cpu/matmul_x86.h — the x86 SIMD matmul kernels, written once and compiled
 * twice: by matmul_avx2.c (integer dot = maddubs + madd) and by matmul_avx512vnni.c
 * (integer dot = vpdpbusd, 8 rows per 256-bit vector for decode, 16 per 512-bit for prefill).
 * The includer defines, before including this file:
 *   MN__DOT(u, s)   __m256i of 8 int32: lane i = sum of u8*s8 products of bytes 4i..4i+3
 *   MN__Q8_VNNI     1: the legacy quants use vpdpbusd (256- and 512-bit); 0: maddubs
 *   MN__Q8_CT       legacy-quant token tile (<= 8); also the largest T that takes the decode tiles
 *   MN__ROWS_FN     the name of the entry point (declared in matmul_impl.h)
 * Both integer dots give the same exact sums, so both levels produce the same bits.
 *
 * Per-element sequences (fixed whatever the tile; that is the batch invariance):
 *   Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: the reference's: exact int dot per block, acc = acc + (dw*dx)*(float)isum
 *     (Q4_1/Q5_1: + mw*sx inside the parentheses) in block order (one lane per weight row; see
 *     the legacy-quant section), so they equal the ref.
 *   Q2_K/Q3_K/Q4_K/Q5_K/Q6_K: the reference's too, one lane per weight row (matmul_x86_kq.h).
 *   F32/F16/BF16: four 8-lane fma chains over k (32 at a time), a 8-lane chain for the
 *     rest of the multiples of 8, a fixed combine, hsum8, scalar tail.
 * The includer turns off FP contraction so no mul+add is fused behind our back.
 */
#include <immintrin.h>
#include <stddef.h>
#include <string.h>

#include "kernels/cpu/matmul_impl.h"
#include "kernels/quant_math.h"

static inline float x86_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int x86_hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline float x86_h2f(uint16_t h) { return _cvtsh_ss(h); }

/* 16 bytes of packed nibbles -> 32 bytes 0..15 in element order (low nibbles first). */
static inline __m256i x86_unpack_q4(const uint8_t *qs) {
    __m128i q = _mm_loadu_si128((const __m128i *)qs), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

/* ---- legacy quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) x q8_1: 8 weight rows interleaved, one lane per row --
 * The 8 rows of a group are interleaved block by block (Q4: nibbles unpacked to bytes
 * 0..15 first): vector k holds bytes 4k..4k+3 of rows 0..7, so one integer dot with the 4
 * activation bytes 4k..4k+3 broadcast adds to each row's own lane, and after 8 of them lane
 * r holds the exact integer dot of row r's block: no horizontal sums, no per-(row, token)
 * float work beyond the scaling. Per element the sequence is the reference's, in block
 * order: acc = acc + (dw*dx) * (float)isum (Q4_1, Q5_1: acc = acc + ((dw*dx) * (float)isum +
 * mw*sx)), separate mul and add, whatever the tile, T or level, so the three types equal
 * mn_ref_matmul bit for bit.
 * Integer dots: vpdpbusd and maddubs take unsigned x signed bytes. Q4 weights are 0..15
 * already (Q4_0's -8 is folded into the start value -8 * sum(x) = xq.xc / 16), Q5 weights
 * 0..31 (nibble | fifth bit << 4; Q5_0's -16 in the start value -16 * sum(x) = xq.xc / 8). Q8_0: vnni
 * repacks w + 128 and starts from -128 * sum(x) (xq.xc); avx2's maddubs would saturate on
 * w + 128, so it keeps signed weights and the abs/sign trick. All exact. */
#ifndef MN__Q8_CT
#define MN__Q8_CT 4
#endif

static inline int64_t x86_lq_block_bytes(mn_dtype t) { return mn_dtype_block_bytes(t); }

/* Types with a min term (x = d*q + m): Q4_1, Q5_1. */
static inline int x86_lq_min(mn_dtype t) { return t == MN_Q4_1 || t == MN_Q5_1; }

/* Q5's fifth bits: 32 bytes, byte i = 16 if bit i of qh (little-endian uint32) is set, else 0.
 * Byte i of each 128-bit lane takes byte i/8 of qh (lane 1: i/8 + 2), then tests bit i % 8. */
static inline __m256i x86_q5_hbits(const uint8_t *qh) {
    int32_t h;
    memcpy(&h, qh, 4);
    const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ull);
    __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(h), pick), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(16));
}

/* Block b of 8 rows, interleaved: o[k] = bytes 4k..4k+3 of rows 0..7 (Q8_0 vnni: + 128);
 * returns the rows' scales and, for Q4_1 / Q5_1, their mins in *mw (built in registers: 8 scalar
 * stores read back as one vector stall store forwarding). */
static inline __attribute__((always_inline)) __m256 x86_lq_gather8(const mn_dtype t, const char *const *rows,
                                                                   int64_t b, __m256i *o, __m256 *mw) {
    __m256i v[8], tv[8], u[8];
    uint16_t dh[8], mh[8];
    _Pragma("GCC unroll 8") for (int r = 0; r < 8; r++) {
        if (t == MN_Q8_0) {
            const mn_block_q8_0 *w = (const mn_block_q8_0 *)rows[r] + b;
            v[r] = _mm256_loadu_si256((const __m256i *)w->qs);
            dh[r] = w->d;
        } else if (t == MN_Q4_0) {
            const mn_block_q4_0 *w = (const mn_block_q4_0 *)rows[r] + b;
            v[r] = x86_unpack_q4(w->qs);
            dh[r] = w->d;
        } else if (t == MN_Q5_0) {
            const mn_block_q5_0 *w = (const mn_block_q5_0 *)rows[r] + b;
            v[r] = _mm256_or_si256(x86_unpack_q4(w->qs), x86_q5_hbits(w->qh));
            dh[r] = w->d;
        } else if (t == MN_Q5_1) {
            const mn_block_q5_1 *w = (const mn_block_q5_1 *)rows[r] + b;
            v[r] = _mm256_or_si256(x86_unpack_q4(w->qs), x86_q5_hbits(w->qh));
            dh[r] = w->d;
            mh[r] = w->m;
        } else {
            const mn_block_q4_1 *w = (const mn_block_q4_1 *)rows[r] + b;
            v[r] = x86_unpack_q4(w->qs);
            dh[r] = w->d;
            mh[r] = w->m;
        }
    }
    /* lane indices of _mm_insert_epi16 must be literals (a loop index is not one at -O1) */
    __m128i h = _mm_setr_epi16((short)dh[0], (short)dh[1], (short)dh[2], (short)dh[3], (short)dh[4], (short)dh[5],
                               (short)dh[6], (short)dh[7]);
    if (x86_lq_min(t))
        *mw = _mm256_cvtph_ps(_mm_setr_epi16((short)mh[0], (short)mh[1], (short)mh[2], (short)mh[3], (short)mh[4],
                                             (short)mh[5], (short)mh[6], (short)mh[7]));
    _Pragma("GCC unroll 8") for (int r = 0; r < 8; r += 2) { /* 8x8 transpose of 4-byte groups */
        tv[r] = _mm256_unpacklo_epi32(v[r], v[r + 1]);
        tv[r + 1] = _mm256_unpackhi_epi32(v[r], v[r + 1]);
    }
    _Pragma("GCC unroll 8") for (int q = 0; q < 8; q += 4) {
        u[q] = _mm256_unpacklo_epi64(tv[q], tv[q + 2]);
        u[q + 1] = _mm256_unpackhi_epi64(tv[q], tv[q + 2]);
        u[q + 2] = _mm256_unpacklo_epi64(tv[q + 1], tv[q + 3]);
        u[q + 3] = _mm256_unpackhi_epi64(tv[q + 1], tv[q + 3]);
    }
    _Pragma("GCC unroll 8") for (int k = 0; k < 4; k++) {
        o[k] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x20);
        o[k + 4] = _mm256_permute2x128_si256(u[k], u[k + 4], 0x31);
#if MN__Q8_VNNI
        if (t == MN_Q8_0) {
            o[k] = _mm256_xor_si256(o[k], _mm256_set1_epi8((char)0x80));
            o[k + 4] = _mm256_xor_si256(o[k + 4], _mm256_set1_epi8((char)0x80));
        }
#endif
    }
    return _mm256_cvtph_ps(h);
}

/* Step b of nb of a group: prefetch the b-th 8 blocks' worth of bytes of the next group,
 * which lies right after this one: one sequential stream, the whole next group requested
 * while this one is computed. 8 strided row streams left DRAM mostly idle otherwise. */
static inline void x86_lq_prefetch(const mn_dtype t, const char *next, int64_t b) {
    const int64_t span = 8 * x86_lq_block_bytes(t);
    const char *p = next + b * span;
    /* asm: gcc dropped the builtin from the inlined decode tiles */
    _Pragma("GCC unroll 8") for (int i = 0; i < (int)((span + 63) / 64) + 1; i++)
        __asm__ volatile("prefetcht0 %0" : : "m"(*(p + 64 * i)));
}

/* The integer dot's start value for (token row i, block b): see the top of this section. */
static inline __attribute__((always_inline)) int32_t x86_lq_start(const mn_dtype t, const mn__mm_ctx *c, int64_t i) {
    if (x86_lq_min(t)) return 0;
    if (t == MN_Q4_0) return c->xq.xc[i] / 16; /* -8 * sum(x): xc = -128 * sum(x) */
    if (t == MN_Q5_0) return c->xq.xc[i] / 8;  /* -16 * sum(x) */
    return MN__Q8_VNNI ? c->xq.xc[i] : 0;
}

/* Adds one 4-byte column k of 8 (or 16) rows times the broadcast activation bytes. */
#if MN__Q8_VNNI
#define MN__LQ_ACC(t, p, w, xb) _mm256_dpbusd_epi32((p), (w), (xb))
#else
#define MN__LQ_ACC(t, p, w, xb) \
    ((t) == MN_Q8_0 ? _mm256_add_epi32((p), MN__DOT(_mm256_abs_epi8(w), _mm256_sign_epi8((xb), (w)))) \
                    : _mm256_add_epi32((p), MN__DOT((w), (xb))))
#endif

/* Scratch of a group: the interleaved blocks (up to 16 rows: 512 bytes a block), then the
 * scales and the Q4_1 / Q5_1 mins (16 floats a block each); MN__LQ_SCR_BYTES in matmul_impl.h. */
typedef struct x86_lq_scr { int8_t *wp; float *dwT, *mwT; } x86_lq_scr;

static inline x86_lq_scr x86_lq_scratch(const mn__mm_ctx *c) {
    int8_t *wp = (int8_t *)c->scr;
    float *dwT = (float *)(wp + c->xq.nb * 512);
    return (x86_lq_scr){wp, dwT, dwT + c->xq.nb * 16};
}

/* The whole 8-row group into the scratch, once for all T tokens (prefill). */
static inline __attribute__((always_inline)) void x86_lq_repack(const mn_dtype t, const mn_matmul_desc *d,
                                                                const char *const *rows, int64_t nb, x86_lq_scr s) {
    const char *next = rows[0] + 8 * d->w_row_bytes;
    for (int64_t b = 0; b < nb; b++) {
        __m256 mw = _mm256_setzero_ps();
        x86_lq_prefetch(t, next, b);
        _mm256_storeu_ps(s.dwT + b * 8, x86_lq_gather8(t, rows, b, (__m256i *)(s.wp + b * 256), &mw));
        if (x86_lq_min(t)) _mm256_storeu_ps(s.mwT + b * 8, mw);
    }
}

/* C tokens x the 8 rows of a group. direct (decode, T <= MN__Q8_CT): the weights are
 * interleaved in registers block by block, with the loads prefetched along each row, since
 * a separate repack pass leaves DRAM idle while computing; otherwise they come from the
 * repacked scratch. Either way the same integers and the same float operations. */
static inline __attribute__((always_inline)) void x86_lq_tile(const mn__mm_ctx *c, const mn_dtype t, const int direct,
                                                              const int C, const char *const *rows, int64_t n, int R,
                                                              int64_t tok, x86_lq_scr s) {
    const mn_matmul_desc *d = c->d;
    const int64_t nb = c->xq.nb;
    const int8_t *xq[MN__Q8_CT];
    const float *xd[MN__Q8_CT];
    __m256 acc[MN__Q8_CT];
    _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
        xq[j] = c->xq.qs + (tok + j) * nb * MN_QK;
        xd[j] = c->xq.d + (tok + j) * nb;
        acc[j] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        __m256i Wd[8];
        const __m256i *W = (const __m256i *)(s.wp + b * 256);
        __m256 dwv, mwv = _mm256_setzero_ps();
        if (direct) {
            x86_lq_prefetch(t, rows[0] + 8 * d->w_row_bytes, b);
            dwv = x86_lq_gather8(t, rows, b, Wd, &mwv);
            W = Wd;
        } else {
            dwv = _mm256_loadu_ps(s.dwT + b * 8);
            if (x86_lq_min(t)) mwv = _mm256_loadu_ps(s.mwT + b * 8);
        }
        __m256i p[MN__Q8_CT];
        _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) p[j] = _mm256_set1_epi32(x86_lq_start(t, c, (tok + j) * nb + b));
        _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++) {
            __m256i w = direct ? W[k] : _mm256_load_si256(W + k);
            _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
                int32_t x4;
                memcpy(&x4, xq[j] + b * MN_QK + 4 * k, 4);
                p[j] = MN__LQ_ACC(t, p[j], w, _mm256_set1_epi32(x4));
            }
        }
        _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
            __m256 sc = _mm256_mul_ps(dwv, _mm256_broadcast_ss(&xd[j][b]));
            __m256 v = _mm256_mul_ps(sc, _mm256_cvtepi32_ps(p[j]));
            if (x86_lq_min(t)) v = _mm256_add_ps(v, _mm256_mul_ps(mwv, _mm256_broadcast_ss(&c->xq.s[(tok + j) * nb + b])));
            acc[j] = _mm256_add_ps(acc[j], v);
        }
    }
    _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
        float v[8];
        _mm256_storeu_ps(v, acc[j]);
        for (int r = 0; r < R; r++) mn__mm_store(d, tok + j, n + r, v[r]);
    }
}

#if MN__Q8_VNNI
/* vnni prefill: 16 rows per 512-bit vector (two gathered 8-row halves per block, 512
 * bytes). Lane r still runs exactly lane r's operations of the 8-row tile, so the bits
 * are those of the decode tiles; a 4-byte activation broadcast now feeds 16 rows. */
static inline __attribute__((always_inline)) void x86_lq_repack16(const mn_dtype t, const mn_matmul_desc *d,
                                                                  const char *const *rows, int64_t nb, x86_lq_scr s) {
    const char *next = rows[0] + 16 * d->w_row_bytes;
    for (int64_t b = 0; b < nb; b++) {
        __m256i lo[8], hi[8];
        __m256 mlo = _mm256_setzero_ps(), mhi = _mm256_setzero_ps();
        x86_lq_prefetch(t, next, 2 * b);
        x86_lq_prefetch(t, next, 2 * b + 1);
        _mm256_storeu_ps(s.dwT + b * 16, x86_lq_gather8(t, rows, b, lo, &mlo));
        _mm256_storeu_ps(s.dwT + b * 16 + 8, x86_lq_gather8(t, rows + 8, b, hi, &mhi));
        if (x86_lq_min(t)) {
            _mm256_storeu_ps(s.mwT + b * 16, mlo);
            _mm256_storeu_ps(s.mwT + b * 16 + 8, mhi);
        }
        __m512i *o = (__m512i *)(s.wp + b * 512);
        _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++)
            _mm512_store_si512(o + k, _mm512_inserti64x4(_mm512_castsi256_si512(lo[k]), hi[k], 1));
    }
}

static inline __attribute__((always_inline)) void x86_lq_tile16(const mn__mm_ctx *c, const mn_dtype t, const int C,
                                                                int64_t n, int R, int64_t tok, x86_lq_scr s) {
    const mn_matmul_desc *d = c->d;
    const int64_t nb = c->xq.nb;
    const int8_t *xq[MN__Q8_CT];
    const float *xd[MN__Q8_CT];
    __m512 acc[MN__Q8_CT];
    _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
        xq[j] = c->xq.qs + (tok + j) * nb * MN_QK;
        xd[j] = c->xq.d + (tok + j) * nb;
        acc[j] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const __m512i *W = (const __m512i *)(s.wp + b * 512);
        __m512i p[MN__Q8_CT];
        _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) p[j] = _mm512_set1_epi32(x86_lq_start(t, c, (tok + j) * nb + b));
        _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++) {
            __m512i w = _mm512_load_si512(W + k);
            _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
                int32_t x4;
                memcpy(&x4, xq[j] + b * MN_QK + 4 * k, 4);
                p[j] = _mm512_dpbusd_epi32(p[j], w, _mm512_set1_epi32(x4));
            }
        }
        __m512 dwv = _mm512_loadu_ps(s.dwT + b * 16);
        __m512 mwv = x86_lq_min(t) ? _mm512_loadu_ps(s.mwT + b * 16) : _mm512_setzero_ps();
        _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
            __m512 sc = _mm512_mul_ps(dwv, _mm512_set1_ps(xd[j][b]));
            __m512 v = _mm512_mul_ps(sc, _mm512_cvtepi32_ps(p[j]));
            if (x86_lq_min(t)) v = _mm512_add_ps(v, _mm512_mul_ps(mwv, _mm512_set1_ps(c->xq.s[(tok + j) * nb + b])));
            acc[j] = _mm512_add_ps(acc[j], v);
        }
    }
    _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
        float v[16];
        _mm512_storeu_ps(v, acc[j]);
        for (int r = 0; r < R; r++) mn__mm_store(d, tok + j, n + r, v[r]);
    }
}

static inline __attribute__((always_inline)) void x86_rows_lq16(const mn__mm_ctx *c, const mn_dtype t, int64_t n0,
                                                                int64_t n1) {
    const mn_matmul_desc *d = c->d;
    int64_t nb = c->xq.nb;
    x86_lq_scr s = x86_lq_scratch(c);
    for (int64_t n = n0; n < n1; n += 16) {
        int R = n1 - n < 16 ? (int)(n1 - n) : 16;
        const char *rows[16];
        for (int r = 0; r < 16; r++) /* a short group repeats its last row: those lanes are never stored */
            rows[r] = (const char *)d->w + (n + (r < R ? r : R - 1)) * d->w_row_bytes;
        x86_lq_repack16(t, d, rows, nb, s);
        for (int64_t tok = 0; tok < d->T; tok += MN__Q8_CT) {
            int C = d->T - tok < MN__Q8_CT ? (int)(d->T - tok) : MN__Q8_CT;
            switch (C) { /* C a constant in each case: straight-line bodies */
            case 1: x86_lq_tile16(c, t, 1, n, R, tok, s); break;
            case 2: x86_lq_tile16(c, t, 2, n, R, tok, s); break;
            case 3: x86_lq_tile16(c, t, 3, n, R, tok, s); break;
            case 4: x86_lq_tile16(c, t, 4, n, R, tok, s); break;
            case 5: x86_lq_tile16(c, t, 5, n, R, tok, s); break;
            case 6: x86_lq_tile16(c, t, 6, n, R, tok, s); break;
            case 7: x86_lq_tile16(c, t, 7, n, R, tok, s); break;
            default: x86_lq_tile16(c, t, MN__Q8_CT, n, R, tok, s); break;
            }
        }
    }
}
#endif

#define MN__LQ_CASE(D_, C_) case C_: x86_lq_tile(c, t, D_, C_, rows, n, R, tok, s); break;
#if MN__Q8_CT > 4
#define MN__LQ_CASES(D_) MN__LQ_CASE(D_, 1) MN__LQ_CASE(D_, 2) MN__LQ_CASE(D_, 3) MN__LQ_CASE(D_, 4) \
    MN__LQ_CASE(D_, 5) MN__LQ_CASE(D_, 6) MN__LQ_CASE(D_, 7)
#else
#define MN__LQ_CASES(D_) MN__LQ_CASE(D_, 1) MN__LQ_CASE(D_, 2) MN__LQ_CASE(D_, 3)
#endif

static inline __attribute__((always_inline)) void x86_rows_lq_t(const mn__mm_ctx *c, const mn_dtype t, int64_t n0,
                                                                int64_t n1) {
    const mn_matmul_desc *d = c->d;
    int64_t nb = c->xq.nb;
    x86_lq_scr s = x86_lq_scratch(c);
    const int direct = d->T <= MN__Q8_CT;
    if (direct) /* the first group: the later ones are prefetched one group ahead */
        for (int64_t b = 0; b < nb; b++) x86_lq_prefetch(t, (const char *)d->w + n0 * d->w_row_bytes, b);
#if MN__Q8_VNNI
    if (!direct) {
        x86_rows_lq16(c, t, n0, n1);
        return;
    }
#endif
    for (int64_t n = n0; n < n1; n += 8) {
        int R = n1 - n < 8 ? (int)(n1 - n) : 8;
        const char *rows[8];
        for (int r = 0; r < 8; r++) /* a short group repeats its last row: those lanes are never stored */
            rows[r] = (const char *)d->w + (n + (r < R ? r : R - 1)) * d->w_row_bytes;
        if (!direct) x86_lq_repack(t, d, rows, nb, s);
        for (int64_t tok = 0; tok < d->T; tok += MN__Q8_CT) {
            int C = d->T - tok < MN__Q8_CT ? (int)(d->T - tok) : MN__Q8_CT;
            /* C a constant in each case: straight-line bodies, same per-element operations */
            if (direct) {
                switch (C) {
                MN__LQ_CASES(1)
                default: x86_lq_tile(c, t, 1, MN__Q8_CT, rows, n, R, tok, s); break;
                }
            } else {
                switch (C) {
                MN__LQ_CASES(0)
                default: x86_lq_tile(c, t, 0, MN__Q8_CT, rows, n, R, tok, s); break;
                }
            }
        }
    }
}

/* The type a constant in each body. */
static void x86_rows_lq(const mn__mm_ctx *c, int64_t n0, int64_t n1) {
    switch (c->d->w_type) {
    case MN_Q8_0: x86_rows_lq_t(c, MN_Q8_0, n0, n1); break;
    case MN_Q4_0: x86_rows_lq_t(c, MN_Q4_0, n0, n1); break;
    case MN_Q5_0: x86_rows_lq_t(c, MN_Q5_0, n0, n1); break;
    case MN_Q5_1: x86_rows_lq_t(c, MN_Q5_1, n0, n1); break;
    default: x86_rows_lq_t(c, MN_Q4_1, n0, n1); break;
    }
}

#include "kernels/cpu/matmul_x86_kq.h"

/* ---- float weights --------------------------------------------------------------------- */

static inline __m256 x86_load_w8(mn_dtype t, const char *row, int64_t k) {
    if (t == MN_F32) return _mm256_loadu_ps((const float *)row + k);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + k));
    if (t == MN_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static float x86_dot_float(mn_dtype t, const char *row, const float *x, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), x86_load_w8(t, row, k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), x86_load_w8(t, row, k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), x86_load_w8(t, row, k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), x86_load_w8(t, row, k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), x86_load_w8(t, row, k), a0);
    float v = x86_hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) {
        float w = t == MN_F32 ? ((const float *)row)[k]
                : t == MN_F16 ? x86_h2f(((const uint16_t *)row)[k])
                              : mn_bf16_to_fp32(((const uint16_t *)row)[k]);
        v += x[k] * w;
    }
    return v;
}

void MN__ROWS_FN(const mn__mm_ctx *c, int64_t n0, int64_t n1) {
    const mn_matmul_desc *d = c->d;
    mn_dtype t = d->w_type;
    if (t == MN_Q8_0 || t == MN_Q4_0 || t == MN_Q4_1 || t == MN_Q5_0 || t == MN_Q5_1) {
        x86_rows_lq(c, n0, n1);
        return;
    }
    if (t == MN_Q2_K || t == MN_Q3_K || t == MN_Q4_K || t == MN_Q5_K || t == MN_Q6_K) {
        x86_rows_kq(c, n0, n1);
        return;
    }
    for (int64_t n = n0; n < n1; n++) {
        const char *row = (const char *)d->w + n * d->w_row_bytes;
        for (int64_t tok = 0; tok < d->T; tok++) {
            mn__mm_store(d, tok, n, x86_dot_float(t, row, d->x + tok * d->x_stride, d->K));
        }
    }
}
