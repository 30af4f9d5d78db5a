/* kernels/cpu/matmul_x86_kq.h — the K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) x q8_K on x86, one lane
 * per weight row, as the legacy quants in matmul_x86.h (included from there, after them;
 * same MN__Q8_VNNI, MN__Q8_CT and MN__DOT).
 *
 * A group of 8 rows (16 on vnni prefill: two 8-row halves per 512-bit vector) is
 * unpacked and interleaved super-block by super-block into a record:
 *   W    64 vectors: vector m holds the weight values of elements 4m..4m+3 of every row
 *        as unsigned bytes (Q4_K 0..15, Q5_K 0..31, Q6_K 0..63, Q3_K 0..7: the -32 / -4 not
 *        applied, Q2_K 0..3)
 *   SC   16 vectors: per sub-block (Q4_K/Q5_K: 8 of 32 elements, Q2_K/Q3_K/Q6_K: 16 of 16) the
 *        rows' scales, one 32-bit lane a row: int32 on vnni (the sub-block's dpbusd sum
 *        times it with vpmulld), the int16 pair (sc, sc) on avx2 (maddubs, then madd
 *        with it: scale and pair sum in one)
 *   AUX  8 vectors of int16 pairs per lane: Q4_K/Q5_K (m_j, m_j), Q6_K/Q3_K (sc_2i, sc_2i+1),
 *        Q2_K (m_2i, m_2i+1)
 *   D, DM  the rows' d and dmin as f32 lanes
 * so one integer dot with 4 activation bytes broadcast adds to each row's own lane.
 * Per lane and super-block, all exact in int32:
 *   Q4_K/Q5_K  isum = sum_j sc_j * (q.x over sub-block j)
 *              imin = sum_j madd((m_j, m_j), (bsums[2j], bsums[2j+1]))
 *   Q6_K       isum = -32 * sum_i madd((sc_2i, sc_2i+1), (bsums[2i], bsums[2i+1]))
 *                     + sum_s sc_s * (q.x over sub-block s)  (the reference's (q-32), regrouped)
 *   Q3_K       the same with -4 (q + 4 in 0..7 stored; scales -32..31 decoded per row first)
 *   Q2_K       isum = sum_s sc_s * (q.x over sub-block s), imin = sum_i madd((m_2i, m_2i+1), (bsums[2i], bsums[2i+1]))
 * Bounds: |q.x| over a 32-element sub-block <= 32*63*127; maddubs pairs <= 2*63*127 = 16002
 * (no int16 saturation); |isum| <= 256*63*127*128 + 32*16*128*2032 < 2^29. Then the
 * reference's float sequence per lane, in super-block order:
 *   acc = acc + ((d*dx)*(float)isum - (dmin*dx)*(float)imin)   (Q6_K, Q3_K: acc + (d*dx)*(float)isum)
 * so every level equals mn_ref_matmul bit for bit, whatever the tile, T or thread count.
 * Decode (T <= MN__Q8_CT) builds the record of each super-block on the stack (L1) right
 * before its dots; prefill builds the whole group's records once into the per-thread
 * scratch (MN__KQ_SCR_BYTES) and reuses them for every token tile.
 */

/* Bytes of one super-block's record for L (8 or 16) lanes: W 256L, SC 64L, AUX 32L, D 4L, DM 4L. */
#define X86_KQ_REC(L) (360 * (L))
#define X86_KQ_SC(L) (256 * (L))
#define X86_KQ_AUX(L) (320 * (L))
#define X86_KQ_D(L) (352 * (L))
#define X86_KQ_DM(L) (356 * (L))

static inline int64_t x86_kq_block_bytes(mn_dtype t) { return mn_dtype_block_bytes(t); }

/* Q4_K/Q5_K: 8 sub-blocks of 32 with mins; Q6_K/Q3_K: 16 of 16 with signed scales, no mins,
 * the offset of q (32, 4) taken out through the bsums (x86_kq_off_shift: log2 of it). */
static inline int x86_kq_nomin(mn_dtype t) { return t == MN_Q6_K || t == MN_Q3_K; }
/* Sub-blocks per super-block: 8 of 32 (Q4_K, Q5_K) or 16 of 16 (Q2_K, Q3_K, Q6_K). */
static inline int x86_kq_nsub(mn_dtype t) { return t == MN_Q4_K || t == MN_Q5_K ? 8 : 16; }

/* The int16 pairs (byte 2(i%2), byte 2(i%2)+1) of each 32-bit lane of v, sign-extended: with
 * v = values 4k..4k+3 of every row, i = 2k or 2k+1 gives the pair (2i, 2i+1). */
static inline __m256i x86_kq_pair(__m256i v, int i) {
    __m256i idx = _mm256_set1_epi32((int)(0x00800080u | ((uint32_t)(2 * (i % 2)) << 8) | ((uint32_t)(2 * (i % 2) + 1) << 24)));
    idx = _mm256_add_epi8(idx, _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 0, 0, 0, 0, 4, 4,
                                                4, 4, 8, 8, 8, 8, 12, 12, 12, 12));
    return _mm256_srai_epi16(_mm256_shuffle_epi8(v, idx), 8);
}
static inline int x86_kq_off_shift(mn_dtype t) { return t == MN_Q6_K ? 5 : 2; }

/* 8x8 transpose of 4-byte groups: o[k] = bytes 4k..4k+3 of v[0..7]. */
static inline __attribute__((always_inline)) void x86_t8x4(const __m256i *v, __m256i *o) {
    __m256i tv[8], u[8];
    _Pragma("GCC unroll 8") for (int r = 0; r < 8; r += 2) {
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
    }
}

/* 32 bytes at offset off of block b of each of the 8 rows, transposed (x86_t8x4). */
static inline __attribute__((always_inline)) void x86_kq_cols(const mn_dtype t, const char *const *rows, int64_t b,
                                                              int off, __m256i *o) {
    __m256i v[8];
    _Pragma("GCC unroll 8") for (int r = 0; r < 8; r++)
        v[r] = _mm256_loadu_si256((const __m256i *)(rows[r] + b * x86_kq_block_bytes(t) + off));
    x86_t8x4(v, o);
}

/* The 16 bytes at offset off of block b of the 8 rows as 4 vectors: w[k] lane r = bytes
 * 4k..4k+3 of row r. */
static inline __attribute__((always_inline)) void x86_kq_words(const mn_dtype t, const char *const *rows, int64_t b,
                                                               int off, __m256i *w) {
    __m256i y[4];
    _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
        const char *p0 = rows[r] + b * x86_kq_block_bytes(t) + off, *p1 = rows[r + 4] + b * x86_kq_block_bytes(t) + off;
        y[r] = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)p1), _mm_loadu_si128((const __m128i *)p0));
    }
    __m256i a = _mm256_unpacklo_epi32(y[0], y[1]), bb = _mm256_unpackhi_epi32(y[0], y[1]);
    __m256i c = _mm256_unpacklo_epi32(y[2], y[3]), e = _mm256_unpackhi_epi32(y[2], y[3]);
    w[0] = _mm256_unpacklo_epi64(a, c);
    w[1] = _mm256_unpackhi_epi64(a, c);
    w[2] = _mm256_unpacklo_epi64(bb, e);
    w[3] = _mm256_unpackhi_epi64(bb, e);
}

/* Byte i (0..3) of each 32-bit lane of v, sign-extended to the whole lane (pair 0) or to
 * both 16-bit halves (pair 1: the int16 pair (x, x)). */
static inline __m256i x86_kq_byte(__m256i v, int i, int pair) {
    __m256i idx = pair ? _mm256_set1_epi32((int)(0x00800080u | ((uint32_t)i << 8) | ((uint32_t)i << 24)))
                       : _mm256_set1_epi32((int)(0x00808080u | ((uint32_t)i << 24)));
    idx = _mm256_add_epi8(idx, _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 0, 0, 0, 0, 4, 4, 4,
                                                4, 8, 8, 8, 8, 12, 12, 12, 12));
    v = _mm256_shuffle_epi8(v, idx); /* 0x80 + lane offset keeps the top bit: still zeroes */
    return pair ? _mm256_srai_epi16(v, 8) : _mm256_srai_epi32(v, 24);
}

/* Super-block b of 8 rows into a record of L lanes (half: which 8 of 16). */
static inline __attribute__((always_inline)) void x86_kq_gather8(const mn_dtype t, const char *const *rows, int64_t b,
                                                                 int8_t *rec, const int L, const int half) {
    const __m256i m15 = _mm256_set1_epi8(15), m16 = _mm256_set1_epi8(16), m48 = _mm256_set1_epi8(48);
#define X86_KQ_PUT(off_, i_, v_) _mm256_store_si256((__m256i *)(rec + (off_) + (i_) * 4 * L + half * 32), (v_))
    const int pair = !MN__Q8_VNNI; /* scale format of SC, see the top of the file */
    if (t == MN_Q2_K) {
        /* element 128h + 32j + 4k + i: (qs[32h + 4k + i] >> 2j) & 3; scales[s] = sc | m << 4 */
        const __m256i m3 = _mm256_set1_epi8(3);
        for (int h = 0; h < 2; h++) {
            __m256i Q[8];
            x86_kq_cols(t, rows, b, (int)offsetof(mn_block_q2_K, qs) + 32 * h, Q);
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)
                _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++)
                    X86_KQ_PUT(0, 32 * h + 8 * j + k, _mm256_and_si256(_mm256_srli_epi16(Q[k], 2 * j), m3));
        }
        __m256i w[4];
        x86_kq_words(t, rows, b, (int)offsetof(mn_block_q2_K, scales), w); /* w[k] = scales 4k..4k+3 */
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
            __m256i sc = _mm256_and_si256(w[k], m15), m = _mm256_and_si256(_mm256_srli_epi16(w[k], 4), m15);
            _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) X86_KQ_PUT(X86_KQ_SC(L), 4 * k + i, x86_kq_byte(sc, i, pair));
            X86_KQ_PUT(X86_KQ_AUX(L), 2 * k, x86_kq_pair(m, 2 * k)); /* (m_2i, m_2i+1) as int16 */
            X86_KQ_PUT(X86_KQ_AUX(L), 2 * k + 1, x86_kq_pair(m, 2 * k + 1));
        }
        uint16_t dh[8], mh[8];
        _Pragma("GCC unroll 8") for (int r = 0; r < 8; r++) {
            dh[r] = ((const mn_block_q2_K *)rows[r] + b)->d;
            mh[r] = ((const mn_block_q2_K *)rows[r] + b)->dmin;
        }
        __m128i hv = _mm_setr_epi16((short)dh[0], (short)dh[1], (short)dh[2], (short)dh[3], (short)dh[4], (short)dh[5],
                                    (short)dh[6], (short)dh[7]);
        __m128i mv = _mm_setr_epi16((short)mh[0], (short)mh[1], (short)mh[2], (short)mh[3], (short)mh[4], (short)mh[5],
                                    (short)mh[6], (short)mh[7]);
        _mm256_store_ps((float *)(rec + X86_KQ_D(L) + half * 32), _mm256_cvtph_ps(hv));
        _mm256_store_ps((float *)(rec + X86_KQ_DM(L) + half * 32), _mm256_cvtph_ps(mv));
        return;
    }
    if (t == MN_Q3_K) {
        /* element 128h + 32j + 4k + i: (qs[32h + 4k + i] >> 2j) & 3 | bit 4h+j of hmask[4k + i] << 2 */
        const __m256i m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
        __m256i H[8];
        x86_kq_cols(t, rows, b, (int)offsetof(mn_block_q3_K, hmask), H);
        for (int h = 0; h < 2; h++) {
            __m256i Q[8];
            x86_kq_cols(t, rows, b, (int)offsetof(mn_block_q3_K, qs) + 32 * h, Q);
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
                const int hb = 4 * h + j;
                _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++) {
                    __m256i lo = _mm256_and_si256(_mm256_srli_epi16(Q[k], 2 * j), m3);
                    __m256i hi = hb >= 2 ? _mm256_srli_epi16(H[k], hb - 2) : _mm256_slli_epi16(H[k], 2 - hb);
                    X86_KQ_PUT(0, 32 * h + 8 * j + k, _mm256_or_si256(lo, _mm256_and_si256(hi, m4)));
                }
            }
        }
    }
    if (t == MN_Q6_K) {
        for (int h = 0; h < 2; h++) {
            __m256i A[8], B[8], Q[8];
            x86_kq_cols(t, rows, b, 64 * h, A);
            x86_kq_cols(t, rows, b, 64 * h + 32, B);
            x86_kq_cols(t, rows, b, 128 + 32 * h, Q);
            _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++) { /* high bits of quad u: bits 2u, 2u+1 of qh -> 4, 5 */
                __m256i a = A[k], bq = B[k], q = Q[k];
                X86_KQ_PUT(0, 32 * h + k, _mm256_or_si256(_mm256_and_si256(a, m15), _mm256_and_si256(_mm256_slli_epi16(q, 4), m48)));
                X86_KQ_PUT(0, 32 * h + 8 + k, _mm256_or_si256(_mm256_and_si256(bq, m15), _mm256_and_si256(_mm256_slli_epi16(q, 2), m48)));
                X86_KQ_PUT(0, 32 * h + 16 + k, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m15), _mm256_and_si256(q, m48)));
                X86_KQ_PUT(0, 32 * h + 24 + k, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bq, 4), m15),
                                                               _mm256_and_si256(_mm256_srli_epi16(q, 2), m48)));
            }
        }
    }
    if (x86_kq_nomin(t)) {
        __m256i w[4];
        if (t == MN_Q6_K) {
            x86_kq_words(t, rows, b, 192, w); /* scales[16]: w[k] = scales 4k..4k+3 */
        } else {
            /* Q3_K: scales[12] at 96..107 read as bytes 94..109 (16 bytes inside the block), the
             * words a0 = scales[0..3], a1 = [4..7], hb = [8..11] realigned per lane; then
             * mn_q3_K_scale for 4 scales a byte lane at a time: w[k] = scales 4k..4k+3 (- 32). */
            __m256i v[4];
            x86_kq_words(t, rows, b, (int)offsetof(mn_block_q3_K, scales) - 2, v);
            __m256i a0 = _mm256_or_si256(_mm256_srli_epi32(v[0], 16), _mm256_slli_epi32(v[1], 16));
            __m256i a1 = _mm256_or_si256(_mm256_srli_epi32(v[1], 16), _mm256_slli_epi32(v[2], 16));
            __m256i hb = _mm256_or_si256(_mm256_srli_epi32(v[2], 16), _mm256_slli_epi32(v[3], 16));
            const __m256i k4 = _mm256_set1_epi8(15), k2 = _mm256_set1_epi8(3), m32 = _mm256_set1_epi8(32);
            __m256i lo[4] = {_mm256_and_si256(a0, k4), _mm256_and_si256(a1, k4),
                             _mm256_and_si256(_mm256_srli_epi32(a0, 4), k4), _mm256_and_si256(_mm256_srli_epi32(a1, 4), k4)};
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                __m256i hi = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 2 * k), k2), 4);
                w[k] = _mm256_sub_epi8(_mm256_or_si256(lo[k], hi), m32);
            }
        }
        _Pragma("GCC unroll 16") for (int s = 0; s < 16; s++) X86_KQ_PUT(X86_KQ_SC(L), s, x86_kq_byte(w[s / 4], s % 4, pair));
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) /* (sc_2i, sc_2i+1) as int16 */
            X86_KQ_PUT(X86_KQ_AUX(L), i, x86_kq_pair(w[i / 2], i));
        uint16_t dh[8];
        _Pragma("GCC unroll 8") for (int r = 0; r < 8; r++)
            dh[r] = t == MN_Q6_K ? ((const mn_block_q6_K *)rows[r] + b)->d : ((const mn_block_q3_K *)rows[r] + b)->d;
        __m128i hv = _mm_setr_epi16((short)dh[0], (short)dh[1], (short)dh[2], (short)dh[3], (short)dh[4], (short)dh[5],
                                    (short)dh[6], (short)dh[7]);
        _mm256_store_ps((float *)(rec + X86_KQ_D(L) + half * 32), _mm256_cvtph_ps(hv));
    } else {
        const int qs_off = t == MN_Q4_K ? (int)offsetof(mn_block_q4_K, qs) : (int)offsetof(mn_block_q5_K, qs);
        __m256i H[8];
        if (t == MN_Q5_K) x86_kq_cols(t, rows, b, (int)offsetof(mn_block_q5_K, qh), H);
        _Pragma("GCC unroll 4") for (int cc = 0; cc < 4; cc++) { /* 32 qs bytes: sub-blocks 2cc (low nibbles), 2cc+1 (high) */
            __m256i P[8];
            x86_kq_cols(t, rows, b, qs_off + 32 * cc, P);
            _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++) {
                __m256i lo = _mm256_and_si256(P[k], m15), hi = _mm256_and_si256(_mm256_srli_epi16(P[k], 4), m15);
                if (t == MN_Q5_K) { /* bit j of qh[l]: the fifth bit of element 32j + l, moved to bit 4 */
                    __m256i h0 = cc < 2 ? _mm256_slli_epi16(H[k], 4 - 2 * cc) : _mm256_srli_epi16(H[k], 2 * cc - 4);
                    __m256i h1 = cc < 2 ? _mm256_slli_epi16(H[k], 3 - 2 * cc) : _mm256_srli_epi16(H[k], 2 * cc - 3);
                    lo = _mm256_or_si256(lo, _mm256_and_si256(h0, m16));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(h1, m16));
                }
                X86_KQ_PUT(0, 16 * cc + k, lo);
                X86_KQ_PUT(0, 16 * cc + 8 + k, hi);
            }
        }
        /* header words: w[0] = d | dmin << 16, w[1..3] = scales[0..11] (mn_k4_scale_min) */
        __m256i w[4];
        x86_kq_words(t, rows, b, 0, w);
        const __m256i k1 = _mm256_set1_epi32(0x3f3f3f3f), k2 = _mm256_set1_epi32(0x0f0f0f0f), k3 = _mm256_set1_epi32(0x03030303);
        __m256i sc_lo = _mm256_and_si256(w[1], k1), m_lo = _mm256_and_si256(w[2], k1);
        __m256i sc_hi = _mm256_or_si256(_mm256_and_si256(w[3], k2),
                                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w[1], 6), k3), 4));
        __m256i m_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(w[3], 4), k2),
                                       _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w[2], 6), k3), 4));
        _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) { /* all 0..63: sign extension is zero extension */
            X86_KQ_PUT(X86_KQ_SC(L), j, x86_kq_byte(j < 4 ? sc_lo : sc_hi, j % 4, pair));
            X86_KQ_PUT(X86_KQ_AUX(L), j, x86_kq_byte(j < 4 ? m_lo : m_hi, j % 4, 1));
        }
        const __m256i lo16 = _mm256_set1_epi32(0xffff);
        __m256i h = _mm256_packus_epi32(_mm256_and_si256(w[0], lo16), _mm256_srli_epi32(w[0], 16));
        h = _mm256_permute4x64_epi64(h, 0xd8); /* d of rows 0..7, then dmin of rows 0..7 */
        _mm256_store_ps((float *)(rec + X86_KQ_D(L) + half * 32), _mm256_cvtph_ps(_mm256_castsi256_si128(h)));
        _mm256_store_ps((float *)(rec + X86_KQ_DM(L) + half * 32), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
    }
#undef X86_KQ_PUT
}

/* Step b of nb of a group: prefetch the b-th 8 blocks' worth of the next group (which
 * lies right after this one), as x86_lq_prefetch. */
static inline void x86_kq_prefetch(const mn_dtype t, const char *next, int64_t b) {
    const int64_t span = 8 * x86_kq_block_bytes(t);
    const char *p = next + b * span;
    _Pragma("GCC unroll 32") for (int i = 0; i < (int)((span + 63) / 64) + 1; i++)
        __asm__ volatile("prefetcht0 %0" : : "m"(*(p + 64 * i)));
}

/* Activation bytes 4m..4m+3 (or the int16 pair at bsums + 2i) broadcast to every lane. */
static inline __m256i x86_b4(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* C tokens x the 8 rows of a group (256-bit lanes). direct (decode): each super-block's
 * record is built on the stack right before use; otherwise it is read from the scratch. */
static inline __attribute__((always_inline)) void x86_kq_tile(const mn__mm_ctx *c, const mn_dtype t, const int direct,
                                                              const int C, const char *const *rows, int64_t n, int R,
                                                              int64_t tok, int8_t *scr) {
    const mn_matmul_desc *d = c->d;
    const int64_t nb = c->xq.nb;
    const int nsub = x86_kq_nsub(t), cols = 64 / nsub; /* sub-blocks, 4-byte columns each */
    _Alignas(64) int8_t loc[X86_KQ_REC(8)];
    __m256 acc[MN__Q8_CT];
    _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *rec = scr + b * X86_KQ_REC(8);
        if (direct) {
            x86_kq_prefetch(t, rows[0] + 8 * d->w_row_bytes, b);
            x86_kq_gather8(t, rows, b, loc, 8, 0);
            rec = loc;
        }
        const __m256i *W = (const __m256i *)rec, *SC = (const __m256i *)(rec + X86_KQ_SC(8));
        const __m256i *AUX = (const __m256i *)(rec + X86_KQ_AUX(8));
        const int8_t *xq[MN__Q8_CT];
        const int16_t *bs[MN__Q8_CT];
        __m256i is[MN__Q8_CT], im[MN__Q8_CT];
        _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
            xq[j] = c->xq.qs + ((tok + j) * nb + b) * MN_QK_K;
            bs[j] = c->xq.bsums + ((tok + j) * nb + b) * 16;
            __m256i a = _mm256_setzero_si256();
            _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++)
                a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_load_si256(AUX + i), x86_b4(bs[j] + 2 * i)));
            if (x86_kq_nomin(t)) { /* -32 (Q3_K: -4) * sum sc_s bsum_s */
                is[j] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(a, x86_kq_off_shift(t)));
            } else {
                is[j] = _mm256_setzero_si256();
                im[j] = a;
            }
        }
        _Pragma("GCC unroll 16") for (int s = 0; s < nsub; s++) {
            const __m256i sc = _mm256_load_si256(SC + s);
#if MN__Q8_VNNI
            __m256i p[MN__Q8_CT];
            _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) p[j] = _mm256_setzero_si256();
            _Pragma("GCC unroll 8") for (int k = 0; k < cols; k++) {
                const __m256i w = _mm256_load_si256(W + s * cols + k);
                _Pragma("GCC unroll 8") for (int j = 0; j < C; j++)
                    p[j] = _mm256_dpbusd_epi32(p[j], w, x86_b4(xq[j] + 4 * (s * cols + k)));
            }
            _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) is[j] = _mm256_add_epi32(is[j], _mm256_mullo_epi32(p[j], sc));
#else
            _Pragma("GCC unroll 8") for (int k = 0; k < cols; k++) {
                const __m256i w = _mm256_load_si256(W + s * cols + k);
                _Pragma("GCC unroll 8") for (int j = 0; j < C; j++)
                    is[j] = _mm256_add_epi32(is[j], _mm256_madd_epi16(_mm256_maddubs_epi16(w, x86_b4(xq[j] + 4 * (s * cols + k))), sc));
            }
#endif
        }
        const __m256 dv = _mm256_load_ps((const float *)(rec + X86_KQ_D(8)));
        const __m256 dmv = x86_kq_nomin(t) ? _mm256_setzero_ps() : _mm256_load_ps((const float *)(rec + X86_KQ_DM(8)));
        _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
            __m256 dx = _mm256_broadcast_ss(c->xq.d + (tok + j) * nb + b);
            __m256 v = _mm256_mul_ps(_mm256_mul_ps(dv, dx), _mm256_cvtepi32_ps(is[j]));
            if (!x86_kq_nomin(t)) v = _mm256_sub_ps(v, _mm256_mul_ps(_mm256_mul_ps(dmv, dx), _mm256_cvtepi32_ps(im[j])));
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
/* vnni prefill: 16 rows per 512-bit vector (records of 16 lanes, two gathered halves);
 * lane r runs exactly lane r's operations of the 8-row tile, so the bits are the same. */
static inline __attribute__((always_inline)) void x86_kq_tile16(const mn__mm_ctx *c, const mn_dtype t, const int C,
                                                                int64_t n, int R, int64_t tok, const int8_t *scr) {
    const mn_matmul_desc *d = c->d;
    const int64_t nb = c->xq.nb;
    const int nsub = x86_kq_nsub(t), cols = 64 / nsub;
    __m512 acc[MN__Q8_CT];
    _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *rec = scr + b * X86_KQ_REC(16);
        const __m512i *W = (const __m512i *)rec, *SC = (const __m512i *)(rec + X86_KQ_SC(16));
        const __m512i *AUX = (const __m512i *)(rec + X86_KQ_AUX(16));
        const int8_t *xq[MN__Q8_CT];
        __m512i is[MN__Q8_CT], im[MN__Q8_CT];
        _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
            xq[j] = c->xq.qs + ((tok + j) * nb + b) * MN_QK_K;
            const int16_t *bs = c->xq.bsums + ((tok + j) * nb + b) * 16;
            __m512i a = _mm512_setzero_si512();
            _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) {
                int32_t v;
                memcpy(&v, bs + 2 * i, 4);
                a = _mm512_add_epi32(a, _mm512_madd_epi16(_mm512_load_si512(AUX + i), _mm512_set1_epi32(v)));
            }
            if (x86_kq_nomin(t)) {
                is[j] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(a, x86_kq_off_shift(t)));
            } else {
                is[j] = _mm512_setzero_si512();
                im[j] = a;
            }
        }
        _Pragma("GCC unroll 16") for (int s = 0; s < nsub; s++) {
            const __m512i sc = _mm512_load_si512(SC + s);
            __m512i p[MN__Q8_CT];
            _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) p[j] = _mm512_setzero_si512();
            _Pragma("GCC unroll 8") for (int k = 0; k < cols; k++) {
                const __m512i w = _mm512_load_si512(W + s * cols + k);
                _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
                    int32_t x4;
                    memcpy(&x4, xq[j] + 4 * (s * cols + k), 4);
                    p[j] = _mm512_dpbusd_epi32(p[j], w, _mm512_set1_epi32(x4));
                }
            }
            _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) is[j] = _mm512_add_epi32(is[j], _mm512_mullo_epi32(p[j], sc));
        }
        const __m512 dv = _mm512_load_ps((const float *)(rec + X86_KQ_D(16)));
        const __m512 dmv = x86_kq_nomin(t) ? _mm512_setzero_ps() : _mm512_load_ps((const float *)(rec + X86_KQ_DM(16)));
        _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
            __m512 dx = _mm512_set1_ps(c->xq.d[(tok + j) * nb + b]);
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(dv, dx), _mm512_cvtepi32_ps(is[j]));
            if (!x86_kq_nomin(t)) v = _mm512_sub_ps(v, _mm512_mul_ps(_mm512_mul_ps(dmv, dx), _mm512_cvtepi32_ps(im[j])));
            acc[j] = _mm512_add_ps(acc[j], v);
        }
    }
    _Pragma("GCC unroll 8") for (int j = 0; j < C; j++) {
        float v[16];
        _mm512_storeu_ps(v, acc[j]);
        for (int r = 0; r < R; r++) mn__mm_store(d, tok + j, n + r, v[r]);
    }
}

static inline __attribute__((always_inline)) void x86_rows_kq16(const mn__mm_ctx *c, const mn_dtype t, int64_t n0,
                                                                int64_t n1) {
    const mn_matmul_desc *d = c->d;
    const int64_t nb = c->xq.nb;
    int8_t *scr = (int8_t *)c->scr;
    for (int64_t n = n0; n < n1; n += 16) {
        int R = n1 - n < 16 ? (int)(n1 - n) : 16;
        const char *rows[16];
        for (int r = 0; r < 16; r++) /* a short group repeats its last row: those lanes are never stored */
            rows[r] = (const char *)d->w + (n + (r < R ? r : R - 1)) * d->w_row_bytes;
        const char *next = rows[0] + 16 * d->w_row_bytes;
        for (int64_t b = 0; b < nb; b++) {
            x86_kq_prefetch(t, next, 2 * b);
            x86_kq_prefetch(t, next, 2 * b + 1);
            x86_kq_gather8(t, rows, b, scr + b * X86_KQ_REC(16), 16, 0);
            x86_kq_gather8(t, rows + 8, b, scr + b * X86_KQ_REC(16), 16, 1);
        }
        for (int64_t tok = 0; tok < d->T; tok += MN__Q8_CT) {
            int C = d->T - tok < MN__Q8_CT ? (int)(d->T - tok) : MN__Q8_CT;
            switch (C) { /* C a constant in each case: straight-line bodies */
            case 1: x86_kq_tile16(c, t, 1, n, R, tok, scr); break;
            case 2: x86_kq_tile16(c, t, 2, n, R, tok, scr); break;
            case 3: x86_kq_tile16(c, t, 3, n, R, tok, scr); break;
            case 4: x86_kq_tile16(c, t, 4, n, R, tok, scr); break;
            case 5: x86_kq_tile16(c, t, 5, n, R, tok, scr); break;
            case 6: x86_kq_tile16(c, t, 6, n, R, tok, scr); break;
            case 7: x86_kq_tile16(c, t, 7, n, R, tok, scr); break;
            default: x86_kq_tile16(c, t, MN__Q8_CT, n, R, tok, scr); break;
            }
        }
    }
}
#endif

#define MN__KQ_CASE(D_, C_) case C_: x86_kq_tile(c, t, D_, C_, rows, n, R, tok, scr); break;
#if MN__Q8_CT > 4
#define MN__KQ_CASES(D_) MN__KQ_CASE(D_, 1) MN__KQ_CASE(D_, 2) MN__KQ_CASE(D_, 3) MN__KQ_CASE(D_, 4) \
    MN__KQ_CASE(D_, 5) MN__KQ_CASE(D_, 6) MN__KQ_CASE(D_, 7)
#else
#define MN__KQ_CASES(D_) MN__KQ_CASE(D_, 1) MN__KQ_CASE(D_, 2) MN__KQ_CASE(D_, 3)
#endif

static inline __attribute__((always_inline)) void x86_rows_kq_t(const mn__mm_ctx *c, const mn_dtype t, int64_t n0,
                                                                int64_t n1) {
    const mn_matmul_desc *d = c->d;
    const int64_t nb = c->xq.nb;
    int8_t *scr = (int8_t *)c->scr;
    const int direct = d->T <= MN__Q8_CT;
    if (direct) /* the first group: the later ones are prefetched one group ahead */
        for (int64_t b = 0; b < nb; b++) x86_kq_prefetch(t, (const char *)d->w + n0 * d->w_row_bytes, b);
#if MN__Q8_VNNI
    if (!direct) {
        x86_rows_kq16(c, t, n0, n1);
        return;
    }
#endif
    for (int64_t n = n0; n < n1; n += 8) {
        int R = n1 - n < 8 ? (int)(n1 - n) : 8;
        const char *rows[8];
        for (int r = 0; r < 8; r++) /* a short group repeats its last row: those lanes are never stored */
            rows[r] = (const char *)d->w + (n + (r < R ? r : R - 1)) * d->w_row_bytes;
        if (!direct) {
            const char *next = rows[0] + 8 * d->w_row_bytes;
            for (int64_t b = 0; b < nb; b++) {
                x86_kq_prefetch(t, next, b);
                x86_kq_gather8(t, rows, b, scr + b * X86_KQ_REC(8), 8, 0);
            }
        }
        for (int64_t tok = 0; tok < d->T; tok += MN__Q8_CT) {
            int C = d->T - tok < MN__Q8_CT ? (int)(d->T - tok) : MN__Q8_CT;
            if (direct) {
                switch (C) {
                MN__KQ_CASES(1)
                default: x86_kq_tile(c, t, 1, MN__Q8_CT, rows, n, R, tok, scr); break;
                }
            } else {
                switch (C) {
                MN__KQ_CASES(0)
                default: x86_kq_tile(c, t, 0, MN__Q8_CT, rows, n, R, tok, scr); break;
                }
            }
        }
    }
}

/* The type a constant in each body. */
static void x86_rows_kq(const mn__mm_ctx *c, int64_t n0, int64_t n1) {
    switch (c->d->w_type) {
    case MN_Q4_K: x86_rows_kq_t(c, MN_Q4_K, n0, n1); break;
    case MN_Q5_K: x86_rows_kq_t(c, MN_Q5_K, n0, n1); break;
    case MN_Q3_K: x86_rows_kq_t(c, MN_Q3_K, n0, n1); break;
    case MN_Q2_K: x86_rows_kq_t(c, MN_Q2_K, n0, n1); break;
    default: x86_rows_kq_t(c, MN_Q6_K, n0, n1); break;
    }
}
