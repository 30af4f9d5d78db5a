/* bench/bench_gpu.c — the GPU numbers of the CUDA issue, on a Llama-3-8B-shaped model with
 * random weights made on the spot (mn_model_synthetic: nothing downloaded).
 *
 *   bandwidth  device copy (D2D, read + write bytes / s) and pinned host <-> device copies
 *   decode     one step at batch 1, 16, 64 with every sequence at --ctx positions, against
 *              the floor: (weight bytes + KV bytes read) / device read bandwidth (measured
 *              by a kernel that only reads, mn_cuda_read_bandwidth; until 2026-11-30 this
 *              was half the D2D copy rate, which is about half what a read-only kernel gets)
 *   prefill    512 tokens of one sequence, TFLOP/s, against the matmul op's GEMM rate on a
 *              BF16 [14336 x 4096] weight at T = 512 (cuBLAS bf16, W used in place)
 *   swap       a --ctx * 4 token session: demote to T1 (pinned; D2H gather) and restore
 *              (H2D scatter), GB/s against the pinned copy bandwidth (target >= 85%)
 *   lora       32 adapters of rank 16 on all seven linears of a layer, one decode token
 *              each: the LoRA ops' time against the base matmuls of the same layer
 * and a table of the results last. Runs on any backend; on the CPU use --shape small (a
 * check of the program itself: the 8B shape needs 5+ GB and minutes per step there).
 *   usage: bench_gpu [--device cuda|cpu] [--shape 8b|small] [--type Q4_0|Q8_0|F16|BF16]
 *                    [--ctx N] [-t THREADS]
 */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/alloc.h"
#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "engine/session.h"
#ifdef MNEME_HAVE_CUDA
#include "engine/cuda/backend_cuda.h"
#include "kernels/cuda/ops_cuda.h"
#endif

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what, const mn_errbuf *eb) {
    fprintf(stderr, "bench_gpu: %s: %s\n", what, eb->msg);
    exit(1);
}
#define TRY(what, x)                 \
    do {                             \
        if ((x) != MN_OK) die(what, &eb); \
    } while (0)

static mn_errbuf eb;
static char table[4096];
static size_t table_len;
#define ROW(...) (table_len += (size_t)snprintf(table + table_len, sizeof table - table_len, __VA_ARGS__))

/* seconds per copy of n bytes (dir), best of reps */
static double time_copy(mn_backend *be, mn_copy_dir dir, void *dst, const void *src, size_t n, int reps) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        mn_event ev = {0};
        TRY("sync", mn_backend_synchronize(be, &eb));
        double t0 = now_s();
        TRY("copy", mn_backend_copy_async(be, dir, dst, src, n, &eb));
        TRY("event", mn_backend_event_record(be, &ev, &eb));
        TRY("wait", mn_backend_event_wait(be, &ev, &eb));
        double t = now_s() - t0;
        best = t < best ? t : best;
    }
    return best;
}

/* seconds per run of ops[0:n] (reserved), synchronized, best of reps */
static double time_ops(mn_backend *be, const mn_op *ops, int n, int reps) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        TRY("sync", mn_backend_synchronize(be, &eb));
        double t0 = now_s();
        TRY("run", mn_backend_run(be, ops, n, &eb));
        TRY("sync", mn_backend_synchronize(be, &eb));
        double t = now_s() - t0;
        best = t < best ? t : best;
    }
    return best;
}

/* fill a device buffer with random 16-bit values of small magnitude (f16 / bf16) */
static void fill_dev(mn_backend *be, void *dev, size_t bytes, mn_dtype type, float amp) {
    size_t chunk = 16 << 20;
    uint16_t *h = malloc(chunk);
    uint64_t s = 0x9E3779B97F4A7C15ULL ^ bytes;
    for (size_t i = 0; i < chunk / 2; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        float v = amp * ((float)(s >> 40) / 16777216.0f * 2.0f - 1.0f);
        h[i] = type == MN_BF16 ? mn_fp32_to_bf16(v) : mn_fp32_to_fp16(v);
    }
    for (size_t off = 0; off < bytes; off += chunk) {
        size_t n = bytes - off < chunk ? bytes - off : chunk;
        TRY("fill", mn_backend_copy_async(be, MN_COPY_H2D, (char *)dev + off, h, n, &eb));
        TRY("fill", mn_backend_synchronize(be, &eb));
    }
    free(h);
}

static mn_buffer *dev_alloc(mn_backend *be, size_t n) {
    mn_buffer *b;
    TRY("device alloc", mn_buffer_alloc(be, MN_MEM_DEVICE, n, &b, &eb));
    return b;
}

/* Where a step's time goes: each op kind's share. The CUDA backend times each op on the
 * device with ops queued back to back (engine/cuda/backend_cuda.c, run_profiled), so the
 * sum is comparable with the plain step; the CPU backend uses its own clock per op. */
static void print_profile(const char *what, int n, const double *op_s, const long *op_n, double wall, double plain) {
    double sum = 0;
    (void)wall;
    printf("profile %s %d (%.2f ms plain):", what, n, plain * 1e3);
    for (int k = 0; k < MN_OP_COUNT; k++) {
        if (!op_n[k]) continue;
        sum += op_s[k];
        printf(" %s %.3f ms/%ld (%.1f us each)", mn_op_name((mn_op_kind)k), op_s[k] * 1e3, op_n[k],
               op_s[k] * 1e6 / (double)op_n[k]);
    }
    printf("; ops %.2f ms\n", sum * 1e3);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* killed by a timeout, the log keeps what was measured */
    const char *device = "cuda", *shape = "8b", *type_name = "Q4_0";
    int32_t ctx = 1024;
    int threads = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--device") && i + 1 < argc) device = argv[++i];
        else if (!strcmp(argv[i], "--shape") && i + 1 < argc) shape = argv[++i];
        else if (!strcmp(argv[i], "--type") && i + 1 < argc) type_name = argv[++i];
        else if (!strcmp(argv[i], "--ctx") && i + 1 < argc) ctx = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) threads = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_gpu [--device cuda|cpu] [--shape 8b|small] [--type Q4_0|Q8_0|F16|BF16] [--ctx N] [-t T]\n");
            return 2;
        }
    }
    mn_dtype type = !strcmp(type_name, "Q8_0") ? MN_Q8_0 : !strcmp(type_name, "F16") ? MN_F16
                  : !strcmp(type_name, "BF16") ? MN_BF16 : MN_Q4_0;
    bool big = strcmp(shape, "small") != 0;
    mn_model_config c;
    memset(&c, 0, sizeof c);
    if (big) { /* Llama-3-8B */
        c.n_layer = 32, c.n_embd = 4096, c.n_head = 32, c.n_kv_head = 8, c.head_dim = 128, c.n_ff = 14336;
        c.n_vocab = 128256, c.n_ctx_train = 8192;
    } else {
        c.n_layer = 4, c.n_embd = 256, c.n_head = 8, c.n_kv_head = 2, c.head_dim = 32, c.n_ff = 512;
        c.n_vocab = 1000, c.n_ctx_train = 4096;
        if (ctx > 512) ctx = 256;
    }
    mn_backend *be;
    mn_backend_params bp = {.device = device, .n_threads = threads};
    TRY("backend", mn_backend_new(&bp, &be, NULL, &eb));
    printf("bench_gpu: backend %s, shape %s (%d layers, embd %d, heads %d/%d, ff %d, vocab %d), %s weights, ctx %d\n",
           mn_backend_name(be), big ? "Llama-3-8B" : "small", c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.n_ff,
           c.n_vocab, mn_dtype_name(type), ctx);

    /* ---- bandwidth ---- */
    size_t nb = big ? (size_t)1 << 30 : (size_t)64 << 20;
    mn_buffer *da = dev_alloc(be, nb), *db = dev_alloc(be, nb), *pin;
    TRY("pinned alloc", mn_buffer_alloc(be, MN_MEM_HOST_PINNED, nb, &pin, &eb));
    memset(pin->ptr, 1, nb);
    double d2d = 2.0 * nb / time_copy(be, MN_COPY_D2D, db->ptr, da->ptr, nb, 5) / 1e9;
    double h2d = nb / time_copy(be, MN_COPY_H2D, da->ptr, pin->ptr, nb, 5) / 1e9;
    double d2h = nb / time_copy(be, MN_COPY_D2H, pin->ptr, da->ptr, nb, 5) / 1e9;
    /* the floor's rate: what a kernel that only reads streams (on the CPU: half the copy) */
    double rd = d2d / 2;
#ifdef MNEME_HAVE_CUDA
    if (!strcmp(mn_backend_name(be), "cuda")) TRY("read bandwidth", mn_cuda_read_bandwidth(da->ptr, nb, 5, &rd, &eb));
#endif
    printf("bandwidth: device copy %.0f GB/s (read + write), read only %.0f GB/s, pinned H2D %.1f GB/s, D2H %.1f GB/s\n",
           d2d, rd, h2d, d2h);
    ROW("%-34s %10.0f GB/s\n", "device memory (copy, r+w)", d2d);
    ROW("%-34s %10.0f GB/s\n", "device memory (read only)", rd);
    ROW("%-34s %10.1f / %.1f GB/s\n", "pinned H2D / D2H", h2d, d2h);
    mn_buffer_free(da);
    mn_buffer_free(db);
    mn_buffer_free(pin);

    /* ---- the model ---- */
    double t0 = now_s();
    mn_model *m;
    TRY("synthetic model", mn_model_synthetic(be, &c, type, 42, &m, &eb));
    double wbytes = (double)mn_model_weight_bytes(m);
    printf("model: %.2f GB of weights, made and mapped in %.1f s\n", wbytes / 1e9, now_s() - t0);

    /* ---- decode ---- */
    enum { MAXB = 64 };
    const int bs_list[3] = {1, 16, 64};
    int32_t bs = 16, per_seq = (ctx + 64) / bs + 1;
    mn_kv_pool *kv;
    TRY("kv pool", mn_kv_pool_new(be, c.n_layer, c.n_kv_head, c.head_dim, bs, per_seq * MAXB + 64, &kv, &eb));
    double kv_tok = (double)mn_kv_bytes_per_token(kv);
    mn_forward *f;
    TRY("forward", mn_forward_new(m, kv, &f, &eb));
    static mn_kv_seq seqs[MAXB];
    mn_kv_seq *sp[MAXB];
    for (int s = 0; s < MAXB; s++) {
        sp[s] = &seqs[s];
        TRY("reserve", mn_kv_seq_reserve(kv, &seqs[s], ctx, &eb));
        seqs[s].n_tokens = ctx; /* KV of ctx positions (zeros: the timing does not depend on values) */
    }
    fill_dev(be, kv->buf->ptr, kv->buf->size, MN_F16, 0.0f);
    float *logits = malloc((size_t)MAXB * c.n_vocab * sizeof(float));
    int32_t tok[MAXB], sq[MAXB], pos[MAXB], rows[MAXB], stok[MAXB];
    mn_sample_params sparams[MAXB];
    for (int s = 0; s < MAXB; s++) sparams[s] = (mn_sample_params){.temperature = 0.0f, .top_p = 1.0f};
    double op_s[MN_OP_COUNT];
    long op_n[MN_OP_COUNT];
    for (int bi = 0; bi < 3; bi++) {
        int B = bs_list[bi];
        /* mode 0: every row's logits to the host; 1: greedy on the device (what the engine
         * serves with), only token ids copied back; 2: mode 1 without CUDA graphs; 3: one
         * step of mode 1 profiled (device time per op, no graphs); 4: mode 1 with the GEMV
         * matmuls on one x fused into one launch (q/k/v, gate/up; off by default); 5: mode 1
         * with the int8 tensor-core matmul for the 16- and 64-token batches (off by default) */
        double best[6] = {1e30, 1e30, 1e30, 1e30, 1e30, 1e30};
        int seq_steps = 0; /* tokens appended so far: the next position is ctx + seq_steps */
        for (int mode = 0; mode < 6; mode++) {
            bool is_cuda = !strcmp(mn_backend_name(be), "cuda");
            if ((mode == 2 || mode == 4 || mode == 5) && !is_cuda) continue;
            if (mode == 5 && B <= 8) continue;
#ifdef MNEME_HAVE_CUDA
            if (is_cuda) mn_backend_cuda_set_graphs(be, mode != 2);
            if (is_cuda) mn_backend_cuda_set_gemv_fuse(be, mode == 4); /* mode 4: the fusion (default off) */
            if (is_cuda) mn_backend_cuda_set_mmq(be, mode == 5);      /* mode 5: the mmq (default off) */
#endif
            for (int step = 0; step < (mode == 3 ? 1 : 8); step++) {
                int st = seq_steps++;
                for (int s = 0; s < B; s++) tok[s] = (s * 7 + st) % c.n_vocab, sq[s] = s, pos[s] = ctx + st, rows[s] = s;
                mn_batch b = {B, tok, sq, pos, B, rows};
                mn_batch_sample bsm = {.n_sample = B, .params = sparams, .token = stok};
                if (mode == 3) {
                    memset(op_s, 0, sizeof op_s);
                    memset(op_n, 0, sizeof op_n);
                    be->op_seconds = op_s;
                    be->op_calls = op_n;
                }
                double ts = now_s();
                TRY("decode", mode == 0 ? mn_forward_run(f, sp, B, &b, logits, &eb)
                                        : mn_forward_run_sample(f, sp, B, &b, NULL, &bsm, logits, &eb));
                double t = now_s() - ts;
                if (mode == 3) {
                    be->op_seconds = NULL;
                    be->op_calls = NULL;
                    print_profile("decode", B, op_s, op_n, t, best[1]);
                } else if (step >= 2 && t < best[mode]) {
                    best[mode] = t;
                }
            }
        }
        for (int s = 0; s < B; s++) mn_kv_seq_truncate(kv, &seqs[s], ctx);
        double bytes = wbytes + (double)B * (ctx + 8) * kv_tok, floor_s = bytes / (rd * 1e9);
        uint64_t caps = 0, reps = 0;
#ifdef MNEME_HAVE_CUDA
        if (!strcmp(mn_backend_name(be), "cuda")) mn_backend_cuda_graph_stats(be, &caps, &reps);
#endif
        printf("decode B=%-2d: %8.2f ms/step  %8.0f tok/s  floor %.2f ms (%.2f GB at %.0f GB/s)  %.2fx floor; "
               "every row's logits to the host: %.2f ms; without CUDA graphs %.2f ms; with GEMV fusion %.2f ms; "
               "with the int8 mmq %.2f ms (graphs so far: %llu captured, %llu replays)\n", B, best[1] * 1e3, B / best[1],
               floor_s * 1e3, bytes / 1e9, rd, best[1] / floor_s, best[0] * 1e3, best[2] < 1e29 ? best[2] * 1e3 : 0.0,
               best[4] < 1e29 ? best[4] * 1e3 : 0.0, best[5] < 1e29 ? best[5] * 1e3 : 0.0, (unsigned long long)caps,
               (unsigned long long)reps);
        ROW("decode B=%-2d ms/step (x floor)       %10.2f (%.2fx)\n", B, best[1] * 1e3, best[1] / floor_s);
    }
    for (int s = 0; s < MAXB; s++) mn_kv_seq_release(kv, &seqs[s]);

    /* ---- prefill ---- */
    {
        int32_t T = big ? 512 : 128;
        int32_t *pt = malloc(T * sizeof(int32_t)), *pq = calloc(T, sizeof(int32_t)), *pp = malloc(T * sizeof(int32_t));
        int32_t last = T - 1;
        for (int i = 0; i < T; i++) pt[i] = (i * 13) % c.n_vocab, pp[i] = i;
        double best = 1e30;
        for (int r = 0; r < 4; r++) {
            mn_batch b = {T, pt, pq, pp, 1, &last};
            if (r == 3) { /* one more, profiled */
                memset(op_s, 0, sizeof op_s);
                memset(op_n, 0, sizeof op_n);
                be->op_seconds = op_s;
                be->op_calls = op_n;
            }
            double ts = now_s();
            TRY("prefill", mn_forward_run(f, sp, 1, &b, logits, &eb));
            double t = now_s() - ts;
            if (r == 3) {
                be->op_seconds = NULL;
                be->op_calls = NULL;
                print_profile("prefill", T, op_s, op_n, t, best);
            } else {
                best = t < best ? t : best;
            }
            mn_kv_seq_release(kv, &seqs[0]);
        }
        double E = c.n_embd, Q = (double)c.n_head * c.head_dim, KVd = (double)c.n_kv_head * c.head_dim;
        double lin = E * (Q + 2 * KVd) + Q * E + 3 * E * c.n_ff;
        double flops = 2.0 * T * lin * c.n_layer + 2.0 * E * c.n_vocab + 2.0 * 2.0 * T * (T + 1) / 2.0 * Q * c.n_layer;
        /* the GEMM rate of the matmul op on a BF16 weight (in place: no dequantization) */
        int64_t N = c.n_ff, K = c.n_embd;
        mn_buffer *w = dev_alloc(be, (size_t)N * K * 2), *x = dev_alloc(be, (size_t)T * K * 4), *y = dev_alloc(be, (size_t)T * N * 4);
        fill_dev(be, w->ptr, w->size, MN_BF16, 0.02f);
        fill_dev(be, x->ptr, x->size, MN_F16, 0.0f);
        TRY("weights_matrix", mn_backend_weights_matrix(be, w->ptr, MN_BF16, N, K, K * 2, &eb));
        mn_op op = {.kind = MN_OP_MATMUL};
        op.u.matmul = (mn_matmul_desc){.T = T, .N = N, .K = K, .x = x->ptr, .x_stride = K, .w = w->ptr, .w_type = MN_BF16,
                                       .w_row_bytes = K * 2, .y = y->ptr, .y_stride = N};
        TRY("reserve", mn_backend_reserve(be, &op, 1, &eb));
        double gbest = time_ops(be, &op, 1, 5);
        double gemm_tf = 2.0 * T * N * K / gbest / 1e12, pre_tf = flops / best / 1e12;
        printf("prefill T=%d: %.1f ms  %.0f tok/s  %.2f TFLOP/s; matmul op GEMM [%lld x %lld] x %d: %.2f TFLOP/s (%.0f%%)\n",
               T, best * 1e3, T / best, pre_tf, (long long)N, (long long)K, T, gemm_tf, 100 * pre_tf / gemm_tf);
        ROW("prefill T=%-4d TFLOP/s (vs GEMM)    %10.1f (%.0f%% of %.1f)\n", T, pre_tf, 100 * pre_tf / gemm_tf, gemm_tf);
        mn_buffer_free(w);
        mn_buffer_free(x);
        mn_buffer_free(y);
        free(pt), free(pq), free(pp);
    }
    mn_forward_free(f);
    mn_kv_pool_free(kv);

#ifdef MNEME_HAVE_CUDA
    /* ---- matmul at 1-8 tokens: the fused dequant GEMV against cuBLAS on the bf16 copy ----
     * (where MN_CUDA_GEMV_MAX_T, or mn_backend_cuda_set_prepared_min_t, should sit) */
    if (!strcmp(mn_backend_name(be), "cuda")) {
        const mn_layer *L0 = &m->layers[0];
        const mn_weight *ws[3] = {&L0->wq, &L0->w_gate, &L0->w_down};
        mn_buffer *x = dev_alloc(be, (size_t)8 * c.n_ff * 4), *y = dev_alloc(be, (size_t)8 * c.n_ff * 4);
        fill_dev(be, x->ptr, x->size, MN_F16, 0.0f);
        for (int wi = 0; wi < 3; wi++) {
            const mn_weight *w = ws[wi];
            printf("matmul %s [%lld x %lld] us, gemv / bf16 cuBLAS:", mn_dtype_name(w->type), (long long)w->N,
                   (long long)w->K);
            for (int T = 1; T <= 8; T++) {
                if (T == 7) continue;
                mn_op op = {.kind = MN_OP_MATMUL};
                op.u.matmul = (mn_matmul_desc){.T = T, .N = w->N, .K = w->K, .x = x->ptr, .x_stride = w->K, .w = w->data,
                                               .w_type = w->type, .w_row_bytes = w->row_bytes, .y = y->ptr, .y_stride = w->N};
                enum { RUN = 20 }; /* back to back: a host sync per op would dwarf the op */
                mn_op ops[RUN];
                for (int k = 0; k < RUN; k++) ops[k] = op;
                double tg, tb;
                mn_backend_cuda_set_prepared_min_t(be, 1000);
                TRY("reserve", mn_backend_reserve(be, &op, 1, &eb));
                tg = time_ops(be, ops, RUN, 5) / RUN;
                mn_backend_cuda_set_prepared_min_t(be, 1);
                TRY("reserve", mn_backend_reserve(be, &op, 1, &eb));
                tb = time_ops(be, ops, RUN, 5) / RUN;
                printf("  T=%d %.1f/%.1f", T, tg * 1e6, tb * 1e6);
            }
            printf("\n");
        }
        mn_backend_cuda_set_prepared_min_t(be, MN_CUDA_GEMV_MAX_T + 1);
        mn_buffer_free(x);
        mn_buffer_free(y);
    }
#endif

    /* ---- KV swap through the engine: demote to T1 (pinned), restore ---- */
    {
        int32_t L = ctx * 4;
        mn_engine_params ep = {.block_size = 16, .n_blocks = L / 16 + 32, .max_batch_tokens = 512, .t1_memory = MN_T1_PINNED};
        mn_engine *e;
        TRY("engine", mn_engine_new(m, &ep, &e, &eb));
        mn_session *s, *fk;
        TRY("session", mn_session_create(e, NULL, &s, &eb));
        int32_t *toks = malloc(L * sizeof(int32_t));
        for (int i = 0; i < L; i++) toks[i] = (i * 31 + 7) % c.n_vocab;
        TRY("prefill", mn_session_append_tokens(e, s, toks, L, MN_ROLE_NONE, &eb));
        double kvb = (double)L * kv_tok, out_best = 1e30, in_best = 1e30;
        for (int r = 0; r < 3; r++) {
            double ts = now_s();
            TRY("demote", mn_session_demote(e, s, 1, &eb));
            double t = now_s() - ts;
            out_best = t < out_best ? t : out_best;
            ts = now_s();
            TRY("restore", mn_session_fork(e, s, &fk, &eb)); /* brings s back to T0 (synchronous scatter) */
            t = now_s() - ts;
            in_best = t < in_best ? t : in_best;
            mn_session_delete(e, fk);
        }
        double gout = kvb / out_best / 1e9, gin = kvb / in_best / 1e9;
        printf("swap %d tokens (%.0f MB): out (D2H gather) %.2f ms %.1f GB/s = %.0f%% of pinned; in (H2D scatter) %.2f ms "
               "%.1f GB/s = %.0f%% of pinned\n", L, kvb / 1e6, out_best * 1e3, gout, 100 * gout / d2h, in_best * 1e3, gin,
               100 * gin / h2d);
        ROW("KV swap out / in GB/s (%% pinned)    %6.1f (%.0f%%) / %.1f (%.0f%%)\n", gout, 100 * gout / d2h, gin, 100 * gin / h2d);
        /* the layer-wise restore: a 1-token turn from T1 against the same turn resident */
        double res_best = 1e30, t1_best = 1e30;
        for (int r = 0; r < 3; r++) {
            int32_t n0 = L, one = 5;
            double ts = now_s();
            TRY("append", mn_session_append_tokens(e, s, &one, 1, MN_ROLE_NONE, &eb));
            double t = now_s() - ts;
            res_best = t < res_best ? t : res_best;
            TRY("rewind", mn_session_rewind(e, s, n0, &eb));
            TRY("demote", mn_session_demote(e, s, 1, &eb));
            ts = now_s();
            TRY("append", mn_session_append_tokens(e, s, &one, 1, MN_ROLE_NONE, &eb));
            t = now_s() - ts;
            t1_best = t < t1_best ? t : t1_best;
            TRY("rewind", mn_session_rewind(e, s, n0, &eb));
        }
        printf("turn of 1 token at %d: resident %.2f ms, from T1 (layer-wise restore) %.2f ms (%.2fx)\n", L, res_best * 1e3,
               t1_best * 1e3, t1_best / res_best);
        ROW("1-token turn from T1 / resident      %10.2fx\n", t1_best / res_best);
        free(toks);
        mn_engine_free(e);
    }

    /* ---- LoRA: 32 adapters of rank 16 on one layer's seven linears, one token each ---- */
    {
        enum { NA = 32, R = 16 };
        int64_t E = c.n_embd, Qd = (int64_t)c.n_head * c.head_dim, KVd = (int64_t)c.n_kv_head * c.head_dim, F = c.n_ff;
        /* groups: (K, outputs) = qkv (E; Q, KV, KV), o (Q; E), gate/up (E; F, F), down (F; E) */
        const int64_t gK[4] = {E, Qd, E, F};
        const int gn[4] = {3, 1, 2, 1};
        const int64_t gN[4][3] = {{Qd, KVd, KVd}, {E, 0, 0}, {F, F, 0}, {E, 0, 0}};
        double lora_s = 0, base_s = 0;
        mn_buffer *x = dev_alloc(be, (size_t)NA * F * 4), *y[3];
        fill_dev(be, x->ptr, x->size, MN_F16, 0.0f);
        for (int o = 0; o < 3; o++) y[o] = dev_alloc(be, (size_t)NA * F * 4);
        for (int g = 0; g < 4; g++) {
            int64_t K = gK[g], a_elems = (int64_t)gn[g] * R * K, b_elems = 0;
            for (int o = 0; o < gn[g]; o++) b_elems += R * gN[g][o];
            mn_buffer *ab = dev_alloc(be, (size_t)NA * (a_elems + b_elems) * 2);
            fill_dev(be, ab->ptr, ab->size, MN_BF16, 0.01f);
            mn_lora_seg segs[NA];
            int32_t rws[NA];
            for (int a = 0; a < NA; a++) {
                char *base = (char *)ab->ptr + (size_t)a * (a_elems + b_elems) * 2;
                memset(&segs[a], 0, sizeof segs[a]);
                segs[a] = (mn_lora_seg){.start = a, .n_rows = 1, .r = gn[g] * R, .type = MN_BF16, .a = base};
                char *bp2 = base + a_elems * 2;
                for (int o = 0; o < gn[g]; o++) {
                    segs[a].b[o] = bp2;
                    segs[a].r_off[o] = o * R;
                    segs[a].r_out[o] = R;
                    segs[a].scale[o] = 2.0f;
                    bp2 += (size_t)R * gN[g][o] * 2;
                }
                rws[a] = a;
            }
            mn_buffer *meta = dev_alloc(be, sizeof segs + sizeof rws);
            TRY("meta", mn_backend_copy_async(be, MN_COPY_H2D, meta->ptr, segs, sizeof segs, &eb));
            TRY("meta", mn_backend_copy_async(be, MN_COPY_H2D, (char *)meta->ptr + sizeof segs, rws, sizeof rws, &eb));
            TRY("meta", mn_backend_synchronize(be, &eb));
            mn_op lop = {.kind = MN_OP_LORA};
            lop.u.lora = (mn_lora_desc){.K = K, .x = x->ptr, .x_stride = K, .n_out = gn[g], .n_seg = NA,
                                        .seg = meta->ptr, .rows = (const int32_t *)((char *)meta->ptr + sizeof segs),
                                        .max_rows = 1, .max_r = gn[g] * R};
            for (int o = 0; o < gn[g]; o++) {
                lop.u.lora.N[o] = gN[g][o];
                lop.u.lora.y[o] = y[o]->ptr;
                lop.u.lora.y_stride[o] = gN[g][o];
            }
            /* the base linears of the group, T = 32, the model's weights of layer 0 */
            const mn_layer *Ly = &m->layers[0];
            const mn_weight *ws[4][3] = {{&Ly->wq, &Ly->wk, &Ly->wv}, {&Ly->wo}, {&Ly->w_gate, &Ly->w_up}, {&Ly->w_down}};
            mn_op bops[3];
            for (int o = 0; o < gn[g]; o++) {
                const mn_weight *w = ws[g][o];
                bops[o] = (mn_op){.kind = MN_OP_MATMUL};
                bops[o].u.matmul = (mn_matmul_desc){.T = NA, .N = w->N, .K = w->K, .x = x->ptr, .x_stride = K, .w = w->data,
                                                    .w_type = w->type, .w_row_bytes = w->row_bytes, .y = y[o]->ptr,
                                                    .y_stride = w->N};
            }
            TRY("reserve", mn_backend_reserve(be, &lop, 1, &eb));
            TRY("reserve", mn_backend_reserve(be, bops, gn[g], &eb));
            double lb = time_ops(be, &lop, 1, 5), bb = time_ops(be, bops, gn[g], 5);
            lora_s += lb;
            base_s += bb;
            mn_buffer_free(meta);
            mn_buffer_free(ab);
        }
        printf("lora: 32 adapters x rank 16, one token each, one layer: lora ops %.1f us, base matmuls %.1f us (%.2fx); "
               "x %d layers: %.2f ms on top of %.2f ms\n", lora_s * 1e6, base_s * 1e6, lora_s / base_s, c.n_layer,
               lora_s * c.n_layer * 1e3, base_s * c.n_layer * 1e3);
        ROW("LoRA 32 adapters / base (a layer)    %10.2fx (%.1f / %.1f us)\n", lora_s / base_s, lora_s * 1e6, base_s * 1e6);
        mn_buffer_free(x);
        for (int o = 0; o < 3; o++) mn_buffer_free(y[o]);
    }
    printf("\n== bench_gpu summary (%s, %s, %s) ==\n%s", mn_backend_name(be), big ? "Llama-3-8B shape" : "small shape",
           mn_dtype_name(type), table);
    free(logits);
    mn_model_free(m);
    mn_backend_free(be);
    return 0;
}
