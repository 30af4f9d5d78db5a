/* tests/fuzz/fuzz_session_file.c — libFuzzer target for the session file reader.
 *
 * Reads the input with mn_session_read_mem from an exact-size copy (a read one byte past the
 * end is an ASan error), and once more with mn_session_read_mem_blocks (the T2/T3 restore
 * into pool blocks reads that way): the same verdict, and for inputs that load the same
 * blocks as the image, in order.
 * A failure must come with a message and no object; a success must
 * give counts that agree with each other, and every token, role and KV element is touched
 * (a short allocation shows up under ASan). Inputs that load are also read with a model
 * fingerprint that does not match, which must never succeed. Each input is read twice: as
 * is, and with every checksum recomputed (otherwise nearly every mutation stops at the
 * header checksum and the checks behind it are never reached).
 * See tests/fuzz/README.md for building, the seed corpus and running.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/kvcodec.h"
#include "engine/session_file.h"

static uint64_t rd64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}
static void wr64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Recompute every checksum the (possibly mutated) layout fields point at, inside bounds, so
 * the fuzzer also reaches the checks behind them: table offsets, LZ4 streams, zero tails. */
static void fix_checksums(uint8_t *p, size_t n) {
    if (n < 176) return;
    uint64_t to = rd64(p + 112), tb = rd64(p + 120), ao = rd64(p + 136), ab = rd64(p + 144);
    if (to <= n && tb <= n - to) wr64(p + 128, mn_hash64(p + to, (size_t)tb, 0));
    if (ao <= n && ab <= n - ao) {
        for (uint64_t e = 0; e + 32 <= ab; e += 32) {
            uint8_t *t = p + ao + e;
            uint64_t co = rd64(t), cb = rd64(t + 8);
            if (co <= n && cb <= n - co && (t + 24 < p + co || t >= p + co + cb)) wr64(t + 24, mn_hash64(p + co, (size_t)cb, 0));
        }
        wr64(p + 152, mn_hash64(p + ao, (size_t)ab, 0));
    }
    wr64(p + 168, mn_hash64(p, 168, 0));
}

/* The block sink (mn_session_read_mem_blocks): each block handed over must equal the
 * image reader's block b, in order, every element touched. */
typedef struct sink_check {
    const mn_session_loaded *ref; /* NULL: the image reader refused the input */
    int32_t next;
} sink_check;

static mn_err sink_block(void *ctx, const mn_session_image *im, int32_t b, const uint16_t *kv, mn_errbuf *eb) {
    (void)eb;
    sink_check *c = ctx;
    if (b != c->next++ || b >= im->n_blocks) abort();
    uint64_t bb = mn_session_block_bytes(im->n_layer, im->n_kv_head, im->head_dim, im->block_size);
    if (c->ref && memcmp(kv, c->ref->kv + (uint64_t)b * bb / 2, (size_t)bb) != 0) abort();
    if (!c->ref) { /* a refused input may hand over blocks before its bad one: each is whole */
        uint64_t acc = 0;
        for (uint64_t i = 0; i < bb / 2; i++) acc += kv[i];
        if (acc == 0x5a5a5a5a5a5aull) c->next += 0;
    }
    return MN_OK;
}

static void one(uint8_t *copy, size_t size) {
    mn_errbuf eb = {{0}};
    mn_session_loaded *L = NULL;
    mn_err e = mn_session_read_mem(copy, size, NULL, &L, &eb);
    {   /* the block reader gives the same verdict and the same blocks */
        sink_check c = {e == MN_OK ? L : NULL, 0};
        mn_session_loaded *B = NULL;
        mn_errbuf eb2 = {{0}};
        mn_err e2 = mn_session_read_mem_blocks(copy, size, NULL, sink_block, &c, &B, &eb2);
        if (c.ref && (e2 != MN_OK || !B || B->kv || c.next != L->img.n_blocks)) abort();
        if (!c.ref && (e2 == MN_OK || B || !eb2.msg[0])) abort();
        mn_session_loaded_free(B);
    }
    if (e != MN_OK) {
        if (L || !eb.msg[0]) abort();
    } else {
        const mn_session_image *im = &L->img;
        if (im->n_tokens < 0 || im->n_blocks != (im->n_tokens + im->block_size - 1) / im->block_size) abort();
        uint64_t acc = 0;
        for (int32_t i = 0; i < im->n_tokens; i++) {
            if (im->tokens[i] < 0) abort();
            acc += (uint64_t)im->tokens[i] + im->roles[i];
        }
        uint64_t bb = mn_session_block_bytes(im->n_layer, im->n_kv_head, im->head_dim, im->block_size);
        if (bb == 0) abort();
        for (uint64_t i = 0; i < (uint64_t)im->n_blocks * bb / 2; i++) acc += im->kv[i];
        if (acc == 0x5a5a5a5a5a5aull) eb.msg[0] = 1;   /* keep acc alive */
        mn_session_loaded_free(L);
        /* the same bytes with another model's fingerprint are refused */
        uint8_t other[16];
        for (int i = 0; i < 16; i++) other[i] = (uint8_t)~copy[40 + i];
        L = NULL;
        if (mn_session_read_mem(copy, size, other, &L, &eb) != MN_EMISMATCH || L) abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    memcpy(copy, data, size);
    one(copy, size);
    /* and once more with the checksums made to agree with the mutated bytes */
    fix_checksums(copy, size);
    one(copy, size);
    free(copy);
    return 0;
}
