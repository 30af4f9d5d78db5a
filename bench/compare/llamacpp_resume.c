/* bench/compare/llamacpp_resume.c — llama.cpp's slot restore + next turn, timed the way
 * bench/bench_session.c times mneme's tiers.
 *
 * Not part of the mneme build or CI (CI has no llama.cpp): run_llamacpp_resume.sh builds it
 * against a libllama and runs it next to bench_session. Written against include/llama.h only.
 *
 * For each history length L (default 512 2048 8000), in one context with f16 K/V:
 *   prefill   decode the L-token history into sequence 0 (batches of n_batch tokens) and
 *             take the first token: what a stateless server pays (once, not repeated)
 *   save      llama_state_seq_save_file(seq 0) — what llama-server's POST /slots?action=save
 *             does — into a file that then stays in the page cache
 *   resident  with the KV in place: decode 5 new tokens at positions L..L+4 and take the
 *             greedy argmax of the last logits (the first token of the answer)
 *   load      the KV of seq 0 removed (llama_memory_seq_rm), then llama_state_seq_load_file
 *             twice, as llama-server's slot restore does (once for the token count, once for
 *             the data)
 *   restore   load + the resident turn: the T3-equivalent turn
 *   +gen      resident / restore turns that also decode the sampled token, because
 *             bench_session's turn (mn_session_generate with max_tokens 1) computes the KV of
 *             the token it generates before it returns
 * Every timed item runs -r times (default 5); the median and the minimum are printed.
 * Between reps the 5 (or 6) new positions are removed again (llama_memory_seq_rm(seq 0, L, -1)).
 *
 * Why the same context and seq_rm, not a new context: llama-server's slot restore loads the
 * file into the slot's sequence of its one long-lived context (the load itself removes what
 * the sequence held first), and the next request decodes in that same context. A new
 * context would add allocation and graph reservation that the server never pays per
 * request.
 *
 * Tokens: the history and the 5-token append are bench_session's: token i is
 * 100 + (i * 7919) mod 40000, the append is tokens L..L+4 of the same sequence.
 *
 *   usage: llamacpp_resume [-m MODEL] [-t THREADS] [-r REPS] [--fa auto|on|off]
 *                          [--dir DIR] [L ...]
 * Output: a header line and one line per L whose first field is "lcpp"; times in ms, each
 * timed item as two columns: the median and the minimum over the reps.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "llama.h"

enum { N_APPEND = 5, MAX_LENS = 16, MAX_REPS = 64 };

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* median and minimum of v[0..n) (sorts v) */
static void stats(double *v, int n, double *med, double *min) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    *min = v[0];
    *med = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* bench_session's token sequence */
static llama_token tok_at(int32_t i) { return 100 + (llama_token)(((uint32_t)i * 7919u) % 40000u); }

/* Quiet logging: errors go to stderr; ud (char[16]) records what flash attention resolved
 * to when it was "auto", from llama.cpp's own log line. */
static void log_cb(enum ggml_log_level level, const char *text, void *ud) {
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
    if (strstr(text, "Flash Attention enabled")) snprintf(ud, 16, "enabled");
    else if (strstr(text, "Flash Attention disabled") || strstr(text, "Flash Attention not")) snprintf(ud, 16, "disabled");
}

typedef struct runner {
    struct llama_context *ctx;
    llama_memory_t mem;
    struct llama_batch batch;   /* capacity n_batch */
    int32_t n_batch;
    int32_t n_vocab;
} runner;

static void die(const char *what) {
    fprintf(stderr, "llamacpp_resume: %s\n", what);
    exit(1);
}

/* Decode tokens [from, from + n) of the bench sequence at the same positions into seq 0,
 * in batches of n_batch; only the very last token asks for logits. */
static void decode_range(runner *r, int32_t from, int32_t n) {
    for (int32_t done = 0; done < n;) {
        int32_t k = n - done < r->n_batch ? n - done : r->n_batch;
        r->batch.n_tokens = k;
        for (int32_t i = 0; i < k; i++) {
            int32_t p = from + done + i;
            r->batch.token[i] = tok_at(p);
            r->batch.pos[i] = p;
            r->batch.n_seq_id[i] = 1;
            r->batch.seq_id[i][0] = 0;
            r->batch.logits[i] = (done + i == n - 1);
        }
        int32_t rc = llama_decode(r->ctx, r->batch);
        if (rc != 0) {
            fprintf(stderr, "llamacpp_resume: llama_decode returned %d (positions %d..%d)\n", rc, from + done,
                    from + done + k - 1);
            exit(1);
        }
        done += k;
    }
}

/* Decode one given token at position pos into seq 0, with logits. */
static void decode_one(runner *r, llama_token t, int32_t pos) {
    r->batch.n_tokens = 1;
    r->batch.token[0] = t;
    r->batch.pos[0] = pos;
    r->batch.n_seq_id[0] = 1;
    r->batch.seq_id[0][0] = 0;
    r->batch.logits[0] = 1;
    if (llama_decode(r->ctx, r->batch) != 0) die("llama_decode of the generated token failed");
}

static llama_token argmax_last(runner *r) {
    const float *lg = llama_get_logits_ith(r->ctx, -1);
    if (!lg) die("no logits");
    llama_token best = 0;
    for (int32_t i = 1; i < r->n_vocab; i++)
        if (lg[i] > lg[best]) best = i;
    return best;
}

/* The turn: 5 new tokens after an L-token history, then the first answer token; with gen,
 * also the KV of that token (what bench_session's turn computes). */
static llama_token turn(runner *r, int32_t L, int gen) {
    decode_range(r, L, N_APPEND);
    llama_token t = argmax_last(r);
    if (gen) decode_one(r, t, L + N_APPEND);
    return t;
}

/* What llama-server's slot restore does: ask the file for its token count, then load it. */
static void load_seq(runner *r, const char *path, int32_t L, llama_token *toks, size_t cap) {
    size_t n_tok = 0;
    if (llama_state_seq_load_file(r->ctx, path, 0, NULL, 0, &n_tok) == 0) die("state_seq_load_file (count) failed");
    if (n_tok != (size_t)L || n_tok > cap) die("saved token count differs from L");
    if (llama_state_seq_load_file(r->ctx, path, 0, toks, cap, &n_tok) == 0) die("state_seq_load_file failed");
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *dir = "/tmp", *fa = "auto";
    int threads = 1, reps = 5;
    int32_t lens[MAX_LENS];
    int n_lens = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) model_path = argv[++i];
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-r") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--fa") && i + 1 < argc) fa = argv[++i];
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc) dir = argv[++i];
        else if (argv[i][0] != '-' && n_lens < MAX_LENS) lens[n_lens++] = atoi(argv[i]);
        else {
            fprintf(stderr, "usage: llamacpp_resume [-m MODEL] [-t THREADS] [-r REPS] [--fa auto|on|off] [--dir DIR] [L ...]\n");
            return 2;
        }
    }
    if (reps < 1 || reps > MAX_REPS) die("-r must be in [1, 64]");
    if (threads < 1) die("-t must be >= 1");
    if (!n_lens) {
        lens[0] = 512;
        lens[1] = 2048;
        lens[2] = 8000;
        n_lens = 3;
    }
    static char def[4096];
    if (!model_path) {
        snprintf(def, sizeof def, "%s/.cache/mneme/SmolLM2-135M-Instruct.Q4_1.gguf", getenv("HOME") ? getenv("HOME") : "");
        model_path = getenv("MNEME_MODEL") ? getenv("MNEME_MODEL") : def;
    }
    int32_t max_len = 0;
    for (int i = 0; i < n_lens; i++) {
        if (lens[i] < 1) die("history lengths must be >= 1");
        max_len = lens[i] > max_len ? lens[i] : max_len;
    }

    static char fa_resolved[16] = "?";
    if (strcmp(fa, "auto") != 0) snprintf(fa_resolved, sizeof fa_resolved, "%s", fa);
    llama_log_set(log_cb, fa_resolved);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) die("cannot load the model");
    struct llama_context_params cp = llama_context_default_params();
    /* room for the longest history, the 5 new tokens and the generated one, in 256-cell steps */
    cp.n_ctx = (uint32_t)((max_len + N_APPEND + 1 + 255) / 256 * 256);
    cp.n_batch = 2048;
    cp.n_ubatch = 512;
    cp.n_seq_max = 1;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.type_k = GGML_TYPE_F16;
    cp.type_v = GGML_TYPE_F16;
    cp.no_perf = true;
    cp.flash_attn_type = !strcmp(fa, "on")    ? LLAMA_FLASH_ATTN_TYPE_ENABLED
                         : !strcmp(fa, "off") ? LLAMA_FLASH_ATTN_TYPE_DISABLED
                                              : LLAMA_FLASH_ATTN_TYPE_AUTO;
    if ((int32_t)cp.n_ctx > llama_model_n_ctx_train(model))
        fprintf(stderr, "llamacpp_resume: note: n_ctx %u > the model's training context %d\n", cp.n_ctx,
                llama_model_n_ctx_train(model));
    runner r = {0};
    r.ctx = llama_init_from_model(model, cp);
    if (!r.ctx) die("cannot create the context");
    r.mem = llama_get_memory(r.ctx);
    r.n_batch = (int32_t)llama_n_batch(r.ctx);
    r.batch = llama_batch_init(r.n_batch, 0, 1);
    r.n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_token *toks = malloc((size_t)(max_len + 16) * sizeof *toks);
    if (!toks) die("out of memory");

    char path[4200];
    snprintf(path, sizeof path, "%s/llamacpp-resume-%d.bin", dir, (int)getpid());

    /* warm-up: pages of the model in, threads started, graphs built once */
    decode_range(&r, 0, 64);
    llama_memory_clear(r.mem, true);

    printf("# llama.cpp, %d thread(s), n_ctx %u, n_batch %d, n_ubatch %u, f16 K/V, flash_attn %s (%s), %d reps; "
           "times in ms\n", threads, cp.n_ctx, r.n_batch, llama_n_ubatch(r.ctx), fa, fa_resolved, reps);
    printf("%-4s %6s %8s %10s %8s %8s %8s %8s %7s %8s %8s %8s %8s %8s %8s %8s %8s %5s\n", "tag", "L", "file_MB",
           "prefill", "res", "res_min", "rst", "rst_min", "ldGB/s", "load", "load_min", "resg", "resg_min", "rstg",
           "rstg_min", "save", "save_min", "same");
    for (int li = 0; li < n_lens; li++) {
        int32_t L = lens[li];
        double res[MAX_REPS], rst[MAX_REPS], ld[MAX_REPS], resg[MAX_REPS], rstg[MAX_REPS], sv[MAX_REPS];
        llama_memory_clear(r.mem, true);
        /* the history: what a stateless server recomputes (+ the first token) */
        double t0 = now_ms();
        decode_range(&r, 0, L);
        (void)argmax_last(&r);
        double prefill = now_ms() - t0;
        /* save (timed, repeated; the file is overwritten and stays in the page cache) */
        for (int k = 0; k < reps; k++) {
            for (int32_t i = 0; i < L; i++) toks[i] = tok_at(i);
            t0 = now_ms();
            if (llama_state_seq_save_file(r.ctx, path, 0, toks, (size_t)L) == 0) die("state_seq_save_file failed");
            sv[k] = now_ms() - t0;
        }
        struct stat st;
        if (stat(path, &st) != 0) die("cannot stat the saved file");
        /* one untimed load so that the timed ones read the page cache and the load path is warm */
        llama_memory_seq_rm(r.mem, 0, -1, -1);
        load_seq(&r, path, L, toks, (size_t)max_len + 16);

        llama_token t_res = -1, t_rst = -1;
        for (int k = 0; k < reps; k++) {
            /* resident turn */
            t0 = now_ms();
            t_res = turn(&r, L, 0);
            res[k] = now_ms() - t0;
            llama_memory_seq_rm(r.mem, 0, L, -1);
            t0 = now_ms();
            (void)turn(&r, L, 1);
            resg[k] = now_ms() - t0;
            llama_memory_seq_rm(r.mem, 0, L, -1);
            /* load alone */
            llama_memory_seq_rm(r.mem, 0, -1, -1);
            t0 = now_ms();
            load_seq(&r, path, L, toks, (size_t)max_len + 16);
            ld[k] = now_ms() - t0;
            if (llama_memory_seq_pos_max(r.mem, 0) != L - 1) die("restored sequence does not end at L - 1");
            /* restore + turn */
            llama_memory_seq_rm(r.mem, 0, -1, -1);
            t0 = now_ms();
            load_seq(&r, path, L, toks, (size_t)max_len + 16);
            t_rst = turn(&r, L, 0);
            rst[k] = now_ms() - t0;
            llama_memory_seq_rm(r.mem, 0, L, -1);
            /* restore + turn + the generated token's KV */
            llama_memory_seq_rm(r.mem, 0, -1, -1);
            t0 = now_ms();
            load_seq(&r, path, L, toks, (size_t)max_len + 16);
            (void)turn(&r, L, 1);
            rstg[k] = now_ms() - t0;
            llama_memory_seq_rm(r.mem, 0, L, -1);
        }
        double m[6], mn[6];
        stats(res, reps, &m[0], &mn[0]);
        stats(rst, reps, &m[1], &mn[1]);
        stats(ld, reps, &m[2], &mn[2]);
        stats(resg, reps, &m[3], &mn[3]);
        stats(rstg, reps, &m[4], &mn[4]);
        stats(sv, reps, &m[5], &mn[5]);
        double mb = (double)st.st_size / 1e6;
        printf("%-4s %6d %8.2f %10.1f %8.2f %8.2f %8.2f %8.2f %7.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %5s\n",
               "lcpp", L, mb, prefill, m[0], mn[0], m[1], mn[1], mb / 1e3 / (mn[2] / 1e3), m[2], mn[2], m[3], mn[3],
               m[4], mn[4], m[5], mn[5], t_res == t_rst ? "yes" : "NO");
        fflush(stdout);
    }
    printf("# res = resident turn, rst = load + turn, resg / rstg = the same + the generated token's KV, load = the\n"
           "# two llama_state_seq_load_file calls; X = median, X_min = fastest of the reps; prefill = the L-token\n"
           "# history + first token, once; ldGB/s = file bytes / fastest load; same = restored turn's first token\n"
           "# equals the resident one's\n");
    unlink(path);
    free(toks);
    llama_batch_free(r.batch);
    llama_free(r.ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
