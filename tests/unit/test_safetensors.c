/* tests/unit/test_safetensors.c — the safetensors reader on good and malformed images.
 *
 * Each malformed case is built in memory (8-byte length + JSON + data) and must be refused
 * with the expected code and a message naming the tensor or offset; a good file must give
 * back the exact values (F32, F16, BF16 converted to f32), also through mn_st_open.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/safetensors.h"

/* image = u64 len | json | data_size bytes (value i = i & 0xff); *n = its size */
static unsigned char *image(const char *json, size_t data_size, size_t *n) {
    size_t hl = strlen(json);
    *n = 8 + hl + data_size;
    unsigned char *p = malloc(*n);
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(hl >> (8 * i));
    memcpy(p + 8, json, hl);
    for (size_t i = 0; i < data_size; i++) p[8 + hl + i] = (unsigned char)i;
    return p;
}

static void expect_err(const char *json, size_t data_size, mn_err want, const char *needle) {
    size_t n;
    unsigned char *p = image(json, data_size, &n);
    mn_safetensors *st = (mn_safetensors *)1;
    mn_errbuf eb = {{0}};
    mn_err e = mn_st_parse(p, n, &st, &eb);
    if (e != want || !strstr(eb.msg, needle))
        fail_msg("json %s: got %s '%s', want %s containing '%s'", json, mn_err_name(e), eb.msg, mn_err_name(want), needle);
    assert_null(st);
    free(p);
}

static void test_good(void **state) {
    /* a: F32 [2,2] at 0..16; b: F16 [3] at 16..22; c: BF16 [1] at 22..24; e: empty */
    const char *json = "{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"b\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[16,22]},"
                       "\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                       "\"e\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[24,24]},"
                       "\"c\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[22,24]}}";
    size_t n;
    unsigned char *p = image(json, 24, &n);
    size_t hl = strlen(json);
    float f[4] = {1.5f, -2.0f, 0.25f, 3e-3f};
    memcpy(p + 8 + hl, f, 16);
    uint16_t h[3] = {0x3c00, 0xc000, 0x3555}; /* 1, -2, 0.333252 */
    memcpy(p + 8 + hl + 16, h, 6);
    uint16_t bf = 0x4049; /* 3.140625 */
    memcpy(p + 8 + hl + 22, &bf, 2);
    long live = mn_alloc_live();
    mn_errbuf eb = {{0}};
    mn_safetensors *st;
    if (mn_st_parse(p, n, &st, &eb) != MN_OK) fail_msg("%s", eb.msg);
    assert_int_equal(st->n_tensors, 4);
    assert_string_equal(mn_st_meta(st, "format"), "pt");
    assert_null(mn_st_meta(st, "nope"));
    const mn_st_tensor *a = mn_st_find(st, "a"), *b = mn_st_find(st, "b"), *c = mn_st_find(st, "c");
    assert_non_null(a);
    assert_int_equal(a->n_dims, 2);
    assert_int_equal(a->shape[0], 2);
    assert_int_equal(a->offset, 8 + hl);
    float got[4];
    mn_st_to_f32(a, 0, 4, got);
    assert_memory_equal(got, f, 16);
    mn_st_to_f32(b, 0, 3, got);
    assert_true(got[0] == 1.0f && got[1] == -2.0f && got[2] == 0.333251953125f);
    mn_st_to_f32(c, 0, 1, got);
    assert_true(got[0] == 3.140625f);
    assert_null(mn_st_find(st, "zz"));
    mn_st_free(st);
    assert_int_equal(mn_alloc_live(), live);

    /* the same bytes through a file */
    char path[] = "/tmp/mn_st_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, p, n), (ssize_t)n);
    close(fd);
    if (mn_st_open(path, &st, &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_st_to_f32(mn_st_find(st, "a"), 1, 2, got);
    assert_true(got[0] == -2.0f && got[1] == 0.25f);
    mn_st_free(st);
    /* truncated file: the last tensor runs past the end */
    assert_int_equal(truncate(path, (off_t)(n - 1)), 0);
    assert_int_equal(mn_st_open(path, &st, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, path));
    assert_non_null(strstr(eb.msg, "past the end of the data"));
    unlink(path);
    assert_int_equal(mn_st_open(path, &st, &eb), MN_ENOT_FOUND);
    free(p);
}

static void test_malformed(void **state) {
    long live = mn_alloc_live();
    mn_safetensors *st;
    mn_errbuf eb = {{0}};
    unsigned char tiny[5] = {0};
    assert_int_equal(mn_st_parse(tiny, sizeof tiny, &st, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, "shorter than the 8-byte"));
    /* header length past the end of the file */
    unsigned char hdr[16] = {0xff, 0xff, 0, 0, 0, 0, 0, 0, '{', '}'};
    assert_int_equal(mn_st_parse(hdr, sizeof hdr, &st, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, "header length 65535 at offset 0"));
    unsigned char huge[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    assert_int_equal(mn_st_parse(huge, sizeof huge, &st, &eb), MN_EFORMAT);

    expect_err("{\"a\":", 0, MN_EFORMAT, "header JSON at file offset");
    expect_err("[1,2]", 0, MN_EFORMAT, "not a JSON object");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
               "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, MN_EFORMAT, "duplicate");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 12, MN_EFORMAT,
               "tensor 'a': data_offsets end 16");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,4]}}", 16, MN_EFORMAT, "'a': data_offsets [8, 4]");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[-4,12]}}", 16, MN_EFORMAT, "'a': data_offsets");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", 16, MN_EFORMAT,
               "tensor 'a' at offset 0: 16 bytes, but shape x F32 needs 12");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, MN_EFORMAT, "'b' at offset");
    expect_err("{\"a\":{\"dtype\":\"Q9\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, MN_EFORMAT, "unknown dtype 'Q9'");
    expect_err("{\"a\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, MN_EUNSUPPORTED, "unsupported dtype 'I32'");
    expect_err("{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, MN_EFORMAT, "'a': \"dtype\" missing");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, MN_EFORMAT, "'a': shape[0]");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", 8, MN_EFORMAT, "'a': \"shape\"");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8, MN_EFORMAT, "'a': \"data_offsets\"");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8, MN_EFORMAT,
               "'a': shape product overflows");
    expect_err("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, MN_EFORMAT, "9 dims");
    expect_err("{\"a\":7}", 0, MN_EFORMAT, "'a': header entry is not an object");
    expect_err("{\"__metadata__\":{\"k\":1}}", 0, MN_EFORMAT, "__metadata__ 'k'");
    expect_err("{\"__metadata__\":[]}", 0, MN_EFORMAT, "__metadata__ is not an object");
    assert_int_equal(mn_alloc_live(), live);
}

/* Every allocation of a parse fails in turn: an error each time, nothing leaked. */
static void test_alloc_failures(void **state) {
    const char *json = "{\"__metadata__\":{\"format\":\"pt\"},\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}";
    size_t n;
    unsigned char *p = image(json, 12, &n);
    long live = mn_alloc_live();
    for (long k = 0;; k++) {
        mn_alloc_fail_after(k);
        mn_safetensors *st;
        mn_errbuf eb = {{0}};
        mn_err e = mn_st_parse(p, n, &st, &eb);
        mn_alloc_fail_after(-1);
        if (e == MN_OK) {
            mn_st_free(st);
            break;
        }
        assert_int_equal(e, MN_ENOMEM);
        assert_int_equal(mn_alloc_live(), live);
    }
    free(p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
