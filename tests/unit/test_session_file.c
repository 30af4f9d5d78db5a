/* tests/unit/test_session_file.c — the session file (engine/session_file.c).
 *
 * Round trips (memory and file) must give back every field and the KV bit for bit; the
 * header fields are read here at the offsets docs/session-format.md gives, with this
 * file's own little-endian reads, and the file size must equal header + 5 bytes per token
 * + 32 per block + the chunks, each chunk compressed here separately with the codec.
 * Every single-byte corruption and every truncation of a small file must be MN_EFORMAT;
 * another model's fingerprint MN_EMISMATCH; headers claiming huge counts (re-checksummed
 * so only the count is wrong) must be refused before anything is allocated. A writer
 * killed mid-write (RLIMIT_FSIZE, SIGXFSZ) or failing mid-write must leave the previous
 * file intact, and the N-th allocation failing must never crash or leak.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/kvcodec.h"
#include "engine/session_file.h"
#include "kernels/common.h"

static uint64_t rs = 0x2545F4914F6CDD1Dull;
static uint64_t rnd(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return rs;
}
static float urand(void) { return ((float)(rnd() >> 40) + 0.5f) * 0x1p-24f; }
static float nrand(void) { return sqrtf(-2.0f * logf(urand())) * cosf(6.2831853f * urand()); }

static uint32_t rd32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const uint8_t *p) { return rd32(p) | (uint64_t)rd32(p + 4) << 32; }
static void wr32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> 8 * i); }
static void wr64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> 8 * i); }

/* A test session: its arrays are plain malloc (not counted by mn_alloc_live). */
typedef struct tsess {
    mn_session_image im;
    int32_t *tokens;
    uint8_t *roles;
    uint16_t *kv;
    size_t block_elems;   /* f16 per K (or V) run of one block and layer */
} tsess;

static void tsess_make(tsess *t, int32_t n_layer, int32_t n_kv_head, int32_t head_dim, int32_t bs, int32_t n_tokens) {
    memset(t, 0, sizeof *t);
    mn_session_image *im = &t->im;
    for (int i = 0; i < 16; i++) {
        im->model_fp[i] = (uint8_t)(0xA0 + i);
        im->adapter_fp[i] = (uint8_t)(i * 7);
    }
    im->n_layer = n_layer;
    im->n_kv_head = n_kv_head;
    im->head_dim = head_dim;
    im->block_size = bs;
    im->n_tokens = n_tokens;
    im->n_blocks = (n_tokens + bs - 1) / bs;
    for (int i = 0; i < 4; i++) im->rng[i] = rnd();
    t->block_elems = (size_t)bs * (size_t)n_kv_head * (size_t)head_dim;
    size_t total = (size_t)im->n_blocks * (size_t)n_layer * 2 * t->block_elems;
    t->tokens = malloc((size_t)n_tokens * 4 + 4);
    t->roles = malloc((size_t)n_tokens + 1);
    t->kv = malloc(total * 2 + 2);
    for (int32_t i = 0; i < n_tokens; i++) {
        t->tokens[i] = (int32_t)(rnd() % 49152);
        t->roles[i] = (uint8_t)(rnd() % 5);
    }
    /* KV-like values; a run of zeros; and garbage in the unused slots of the last block */
    for (size_t i = 0; i < total; i++) t->kv[i] = mn_fp32_to_fp16(nrand() * (1.0f + (float)(i % 7)));
    for (size_t i = total / 4; i < total / 4 + total / 8; i++) t->kv[i] = 0;
    im->tokens = t->tokens;
    im->roles = t->roles;
    im->kv = t->kv;
}

static void tsess_free(tsess *t) {
    free(t->tokens);
    free(t->roles);
    free(t->kv);
}

/* Is KV element e (within block b, layer l, K/V k) at a position < n_tokens? */
static int used_elem(const tsess *t, size_t b, size_t e) {
    size_t kv_dim = (size_t)t->im.n_kv_head * (size_t)t->im.head_dim;
    return b * (size_t)t->im.block_size + e / kv_dim < (size_t)t->im.n_tokens;
}

static void check_loaded(const tsess *t, const mn_session_loaded *L) {
    const mn_session_image *a = &t->im, *b = &L->img;
    assert_memory_equal(a->model_fp, b->model_fp, 16);
    assert_memory_equal(a->adapter_fp, b->adapter_fp, 16);
    assert_int_equal(a->n_layer, b->n_layer);
    assert_int_equal(a->n_kv_head, b->n_kv_head);
    assert_int_equal(a->head_dim, b->head_dim);
    assert_int_equal(a->block_size, b->block_size);
    assert_int_equal(a->n_tokens, b->n_tokens);
    assert_int_equal(a->n_blocks, b->n_blocks);
    for (int i = 0; i < 4; i++) assert_true(a->rng[i] == b->rng[i]);
    if (a->n_tokens) {
        assert_memory_equal(a->tokens, b->tokens, (size_t)a->n_tokens * 4);
        assert_memory_equal(a->roles, b->roles, (size_t)a->n_tokens);
    }
    for (size_t blk = 0; blk < (size_t)a->n_blocks; blk++)
        for (size_t r = 0; r < 2 * (size_t)a->n_layer; r++)
            for (size_t e = 0; e < t->block_elems; e++) {
                size_t i = (blk * 2 * (size_t)a->n_layer + r) * t->block_elems + e;
                uint16_t want = used_elem(t, blk, e) ? a->kv[i] : 0;   /* unused slots come back as zeros */
                if (b->kv[i] != want)
                    fail_msg("kv block %zu run %zu elem %zu: %#x, want %#x", blk, r, e, b->kv[i], want);
            }
}

static void write_mem_ok(const mn_session_image *im, uint8_t **buf, size_t *len) {
    mn_errbuf eb = {{0}};
    mn_err e = mn_session_write_mem(im, buf, len, &eb);
    if (e != MN_OK) fail_msg("write_mem: %s", eb.msg);
}

static void test_roundtrip_and_layout(void **st) {
    (void)st;
    tsess t;
    tsess_make(&t, 3, 2, 8, 4, 10);   /* 3 blocks, the last holds 2 of 4 slots */
    /* the garbage in the unused slots of the last block differs from zero */
    size_t last = (size_t)(t.im.n_blocks - 1) * 2 * 3 * t.block_elems;
    t.kv[last + t.block_elems - 1] = 0x3c00;
    uint8_t *buf;
    size_t len;
    write_mem_ok(&t.im, &buf, &len);
    /* the documented layout, read independently */
    assert_memory_equal(buf, "MNEMESES", 8);
    assert_int_equal(rd32(buf + 8), 1);
    assert_int_equal(rd32(buf + 12), 176);
    assert_int_equal(rd32(buf + 16), 3);
    assert_int_equal(rd32(buf + 20), 2);
    assert_int_equal(rd32(buf + 24), 8);
    assert_int_equal(rd32(buf + 28), 4);
    assert_int_equal(rd32(buf + 32), 10);
    assert_int_equal(rd32(buf + 36), 3);
    assert_memory_equal(buf + 40, t.im.model_fp, 16);
    assert_memory_equal(buf + 56, t.im.adapter_fp, 16);
    assert_true(rd64(buf + 72) == t.im.rng[0] && rd64(buf + 96) == t.im.rng[3]);
    assert_int_equal(rd32(buf + 104), 1);
    assert_int_equal(rd64(buf + 112), 176);
    assert_int_equal(rd64(buf + 120), 50);
    assert_int_equal(rd64(buf + 136), 226);
    assert_int_equal(rd64(buf + 144), 96);
    assert_int_equal(rd64(buf + 160), len);
    assert_true(rd64(buf + 168) == mn_hash64(buf, 168, 0));
    assert_true(rd64(buf + 128) == mn_hash64(buf + 176, 50, 0));
    for (int i = 0; i < 10; i++) {
        assert_int_equal((int32_t)rd32(buf + 176 + 4 * i), t.tokens[i]);
        assert_int_equal(buf[176 + 40 + i], t.roles[i]);
    }
    /* each chunk = the codec's output for that block (last one with zeroed unused slots) */
    size_t bb = 2 * 3 * t.block_elems * 2, off = 176 + 50 + 96;
    uint16_t *blk = malloc(bb);
    uint8_t *comp = malloc(mn_kvcodec_bound(bb));
    mn_errbuf eb = {{0}};
    for (size_t b = 0; b < 3; b++) {
        memcpy(blk, t.kv + b * bb / 2, bb);
        for (size_t r = 0; r < 6; r++)
            for (size_t e = 0; e < t.block_elems; e++)
                if (!used_elem(&t, b, e)) blk[r * t.block_elems + e] = 0;
        size_t cb;
        assert_int_equal(mn_kvcodec_compress(blk, bb, comp, mn_kvcodec_bound(bb), &cb, &eb), MN_OK);
        const uint8_t *ent = buf + 226 + 32 * b;
        assert_int_equal(rd64(ent), off);
        assert_int_equal(rd64(ent + 8), cb);
        assert_int_equal(rd64(ent + 16), bb);
        assert_memory_equal(buf + off, comp, cb);
        assert_true(rd64(ent + 24) == mn_hash64(comp, cb, 0));
        off += cb;
    }
    assert_int_equal(off, len);
    free(blk);
    free(comp);

    mn_session_loaded *L = NULL;
    assert_int_equal(mn_session_read_mem(buf, len, t.im.model_fp, &L, &eb), MN_OK);
    check_loaded(&t, L);
    assert_int_equal(L->file_bytes, len);
    assert_int_equal(mn_session_check_adapter(L, t.im.adapter_fp, &eb), MN_OK);
    uint8_t other[16] = {0};
    assert_int_equal(mn_session_check_adapter(L, other, &eb), MN_EMISMATCH);
    assert_non_null(strstr(eb.msg, "adapter"));
    mn_session_loaded_free(L);

    /* the file writer produces the same bytes */
    char path[] = "/tmp/mn_sfile_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(mn_session_write_file(path, &t.im, &eb), MN_OK);
    FILE *f = fopen(path, "rb");
    uint8_t *fb = malloc(len + 16);
    assert_int_equal(fread(fb, 1, len + 16, f), len);
    fclose(f);
    assert_memory_equal(fb, buf, len);
    assert_int_equal(mn_session_read_file(path, t.im.model_fp, &L, &eb), MN_OK);
    check_loaded(&t, L);
    mn_session_loaded_free(L);
    unlink(path);
    free(fb);
    free(buf);
    tsess_free(&t);
}

/* KV that LZ4 cannot shrink (random bits) is stored: compressed_bytes == raw_bytes, the
 * chunk is the block's bytes as they are, flags bit 0 is set; it reads back exactly, from
 * memory and from a file; a flipped byte in a stored chunk fails its checksum; a file of
 * the earlier writer (flags 0: every chunk LZ4) still reads; other flag bits are refused. */
static void test_stored_chunks(void **st) {
    (void)st;
    tsess t;
    tsess_make(&t, 2, 2, 16, 8, 20); /* 3 blocks, the last holds 4 of 8 slots */
    size_t total = (size_t)t.im.n_blocks * 2 * 2 * t.block_elems;
    for (size_t i = 0; i < total; i++) t.kv[i] = (uint16_t)rnd();
    uint8_t *buf;
    size_t len;
    write_mem_ok(&t.im, &buf, &len);
    assert_int_equal(rd32(buf + 108), 1);
    size_t bb = 2 * 2 * t.block_elems * 2, tab = 176 + 5 * 20;
    for (size_t b = 0; b < 2; b++) {
        const uint8_t *ent = buf + tab + 32 * b;
        assert_int_equal(rd64(ent + 8), bb);                          /* stored */
        assert_memory_equal(buf + rd64(ent), t.kv + b * bb / 2, bb);  /* the block as it is */
    }
    assert_true(rd64(buf + tab + 64 + 8) < bb); /* the last block, half zeros, is LZ4: both kinds in one file */
    mn_errbuf eb = {{0}};
    mn_session_loaded *L = NULL;
    assert_int_equal(mn_session_read_mem(buf, len, t.im.model_fp, &L, &eb), MN_OK);
    check_loaded(&t, L);
    mn_session_loaded_free(L);
    char path[] = "/tmp/mn_sfile_stored_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(mn_session_write_file(path, &t.im, &eb), MN_OK);
    assert_int_equal(mn_session_read_file(path, t.im.model_fp, &L, &eb), MN_OK);
    check_loaded(&t, L);
    mn_session_loaded_free(L);
    unlink(path);
    /* a flipped byte inside the second stored chunk */
    uint8_t *bad = malloc(len);
    memcpy(bad, buf, len);
    bad[rd64(buf + tab + 32) + 100] ^= 1;
    assert_int_equal(mn_session_read_mem(bad, len, t.im.model_fp, &L, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, "chunk 1"));
    assert_non_null(strstr(eb.msg, "checksum"));
    /* flags 3: refused, naming the field */
    memcpy(bad, buf, len);
    wr32(bad + 108, 3);
    wr64(bad + 168, mn_hash64(bad, 168, 0));
    assert_int_equal(mn_session_read_mem(bad, len, t.im.model_fp, &L, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, "flags"));
    free(bad);
    free(buf);
    tsess_free(&t);

    /* compressible KV with flags cleared (what the earlier writer wrote): LZ4 chunks read */
    tsess c;
    tsess_make(&c, 3, 2, 8, 4, 10);
    write_mem_ok(&c.im, &buf, &len);
    for (size_t b = 0; b < 3; b++) assert_true(rd64(buf + 176 + 50 + 32 * b + 8) < 2 * 3 * c.block_elems * 2);
    wr32(buf + 108, 0);
    wr64(buf + 168, mn_hash64(buf, 168, 0));
    assert_int_equal(mn_session_read_mem(buf, len, c.im.model_fp, &L, &eb), MN_OK);
    check_loaded(&c, L);
    mn_session_loaded_free(L);
    free(buf);
    tsess_free(&c);
}

static void test_shapes(void **st) {
    (void)st;
    /* empty session; a full last block; SmolLM2's geometry (30 layers, 3 x 64, block 16) */
    int32_t shapes[][5] = {{2, 1, 4, 4, 0}, {1, 1, 2, 4, 8}, {2, 3, 16, 16, 33}, {30, 3, 64, 16, 100}};
    for (size_t k = 0; k < 4; k++) {
        tsess t;
        tsess_make(&t, shapes[k][0], shapes[k][1], shapes[k][2], shapes[k][3], shapes[k][4]);
        uint8_t *buf;
        size_t len;
        write_mem_ok(&t.im, &buf, &len);
        /* MNEME_SESSION_SEED_DIR: also keep the small ones as a fuzz seed corpus (tests/fuzz/README.md) */
        const char *seeds = getenv("MNEME_SESSION_SEED_DIR");
        if (seeds && len < 100000) {
            char sp[512];
            snprintf(sp, sizeof sp, "%s/seed%zu.mns", seeds, k);
            FILE *f = fopen(sp, "wb");
            if (f) {
                fwrite(buf, 1, len, f);
                fclose(f);
            }
        }
        mn_session_loaded *L = NULL;
        mn_errbuf eb = {{0}};
        assert_int_equal(mn_session_read_mem(buf, len, NULL, &L, &eb), MN_OK);
        check_loaded(&t, L);
        mn_session_loaded_free(L);
        free(buf);
        tsess_free(&t);
    }
}

static void test_invalid_image(void **st) {
    (void)st;
    tsess t;
    tsess_make(&t, 2, 1, 4, 4, 6);
    uint8_t *buf = NULL;
    size_t len;
    mn_errbuf eb = {{0}};
    t.im.n_blocks = 3;
    assert_int_equal(mn_session_write_mem(&t.im, &buf, &len, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "n_blocks"));
    t.im.n_blocks = 2;
    t.tokens[5] = -1;
    assert_int_equal(mn_session_write_mem(&t.im, &buf, &len, &eb), MN_EINVALID);
    t.tokens[5] = 1;
    t.im.head_dim = MN_SESSION_MAX_HEAD_DIM + 1;
    assert_int_equal(mn_session_write_mem(&t.im, &buf, &len, &eb), MN_EINVALID);
    assert_null(buf);
    tsess_free(&t);
}

/* Every single-byte change and every truncation of a small file: MN_EFORMAT. Exact-size
 * copies, so a read past the end is an ASan error. */
static void test_corruption_and_truncation(void **st) {
    (void)st;
    tsess t;
    tsess_make(&t, 2, 1, 8, 4, 7);
    uint8_t *buf;
    size_t len;
    write_mem_ok(&t.im, &buf, &len);
    print_message("small session file: %zu bytes\n", len);
    mn_errbuf eb = {{0}};
    mn_session_loaded *L = NULL;
    long base = mn_alloc_live();
    for (size_t i = 0; i < len; i++) {
        for (int k = 0; k < 2; k++) {
            uint8_t *c = malloc(len);
            memcpy(c, buf, len);
            c[i] ^= k ? 0xFF : 0x01;
            mn_err e = mn_session_read_mem(c, len, t.im.model_fp, &L, &eb);
            if (e != MN_EFORMAT) fail_msg("byte %zu ^%#x: got %d (%s)", i, k ? 0xFF : 0x01, e, eb.msg);
            assert_null(L);
            free(c);
        }
    }
    for (size_t n = 0; n < len; n++) {
        uint8_t *c = malloc(n + 1);
        memcpy(c, buf, n);
        mn_err e = mn_session_read_mem(c, n, t.im.model_fp, &L, &eb);
        if (e != MN_EFORMAT) fail_msg("truncated to %zu: got %d (%s)", n, e, eb.msg);
        free(c);
    }
    assert_int_equal(mn_alloc_live(), base);
    /* messages name the part and offset */
    buf[len - 1] ^= 1;
    assert_int_equal(mn_session_read_mem(buf, len, NULL, &L, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, "chunk 1 at offset"));
    buf[len - 1] ^= 1;
    buf[180] ^= 1;
    assert_int_equal(mn_session_read_mem(buf, len, NULL, &L, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, "tokens section at offset 176"));
    buf[180] ^= 1;
    assert_int_equal(mn_session_read_mem(buf, len - 9, NULL, &L, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, "truncated"));
    /* a trailing byte is refused too */
    uint8_t *longer = malloc(len + 1);
    memcpy(longer, buf, len);
    longer[len] = 0;
    assert_int_equal(mn_session_read_mem(longer, len + 1, NULL, &L, &eb), MN_EFORMAT);
    free(longer);
    free(buf);
    tsess_free(&t);
}

static void test_model_mismatch_and_version(void **st) {
    (void)st;
    tsess t;
    tsess_make(&t, 1, 1, 4, 4, 5);
    uint8_t *buf;
    size_t len;
    write_mem_ok(&t.im, &buf, &len);
    uint8_t other[16];
    for (int i = 0; i < 16; i++) other[i] = (uint8_t)(0x10 * (i % 16) + 1);
    mn_errbuf eb = {{0}};
    mn_session_loaded *L = NULL;
    assert_int_equal(mn_session_read_mem(buf, len, other, &L, &eb), MN_EMISMATCH);
    assert_null(L);
    assert_non_null(strstr(eb.msg, "another model"));
    assert_non_null(strstr(eb.msg, "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"));
    assert_non_null(strstr(eb.msg, "01112131415161718191a1b1c1d1e1f1"));
    /* a newer version with a valid header checksum: unsupported, not corrupt */
    wr32(buf + 8, 2);
    wr64(buf + 168, mn_hash64(buf, 168, 0));
    assert_int_equal(mn_session_read_mem(buf, len, t.im.model_fp, &L, &eb), MN_EUNSUPPORTED);
    assert_non_null(strstr(eb.msg, "version 2"));
    free(buf);
    tsess_free(&t);
}

/* Headers whose counts are huge (checksum fixed up so only the count is wrong) are refused
 * with every allocation failing: nothing is allocated before they are checked. */
static void test_huge_counts(void **st) {
    (void)st;
    tsess t;
    tsess_make(&t, 2, 1, 4, 4, 6);
    uint8_t *buf;
    size_t len;
    write_mem_ok(&t.im, &buf, &len);
    struct { int off, width; uint64_t val; } cases[] = {
        {32, 4, MN_SESSION_MAX_TOKENS},          /* n_tokens at the limit, n_blocks now wrong */
        {32, 4, 0x7fffffff}, {36, 4, 0x7fffffff}, {16, 4, 1u << 20}, {20, 4, 0xffffffff},
        {28, 4, 0},                              /* block_size 0 */
        {120, 8, UINT64_MAX - 3}, {144, 8, 1ull << 62}, {160, 8, UINT64_MAX}, {112, 8, 1ull << 40},
    };
    mn_errbuf eb = {{0}};
    mn_session_loaded *L = NULL;
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        uint8_t *c = malloc(len);
        memcpy(c, buf, len);
        if (cases[k].width == 4) wr32(c + cases[k].off, (uint32_t)cases[k].val);
        else wr64(c + cases[k].off, cases[k].val);
        wr64(c + 168, mn_hash64(c, 168, 0));
        mn_alloc_fail_after(0);
        mn_err e = mn_session_read_mem(c, len, NULL, &L, &eb);
        mn_alloc_fail_after(-1);
        if (e != MN_EFORMAT) fail_msg("case %zu (offset %d): got %d (%s)", k, cases[k].off, e, eb.msg);
        free(c);
    }
    /* n_tokens with a consistent n_blocks but a file far too small for them */
    uint8_t *c = malloc(len);
    memcpy(c, buf, len);
    wr32(c + 32, 1000000);
    wr32(c + 36, 250000);
    wr64(c + 168, mn_hash64(c, 168, 0));
    mn_alloc_fail_after(0);
    assert_int_equal(mn_session_read_mem(c, len, NULL, &L, &eb), MN_EFORMAT);
    mn_alloc_fail_after(-1);
    free(c);
    free(buf);
    tsess_free(&t);
    /* a tiny file claiming a 1 GiB block: refused by the LZ4 ratio bound before the KV
     * allocation (the table itself is small and allowed) */
    tsess_make(&t, 1, 1, 4, 4, 1);
    write_mem_ok(&t.im, &buf, &len);
    c = malloc(len);
    memcpy(c, buf, len);
    wr32(c + 16, 1024);   /* n_layer */
    wr32(c + 20, 1024);   /* n_kv_head */
    wr32(c + 24, 64);     /* head_dim: 1024 * 2 * 4 * 1024 * 64 * 2 bytes = 1 GiB per block */
    wr64(c + 176 + 5 + 16, (uint64_t)1 << 30);   /* the table's raw size agrees */
    wr64(c + 152, mn_hash64(c + 181, 32, 0));
    wr64(c + 168, mn_hash64(c, 168, 0));
    long base = mn_alloc_live();
    assert_int_equal(mn_session_read_mem(c, len, NULL, &L, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, "impossible"));
    assert_int_equal(mn_alloc_live(), base);
    free(c);
    free(buf);
    tsess_free(&t);
}

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    uint8_t *b = malloc(1 << 20);
    *n = fread(b, 1, 1 << 20, f);
    fclose(f);
    return b;
}

/* v1 on disk; a writer of v2 dies (SIGXFSZ) or fails (EFBIG) mid-write; v1 must remain. */
static void test_atomic_write(void **st) {
    (void)st;
    char dir[] = "/tmp/mn_sdir_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256], tmp[400];
    snprintf(path, sizeof path, "%s/s.mns", dir);
    tsess v1, v2;
    tsess_make(&v1, 2, 2, 8, 4, 9);
    tsess_make(&v2, 2, 2, 8, 4, 40);
    mn_errbuf eb = {{0}};
    assert_int_equal(mn_session_write_file(path, &v1.im, &eb), MN_OK);
    size_t n1;
    uint8_t *before = slurp(path, &n1);
    assert_non_null(before);
    for (int mode = 0; mode < 2; mode++) {
        fflush(NULL);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            struct rlimit rl = {.rlim_cur = 1500, .rlim_max = RLIM_INFINITY};
            if (mode == 1) signal(SIGXFSZ, SIG_IGN);   /* writes fail with EFBIG instead */
            setrlimit(RLIMIT_FSIZE, &rl);
            mn_errbuf ceb;
            mn_err e = mn_session_write_file(path, &v2.im, &ceb);
            _exit(e == MN_EIO && strstr(ceb.msg, "write") ? 42 : 1);
        }
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)pid);
        struct stat sb;
        if (mode == 0) {
            assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGXFSZ);
            assert_int_equal(stat(tmp, &sb), 0);   /* the crash left a partial temp file */
            unlink(tmp);
        } else {
            assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 42);
            assert_int_equal(stat(tmp, &sb), -1);   /* a failed write removes its temp */
        }
        size_t n;
        uint8_t *now = slurp(path, &n);
        assert_int_equal(n, n1);
        assert_memory_equal(now, before, n1);
        free(now);
        mn_session_loaded *L = NULL;
        assert_int_equal(mn_session_read_file(path, v1.im.model_fp, &L, &eb), MN_OK);
        check_loaded(&v1, L);
        mn_session_loaded_free(L);
    }
    /* a rename that cannot happen (path is a non-empty directory): MN_EIO, no temp left */
    char sub[320];
    snprintf(sub, sizeof sub, "%s/d", dir);
    assert_int_equal(mkdir(sub, 0755), 0);
    snprintf(tmp, sizeof tmp, "%s/x", sub);
    FILE *f = fopen(tmp, "w");
    fclose(f);
    assert_int_equal(mn_session_write_file(sub, &v1.im, &eb), MN_EIO);
    assert_non_null(strstr(eb.msg, "rename"));
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", sub, (long)getpid());
    struct stat sb;
    assert_int_equal(stat(tmp, &sb), -1);
    /* then v2 replaces v1 for real */
    assert_int_equal(mn_session_write_file(path, &v2.im, &eb), MN_OK);
    mn_session_loaded *L = NULL;
    assert_int_equal(mn_session_read_file(path, v2.im.model_fp, &L, &eb), MN_OK);
    check_loaded(&v2, L);
    mn_session_loaded_free(L);
    char nope[300];
    snprintf(nope, sizeof nope, "%s/none/s.mns", dir);
    assert_int_equal(mn_session_write_file(nope, &v1.im, &eb), MN_EIO);
    assert_int_equal(mn_session_read_file(nope, NULL, &L, &eb), MN_ENOT_FOUND);
    unlink(tmp);
    snprintf(tmp, sizeof tmp, "%s/x", sub);
    unlink(tmp);
    rmdir(sub);
    unlink(path);
    rmdir(dir);
    free(before);
    tsess_free(&v1);
    tsess_free(&v2);
}

/* The N-th allocation fails, for every N until the whole sequence succeeds. */
static void test_alloc_failures(void **st) {
    (void)st;
    tsess t;
    tsess_make(&t, 2, 1, 8, 4, 11);
    char path[] = "/tmp/mn_salloc_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    long base = mn_alloc_live();
    int done = 0;
    for (long n = 0; n < 1000 && !done; n++) {
        mn_errbuf eb = {{0}};
        uint8_t *buf = NULL;
        size_t len = 0;
        mn_session_loaded *L1 = NULL, *L2 = NULL;
        mn_alloc_fail_after(n);
        mn_err e = mn_session_write_mem(&t.im, &buf, &len, &eb);
        if (e == MN_OK) e = mn_session_read_mem(buf, len, t.im.model_fp, &L1, &eb);
        if (e == MN_OK) e = mn_session_write_file(path, &t.im, &eb);
        if (e == MN_OK) e = mn_session_read_file(path, t.im.model_fp, &L2, &eb);
        mn_alloc_fail_after(-1);
        if (e == MN_OK) {
            check_loaded(&t, L1);
            check_loaded(&t, L2);
            done = 1;
        } else if (e != MN_ENOMEM) {
            fail_msg("fail after %ld: %d (%s)", n, e, eb.msg);
        }
        mn_free(buf);
        mn_session_loaded_free(L1);
        mn_session_loaded_free(L2);
        assert_int_equal(mn_alloc_live(), base);
    }
    assert_true(done);
    unlink(path);
    tsess_free(&t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_and_layout),      cmocka_unit_test(test_shapes),
        cmocka_unit_test(test_invalid_image),             cmocka_unit_test(test_corruption_and_truncation),
        cmocka_unit_test(test_model_mismatch_and_version), cmocka_unit_test(test_huge_counts),
        cmocka_unit_test(test_atomic_write),              cmocka_unit_test(test_alloc_failures),
        cmocka_unit_test(test_stored_chunks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
