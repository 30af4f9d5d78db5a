/* bench/bench_sample_step.c — decode steps with sampling on the host and on the backend.
 *
 * N sessions (default 8) each get a 32-token prompt and generate G tokens (default 32)
 * together with the default sampling parameters (T 0.8, top-k 40, top-p 0.95, min-p 0.05,
 * a seed per session), once with mn_engine_params.sample_on = host (every session's
 * n_vocab logits copied to the host each step, sampled there one session after another)
 * and once = backend (MN_OP_SAMPLE in the forward, only token ids back). The modes
 * alternate for R rounds (default 3); per mode the best round's decode time is printed
 * (ms per step after the prompt step, and tokens/s), the median and the fastest single
 * decode step over all rounds (on a shared machine the fastest step is the figure least
 * moved by other load), and the logits bytes the steps copied to the host. Both modes
 * must produce the same tokens (checked).
 * Then the sampling alone, without the forward around it (what the modes differ in), on
 * N rows of logits taken from real decode steps: host = per row the two copies of
 * n_vocab floats the step makes (forward output -> session logits -> sampler scratch) and
 * mn_sampler_sample; backend = one MN_OP_SAMPLE over the N rows through mn_backend_run
 * (and on CUDA the logits would not leave the device at all). Best of 50, microseconds.
 *   usage: bench_sample_step [-m MODEL] [-d cpu|cuda] [-t THREADS] [-n SESSIONS] [-g TOKENS] [-r ROUNDS]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/backend.h"
#include "engine/session.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what, const mn_errbuf *eb) {
    fprintf(stderr, "bench_sample_step: %s: %s\n", what, eb->msg);
    exit(1);
}

typedef struct sink { int32_t n, cap; int32_t *tok; } sink;

static bool on_token(void *ud, int32_t token, const char *text, size_t len, const mn_sample_info *info) {
    (void)text, (void)len, (void)info;
    sink *k = ud;
    if (k->n < k->cap) k->tok[k->n++] = token;
    return true;
}

static void on_done(void *ud, const mn_gen_result *res, mn_err err, const char *msg) {
    (void)ud, (void)res, (void)err, (void)msg;
}

/* One round: returns the seconds of the decode steps (every step after the first) and
 * their count; tokens land in k[N]; *bytes gets the logits bytes copied to the host. */
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ... and each decode step's seconds appended to dt[*n_dt ..) (room for G + 1 per round). */
static double round_of(mn_model *m, mn_sample_on on, int32_t N, int32_t G, sink *k, int32_t *steps, int64_t *bytes,
                       double *dt, int32_t *n_dt) {
    mn_errbuf eb;
    mn_engine *e;
    mn_engine_params ep = {.block_size = 16, .n_blocks = N * 8 + 16, .max_batch_tokens = 512, .sample_on = on};
    if (mn_engine_new(m, &ep, &e, &eb) != MN_OK) die("engine", &eb);
    for (int32_t i = 0; i < N; i++) {
        mn_session *s;
        int32_t prompt[32];
        for (int32_t j = 0; j < 32; j++) prompt[j] = (int32_t)((j * 131 + i * 17 + 7) % m->cfg.n_vocab);
        if (mn_session_create(e, NULL, &s, &eb) != MN_OK) die("session", &eb);
        if (mn_session_submit_tokens(e, s, prompt, 32, MN_ROLE_NONE, &eb) != MN_OK) die("submit", &eb);
        mn_gen_params g = {.sampling = mn_sampling_defaults(), .max_tokens = G};
        g.sampling.seed = 1000 + (uint64_t)i;
        k[i].n = 0;
        if (mn_session_generate_start(e, s, &g, on_token, on_done, &k[i], &eb) != MN_OK) die("generate", &eb);
    }
    bool did;
    if (mn_engine_step(e, &did, &eb) != MN_OK) die("step", &eb); /* the prompts */
    double t0 = now_s();
    int32_t n = 0;
    while (mn_engine_has_work(e)) {
        double ts = now_s();
        if (mn_engine_step(e, &did, &eb) != MN_OK) die("step", &eb);
        if (n <= G) dt[(*n_dt)++] = now_s() - ts;
        n++;
    }
    double t = now_s() - t0;
    mn_engine_stats st;
    mn_engine_stats_get(e, &st);
    *bytes = st.logits_bytes;
    *steps = n;
    mn_engine_free(e);
    return t;
}

/* The sampling alone (see the top comment): N rows of logits of real decode steps. */
static void sample_alone(mn_model *m, mn_backend *be, int32_t N) {
    const int32_t V = m->cfg.n_vocab;
    const size_t row = (size_t)V * sizeof(float);
    mn_errbuf eb;
    mn_engine *e;
    mn_engine_params ep = {.block_size = 16, .n_blocks = N * 4 + 16, .max_batch_tokens = 512, .sample_on = MN_SAMPLE_ON_HOST};
    if (mn_engine_new(m, &ep, &e, &eb) != MN_OK) die("engine", &eb);
    float *host = malloc((size_t)N * row), *sess = malloc(row), *scratch = malloc(row);
    for (int32_t i = 0; i < N; i++) { /* logits after a few tokens of text-like ids */
        mn_session *s;
        int32_t prompt[16];
        for (int32_t j = 0; j < 16; j++) prompt[j] = (int32_t)((j * 131 + i * 17 + 7) % V);
        if (mn_session_create(e, NULL, &s, &eb) != MN_OK) die("session", &eb);
        if (mn_session_append_tokens(e, s, prompt, 16, MN_ROLE_NONE, &eb) != MN_OK) die("append", &eb);
        memcpy(host + (size_t)i * V, mn_session_logits(s), row);
    }
    mn_engine_free(e);
    mn_sampling_params sp = mn_sampling_defaults();
    sp.seed = 1;
    mn_sampler *smp;
    if (mn_sampler_new(&sp, V, &smp, &eb) != MN_OK) die("sampler", &eb);
    mn_buffer *dl, *dp, *dt;
    if (mn_buffer_alloc(be, MN_MEM_DEVICE, (size_t)N * row, &dl, &eb) != MN_OK ||
        mn_buffer_alloc(be, MN_MEM_DEVICE, (size_t)N * sizeof(mn_sample_params), &dp, &eb) != MN_OK ||
        mn_buffer_alloc(be, MN_MEM_DEVICE, (size_t)N * sizeof(int32_t), &dt, &eb) != MN_OK)
        die("buffers", &eb);
    mn_sample_params *params = malloc((size_t)N * sizeof *params);
    for (int32_t i = 0; i < N; i++)
        params[i] = (mn_sample_params){.temperature = sp.temperature, .top_k = sp.top_k, .top_p = sp.top_p,
                                       .min_p = sp.min_p, .u = (i + 0.5) / N, .n_logprobs = 0};
    if (mn_backend_copy_async(be, MN_COPY_H2D, dl->ptr, host, (size_t)N * row, &eb) != MN_OK ||
        mn_backend_copy_async(be, MN_COPY_H2D, dp->ptr, params, (size_t)N * sizeof *params, &eb) != MN_OK ||
        mn_backend_synchronize(be, &eb) != MN_OK)
        die("copy", &eb);
    mn_op op = {MN_OP_SAMPLE, .u.sample = {.n_rows = N, .V = V, .logits = dl->ptr, .logits_stride = V,
                                           .params = dp->ptr, .token = dt->ptr}};
    if (mn_backend_reserve(be, &op, 1, &eb) != MN_OK) die("reserve", &eb);
    double best[2] = {1e30, 1e30};
    for (int rep = 0; rep < 50; rep++) {
        double t0 = now_s();
        for (int32_t i = 0; i < N; i++) {
            memcpy(sess, host + (size_t)i * V, row);
            memcpy(scratch, sess, row);
            (void)mn_sampler_sample(smp, scratch, NULL);
        }
        double t1 = now_s();
        if (mn_backend_run(be, &op, 1, &eb) != MN_OK || mn_backend_synchronize(be, &eb) != MN_OK) die("sample op", &eb);
        double t2 = now_s();
        if (t1 - t0 < best[0]) best[0] = t1 - t0;
        if (t2 - t1 < best[1]) best[1] = t2 - t1;
    }
    printf("  sampling alone, %d rows of %d logits: host %.1f us (copies + mn_sampler_sample), backend op %.1f us\n",
           (int)N, (int)V, 1e6 * best[0], 1e6 * best[1]);
    mn_buffer_free(dl);
    mn_buffer_free(dp);
    mn_buffer_free(dt);
    free(params);
    mn_sampler_free(smp);
    free(host);
    free(sess);
    free(scratch);
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *device = "cpu";
    int threads = 0, N = 8, G = 32, R = 3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) model_path = argv[++i];
        else if (!strcmp(argv[i], "-d") && i + 1 < argc) device = argv[++i];
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-n") && i + 1 < argc) N = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-g") && i + 1 < argc) G = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-r") && i + 1 < argc) R = atoi(argv[++i]);
        else { fprintf(stderr, "usage: %s [-m MODEL] [-d cpu|cuda] [-t THREADS] [-n SESSIONS] [-g TOKENS] [-r ROUNDS]\n", argv[0]); return 2; }
    }
    if (N < 1 || G < 2 || R < 1) { fprintf(stderr, "bench_sample_step: need -n >= 1, -g >= 2, -r >= 1\n"); return 2; }
    if (!model_path) model_path = mn_model_default_path();
    mn_errbuf eb;
    mn_backend *be;
    mn_backend_params bp = {.device = device, .n_threads = threads};
    if (mn_backend_new(&bp, &be, NULL, &eb) != MN_OK) die("backend", &eb);
    mn_model *m;
    if (mn_model_load(model_path, be, NULL, &m, &eb) != MN_OK) die(model_path, &eb);
    sink *k[2];
    for (int md = 0; md < 2; md++) {
        k[md] = calloc((size_t)N, sizeof **k);
        for (int32_t i = 0; i < N; i++) k[md][i] = (sink){0, G, calloc((size_t)G, sizeof(int32_t))};
    }
    static const mn_sample_on modes[2] = {MN_SAMPLE_ON_HOST, MN_SAMPLE_ON_BACKEND};
    static const char *const names[2] = {"host", "backend"};
    double best[2] = {1e30, 1e30};
    int32_t steps[2] = {0, 0};
    int64_t bytes[2] = {0, 0};
    double *dt[2];
    int32_t n_dt[2] = {0, 0};
    for (int md = 0; md < 2; md++) dt[md] = malloc((size_t)R * (G + 1) * sizeof(double));
    for (int r = 0; r < R; r++)
        for (int md = 0; md < 2; md++) {
            double t = round_of(m, modes[md], N, G, k[md], &steps[md], &bytes[md], dt[md], &n_dt[md]);
            if (t < best[md]) best[md] = t;
        }
    for (int md = 0; md < 2; md++) qsort(dt[md], (size_t)n_dt[md], sizeof(double), cmp_double);
    for (int32_t i = 0; i < N; i++)
        if (k[0][i].n != k[1][i].n || memcmp(k[0][i].tok, k[1][i].tok, (size_t)k[0][i].n * sizeof(int32_t)) != 0) {
            fprintf(stderr, "bench_sample_step: session %d: tokens differ between host and backend sampling\n", (int)i);
            return 1;
        }
    printf("%s, %s, %d sessions x %d tokens, best of %d rounds (same tokens in both modes)\n", m->name, device, N, G, R);
    for (int md = 0; md < 2; md++)
        printf("  sample on %-8s %7.3f ms/step (median %.3f, fastest %.3f)  %8.1f tok/s  logits to the host %lld bytes\n",
               names[md], 1e3 * best[md] / steps[md], 1e3 * dt[md][n_dt[md] / 2], 1e3 * dt[md][0],
               N * (double)steps[md] / best[md], (long long)bytes[md]);
    printf("  backend / host step time: best round %.3f, median step %.3f, fastest step %.3f\n",
           (best[1] / steps[1]) / (best[0] / steps[0]), dt[1][n_dt[1] / 2] / dt[0][n_dt[0] / 2], dt[1][0] / dt[0][0]);
    free(dt[0]);
    free(dt[1]);
    sample_alone(m, be, N);
    for (int md = 0; md < 2; md++) {
        for (int32_t i = 0; i < N; i++) free(k[md][i].tok);
        free(k[md]);
    }
    mn_model_free(m);
    mn_backend_free(be);
    return 0;
}
