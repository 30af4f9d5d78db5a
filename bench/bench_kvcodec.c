/* bench/bench_kvcodec.c — the KV codec (engine/kvcodec.c) on real and synthetic KV.
 *
 * Real KV: loads SmolLM2 (or -m MODEL), runs a few hundred tokens of English text through
 * the forward pass into a paged KV pool (block 16), gathers each block's KV of every layer
 * into one contiguous chunk (the session file's "block-major" chunk, 16 * 23040 bytes for
 * SmolLM2) and times, per chunk:
 *   plain     LZ4 on the raw f16 bytes
 *   shuf aN   byte shuffle + LZ4 with acceleration N (what the codec does; a1 = default)
 * reporting compressed/raw ratio and compress / decompress GB/s of raw bytes (one thread,
 * each timed over ~0.3 s). Every decompressed chunk is compared with the original, and the
 * ratio of the low-byte and high-byte halves of the shuffled stream is shown (where the
 * gain comes from). Synthetic KV (normal values in f16, 10% zero run) and all-zero chunks
 * follow for comparison.
 *   usage: bench_kvcodec [-m MODEL] [-n TOKENS] [-t THREADS]   (~10 s)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lz4.h>

#include "engine/alloc.h"
#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/kvcodec.h"
#include "engine/model.h"
#include "kernels/common.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what, const char *msg) {
    fprintf(stderr, "bench_kvcodec: %s: %s\n", what, msg);
    exit(1);
}

static const char *TEXT =
    "The history of memory in computing is a history of trade-offs between speed, size and cost. "
    "Early machines stored data in delay lines and drums; later, magnetic cores gave way to "
    "semiconductor memory, and caches appeared to hide the growing gap between processor and DRAM. "
    "A language model that serves a conversation faces the same trade-off: the keys and values of "
    "every past token must be kept somewhere if the model is to continue without recomputing them. "
    "Keeping them in the accelerator's memory is fastest, but that memory is small and expensive. "
    "Moving them to host memory, compressing them, or writing them to disk frees room for other "
    "conversations, at the price of bringing them back when the user speaks again. How much the "
    "data compresses decides how far down the hierarchy a conversation can go cheaply. Numbers in "
    "half precision carry a sign, five bits of exponent and ten bits of mantissa; the exponents of "
    "neighbouring values are similar, while the low mantissa bits look like noise. Separating the "
    "two kinds of bytes lets a fast compressor find the repetition that is there. Whether that is "
    "enough depends on the data, and the only honest answer comes from measuring real activations "
    "of a real model on real text, which is what this program does. Once upon a time, in a small "
    "village by the sea, there lived an old fisherman who told stories to anyone who would listen. "
    "He spoke of storms and of calm mornings, of nets full of silver fish and of days when the sea "
    "gave nothing at all. The children of the village gathered around him every evening, and he "
    "never told the same story twice, or so they believed.";

typedef struct stats {
    double ratio, c_gbs, d_gbs;
    double lo_ratio, hi_ratio;
} stats;

/* Time mode over n_chunks chunks of cb bytes each at data: mode 0 plain lz4, else byte
 * shuffle + lz4 with acceleration mode. */
static stats measure(const uint8_t *data, size_t n_chunks, size_t cb, int mode) {
    size_t cap = mn_kvcodec_bound(cb);
    uint8_t *comp = mn_malloc(n_chunks * cap), *back = mn_malloc(cb), *scratch = mn_malloc(cb);
    size_t *sz = mn_malloc(n_chunks * sizeof(size_t));
    if (!comp || !back || !scratch || !sz) die("measure", "out of memory");
    mn_errbuf eb = {{0}};
    stats s = {0};
    size_t total = 0;
    int reps = 0;
    double t0 = now_s(), t;
    do {
        total = 0;
        for (size_t i = 0; i < n_chunks; i++) {
            const uint8_t *src = data + i * cb;
            uint8_t *dst = comp + i * cap;
            if (mode == 0) {
                int r = LZ4_compress_default((const char *)src, (char *)dst, (int)cb, (int)cap);
                if (r <= 0) die("lz4", "compress failed");
                sz[i] = (size_t)r;
            } else if (mn_kvcodec_compress_ex(src, cb, dst, cap, scratch, mode, &sz[i], &eb) != MN_OK) {
                die("compress", eb.msg);
            }
            total += sz[i];
        }
        reps++;
        t = now_s();
    } while (t - t0 < 0.3);
    s.ratio = (double)total / (double)(n_chunks * cb);
    s.c_gbs = (double)(n_chunks * cb) * reps / (t - t0) / 1e9;
    reps = 0;
    t0 = now_s();
    do {
        for (size_t i = 0; i < n_chunks; i++) {
            uint8_t *dst = comp + i * cap;
            if (mode == 0) {
                if (LZ4_decompress_safe((const char *)dst, (char *)back, (int)sz[i], (int)cb) != (int)cb)
                    die("lz4", "decompress failed");
            } else if (mn_kvcodec_decompress_ex(dst, sz[i], back, cb, scratch, &eb) != MN_OK) {
                die("decompress", eb.msg);
            }
            if (reps == 0 && memcmp(back, data + i * cb, cb) != 0) die("round trip", "decompressed bytes differ");
        }
        reps++;
        t = now_s();
    } while (t - t0 < 0.3);
    s.d_gbs = (double)(n_chunks * cb) * reps / (t - t0) / 1e9;
    if (mode == 1) {   /* where the bytes go: each half of the shuffled stream on its own */
        size_t lo = 0, hi = 0;
        for (size_t i = 0; i < n_chunks; i++) {
            mn_kvcodec_shuffle(data + i * cb, scratch, cb);
            lo += (size_t)LZ4_compress_default((const char *)scratch, (char *)comp, (int)(cb / 2), (int)cap);
            hi += (size_t)LZ4_compress_default((const char *)scratch + cb / 2, (char *)comp, (int)(cb / 2), (int)cap);
        }
        s.lo_ratio = (double)lo / (double)(n_chunks * cb / 2);
        s.hi_ratio = (double)hi / (double)(n_chunks * cb / 2);
    }
    mn_free(comp);
    mn_free(back);
    mn_free(scratch);
    mn_free(sz);
    return s;
}

static void report(const char *what, const uint8_t *data, size_t n_chunks, size_t cb) {
    printf("\n%s: %zu chunks of %zu bytes (%.1f MB)\n", what, n_chunks, cb, (double)(n_chunks * cb) / 1e6);
    printf("  %-10s %8s %12s %12s\n", "codec", "ratio", "comp GB/s", "decomp GB/s");
    int modes[] = {0, 1, 2, 4, 8};
    for (int k = 0; k < 5; k++) {
        stats s = measure(data, n_chunks, cb, modes[k]);
        char name[32];
        if (modes[k]) snprintf(name, sizeof name, "shuf a%d", modes[k]);
        else snprintf(name, sizeof name, "plain");
        printf("  %-10s %8.3f %12.2f %12.2f", name, s.ratio, s.c_gbs, s.d_gbs);
        if (modes[k] == 1) printf("   (low bytes %.3f, high bytes %.3f)", s.lo_ratio, s.hi_ratio);
        printf("\n");
    }
}

static uint64_t rs = 88172645463325252ull;
static float urand(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return ((float)(rs >> 40) + 0.5f) * 0x1p-24f;
}

int main(int argc, char **argv) {
    const char *model = getenv("MNEME_MODEL");
    int n_want = 400, threads = 2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "-n") && i + 1 < argc) n_want = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) threads = atoi(argv[++i]);
        else die("usage", "bench_kvcodec [-m MODEL] [-n TOKENS] [-t THREADS]");
    }
    if (!model) model = mn_model_default_path();
    mn_errbuf eb = {{0}};
    mn_backend *be;
    mn_backend_params bp = {.device = "cpu", .n_threads = threads};
    if (mn_backend_cpu_new(&bp, &be, &eb) != MN_OK) die("backend", eb.msg);
    mn_model *m;
    if (mn_model_load(model, be, NULL, &m, &eb) != MN_OK) die(model, eb.msg);
    /* the text, repeated with a counter so long runs are not verbatim copies */
    int32_t *toks = mn_malloc((size_t)(n_want + 1024) * sizeof(int32_t));
    int32_t n = 0;
    for (int rep = 0; n < n_want; rep++) {
        char buf[4096];
        int len = snprintf(buf, sizeof buf, "Part %d. %s ", rep + 1, TEXT);
        int32_t *t;
        int64_t nt;
        if (mn_tokenize(m->tok, buf, (size_t)len, 0, &t, &nt, &eb) != MN_OK) die("tokenize", eb.msg);
        for (int64_t i = 0; i < nt && n < n_want; i++) toks[n++] = t[i];
        mn_free(t);
    }
    const mn_model_config *c = &m->cfg;
    const int32_t BS = 16;
    mn_kv_pool *kv;
    mn_forward *f;
    if (mn_kv_pool_new(be, c->n_layer, c->n_kv_head, c->head_dim, BS, n / BS + 2, &kv, &eb) != MN_OK) die("kv", eb.msg);
    if (mn_forward_new(m, kv, &f, &eb) != MN_OK) die("forward", eb.msg);
    mn_kv_seq seq = {0};
    mn_kv_seq *seqs[1] = {&seq};
    float *logits = mn_malloc((size_t)c->n_vocab * sizeof(float));
    int32_t *sv = mn_malloc((size_t)n * sizeof(int32_t)), *pos = mn_malloc((size_t)n * sizeof(int32_t));
    for (int32_t i = 0; i < n; i++) {
        sv[i] = 0;
        pos[i] = i;
    }
    int32_t last = n - 1;
    mn_batch b = {.n_tokens = n, .tokens = toks, .seq = sv, .pos = pos, .n_out = 1, .out_rows = &last};
    double t0 = now_s();
    if (mn_forward_run(f, seqs, 1, &b, logits, &eb) != MN_OK) die("forward", eb.msg);
    printf("bench_kvcodec: %s, %d tokens prefilled in %.2f s; KV %lld bytes per token (f16)\n", m->name, n,
           now_s() - t0, (long long)mn_kv_bytes_per_token(kv));

    /* gather full blocks block-major: block b = [layer][K|V][slot][kv_head][head_dim] */
    int32_t nb = n / BS;
    size_t be_bytes = (size_t)kv->block_elems * 2, cb = be_bytes * 2 * (size_t)c->n_layer;
    uint8_t *data = mn_aligned_alloc(64, (size_t)nb * cb);
    const uint8_t *base = kv->buf->ptr;
    size_t per_kind = (size_t)kv->n_blocks * be_bytes;
    for (int32_t i = 0; i < nb; i++)
        for (int32_t l = 0; l < c->n_layer; l++)
            for (int k = 0; k < 2; k++)
                memcpy(data + (size_t)i * cb + ((size_t)l * 2 + (size_t)k) * be_bytes,
                       base + ((size_t)l * 2 + (size_t)k) * per_kind + (size_t)seq.blocks[i] * be_bytes, be_bytes);
    report("SmolLM2 KV (real)", data, (size_t)nb, cb);

    /* synthetic: per-channel scale, normal values, a 10% run of zeros */
    size_t ne = (size_t)nb * cb / 2;
    uint16_t *syn = (uint16_t *)data;
    float scale[192];
    for (int i = 0; i < 192; i++) scale[i] = 0.05f + 4.0f * urand();
    for (size_t i = 0; i < ne; i++) {
        float g = sqrtf(-2.0f * logf(urand())) * cosf(6.2831853f * urand());
        syn[i] = mn_fp32_to_fp16(scale[i % 192] * g);
    }
    for (size_t i = ne / 3; i < ne / 3 + ne / 10; i++) syn[i] = 0;
    report("synthetic normal f16 (10% zeros)", data, (size_t)nb, cb);
    memset(data, 0, (size_t)nb * cb);
    report("all zeros", data, (size_t)nb, cb);

    mn_free(data);
    mn_free(toks);
    mn_free(logits);
    mn_free(sv);
    mn_free(pos);
    mn_kv_seq_release(kv, &seq);
    mn_forward_free(f);
    mn_kv_pool_free(kv);
    mn_model_free(m);
    mn_backend_free(be);
    return 0;
}
