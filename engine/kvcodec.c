/* engine/kvcodec.c — byte shuffle + LZ4 for f16 KV, and the XXH3 hash.
 *
 * The shuffle runs at memory speed with SSE2 (part of every x86-64 CPU): two 16-byte loads
 * hold 16 f16 values; masking and a saturating pack (values fit in 0..255, so the pack is
 * exact) gather the 16 low bytes, a shift by 8 and a pack the 16 high bytes. The unshuffle
 * interleaves them again with unpacklo/hi. Other CPUs use the scalar loop.
 */
#include "engine/kvcodec.h"

#include <string.h>

#include <lz4.h>
#include <xxhash.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "engine/alloc.h"

size_t mn_kvcodec_bound(size_t raw_bytes) {
    if (raw_bytes > MN_KVCODEC_MAX_RAW) return 0;
    return (size_t)LZ4_compressBound((int)raw_bytes);
}

void mn_kvcodec_shuffle(const void *src, void *dst, size_t raw_bytes) {
    const uint8_t *s = src;
    size_t n = raw_bytes / 2, i = 0;
    uint8_t *lo = dst, *hi = (uint8_t *)dst + n;
#if defined(__SSE2__)
    const __m128i mask = _mm_set1_epi16(0x00ff);
    for (; i + 16 <= n; i += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + 2 * i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + 2 * i + 16));
        __m128i l = _mm_packus_epi16(_mm_and_si128(a, mask), _mm_and_si128(b, mask));
        __m128i h = _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8));
        _mm_storeu_si128((__m128i *)(lo + i), l);
        _mm_storeu_si128((__m128i *)(hi + i), h);
    }
#endif
    for (; i < n; i++) {
        lo[i] = s[2 * i];
        hi[i] = s[2 * i + 1];
    }
}

void mn_kvcodec_unshuffle(const void *src, void *dst, size_t raw_bytes) {
    size_t n = raw_bytes / 2, i = 0;
    const uint8_t *lo = src, *hi = (const uint8_t *)src + n;
    uint8_t *d = dst;
#if defined(__SSE2__)
    for (; i + 16 <= n; i += 16) {
        __m128i l = _mm_loadu_si128((const __m128i *)(lo + i));
        __m128i h = _mm_loadu_si128((const __m128i *)(hi + i));
        _mm_storeu_si128((__m128i *)(d + 2 * i), _mm_unpacklo_epi8(l, h));
        _mm_storeu_si128((__m128i *)(d + 2 * i + 16), _mm_unpackhi_epi8(l, h));
    }
#endif
    for (; i < n; i++) {
        d[2 * i] = lo[i];
        d[2 * i + 1] = hi[i];
    }
}

static mn_err check_raw(size_t raw_bytes, mn_errbuf *eb) {
    if (raw_bytes & 1) return mn_errf(eb, MN_EINVALID, "kvcodec: raw size %zu is odd (data must be f16)", raw_bytes);
    if (raw_bytes > MN_KVCODEC_MAX_RAW)
        return mn_errf(eb, MN_EINVALID, "kvcodec: raw size %zu over the limit %zu", raw_bytes, MN_KVCODEC_MAX_RAW);
    return MN_OK;
}

mn_err mn_kvcodec_compress_ex(const void *raw, size_t raw_bytes, void *dst, size_t cap, void *scratch, int accel,
                              size_t *out_bytes, mn_errbuf *eb) {
    mn_err e = check_raw(raw_bytes, eb);
    if (e != MN_OK) return e;
    void *own = NULL;
    if (!scratch && !(scratch = own = mn_malloc(raw_bytes)))
        return mn_errf(eb, MN_ENOMEM, "kvcodec: out of memory for a %zu-byte scratch", raw_bytes);
    mn_kvcodec_shuffle(raw, scratch, raw_bytes);
    int c = cap > (size_t)INT32_MAX ? INT32_MAX : (int)cap;
    int r = LZ4_compress_fast(scratch, dst, (int)raw_bytes, c, accel > 1 ? accel : 1);
    mn_free(own);
    if (r <= 0)
        return mn_errf(eb, MN_ELIMIT, "kvcodec: %zu raw bytes do not fit in %zu compressed bytes (need up to %zu)",
                       raw_bytes, cap, mn_kvcodec_bound(raw_bytes));
    *out_bytes = (size_t)r;
    return MN_OK;
}

mn_err mn_kvcodec_compress(const void *raw, size_t raw_bytes, void *dst, size_t cap, size_t *out_bytes,
                           mn_errbuf *eb) {
    return mn_kvcodec_compress_ex(raw, raw_bytes, dst, cap, NULL, 1, out_bytes, eb);
}

mn_err mn_kvcodec_decompress_ex(const void *src, size_t src_bytes, void *raw, size_t raw_bytes, void *scratch,
                                mn_errbuf *eb) {
    mn_err e = check_raw(raw_bytes, eb);
    if (e != MN_OK) return e;
    if (src_bytes == 0 || src_bytes > (size_t)INT32_MAX)
        return mn_errf(eb, MN_EFORMAT, "kvcodec: compressed size %zu is not a valid LZ4 block size", src_bytes);
    void *own = NULL;
    if (!scratch && !(scratch = own = mn_malloc(raw_bytes)))
        return mn_errf(eb, MN_ENOMEM, "kvcodec: out of memory for a %zu-byte scratch", raw_bytes);
    /* LZ4_decompress_safe never writes past dstCapacity nor reads past compressedSize; a
     * shorter result means the stream ended early, a longer one is refused by LZ4 itself. */
    int r = LZ4_decompress_safe(src, scratch, (int)src_bytes, (int)raw_bytes);
    if (r < 0 || (size_t)r != raw_bytes) {
        mn_free(own);
        if (r < 0)
            return mn_errf(eb, MN_EFORMAT, "kvcodec: corrupt LZ4 stream (%zu bytes; error at input byte %d)", src_bytes,
                           -r - 1);
        return mn_errf(eb, MN_EFORMAT, "kvcodec: LZ4 stream decodes to %d bytes, expected %zu", r, raw_bytes);
    }
    mn_kvcodec_unshuffle(scratch, raw, raw_bytes);
    mn_free(own);
    return MN_OK;
}

mn_err mn_kvcodec_decompress(const void *src, size_t src_bytes, void *raw, size_t raw_bytes, mn_errbuf *eb) {
    return mn_kvcodec_decompress_ex(src, src_bytes, raw, raw_bytes, NULL, eb);
}

uint64_t mn_hash64(const void *p, size_t n, uint64_t seed) { return XXH3_64bits_withSeed(p, n, seed); }
