/* tests/unit/test_kvcodec.c — the f16 KV codec (byte shuffle + LZ4) and mn_hash64.
 *
 * The shuffle is checked against a plain loop written here; round trips must be bit-exact
 * on KV-like data (normal values converted to f16, runs of zeros, NaN/inf/subnormals) and
 * on random bytes; the shuffled stream must compress better than plain LZ4 on KV-like
 * data (the reason for the shuffle); corrupt and truncated streams must give MN_EFORMAT or,
 * where LZ4 cannot tell (a changed literal byte), some output of the right size, and never
 * touch memory outside the buffers (run under ASan in tools/test.sh).
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <lz4.h>

#include "engine/alloc.h"
#include "engine/kvcodec.h"
#include "kernels/common.h"

static uint64_t rs = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return rs;
}
static float urand(void) { return ((float)(rnd() >> 40) + 0.5f) * 0x1p-24f; }
static float nrand(void) { return sqrtf(-2.0f * logf(urand())) * cosf(6.2831853f * urand()); }

/* KV-like f16: per-"channel" scales as real K/V have, values normal around them, and some
 * runs of zeros (unused slots). n values. */
static uint16_t *kv_like(size_t n, int channels) {
    uint16_t *v = malloc(n * 2 + 1);
    assert_non_null(v);
    float scale[64];
    for (int c = 0; c < 64; c++) scale[c] = 0.05f + 4.0f * urand();
    for (size_t i = 0; i < n; i++) v[i] = mn_fp32_to_fp16(scale[i % (size_t)channels % 64] * nrand());
    for (size_t i = n / 3; i < n / 3 + n / 10; i++) v[i] = 0;
    return v;
}

static void test_shuffle_matches_loop(void **st) {
    (void)st;
    for (size_t n = 0; n <= 300; n++) {   /* every tail length around the 16-value SIMD step */
        uint8_t *src = malloc(2 * n + 1), *sh = malloc(2 * n + 1), *back = malloc(2 * n + 1);
        assert_true(src && sh && back);
        for (size_t i = 0; i < 2 * n; i++) src[i] = (uint8_t)rnd();
        mn_kvcodec_shuffle(src, sh, 2 * n);
        for (size_t i = 0; i < n; i++) {
            assert_int_equal(sh[i], src[2 * i]);
            assert_int_equal(sh[n + i], src[2 * i + 1]);
        }
        mn_kvcodec_unshuffle(sh, back, 2 * n);
        assert_memory_equal(back, src, 2 * n + (n == 0));
        free(src);
        free(sh);
        free(back);
    }
    /* unaligned buffers */
    uint8_t src[1027], sh[1027], back[1027];
    for (size_t i = 0; i < sizeof src; i++) src[i] = (uint8_t)rnd();
    mn_kvcodec_shuffle(src + 1, sh + 3, 1000);
    for (size_t i = 0; i < 500; i++) assert_int_equal(sh[3 + 500 + i], src[1 + 2 * i + 1]);
    mn_kvcodec_unshuffle(sh + 3, back + 1, 1000);
    assert_memory_equal(back + 1, src + 1, 1000);
}

static void roundtrip(const void *raw, size_t bytes, size_t *comp_bytes) {
    size_t cap = mn_kvcodec_bound(bytes);
    assert_true(cap >= bytes);
    uint8_t *c = malloc(cap), *back = malloc(bytes + 1);
    assert_true(c && back);
    mn_errbuf eb = {{0}};
    size_t cb = 0;
    assert_int_equal(mn_kvcodec_compress(raw, bytes, c, cap, &cb, &eb), MN_OK);
    assert_true(cb > 0 && cb <= cap);
    memset(back, 0xA5, bytes);
    assert_int_equal(mn_kvcodec_decompress(c, cb, back, bytes, &eb), MN_OK);
    assert_memory_equal(back, raw, bytes);
    /* the same with caller scratch and a higher acceleration */
    uint8_t *scratch = malloc(bytes + 1);
    size_t cb2 = 0;
    assert_int_equal(mn_kvcodec_compress_ex(raw, bytes, c, cap, scratch, 8, &cb2, &eb), MN_OK);
    memset(back, 0x5A, bytes);
    assert_int_equal(mn_kvcodec_decompress_ex(c, cb2, back, bytes, scratch, &eb), MN_OK);
    assert_memory_equal(back, raw, bytes);
    if (comp_bytes) *comp_bytes = cb;
    free(scratch);
    free(c);
    free(back);
}

static void test_roundtrip_kv_like(void **st) {
    (void)st;
    size_t n = 16 * 30 * 2 * 3 * 64;   /* one SmolLM2 block of 16 tokens, all layers */
    uint16_t *v = kv_like(n, 64);
    size_t cb;
    roundtrip(v, n * 2, &cb);
    assert_true(cb < n * 2);   /* the 10% zero run at least */
    free(v);
}

/* The shuffle's mechanism: when the high bytes repeat (same sign and exponent per channel)
 * and the low bytes are noise, interleaved bytes give LZ4 no 4-byte match, split ones do.
 * Values s_c * (1 + u/4), s_c a signed power of two per channel: the high byte (sign,
 * exponent, 2 top mantissa bits = 0) depends on the channel only. */
static void test_shuffle_helps_repetitive_high_bytes(void **st) {
    (void)st;
    size_t n = 1 << 16;
    uint16_t *v = malloc(n * 2);
    float s[192];
    for (int c = 0; c < 192; c++) s[c] = ldexpf(rnd() & 1 ? 1.0f : -1.0f, (int)(rnd() % 9) - 6);
    for (size_t i = 0; i < n; i++) v[i] = mn_fp32_to_fp16(s[i % 192] * (1.0f + 0.25f * urand()));
    size_t cb;
    roundtrip(v, n * 2, &cb);
    int cap = LZ4_compressBound((int)(n * 2));
    char *c = malloc((size_t)cap);
    int plain = LZ4_compress_default((const char *)v, c, (int)(n * 2), cap);
    assert_true(plain > 0);
    print_message("repetitive high bytes, %zu bytes: shuffled lz4 %.3f, plain lz4 %.3f\n", n * 2,
                  (double)cb / (double)(n * 2), (double)plain / (double)(n * 2));
    assert_true(plain > (int)(n * 2 * 95 / 100));   /* plain LZ4 finds nothing */
    assert_true(cb < n * 2 * 60 / 100);             /* the high half nearly vanishes */
    free(c);
    free(v);
}

static void test_roundtrip_special(void **st) {
    (void)st;
    /* zeros compress to almost nothing */
    size_t n = 1 << 16;
    uint16_t *z = calloc(n, 2);
    size_t cb;
    roundtrip(z, n * 2, &cb);
    assert_true(cb < n * 2 / 200);
    /* every f16 bit pattern (NaNs, infs, subnormals, -0) survives */
    for (size_t i = 0; i < n; i++) z[i] = (uint16_t)i;
    roundtrip(z, n * 2, NULL);
    /* random bytes: incompressible, still exact; odd value counts and tiny sizes */
    for (size_t i = 0; i < n; i++) z[i] = (uint16_t)rnd();
    roundtrip(z, n * 2, &cb);
    assert_true(cb <= mn_kvcodec_bound(n * 2));
    size_t sizes[] = {0, 2, 6, 30, 32, 34, 62, 1026};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) roundtrip(z, sizes[i], NULL);
    free(z);
}

static void test_bad_arguments(void **st) {
    (void)st;
    uint16_t v[64];
    for (int i = 0; i < 64; i++) v[i] = (uint16_t)rnd();
    uint8_t c[256];
    size_t cb = 0;
    mn_errbuf eb = {{0}};
    assert_int_equal(mn_kvcodec_compress(v, 127, c, sizeof c, &cb, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "odd"));
    assert_int_equal(mn_kvcodec_compress(v, 128, c, 10, &cb, &eb), MN_ELIMIT);   /* random data: no fit */
    assert_int_equal(mn_kvcodec_bound(MN_KVCODEC_MAX_RAW + 2), 0);
    assert_int_equal(mn_kvcodec_compress(v, 128, c, sizeof c, &cb, &eb), MN_OK);
    uint16_t back[65];
    /* wrong expected size either way */
    assert_int_equal(mn_kvcodec_decompress(c, cb, back, 126, &eb), MN_EFORMAT);
    assert_int_equal(mn_kvcodec_decompress(c, cb, back, 130, &eb), MN_EFORMAT);
    assert_int_equal(mn_kvcodec_decompress(c, 0, back, 128, &eb), MN_EFORMAT);
    /* allocation failure of the per-call scratch */
    long base = mn_alloc_live();
    mn_alloc_fail_after(0);
    assert_int_equal(mn_kvcodec_compress(v, 128, c, sizeof c, &cb, &eb), MN_ENOMEM);
    assert_int_equal(mn_kvcodec_decompress(c, cb, back, 128, &eb), MN_ENOMEM);
    mn_alloc_fail_after(-1);
    assert_int_equal(mn_alloc_live(), base);
}

/* Every truncation fails; every byte flip fails or decodes to the right size; random
 * garbage never decodes past the buffer (ASan would see it). */
static void test_corrupt_streams(void **st) {
    (void)st;
    size_t n = 2048;
    uint16_t *v = kv_like(n, 16);
    size_t cap = mn_kvcodec_bound(n * 2), cb = 0;
    uint8_t *c = malloc(cap), *bad = malloc(cap);
    uint16_t *back = malloc(n * 2);
    mn_errbuf eb = {{0}};
    assert_int_equal(mn_kvcodec_compress(v, n * 2, c, cap, &cb, &eb), MN_OK);
    for (size_t len = 1; len < cb; len++) {
        /* exact-size copy so a read past len is an ASan error */
        uint8_t *t = malloc(len);
        memcpy(t, c, len);
        mn_err e = mn_kvcodec_decompress(t, len, back, n * 2, &eb);
        if (e != MN_EFORMAT) fail_msg("truncated to %zu of %zu bytes: got %d", len, cb, e);
        free(t);
    }
    int detected = 0;
    for (size_t i = 0; i < cb; i++) {
        for (int bit = 0; bit < 8; bit += 3) {
            memcpy(bad, c, cb);
            bad[i] ^= (uint8_t)(1u << bit);
            mn_err e = mn_kvcodec_decompress(bad, cb, back, n * 2, &eb);
            assert_true(e == MN_OK || e == MN_EFORMAT);
            detected += e == MN_EFORMAT;
        }
    }
    assert_true(detected > 0);   /* LZ4 has no checksum: session files add one per chunk */
    for (int k = 0; k < 200; k++) {
        size_t len = 1 + rnd() % 300;
        for (size_t i = 0; i < len; i++) bad[i] = (uint8_t)rnd();
        mn_err e = mn_kvcodec_decompress(bad, len, back, n * 2, &eb);
        assert_true(e == MN_OK || e == MN_EFORMAT);
    }
    free(v);
    free(c);
    free(bad);
    free(back);
}

static void test_hash(void **st) {
    (void)st;
    /* XXH3-64 of the empty input with seed 0, from the xxHash documentation */
    assert_true(mn_hash64("", 0, 0) == 0x2D06800538D394C2ull);
    uint8_t b[1000];
    for (size_t i = 0; i < sizeof b; i++) b[i] = (uint8_t)rnd();
    uint64_t h = mn_hash64(b, sizeof b, 0);
    assert_true(h == mn_hash64(b, sizeof b, 0));
    assert_true(h != mn_hash64(b, sizeof b, 1));
    /* every single-bit change of the input changes the hash */
    for (size_t i = 0; i < sizeof b; i += 7) {
        b[i] ^= 0x10;
        assert_true(mn_hash64(b, sizeof b, 0) != h);
        b[i] ^= 0x10;
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shuffle_matches_loop), cmocka_unit_test(test_roundtrip_kv_like),
        cmocka_unit_test(test_shuffle_helps_repetitive_high_bytes),
        cmocka_unit_test(test_roundtrip_special),    cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_corrupt_streams),      cmocka_unit_test(test_hash),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
