/* tests/unit/test_gguf.c — the GGUF reader against files built byte by byte here.
 *
 * A small writer in this file lays out GGUF v2/v3 files and records where it put each
 * field, so tests can corrupt exactly one field and check that the error names that
 * offset and the key or tensor. Expected sizes (bytes per block) are written out as
 * literals from the GGUF spec, not taken from kernels/dtype.h, so a wrong table there
 * fails here. The real SmolLM2 file is checked against facts read with the python
 * `gguf` package; synthetic models from tools/gen_gguf.py are checked against the
 * shapes implied by the options given to it.
 */
#define _GNU_SOURCE /* memmem */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/gguf.h"
#include "engine/model.h"

/* ---- an in-memory GGUF writer ---------------------------------------------------------- */

typedef struct buf { uint8_t *p; size_t n, cap; } buf;

static void put(buf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void put_u8(buf *b, uint8_t v) { put(b, &v, 1); }
static void put_u16(buf *b, uint16_t v) { put(b, &v, 2); }
static void put_u32(buf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(buf *b, uint64_t v) { put(b, &v, 8); }
static void put_f32(buf *b, float v) { put(b, &v, 4); }
static void put_f64(buf *b, double v) { put(b, &v, 8); }
static void put_str(buf *b, const char *s) { put_u64(b, strlen(s)); put(b, s, strlen(s)); }
static void patch_u32(buf *b, size_t at, uint32_t v) { memcpy(b->p + at, &v, 4); }
static void patch_u64(buf *b, size_t at, uint64_t v) { memcpy(b->p + at, &v, 8); }

enum { T_U8 = 0, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 };

/* Tensors of the standard file: bytes per tensor from the spec's block sizes
 * (Q4_0 18/32, Q4_1 20/32, Q5_0 22/32, Q5_1 24/32, Q8_0 34/32, Q2_K 84/256, Q3_K 110/256, Q4_K 144/256, Q5_K 176/256, Q6_K 210/256). */
typedef struct tspec { const char *name; int nd; int64_t ne[4]; uint32_t type; uint64_t nbytes; } tspec;
static const tspec TS[] = {
    {"tok", 2, {64, 3}, 8, 2 * 34 * 3},
    {"norm", 1, {64}, 0, 64 * 4},
    {"q41", 2, {32, 2}, 3, 2 * 20},
    {"q4k", 2, {256, 2}, 12, 2 * 144},
    {"q5k", 1, {256}, 13, 176},
    {"q6k", 1, {512}, 14, 2 * 210},
    {"f16", 3, {4, 3, 2}, 1, 24 * 2},
    {"bf16", 4, {2, 2, 2, 2}, 30, 16 * 2},
    {"q50", 2, {64, 2}, 6, 4 * 22},
    {"q51", 1, {96}, 7, 3 * 24},
    {"q3k", 2, {256, 3}, 11, 3 * 110},
    {"q2k", 1, {512}, 10, 2 * 84},
    {"q40", 1, {32}, 2, 18},
};
#define NT ((int)(sizeof TS / sizeof TS[0]))

/* Where the writer put things. */
typedef struct layout {
    size_t key_pos[64];      /* length field of each key */
    size_t type_pos[64];     /* value-type field of each key */
    const char *keys[64];
    int n_kv;
    size_t str_len_pos;      /* length field of t.str's value */
    size_t arr_len_pos;      /* length field of t.arr_u8 */
    size_t align_pos;        /* value of general.alignment (0 = none written) */
    size_t t_name_pos[NT], t_nd_pos[NT], t_ne0_pos[NT], t_type_pos[NT], t_off_pos[NT];
    uint64_t t_off[NT];
    size_t data_off;
} layout;

static void kv_begin(buf *b, layout *L, const char *key, uint32_t type) {
    L->keys[L->n_kv] = key;
    L->key_pos[L->n_kv] = b->n;
    put_str(b, key);
    L->type_pos[L->n_kv++] = b->n;
    put_u32(b, type);
}

static uint8_t data_byte(int t, uint64_t i) { return (uint8_t)(i * 7 + (uint64_t)t * 31 + 1); }

/* The standard file: every value type, nested arrays, NT tensors of different types.
 * align 0 writes no general.alignment key (the default 32 applies). The last tensor's
 * data ends exactly at the end of the file, so every truncation must fail. */
static buf build(uint32_t version, uint32_t align, layout *L) {
    buf b = {0};
    memset(L, 0, sizeof *L);
    int n_kv = 23 + (align ? 1 : 0);
    put(&b, "GGUF", 4);
    put_u32(&b, version);
    put_u64(&b, NT);
    put_u64(&b, (uint64_t)n_kv);
    kv_begin(&b, L, "general.architecture", T_STR); put_str(&b, "llama");
    if (align) { kv_begin(&b, L, "general.alignment", T_U32); L->align_pos = b.n; put_u32(&b, align); }
    kv_begin(&b, L, "t.u8", T_U8); put_u8(&b, 200);
    kv_begin(&b, L, "t.i8", T_I8); put_u8(&b, (uint8_t)-5);
    kv_begin(&b, L, "t.u16", T_U16); put_u16(&b, 60000);
    kv_begin(&b, L, "t.i16", T_I16); put_u16(&b, (uint16_t)-30000);
    kv_begin(&b, L, "t.u32", T_U32); put_u32(&b, 4000000000u);
    kv_begin(&b, L, "t.i32", T_I32); put_u32(&b, (uint32_t)-2000000000);
    kv_begin(&b, L, "t.f32", T_F32); put_f32(&b, 1.5f);
    kv_begin(&b, L, "t.bool", T_BOOL); put_u8(&b, 1);
    kv_begin(&b, L, "t.u64", T_U64); put_u64(&b, (1ull << 40) + 3);
    kv_begin(&b, L, "t.i64", T_I64); put_u64(&b, (uint64_t)-(1ll << 40));
    kv_begin(&b, L, "t.f64", T_F64); put_f64(&b, 3.25);
    kv_begin(&b, L, "t.str", T_STR); L->str_len_pos = b.n; put_str(&b, "hello, world");
    kv_begin(&b, L, "t.empty", T_STR); put_str(&b, "");
    kv_begin(&b, L, "t.arr_u8", T_ARR); put_u32(&b, T_U8); L->arr_len_pos = b.n; put_u64(&b, 3);
    put_u8(&b, 1); put_u8(&b, 2); put_u8(&b, 255);
    kv_begin(&b, L, "t.arr_i16", T_ARR); put_u32(&b, T_I16); put_u64(&b, 2);
    put_u16(&b, (uint16_t)-1); put_u16(&b, 300);
    kv_begin(&b, L, "t.arr_f32", T_ARR); put_u32(&b, T_F32); put_u64(&b, 2); put_f32(&b, 0.5f); put_f32(&b, -2.0f);
    kv_begin(&b, L, "t.arr_f64", T_ARR); put_u32(&b, T_F64); put_u64(&b, 1); put_f64(&b, -1e300);
    kv_begin(&b, L, "t.arr_bool", T_ARR); put_u32(&b, T_BOOL); put_u64(&b, 3);
    put_u8(&b, 1); put_u8(&b, 0); put_u8(&b, 1);
    kv_begin(&b, L, "t.arr_i64", T_ARR); put_u32(&b, T_I64); put_u64(&b, 2);
    put_u64(&b, (uint64_t)INT64_MIN); put_u64(&b, 7);
    kv_begin(&b, L, "t.arr_str", T_ARR); put_u32(&b, T_STR); put_u64(&b, 3);
    put_str(&b, "a"); put_str(&b, "bc"); put_str(&b, "");
    /* [[1, 2], [3], []] of INT32 */
    kv_begin(&b, L, "t.nested", T_ARR); put_u32(&b, T_ARR); put_u64(&b, 3);
    put_u32(&b, T_I32); put_u64(&b, 2); put_u32(&b, 1); put_u32(&b, 2);
    put_u32(&b, T_I32); put_u64(&b, 1); put_u32(&b, 3);
    put_u32(&b, T_I32); put_u64(&b, 0);
    /* [["x", "yz"], [[]]]: an array of strings next to an array of (empty) arrays */
    kv_begin(&b, L, "t.nested_str", T_ARR); put_u32(&b, T_ARR); put_u64(&b, 2);
    put_u32(&b, T_STR); put_u64(&b, 2); put_str(&b, "x"); put_str(&b, "yz");
    put_u32(&b, T_ARR); put_u64(&b, 1); put_u32(&b, T_U8); put_u64(&b, 0);
    assert_int_equal(L->n_kv, n_kv);

    uint64_t a = align ? align : 32, off = 0;
    for (int t = 0; t < NT; t++) {
        L->t_name_pos[t] = b.n;
        put_str(&b, TS[t].name);
        L->t_nd_pos[t] = b.n;
        put_u32(&b, (uint32_t)TS[t].nd);
        L->t_ne0_pos[t] = b.n;
        for (int d = 0; d < TS[t].nd; d++) put_u64(&b, (uint64_t)TS[t].ne[d]);
        L->t_type_pos[t] = b.n;
        put_u32(&b, TS[t].type);
        L->t_off_pos[t] = b.n;
        L->t_off[t] = off;
        put_u64(&b, off);
        off = (off + TS[t].nbytes + a - 1) / a * a;
    }
    while (b.n % a) put_u8(&b, 0);
    L->data_off = b.n;
    for (int t = 0; t < NT; t++) {
        while (b.n < L->data_off + L->t_off[t]) put_u8(&b, 0xee);
        for (uint64_t i = 0; i < TS[t].nbytes; i++) put_u8(&b, data_byte(t, i));
    }
    return b;
}

static mn_gguf *open_ok(const buf *b) {
    mn_gguf *g = NULL;
    mn_errbuf eb = {{0}};
    mn_err e = mn_gguf_open_memory(b->p, b->n, &g, &eb);
    if (e) fail_msg("unexpected error %s: %s", mn_err_name(e), eb.msg);
    return g;
}

/* Open b, expect MN_EFORMAT and a message containing every given fragment. */
static void expect_fail(const buf *b, int n, ...) {
    mn_gguf *g = NULL;
    mn_errbuf eb = {{0}};
    mn_err e = mn_gguf_open_memory(b->p, b->n, &g, &eb);
    if (e != MN_EFORMAT) fail_msg("expected MN_EFORMAT, got %s (%s)", mn_err_name(e), eb.msg);
    assert_null(g);
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++) {
        const char *frag = va_arg(ap, const char *);
        if (!strstr(eb.msg, frag)) fail_msg("message \"%s\" lacks \"%s\"", eb.msg, frag);
    }
    va_end(ap);
}

static const char *at(size_t off) {
    static char s[8][48];
    static int k;
    k = (k + 1) % 8;
    snprintf(s[k], sizeof s[k], "offset %zu:", off);
    return s[k];
}

/* ---- parsing every value type ------------------------------------------------------------ */

static void check_standard(uint32_t version, uint32_t align) {
    layout L;
    buf b = build(version, align, &L);
    long live0 = mn_alloc_live();
    mn_gguf *g = open_ok(&b);
    mn_errbuf eb;
    assert_int_equal(mn_gguf_version(g), version);
    assert_int_equal(mn_gguf_alignment(g), align ? align : 32);
    assert_int_equal(mn_gguf_data_offset(g), L.data_off);
    assert_int_equal(mn_gguf_file_size(g), b.n);
    assert_ptr_equal(mn_gguf_file_data(g), b.p);
    assert_int_equal(mn_gguf_n_kv(g), L.n_kv);
    for (int i = 0; i < L.n_kv; i++) assert_string_equal(mn_gguf_kv_at(g, i)->key, L.keys[i]);
    assert_null(mn_gguf_kv_at(g, L.n_kv));
    assert_null(mn_gguf_find(g, "t.missing"));

    uint32_t u32; int64_t i64; float f; bool bo; mn_str s;
    assert_int_equal(mn_gguf_get_u32(g, "t.u8", &u32, &eb), MN_OK); assert_int_equal(u32, 200);
    assert_int_equal(mn_gguf_get_i64(g, "t.i8", &i64, &eb), MN_OK); assert_int_equal(i64, -5);
    assert_int_equal(mn_gguf_get_u32(g, "t.u16", &u32, &eb), MN_OK); assert_int_equal(u32, 60000);
    assert_int_equal(mn_gguf_get_i64(g, "t.i16", &i64, &eb), MN_OK); assert_int_equal(i64, -30000);
    assert_int_equal(mn_gguf_get_u32(g, "t.u32", &u32, &eb), MN_OK); assert_int_equal(u32, 4000000000u);
    assert_int_equal(mn_gguf_get_i64(g, "t.i32", &i64, &eb), MN_OK); assert_int_equal(i64, -2000000000);
    assert_int_equal(mn_gguf_get_f32(g, "t.f32", &f, &eb), MN_OK); assert_true(f == 1.5f);
    assert_int_equal(mn_gguf_get_bool(g, "t.bool", &bo, &eb), MN_OK); assert_true(bo);
    assert_int_equal(mn_gguf_get_i64(g, "t.u64", &i64, &eb), MN_OK); assert_int_equal(i64, (1ll << 40) + 3);
    assert_int_equal(mn_gguf_get_i64(g, "t.i64", &i64, &eb), MN_OK); assert_int_equal(i64, -(1ll << 40));
    assert_int_equal(mn_gguf_get_f32(g, "t.f64", &f, &eb), MN_OK); assert_true(f == 3.25f);
    assert_int_equal(mn_gguf_get_str(g, "t.str", &s, &eb), MN_OK);
    assert_int_equal(s.len, 12); assert_memory_equal(s.ptr, "hello, world", 12);
    assert_int_equal(mn_gguf_get_str(g, "t.empty", &s, &eb), MN_OK); assert_int_equal(s.len, 0);
    assert_int_equal(mn_gguf_find(g, "t.f64")->type, MN_GGUF_FLOAT64);
    assert_true(mn_gguf_find(g, "t.f64")->v.f64 == 3.25);

    /* conversions that must be refused */
    assert_int_equal(mn_gguf_get_u32(g, "t.i8", &u32, &eb), MN_ERANGE);
    assert_non_null(strstr(eb.msg, "t.i8"));
    assert_int_equal(mn_gguf_get_u32(g, "t.u64", &u32, &eb), MN_ERANGE);
    assert_int_equal(mn_gguf_get_str(g, "t.u32", &s, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, "'t.u32'")); assert_non_null(strstr(eb.msg, "STRING"));
    assert_non_null(strstr(eb.msg, "UINT32"));
    assert_int_equal(mn_gguf_get_bool(g, "t.u8", &bo, &eb), MN_EFORMAT);
    assert_int_equal(mn_gguf_get_u32(g, "t.str", &u32, &eb), MN_EFORMAT);
    assert_int_equal(mn_gguf_get_u32(g, "nope", &u32, &eb), MN_ENOT_FOUND);
    assert_non_null(strstr(eb.msg, "'nope'"));

    const mn_gguf_value *a;
    assert_int_equal(mn_gguf_get_arr(g, "t.arr_u8", MN_GGUF_UINT8, &a, &eb), MN_OK);
    assert_int_equal(a->v.arr.n, 3);
    assert_int_equal(mn_gguf_arr_int(a, 0), 1); assert_int_equal(mn_gguf_arr_int(a, 2), 255);
    assert_int_equal(mn_gguf_get_arr(g, "t.arr_u8", MN_GGUF_INT32, &a, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, "t.arr_u8"));
    assert_int_equal(mn_gguf_get_arr(g, "t.arr_i16", MN_GGUF_INT16, &a, &eb), MN_OK);
    assert_int_equal(mn_gguf_arr_int(a, 0), -1); assert_int_equal(mn_gguf_arr_int(a, 1), 300);
    assert_int_equal(mn_gguf_get_arr(g, "t.arr_f32", MN_GGUF_FLOAT32, &a, &eb), MN_OK);
    assert_true(mn_gguf_arr_float(a, 0) == 0.5 && mn_gguf_arr_float(a, 1) == -2.0);
    assert_int_equal(mn_gguf_get_arr(g, "t.arr_f64", MN_GGUF_FLOAT64, &a, &eb), MN_OK);
    assert_true(mn_gguf_arr_float(a, 0) == -1e300);
    assert_int_equal(mn_gguf_get_arr(g, "t.arr_bool", MN_GGUF_BOOL, &a, &eb), MN_OK);
    assert_int_equal(mn_gguf_arr_int(a, 0), 1); assert_int_equal(mn_gguf_arr_int(a, 1), 0);
    assert_int_equal(mn_gguf_get_arr(g, "t.arr_i64", MN_GGUF_INT64, &a, &eb), MN_OK);
    assert_true(mn_gguf_arr_int(a, 0) == INT64_MIN); assert_int_equal(mn_gguf_arr_int(a, 1), 7);
    assert_true(mn_gguf_arr_float(a, 1) == 7.0);
    assert_int_equal(mn_gguf_get_arr(g, "t.arr_str", MN_GGUF_STRING, &a, &eb), MN_OK);
    assert_int_equal(a->v.arr.n, 3);
    assert_int_equal(a->v.arr.items[0].type, MN_GGUF_STRING);
    assert_int_equal(a->v.arr.items[1].v.str.len, 2);
    assert_memory_equal(a->v.arr.items[1].v.str.ptr, "bc", 2);
    assert_int_equal(a->v.arr.items[2].v.str.len, 0);

    assert_int_equal(mn_gguf_get_arr(g, "t.nested", MN_GGUF_ARRAY, &a, &eb), MN_OK);
    assert_int_equal(a->v.arr.n, 3);
    const mn_gguf_value *it = a->v.arr.items;
    assert_int_equal(it[0].type, MN_GGUF_ARRAY); assert_int_equal(it[0].v.arr.elem_type, MN_GGUF_INT32);
    assert_int_equal(it[0].v.arr.n, 2);
    assert_int_equal(mn_gguf_arr_int(&it[0], 0), 1); assert_int_equal(mn_gguf_arr_int(&it[0], 1), 2);
    assert_int_equal(it[1].v.arr.n, 1); assert_int_equal(mn_gguf_arr_int(&it[1], 0), 3);
    assert_int_equal(it[2].v.arr.n, 0);
    assert_int_equal(mn_gguf_get_arr(g, "t.nested_str", MN_GGUF_ARRAY, &a, &eb), MN_OK);
    it = a->v.arr.items;
    assert_int_equal(it[0].v.arr.elem_type, MN_GGUF_STRING);
    assert_memory_equal(it[0].v.arr.items[1].v.str.ptr, "yz", 2);
    assert_int_equal(it[1].v.arr.elem_type, MN_GGUF_ARRAY);
    assert_int_equal(it[1].v.arr.n, 1);
    assert_int_equal(it[1].v.arr.items[0].v.arr.elem_type, MN_GGUF_UINT8);
    assert_int_equal(it[1].v.arr.items[0].v.arr.n, 0);

    assert_int_equal(mn_gguf_n_tensors(g), NT);
    for (int t = 0; t < NT; t++) {
        const mn_gguf_tensor *x = mn_gguf_find_tensor(g, TS[t].name);
        assert_non_null(x);
        assert_ptr_equal(x, mn_gguf_tensor_at(g, t));
        assert_string_equal(x->name, TS[t].name);
        assert_int_equal(x->n_dims, TS[t].nd);
        for (int d = 0; d < 4; d++) assert_int_equal(x->ne[d], d < TS[t].nd ? TS[t].ne[d] : 1);
        assert_int_equal((int)x->type, (int)TS[t].type);
        assert_int_equal(x->offset, L.t_off[t]);
        assert_int_equal(x->offset % (align ? align : 32), 0);
        assert_int_equal(x->nbytes, TS[t].nbytes);
        assert_ptr_equal(x->data, b.p + L.data_off + L.t_off[t]);
        const uint8_t *d = x->data;
        assert_int_equal(d[0], data_byte(t, 0));
        assert_int_equal(d[x->nbytes - 1], data_byte(t, x->nbytes - 1));
    }
    assert_null(mn_gguf_find_tensor(g, "nope"));
    assert_null(mn_gguf_tensor_at(g, NT));
    mn_gguf_close(g);
    assert_int_equal(mn_alloc_live(), live0);
    free(b.p);
}

static void test_v3_default_alignment(void **st) { (void)st; check_standard(3, 0); }
static void test_v2_alignment_64(void **st) { (void)st; check_standard(2, 64); }
static void test_v3_alignment_8(void **st) { (void)st; check_standard(3, 8); }

/* A file with no tensors (a tokenizer-only file) and nothing after its keys. */
static void test_no_tensors(void **st) {
    (void)st;
    buf b = {0};
    put(&b, "GGUF", 4); put_u32(&b, 3); put_u64(&b, 0); put_u64(&b, 1);
    put_str(&b, "tokenizer.ggml.model"); put_u32(&b, T_STR); put_str(&b, "gpt2");
    mn_gguf *g = open_ok(&b);
    assert_int_equal(mn_gguf_n_tensors(g), 0);
    assert_int_equal(mn_gguf_n_kv(g), 1);
    assert_null(mn_gguf_find_tensor(g, "x"));
    mn_gguf_close(g);
    free(b.p);
}

/* ---- specific errors --------------------------------------------------------------------- */

static void test_errors(void **st) {
    (void)st;
    layout L;
    buf b = build(3, 64, &L);
    buf c = {malloc(b.n), b.n, b.n};
#define RESET() memcpy(c.p, b.p, b.n)
    RESET(); c.p[0] = 'X';
    expect_fail(&c, 2, "offset 0:", "magic");
    RESET(); patch_u32(&c, 4, 1);
    expect_fail(&c, 2, "offset 4:", "version 1");
    RESET(); patch_u32(&c, 4, 4);
    expect_fail(&c, 2, "offset 4:", "version 4");
    RESET(); patch_u32(&c, L.type_pos[2], 13);
    expect_fail(&c, 3, at(L.type_pos[2]), "key 't.u8'", "unknown value type 13");
    RESET(); patch_u64(&c, L.str_len_pos, c.n);
    expect_fail(&c, 3, at(L.str_len_pos), "key 't.str'", "past end");
    RESET(); patch_u64(&c, L.arr_len_pos, UINT64_MAX / 2);
    expect_fail(&c, 2, at(L.arr_len_pos), "key 't.arr_u8'");
    RESET(); patch_u32(&c, L.align_pos, 48);
    expect_fail(&c, 3, at(L.align_pos), "key 'general.alignment'", "power of two");
    RESET(); patch_u32(&c, L.align_pos, 0);
    expect_fail(&c, 2, at(L.align_pos), "power of two");
    RESET(); patch_u32(&c, L.align_pos - 4, T_I32);
    expect_fail(&c, 2, "key 'general.alignment'", "UINT32");
    RESET(); patch_u64(&c, 16, UINT64_MAX);
    expect_fail(&c, 2, "offset 16:", "key/value count");
    RESET(); patch_u64(&c, 8, 1u << 20);
    expect_fail(&c, 2, "offset 8:", "tensor count");
    /* t.u8 -> t.i8: the second t.i8 is a duplicate */
    RESET(); c.p[L.key_pos[2] + 8 + 2] = 'i';
    expect_fail(&c, 3, at(L.key_pos[3]), "key 't.i8'", "duplicate");
    /* q5k -> q4k */
    RESET(); c.p[L.t_name_pos[4] + 8 + 1] = '4';
    expect_fail(&c, 3, at(L.t_name_pos[4]), "tensor 'q4k'", "duplicate");
    int last = NT - 1;
    RESET(); patch_u64(&c, L.t_off_pos[last], L.t_off[last] + 64);
    expect_fail(&c, 3, at(L.t_off_pos[last]), "tensor 'q40'", "past end of file");
    RESET(); patch_u64(&c, L.t_off_pos[last], UINT64_MAX - 63);
    expect_fail(&c, 3, at(L.t_off_pos[last]), "tensor 'q40'", "past end of file");
    RESET(); patch_u64(&c, L.t_off_pos[2], L.t_off[2] + 32);
    expect_fail(&c, 3, at(L.t_off_pos[2]), "tensor 'q41'", "alignment 64");
    RESET(); patch_u32(&c, L.t_type_pos[1], 16); /* IQ2_XXS: a real GGML type we do not read */
    expect_fail(&c, 3, at(L.t_type_pos[1]), "tensor 'norm'", "type 16");
    RESET(); patch_u32(&c, L.t_type_pos[1], 1000);
    expect_fail(&c, 2, at(L.t_type_pos[1]), "tensor 'norm'");
    RESET(); patch_u32(&c, L.t_type_pos[1], 9); /* Q8_1 is an activation format */
    expect_fail(&c, 2, at(L.t_type_pos[1]), "tensor 'norm'");
    RESET(); patch_u64(&c, L.t_ne0_pos[0], 48); /* Q8_0 rows must be whole blocks of 32 */
    expect_fail(&c, 3, at(L.t_type_pos[0]), "tensor 'tok'", "block size 32");
    RESET(); patch_u64(&c, L.t_ne0_pos[8], 80); /* Q5_0 likewise */
    expect_fail(&c, 3, at(L.t_type_pos[8]), "tensor 'q50'", "Q5_0 block size 32");
    RESET(); patch_u64(&c, L.t_ne0_pos[9], 100); /* Q5_1 likewise */
    expect_fail(&c, 3, at(L.t_type_pos[9]), "tensor 'q51'", "Q5_1 block size 32");
    RESET(); patch_u64(&c, L.t_ne0_pos[10], 128); /* K-quant rows are whole super-blocks */
    expect_fail(&c, 3, at(L.t_type_pos[10]), "tensor 'q3k'", "Q3_K block size 256");
    RESET(); patch_u64(&c, L.t_ne0_pos[11], 320);
    expect_fail(&c, 3, at(L.t_type_pos[11]), "tensor 'q2k'", "Q2_K block size 256");
    RESET(); patch_u64(&c, L.t_ne0_pos[0], 0);
    expect_fail(&c, 2, at(L.t_ne0_pos[0]), "tensor 'tok'");
    RESET(); patch_u64(&c, L.t_ne0_pos[0], (uint64_t)1 << 62); /* * 3 rows overflows */
    expect_fail(&c, 1, "tensor 'tok'");
    RESET(); patch_u32(&c, L.t_nd_pos[0], 5);
    expect_fail(&c, 3, at(L.t_nd_pos[0]), "tensor 'tok'", "n_dims 5");
    RESET(); c.p[L.type_pos[9] + 4] = 2; /* t.bool = 2 */
    expect_fail(&c, 2, at(L.type_pos[9] + 4), "key 't.bool'");
    RESET(); c.p[L.key_pos[2] + 8 + 1] = 0; /* NUL inside a key */
    expect_fail(&c, 2, at(L.key_pos[2]), "NUL");
#undef RESET
    free(c.p);
    free(b.p);
}

static void test_deep_nesting(void **st) {
    (void)st;
    buf b = {0};
    put(&b, "GGUF", 4); put_u32(&b, 3); put_u64(&b, 0); put_u64(&b, 1);
    put_str(&b, "deep"); put_u32(&b, T_ARR);
    for (int i = 0; i < 100; i++) { put_u32(&b, T_ARR); put_u64(&b, 1); }
    put_u32(&b, T_U8); put_u64(&b, 0);
    expect_fail(&b, 2, "key 'deep'", "nested");
    free(b.p);
}

/* ---- truncation, mutation, allocation failure ------------------------------------------- */

static void test_truncation(void **st) {
    (void)st;
    layout L;
    buf b = build(3, 0, &L);
    for (size_t n = 0; n < b.n; n++) {
        /* a fresh copy of exactly n bytes so ASan catches any read past it */
        uint8_t *p = malloc(n ? n : 1);
        memcpy(p, b.p, n);
        mn_gguf *g = NULL;
        mn_errbuf eb = {{0}};
        mn_err e = mn_gguf_open_memory(p, n, &g, &eb);
        if (e != MN_EFORMAT) fail_msg("length %zu: got %s (%s)", n, mn_err_name(e), eb.msg);
        if (strncmp(eb.msg, "gguf: offset ", 13) != 0) fail_msg("length %zu: message \"%s\"", n, eb.msg);
        free(p);
    }
    free(b.p);
}

static uint64_t rng_next(uint64_t *s) {
    *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
    return *s;
}

/* Read everything a parsed file exposes, so ASan sees any pointer that is out of range. */
static unsigned walk_value(const mn_gguf_value *v) {
    unsigned acc = 0;
    if (v->type == MN_GGUF_STRING) {
        for (uint64_t i = 0; i < v->v.str.len; i++) acc += (unsigned char)v->v.str.ptr[i];
    } else if (v->type == MN_GGUF_ARRAY) {
        mn_gguf_type et = v->v.arr.elem_type;
        for (uint64_t i = 0; i < v->v.arr.n; i++) {
            if (et == MN_GGUF_STRING || et == MN_GGUF_ARRAY) acc += walk_value(&v->v.arr.items[i]);
            else if (et == MN_GGUF_FLOAT32 || et == MN_GGUF_FLOAT64) acc += mn_gguf_arr_float(v, i) > 0;
            else acc += (unsigned)mn_gguf_arr_int(v, i);
        }
    }
    return acc;
}

static unsigned walk(const mn_gguf *g) {
    unsigned acc = 0;
    for (int64_t i = 0; i < mn_gguf_n_kv(g); i++) {
        const mn_gguf_kv *kv = mn_gguf_kv_at(g, i);
        assert_ptr_equal(mn_gguf_find(g, kv->key), &kv->value);
        acc += walk_value(&kv->value);
    }
    for (int64_t i = 0; i < mn_gguf_n_tensors(g); i++) {
        const mn_gguf_tensor *t = mn_gguf_tensor_at(g, i);
        assert_ptr_equal(mn_gguf_find_tensor(g, t->name), t);
        const uint8_t *d = t->data;
        assert_true(d >= (const uint8_t *)mn_gguf_file_data(g));
        assert_true(d + t->nbytes <= (const uint8_t *)mn_gguf_file_data(g) + mn_gguf_file_size(g));
        acc += d[0] + d[t->nbytes - 1];
    }
    return acc;
}

static void test_mutations(void **st) {
    (void)st;
    layout L;
    buf b = build(3, 0, &L);
    uint8_t *p = malloc(b.n);
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    long live0 = mn_alloc_live();
    int parsed = 0, failed = 0;
    for (int iter = 0; iter < 6000; iter++) {
        memcpy(p, b.p, b.n);
        uint64_t r = rng_next(&seed);
        if (r % 3 == 0) { /* a few random bytes */
            for (int k = 0, nk = 1 + (int)(r >> 8) % 4; k < nk; k++)
                p[rng_next(&seed) % b.n] = (uint8_t)rng_next(&seed);
        } else { /* one u64 (a length, count, offset or ne) set to an awkward value */
            static const uint64_t vals[] = {0, 1, 2, 31, 32, 0x7fffffffffffffffull, 0x8000000000000000ull,
                                            UINT64_MAX, UINT64_MAX - 7, 1ull << 32, 1ull << 40};
            uint64_t v = (r >> 8) % 2 ? vals[rng_next(&seed) % 11] : rng_next(&seed) % (b.n * 2);
            size_t pos = rng_next(&seed) % (b.n - 8);
            memcpy(p + pos, &v, 8);
        }
        mn_gguf *g = NULL;
        mn_errbuf eb = {{0}};
        mn_err e = mn_gguf_open_memory(p, b.n, &g, &eb);
        if (e == MN_OK) {
            parsed++;
            (void)walk(g);
            mn_gguf_close(g);
        } else {
            failed++;
            if (e != MN_EFORMAT) fail_msg("iteration %d: %s (%s)", iter, mn_err_name(e), eb.msg);
            if (strncmp(eb.msg, "gguf: offset ", 13) != 0) fail_msg("iteration %d: message \"%s\"", iter, eb.msg);
        }
    }
    assert_int_equal(mn_alloc_live(), live0);
    /* both outcomes must occur, or the mutations are not exercising anything */
    assert_true(parsed > 100 && failed > 1000);
    free(p);
    free(b.p);
}

/* Make the N-th allocation fail for every N: MN_ENOMEM and no leak, until it succeeds. */
static void test_alloc_failure(void **st) {
    (void)st;
    layout L;
    buf b = build(2, 64, &L);
    long live0 = mn_alloc_live();
    int ok = 0;
    for (long n = 0; n < 100 && !ok; n++) {
        mn_alloc_fail_after(n);
        mn_gguf *g = NULL;
        mn_errbuf eb = {{0}};
        mn_err e = mn_gguf_open_memory(b.p, b.n, &g, &eb);
        mn_alloc_fail_after(-1);
        if (e == MN_OK) {
            ok = 1;
            assert_int_equal(mn_gguf_n_tensors(g), NT);
            mn_gguf_close(g);
        } else if (e != MN_ENOMEM) {
            fail_msg("fail_after %ld: %s (%s)", n, mn_err_name(e), eb.msg);
        }
        assert_int_equal(mn_alloc_live(), live0);
    }
    assert_true(ok);
    free(b.p);
}

/* ---- files on disk ----------------------------------------------------------------------- */

static void test_open_errors(void **st) {
    (void)st;
    mn_gguf *g = (mn_gguf *)1;
    mn_errbuf eb;
    assert_int_equal(mn_gguf_open("/nonexistent/x.gguf", &g, &eb), MN_ENOT_FOUND);
    assert_null(g);
    assert_non_null(strstr(eb.msg, "/nonexistent/x.gguf"));
    char path[] = "/tmp/mn_test_gguf_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(mn_gguf_open(path, &g, &eb), MN_EFORMAT); /* empty */
    layout L;
    buf b = build(3, 0, &L);
    assert_int_equal(write(fd, b.p, b.n), (ssize_t)b.n);
    close(fd);
    assert_int_equal(mn_gguf_open(path, &g, &eb), MN_OK);
    assert_int_equal(mn_gguf_n_tensors(g), NT);
    assert_memory_equal(mn_gguf_file_data(g), b.p, b.n);
    mn_gguf_close(g);
    assert_int_equal(truncate(path, (off_t)b.n - 1), 0);
    assert_int_equal(mn_gguf_open(path, &g, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, path));
    assert_non_null(strstr(eb.msg, "tensor 'q40'"));
    unlink(path);
    free(b.p);
}

/* Facts read from the file with the python gguf package (GGUFReader). */
static void test_real_model(void **st) {
    (void)st;
    const char *path = mn_model_default_path();
    if (access(path, R_OK) != 0) {
        const char *allow = getenv("MNEME_ALLOW_NO_MODEL");
        if (allow && strcmp(allow, "1") == 0) skip();
        fail_msg("model %s not found (set MNEME_MODEL, or MNEME_ALLOW_NO_MODEL=1 to skip)", path);
    }
    mn_gguf *g;
    mn_errbuf eb;
    if (mn_gguf_open(path, &g, &eb)) fail_msg("%s", eb.msg);
    assert_int_equal(mn_gguf_version(g), 3);
    assert_int_equal(mn_gguf_n_tensors(g), 272);
    assert_int_equal(mn_gguf_n_kv(g), 33);
    assert_int_equal(mn_gguf_data_offset(g), 1785664);
    assert_int_equal(mn_gguf_file_size(g), 98362432);
    const mn_gguf_tensor *t = mn_gguf_find_tensor(g, "token_embd.weight");
    assert_non_null(t);
    assert_int_equal(t->type, MN_Q8_0);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 576); assert_int_equal(t->ne[1], 49152);
    assert_int_equal(t->nbytes, 576 / 32 * 34 * 49152ull);
    assert_int_equal(mn_gguf_data_offset(g) + t->offset, 1785664);
    t = mn_gguf_find_tensor(g, "blk.0.ffn_down.weight");
    assert_non_null(t);
    assert_int_equal(t->type, MN_Q4_1);
    assert_int_equal(t->ne[0], 1536); assert_int_equal(t->ne[1], 576);
    assert_int_equal(t->nbytes, 1536 / 32 * 20 * 576ull);
    t = mn_gguf_find_tensor(g, "blk.0.attn_norm.weight");
    assert_non_null(t);
    assert_int_equal(mn_gguf_data_offset(g) + t->offset, 31866688);
    const float *w = t->data;
    double sum = 0;
    for (int i = 0; i < 576; i++) sum += w[i];
    assert_true(fabs(sum - 0.6129436492919922) < 1e-5);
    assert_true(fabsf(w[0] - 0.01397705f) < 1e-7f);
    assert_non_null(mn_gguf_find_tensor(g, "blk.29.ffn_down.weight"));
    assert_null(mn_gguf_find_tensor(g, "output.weight")); /* tied embeddings */
    int counts[MN_DTYPE_COUNT] = {0};
    for (int64_t i = 0; i < 272; i++) counts[mn_gguf_tensor_at(g, i)->type]++;
    assert_int_equal(counts[MN_Q4_1], 210); assert_int_equal(counts[MN_F32], 61);
    assert_int_equal(counts[MN_Q8_0], 1);

    uint32_t u; float f; mn_str s; bool b;
    assert_int_equal(mn_gguf_get_u32(g, "llama.block_count", &u, &eb), MN_OK); assert_int_equal(u, 30);
    assert_int_equal(mn_gguf_get_u32(g, "llama.attention.head_count", &u, &eb), MN_OK); assert_int_equal(u, 9);
    assert_int_equal(mn_gguf_get_u32(g, "llama.attention.head_count_kv", &u, &eb), MN_OK); assert_int_equal(u, 3);
    assert_int_equal(mn_gguf_get_u32(g, "llama.context_length", &u, &eb), MN_OK); assert_int_equal(u, 8192);
    assert_int_equal(mn_gguf_get_f32(g, "llama.rope.freq_base", &f, &eb), MN_OK); assert_true(f == 100000.0f);
    assert_int_equal(mn_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &f, &eb), MN_OK);
    assert_true(f == 1e-5f);
    assert_int_equal(mn_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b, &eb), MN_OK); assert_false(b);
    assert_int_equal(mn_gguf_get_str(g, "tokenizer.ggml.pre", &s, &eb), MN_OK);
    assert_int_equal(s.len, 6); assert_memory_equal(s.ptr, "smollm", 6);
    const mn_gguf_value *a;
    assert_int_equal(mn_gguf_get_arr(g, "tokenizer.ggml.tokens", MN_GGUF_STRING, &a, &eb), MN_OK);
    assert_int_equal(a->v.arr.n, 49152);
    assert_int_equal(a->v.arr.items[2].v.str.len, 10);
    assert_memory_equal(a->v.arr.items[2].v.str.ptr, "<|im_end|>", 10);
    assert_memory_equal(a->v.arr.items[49151].v.str.ptr, "ectable", 7);
    assert_int_equal(mn_gguf_get_arr(g, "tokenizer.ggml.merges", MN_GGUF_STRING, &a, &eb), MN_OK);
    assert_int_equal(a->v.arr.n, 48900);
    assert_memory_equal(a->v.arr.items[0].v.str.ptr, "\xc4\xa0 t", 4);
    assert_int_equal(mn_gguf_get_arr(g, "tokenizer.ggml.token_type", MN_GGUF_INT32, &a, &eb), MN_OK);
    assert_int_equal(mn_gguf_arr_int(a, 0), 3); assert_int_equal(mn_gguf_arr_int(a, 300), 1);
    mn_gguf_close(g);
}

/* ---- synthetic models from tools/gen_gguf.py ---------------------------------------------- */

typedef struct gen_case {
    const char *args;
    const char *arch;
    int n_layer, n_embd, n_head, n_kv, head_dim, n_ff, n_vocab;
    mn_dtype type, embd_type;
    bool untied, llama3, no_tensors;
} gen_case;

static const char *source_dir(char *b, size_t n) {
    const char *s = getenv("MNEME_SOURCE_DIR");
    if (s && *s) return s;
    snprintf(b, n, "%s", __FILE__); /* <src>/tests/unit/test_gguf.c */
    char *p = strstr(b, "/tests/unit/test_gguf.c");
    if (p) *p = 0;
    else snprintf(b, n, ".");
    return b;
}

/* Rows that are not whole K-quant super-blocks fall back to Q8_0 (documented in the tool). */
static mn_dtype gen_mat_type(mn_dtype t, int64_t ne0) {
    return (t == MN_Q2_K || t == MN_Q3_K || t == MN_Q4_K || t == MN_Q5_K || t == MN_Q6_K) && ne0 % 256 ? MN_Q8_0 : t;
}

static void expect_tensor(const mn_gguf *g, const char *name, int nd, int64_t ne0, int64_t ne1, mn_dtype type) {
    const mn_gguf_tensor *t = mn_gguf_find_tensor(g, name);
    if (!t) fail_msg("tensor %s missing", name);
    assert_int_equal(t->n_dims, nd);
    assert_int_equal(t->ne[0], ne0);
    assert_int_equal(t->ne[1], nd > 1 ? ne1 : 1);
    if (t->type != type) fail_msg("tensor %s: type %s, expected %s", name, mn_dtype_name(t->type), mn_dtype_name(type));
    assert_int_equal((uintptr_t)t->data % 32, (uintptr_t)mn_gguf_file_data(g) % 32);
}

static void expect_u32(const mn_gguf *g, const char *arch, const char *suffix, uint32_t want) {
    char key[128];
    uint32_t v = 0;
    mn_errbuf eb;
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    if (mn_gguf_get_u32(g, key, &v, &eb)) fail_msg("%s", eb.msg);
    if (v != want) fail_msg("%s = %u, expected %u", key, v, want);
}

static void check_generated(const mn_gguf *g, const gen_case *c) {
    mn_errbuf eb;
    mn_str s;
    const char *a = c->arch;
    assert_int_equal(mn_gguf_get_str(g, "general.architecture", &s, &eb), MN_OK);
    assert_int_equal(s.len, strlen(a)); assert_memory_equal(s.ptr, a, s.len);
    expect_u32(g, a, "block_count", (uint32_t)c->n_layer);
    expect_u32(g, a, "embedding_length", (uint32_t)c->n_embd);
    expect_u32(g, a, "feed_forward_length", (uint32_t)c->n_ff);
    expect_u32(g, a, "attention.head_count", (uint32_t)c->n_head);
    expect_u32(g, a, "attention.head_count_kv", (uint32_t)c->n_kv);
    expect_u32(g, a, "rope.dimension_count", (uint32_t)c->head_dim);
    expect_u32(g, a, "vocab_size", (uint32_t)c->n_vocab);
    char key[128];
    snprintf(key, sizeof key, "%s.attention.key_length", a);
    if (c->head_dim * c->n_head != c->n_embd) expect_u32(g, a, "attention.key_length", (uint32_t)c->head_dim);
    else assert_null(mn_gguf_find(g, key));
    float f;
    snprintf(key, sizeof key, "%s.rope.freq_base", a);
    assert_int_equal(mn_gguf_get_f32(g, key, &f, &eb), MN_OK);
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", a);
    assert_int_equal(mn_gguf_get_f32(g, key, &f, &eb), MN_OK);
    assert_true(f > 0 && f < 1e-4f);

    assert_int_equal(mn_gguf_get_str(g, "tokenizer.ggml.model", &s, &eb), MN_OK);
    assert_memory_equal(s.ptr, "gpt2", 4);
    assert_int_equal(mn_gguf_get_str(g, "tokenizer.chat_template", &s, &eb), MN_OK);
    assert_true(s.len > 20 && memmem(s.ptr, s.len, "<|im_start|>", 12) != NULL);
    const mn_gguf_value *tok, *tt, *mg;
    assert_int_equal(mn_gguf_get_arr(g, "tokenizer.ggml.tokens", MN_GGUF_STRING, &tok, &eb), MN_OK);
    assert_int_equal(tok->v.arr.n, (uint64_t)c->n_vocab);
    assert_int_equal(mn_gguf_get_arr(g, "tokenizer.ggml.token_type", MN_GGUF_INT32, &tt, &eb), MN_OK);
    assert_int_equal(tt->v.arr.n, (uint64_t)c->n_vocab);
    assert_int_equal(mn_gguf_get_arr(g, "tokenizer.ggml.merges", MN_GGUF_STRING, &mg, &eb), MN_OK);
    assert_true(mg->v.arr.n >= (uint64_t)(c->n_vocab - 259) || c->n_vocab > 700);
    uint32_t eos;
    assert_int_equal(mn_gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &eos, &eb), MN_OK);
    const mn_str *e = &tok->v.arr.items[eos].v.str;
    assert_int_equal(e->len, 13); assert_memory_equal(e->ptr, "<|endoftext|>", 13);
    assert_int_equal(mn_gguf_arr_int(tt, eos), 3);                      /* CONTROL */
    assert_memory_equal(tok->v.arr.items[c->n_vocab - 1].v.str.ptr, "<|im_end|>", 10);
    assert_int_equal(mn_gguf_arr_int(tt, c->n_vocab - 1), 3);
    assert_memory_equal(tok->v.arr.items['A'].v.str.ptr, "A", 1);        /* byte tokens */
    assert_memory_equal(tok->v.arr.items[' '].v.str.ptr, "\xc4\xa0", 2); /* U+0120 for a space */

    if (c->no_tensors) { assert_int_equal(mn_gguf_n_tensors(g), 0); return; }
    int64_t E = c->n_embd, Q = (int64_t)c->n_head * c->head_dim, K = (int64_t)c->n_kv * c->head_dim;
    bool qwen = strcmp(a, "qwen2") == 0;
    int64_t want = 2 + (int64_t)c->n_layer * (qwen ? 12 : 9) + c->untied + c->llama3;
    assert_int_equal(mn_gguf_n_tensors(g), want);
    expect_tensor(g, "token_embd.weight", 2, E, c->n_vocab, c->embd_type);
    expect_tensor(g, "output_norm.weight", 1, E, 1, MN_F32);
    if (c->untied) expect_tensor(g, "output.weight", 2, E, c->n_vocab, gen_mat_type(c->type, E));
    else assert_null(mn_gguf_find_tensor(g, "output.weight"));
    for (int l = 0; l < c->n_layer; l++) {
        char n[64];
#define T(suffix, nd, ne0, ne1, ty) (snprintf(n, sizeof n, "blk.%d.%s", l, suffix), expect_tensor(g, n, nd, ne0, ne1, ty))
        T("attn_norm.weight", 1, E, 1, MN_F32);
        T("ffn_norm.weight", 1, E, 1, MN_F32);
        T("attn_q.weight", 2, E, Q, gen_mat_type(c->type, E));
        T("attn_k.weight", 2, E, K, gen_mat_type(c->type, E));
        T("attn_v.weight", 2, E, K, gen_mat_type(c->type, E));
        T("attn_output.weight", 2, Q, E, gen_mat_type(c->type, Q));
        T("ffn_gate.weight", 2, E, c->n_ff, gen_mat_type(c->type, E));
        T("ffn_up.weight", 2, E, c->n_ff, gen_mat_type(c->type, E));
        T("ffn_down.weight", 2, c->n_ff, E, gen_mat_type(c->type, c->n_ff));
        if (qwen) {
            T("attn_q.bias", 1, Q, 1, MN_F32);
            T("attn_k.bias", 1, K, 1, MN_F32);
            T("attn_v.bias", 1, K, 1, MN_F32);
        }
#undef T
    }
    const mn_gguf_tensor *nw = mn_gguf_find_tensor(g, "blk.0.attn_norm.weight");
    double mean = 0;
    for (int64_t i = 0; i < E; i++) mean += ((const float *)nw->data)[i] / (double)E;
    assert_true(mean > 0.9 && mean < 1.1);
    const mn_gguf_tensor *rf = mn_gguf_find_tensor(g, "rope_freqs.weight");
    if (!c->llama3) { assert_null(rf); return; }
    expect_tensor(g, "rope_freqs.weight", 1, c->head_dim / 2, 1, MN_F32);
    const float *r = rf->data;
    /* llama3: the highest frequencies are unscaled, the lowest divided by factor 8 */
    assert_true(r[0] == 1.0f);
    assert_true(fabsf(r[c->head_dim / 2 - 1] - 8.0f) < 1e-6f);
    for (int i = 1; i < c->head_dim / 2; i++) assert_true(r[i] >= r[i - 1]);
}

static void test_generated_models(void **st) {
    (void)st;
    if (system("python3 -c 'import gguf, numpy' >/dev/null 2>&1") != 0)
        fail_msg("python3 with the gguf and numpy packages is needed (pip install gguf numpy)");
    char sb[1024], dir[] = "/tmp/mn_gen_gguf_XXXXXX";
    const char *src = source_dir(sb, sizeof sb);
    assert_non_null(mkdtemp(dir));
    static const gen_case cases[] = {
        {"", "llama", 2, 256, 8, 2, 32, 512, 384, MN_Q4_1, MN_Q4_1, false, false, false},
        {"--arch qwen2 --type Q6_K --untied --rope-scaling llama3 --n-layer 1 --n-head 2 --n-kv-head 1 "
         "--head-dim 64 --n-ff 256 --n-vocab 300 --seed 7",
         "qwen2", 1, 256, 2, 1, 64, 256, 300, MN_Q6_K, MN_Q6_K, true, true, false},
        {"--type Q4_K --n-embd 96 --n-head 3 --n-kv-head 1 --n-ff 512 --n-layer 1",
         "llama", 1, 96, 3, 1, 32, 512, 384, MN_Q4_K, MN_Q8_0, false, false, false},
        {"--type Q5_K --untied --n-layer 1", "llama", 1, 256, 8, 2, 32, 512, 384, MN_Q5_K, MN_Q5_K, true, false, false},
        {"--type F16 --embd-type F32 --n-layer 1", "llama", 1, 256, 8, 2, 32, 512, 384, MN_F16, MN_F32, false, false, false},
        {"--type BF16 --n-layer 1 --n-vocab 260", "llama", 1, 256, 8, 2, 32, 512, 260, MN_BF16, MN_BF16, false, false, false},
        {"--type Q8_0 --arch qwen2 --n-layer 1", "qwen2", 1, 256, 8, 2, 32, 512, 384, MN_Q8_0, MN_Q8_0, false, false, false},
        {"--type Q5_0 --n-layer 1", "llama", 1, 256, 8, 2, 32, 512, 384, MN_Q5_0, MN_Q5_0, false, false, false},
        {"--type Q5_1 --n-layer 1 --untied --n-embd 96 --n-head 3 --n-kv-head 1",
         "llama", 1, 96, 3, 1, 32, 512, 384, MN_Q5_1, MN_Q5_1, true, false, false},
        {"--type Q3_K --n-layer 1 --untied", "llama", 1, 256, 8, 2, 32, 512, 384, MN_Q3_K, MN_Q3_K, true, false, false},
        {"--type Q3_K --n-embd 96 --n-head 3 --n-kv-head 1 --n-ff 512 --n-layer 1",
         "llama", 1, 96, 3, 1, 32, 512, 384, MN_Q3_K, MN_Q8_0, false, false, false},
        {"--type Q2_K --n-layer 1", "llama", 1, 256, 8, 2, 32, 512, 384, MN_Q2_K, MN_Q2_K, false, false, false},
        {"--type Q4_0 --n-layer 1 --untied", "llama", 1, 256, 8, 2, 32, 512, 384, MN_Q4_0, MN_Q4_0, true, false, false},
        {"--type F32 --n-layer 1 --n-vocab 1000", "llama", 1, 256, 8, 2, 32, 512, 1000, MN_F32, MN_F32, false, false, false},
        {"--no-tensors", "llama", 2, 256, 8, 2, 32, 512, 384, MN_Q4_1, MN_Q4_1, false, false, true},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[1200], cmd[4096];
        snprintf(path, sizeof path, "%s/m%zu.gguf", dir, i);
        snprintf(cmd, sizeof cmd, "python3 '%s/tools/gen_gguf.py' '%s' %s 2>/dev/null", src, path, cases[i].args);
        if (system(cmd) != 0) fail_msg("command failed: %s", cmd);
        mn_gguf *g;
        mn_errbuf eb;
        if (mn_gguf_open(path, &g, &eb)) fail_msg("case %zu (%s): %s", i, cases[i].args, eb.msg);
        check_generated(g, &cases[i]);
        mn_gguf_close(g);
        unlink(path);
    }
    rmdir(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_v3_default_alignment),
        cmocka_unit_test(test_v2_alignment_64),
        cmocka_unit_test(test_v3_alignment_8),
        cmocka_unit_test(test_no_tensors),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_deep_nesting),
        cmocka_unit_test(test_truncation),
        cmocka_unit_test(test_mutations),
        cmocka_unit_test(test_alloc_failure),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_real_model),
        cmocka_unit_test(test_generated_models),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
