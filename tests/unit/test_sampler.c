/* tests/unit/test_sampler.c — the sampler and the stop-string matcher.
 *
 * Every expectation is computed here independently, in double, from the formulas:
 * softmax(l/T) for the temperature, the candidate sets of top-k / top-p / min-p by
 * sorting the whole vocabulary, the penalty rules of llama.cpp and OpenAI, and a
 * log-softmax for logprobs. Sampled frequencies are checked with a chi-square bound
 * (Wilson-Hilferty quantile at tail 1e-6), and each such test also checks that the
 * bound rejects a wrong distribution, so the statistic has power. Stop strings are
 * checked against strstr on the whole text, fed in every split and byte by byte.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/sampler.h"

/* ---- helpers -------------------------------------------------------------------------- */

static uint64_t tr_state = 12345;
static double trand(void) {   /* the test's own generator, unrelated to the sampler's */
    tr_state = tr_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(tr_state >> 11) / 9007199254740992.0;
}

static mn_sampling_params plain(float T) {
    mn_sampling_params p = mn_sampling_defaults();
    p.temperature = T;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repeat_penalty = 1.0f;
    p.seed = 42;
    return p;
}

static mn_sampler *make(const mn_sampling_params *p, int32_t V) {
    mn_sampler *s = NULL;
    mn_errbuf eb = { { 0 } };
    mn_err e = mn_sampler_new(p, V, &s, &eb);
    if (e) fprintf(stderr, "mn_sampler_new: %s\n", eb.msg);
    assert_int_equal(e, MN_OK);
    return s;
}

static int32_t sample_copy(mn_sampler *s, const float *logits, int32_t V, float *scratch, mn_sample_info *info) {
    memcpy(scratch, logits, (size_t)V * sizeof *scratch);
    return mn_sampler_sample(s, scratch, info);
}

/* p[i] = softmax(l / T) in double */
static void softmax_T(const float *l, int n, double T, double *p) {
    double m = -INFINITY, z = 0;
    for (int i = 0; i < n; i++) if (l[i] > m) m = l[i];
    for (int i = 0; i < n; i++) { p[i] = exp((l[i] - m) / T); z += p[i]; }
    for (int i = 0; i < n; i++) p[i] /= z;
}

/* chi-square quantile for tail 1e-6 (Wilson-Hilferty), z = 4.753 */
static double chi2_bound(int df) {
    double a = 2.0 / (9.0 * df);
    double q = 1.0 - a + 4.753 * sqrt(a);
    return df * q * q * q;
}

static double chi2(const long *counts, const double *p, int n, long draws, int *df) {
    double x = 0;
    *df = -1;
    for (int i = 0; i < n; i++) {
        if (p[i] <= 0) continue;
        double e = p[i] * draws;
        x += (counts[i] - e) * (counts[i] - e) / e;
        (*df)++;
    }
    return x;
}

/* ids sorted by (logit desc, id asc) */
static const float *g_sort_l;
static int by_logit(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    if (g_sort_l[x] != g_sort_l[y]) return g_sort_l[x] > g_sort_l[y] ? -1 : 1;
    return x - y;
}
static void order(const float *l, int n, int *ids) {
    for (int i = 0; i < n; i++) ids[i] = i;
    g_sort_l = l;
    qsort(ids, (size_t)n, sizeof *ids, by_logit);
}

/* ---- greedy ----------------------------------------------------------------------------- */

static void test_greedy_argmax_ties(void **st) {
    (void)st;
    float l[6] = { 1.0f, 5.0f, 3.0f, 5.0f, -2.0f, 5.0f };
    float w[6];
    mn_sampling_params p = plain(0.0f);
    p.top_k = 3; p.top_p = 0.5f; p.min_p = 0.2f;   /* greedy ignores the filters */
    mn_sampler *s = make(&p, 6);
    for (int r = 0; r < 5; r++) assert_int_equal(sample_copy(s, l, 6, w, NULL), 1);
    mn_sampler_free(s);

    /* random logits: argmax found by a plain loop here */
    enum { V = 4096 };
    float *big = malloc(V * sizeof *big), *wb = malloc(V * sizeof *wb);
    for (int t = 0; t < 20; t++) {
        int best = 0;
        for (int i = 0; i < V; i++) {
            big[i] = (float)floor(trand() * 50.0);      /* many ties */
            if (big[i] > big[best]) best = i;
        }
        s = make(&p, V);
        assert_int_equal(sample_copy(s, big, V, wb, NULL), best);
        mn_sampler_free(s);
    }
    /* a logit bias moves the argmax */
    mn_logit_bias b = { 4, 8.0f };
    p.bias = &b; p.n_bias = 1;
    s = make(&p, 6);
    assert_int_equal(sample_copy(s, l, 6, w, NULL), 4);
    mn_sampler_free(s);
    free(big); free(wb);
}

/* ---- temperature: empirical distribution ------------------------------------------------ */

static void test_temperature_distribution(void **st) {
    (void)st;
    enum { V = 8 };
    const long N = 200000;
    float l[V] = { 0.5f, 1.5f, -0.3f, 2.0f, 0.0f, 1.0f, -1.0f, 0.7f };
    float w[V];
    const float T = 0.7f;
    mn_sampling_params p = plain(T);
    mn_sampler *s = make(&p, V);
    long cnt[V] = { 0 };
    for (long i = 0; i < N; i++) cnt[sample_copy(s, l, V, w, NULL)]++;
    mn_sampler_free(s);
    double pr[V], wrong[V];
    softmax_T(l, V, T, pr);
    softmax_T(l, V, 1.0, wrong);
    int df;
    double x = chi2(cnt, pr, V, N, &df);
    double bound = chi2_bound(df);
    printf("temperature: chi2 %.2f, df %d, bound %.2f\n", x, df, bound);
    assert_true(x < bound);
    double xw = chi2(cnt, wrong, V, N, &df);
    assert_true(xw > bound);   /* the test can tell T=0.7 from T=1 */
}

/* ---- top-k -------------------------------------------------------------------------------- */

static void test_top_k(void **st) {
    (void)st;
    enum { V = 50, K = 5 };
    const long N = 40000;
    float l[V], w[V];
    for (int i = 0; i < V; i++) l[i] = (float)(trand() * 4.0 - 2.0);
    l[17] = l[3];   /* a tie somewhere */
    int ids[V];
    order(l, V, ids);
    mn_sampling_params p = plain(1.5f);
    p.top_k = K;
    mn_sampler *s = make(&p, V);
    long cnt[V] = { 0 };
    for (long i = 0; i < N; i++) cnt[sample_copy(s, l, V, w, NULL)]++;
    mn_sampler_free(s);
    float sub[K];
    for (int j = 0; j < K; j++) sub[j] = l[ids[j]];
    double pk[K];
    softmax_T(sub, K, 1.5, pk);
    double pr[V] = { 0 };
    for (int j = 0; j < K; j++) pr[ids[j]] = pk[j];
    for (int i = 0; i < V; i++) if (pr[i] == 0) assert_int_equal(cnt[i], 0);   /* never outside top-k */
    int seen = 0;
    for (int j = 0; j < K; j++) seen += cnt[ids[j]] > 0;
    assert_int_equal(seen, K);
    int df;
    double x = chi2(cnt, pr, V, N, &df);
    assert_int_equal(df, K - 1);
    assert_true(x < chi2_bound(df));

    /* ties at the boundary: the lowest ids win */
    float t[8] = { 1, 3, 2, 3, 3, 0, 3, 1 }, tw[8];
    p.top_k = 2; p.temperature = 1.0f;
    s = make(&p, 8);
    long c2[8] = { 0 };
    for (int i = 0; i < 2000; i++) c2[sample_copy(s, t, 8, tw, NULL)]++;
    mn_sampler_free(s);
    assert_true(c2[1] > 0 && c2[3] > 0);
    assert_int_equal(c2[1] + c2[3], 2000);
    /* top_k = 1 is greedy */
    p.top_k = 1;
    s = make(&p, V);
    int g = ids[0];
    for (int i = 0; i < 100; i++) assert_int_equal(sample_copy(s, l, V, w, NULL), g);
    mn_sampler_free(s);
}

/* ---- top-p / min-p ------------------------------------------------------------------------ */

/* Independent candidate set: sort all, top-p prefix over the whole softmax, then min-p. */
static int expected_set(const float *l, int V, double T, int top_k, double top_p, double min_p, double *pr) {
    int *ids = malloc((size_t)V * sizeof *ids);
    double *q = malloc((size_t)V * sizeof *q);
    order(l, V, ids);
    int n = top_k > 0 && top_k < V ? top_k : V;
    float *sub = malloc((size_t)n * sizeof *sub);
    for (int j = 0; j < n; j++) sub[j] = l[ids[j]];
    softmax_T(sub, n, T, q);
    if (top_p < 1.0) {
        double acc = 0;
        int j = 0;
        while (j < n) { acc += q[j++]; if (acc >= top_p) break; }
        n = j;
    }
    if (min_p > 0) {
        int j = 1;
        while (j < n && q[j] >= min_p * q[0]) j++;
        n = j;
    }
    softmax_T(sub, n, T, q);
    for (int i = 0; i < V; i++) pr[i] = 0;
    for (int j = 0; j < n; j++) pr[ids[j]] = q[j];
    free(ids); free(q); free(sub);
    return n;
}

static void check_filter(int V, double T, int top_k, double top_p, double min_p, long N, float spread) {
    float *l = malloc((size_t)V * sizeof *l), *w = malloc((size_t)V * sizeof *w);
    for (int i = 0; i < V; i++) l[i] = (float)(trand() * spread);
    double *pr = malloc((size_t)V * sizeof *pr);
    long *cnt = calloc((size_t)V, sizeof *cnt);
    int n = expected_set(l, V, T, top_k, top_p, min_p, pr);
    mn_sampling_params p = plain((float)T);
    p.top_k = top_k; p.top_p = (float)top_p; p.min_p = (float)min_p;
    mn_sampler *s = make(&p, V);
    for (long i = 0; i < N; i++) cnt[sample_copy(s, l, V, w, NULL)]++;
    mn_sampler_free(s);
    for (int i = 0; i < V; i++) {
        if (pr[i] == 0 && cnt[i] != 0) fail_msg("V %d: token %d (p 0) drawn %ld times", V, i, cnt[i]);
        if (pr[i] * N > 30 && cnt[i] == 0) fail_msg("V %d: token %d (p %g) never drawn", V, i, pr[i]);
    }
    int df;
    double x = chi2(cnt, pr, V, N, &df);
    printf("filter V %d k %d p %.2f min_p %.2f: %d candidates, chi2 %.1f df %d bound %.1f\n", V, top_k, top_p,
           min_p, n, x, df, chi2_bound(df));
    if (df > 0 && n < 200) assert_true(x < chi2_bound(df));
    free(l); free(w); free(pr); free(cnt);
}

static void test_top_p(void **st) {
    (void)st;
    check_filter(30, 1.0, 0, 0.6, 0.0, 30000, 4.0f);
    check_filter(30, 0.5, 0, 0.9, 0.0, 30000, 4.0f);
    check_filter(40, 1.0, 10, 0.7, 0.0, 30000, 3.0f);   /* top-p over the top-k survivors */
    /* wide flat vocab: the prefix holding 0.95 is far past the first 512 */
    check_filter(3000, 1.0, 0, 0.95, 0.0, 2000, 1.5f);
}

static void test_min_p(void **st) {
    (void)st;
    check_filter(40, 0.8, 0, 1.0, 0.1, 30000, 4.0f);
    check_filter(40, 1.3, 0, 1.0, 0.3, 30000, 4.0f);
    check_filter(60, 1.0, 0, 0.8, 0.05, 30000, 5.0f);   /* top-p then min-p, both cuts */
    check_filter(60, 1.0, 0, 0.3, 0.05, 30000, 5.0f);
    check_filter(60, 1.0, 20, 0.9, 0.2, 30000, 5.0f);
}

/* ---- penalties -------------------------------------------------------------------------- */

/* With V <= 20 and n_logprobs = V the info holds the whole log-softmax: compare it with
 * the penalised logits computed here. */
static void check_logits(mn_sampler *s, const float *l, const double *want, int V) {
    float w[20];
    mn_sample_info info;
    sample_copy(s, l, V, w, &info);
    assert_int_equal(info.n_top, V);
    double m = -INFINITY, z = 0;
    for (int i = 0; i < V; i++) if (want[i] > m) m = want[i];
    for (int i = 0; i < V; i++) z += exp(want[i] - m);
    double lse = m + log(z);
    for (int j = 0; j < V; j++) {
        int t = info.top[j].token;
        double d = fabs(info.top[j].logprob - (want[t] - lse));
        if (d > 1e-5) fail_msg("token %d: logprob %g, want %g", t, (double)info.top[j].logprob, want[t] - lse);
    }
}

static void test_penalties(void **st) {
    (void)st;
    enum { V = 10 };
    float l[V] = { 1.0f, -1.0f, 2.0f, 0.5f, -0.5f, 3.0f, 0.0f, -2.0f, 1.5f, 0.25f };
    const int hist[] = { 2, 3, 3, 5, 7, 3, 1 };
    const int nh = (int)(sizeof hist / sizeof hist[0]);
    const float rp = 1.3f, fp = 0.5f, pp = 0.25f;
    for (int window = -1; window <= 5; window += 3) {   /* -1: all, 2: last two, 5: last five */
        mn_sampling_params p = plain(0.0f);
        p.repeat_penalty = rp; p.frequency_penalty = fp; p.presence_penalty = pp;
        p.repeat_last_n = window; p.n_logprobs = V;
        mn_logit_bias b[2] = { { 6, 1.0f }, { 3, -0.5f } };
        p.bias = b; p.n_bias = 2;
        mn_sampler *s = make(&p, V);
        for (int i = 0; i < nh; i++) mn_sampler_accept(s, hist[i]);
        int cnt[V] = { 0 };
        int from = window < 0 ? 0 : nh - window;
        for (int i = from; i < nh; i++) cnt[hist[i]]++;
        double want[V];
        for (int i = 0; i < V; i++) {
            double x = (double)l[i] + (i == 6 ? 1.0 : 0) + (i == 3 ? -0.5 : 0);
            if (cnt[i] > 0) {
                x = x > 0 ? x / rp : x * rp;
                x -= cnt[i] * fp + pp;
            }
            want[i] = x;
        }
        check_logits(s, l, want, V);
        mn_sampler_free(s);
    }
    /* repeat_last_n = 0: no penalty at all */
    mn_sampling_params p = plain(0.0f);
    p.repeat_penalty = 2.0f; p.frequency_penalty = 1.0f; p.repeat_last_n = 0; p.n_logprobs = V;
    mn_sampler *s = make(&p, V);
    for (int i = 0; i < nh; i++) mn_sampler_accept(s, hist[i]);
    double want[V];
    for (int i = 0; i < V; i++) want[i] = l[i];
    check_logits(s, l, want, V);
    mn_sampler_free(s);
}

/* ---- seeds and RNG state ------------------------------------------------------------------ */

static void run_seq(uint64_t seed, int n, int32_t *out) {
    enum { V = 1000 };
    static float l[V], w[V];
    for (int i = 0; i < V; i++) l[i] = (float)sin(i * 0.37) * 2.0f;
    mn_sampling_params p = plain(1.0f);
    p.seed = seed;
    mn_sampler *s = make(&p, V);
    for (int i = 0; i < n; i++) out[i] = sample_copy(s, l, V, w, NULL);
    mn_sampler_free(s);
}

static void test_seed(void **st) {
    (void)st;
    int32_t a[100], b[100], c[100];
    run_seq(7, 100, a);
    run_seq(7, 100, b);
    run_seq(8, 100, c);
    assert_memory_equal(a, b, sizeof a);
    int diff = 0;
    for (int i = 0; i < 100; i++) diff += a[i] != c[i];
    assert_true(diff > 50);
}

static void test_rng_save_restore(void **st) {
    (void)st;
    enum { V = 500 };
    float l[V], w[V];
    for (int i = 0; i < V; i++) l[i] = (float)cos(i * 0.11);
    mn_sampling_params p = plain(0.9f);
    p.seed = 99;
    mn_sampler *s = make(&p, V);
    for (int i = 0; i < 10; i++) sample_copy(s, l, V, w, NULL);
    uint64_t state[4];
    mn_sampler_get_rng(s, state);
    int32_t first[30], again[30], other[30];
    for (int i = 0; i < 30; i++) first[i] = sample_copy(s, l, V, w, NULL);
    mn_sampler_set_rng(s, state);
    for (int i = 0; i < 30; i++) again[i] = sample_copy(s, l, V, w, NULL);
    assert_memory_equal(first, again, sizeof first);
    /* a fresh sampler with another seed, given the saved state, continues identically */
    p.seed = 1234;
    mn_sampler *s2 = make(&p, V);
    mn_sampler_set_rng(s2, state);
    for (int i = 0; i < 30; i++) other[i] = sample_copy(s2, l, V, w, NULL);
    assert_memory_equal(first, other, sizeof first);
    mn_sampler_free(s);
    mn_sampler_free(s2);
}

/* ---- logprobs ------------------------------------------------------------------------------- */

static void test_logprobs(void **st) {
    (void)st;
    /* whole vocabulary inside top-20: probabilities sum to one */
    enum { S = 20 };
    float ls[S], ws[S];
    for (int i = 0; i < S; i++) ls[i] = (float)(trand() * 6 - 3);
    mn_sampling_params p = plain(0.0f);
    p.n_logprobs = 20;
    mn_sampler *s = make(&p, S);
    mn_sample_info info;
    int32_t c = sample_copy(s, ls, S, ws, &info);
    mn_sampler_free(s);
    double sum = 0;
    for (int j = 0; j < info.n_top; j++) sum += exp(info.top[j].logprob);
    assert_int_equal(info.n_top, S);
    assert_true(fabs(sum - 1.0) < 1e-5);
    assert_int_equal(info.top[0].token, c);

    /* big vocab with a bias and a temperature: logprobs are before temperature */
    enum { V = 49152 };
    float *l = malloc(V * sizeof *l), *w = malloc(V * sizeof *w);
    for (int i = 0; i < V; i++) l[i] = (float)(trand() * 20 - 10);
    mn_logit_bias b = { 777, 15.0f };
    p = plain(1.7f);
    p.top_k = 50; p.n_logprobs = 7; p.bias = &b; p.n_bias = 1;
    s = make(&p, V);
    c = sample_copy(s, l, V, w, &info);
    mn_sampler_free(s);
    double m = -INFINITY, z = 0;
    l[777] += 15.0f;
    for (int i = 0; i < V; i++) if (l[i] > m) m = l[i];
    for (int i = 0; i < V; i++) z += exp((double)l[i] - m);
    double lse = m + log(z);
    int ids[V];
    order(l, V, ids);
    assert_int_equal(info.n_top, 7);
    for (int j = 0; j < 7; j++) {
        assert_int_equal(info.top[j].token, ids[j]);
        assert_true(fabs(info.top[j].logprob - (l[ids[j]] - lse)) < 1e-4);
        if (j > 0) assert_true(info.top[j].logprob <= info.top[j - 1].logprob);
    }
    assert_true(fabs(info.logprob - (l[c] - lse)) < 1e-4);
    free(l); free(w);
}

/* ---- big vocab smoke (speed paths) ----------------------------------------------------- */

static void test_big_vocab_paths(void **st) {
    (void)st;
    enum { V = 152000 };
    float *l = malloc(V * sizeof *l), *w = malloc(V * sizeof *w);
    for (int i = 0; i < V; i++) l[i] = (float)(trand() * 8);
    int ids[16];
    float best = -1;
    for (int i = 0; i < V; i++) if (l[i] > best) { best = l[i]; ids[0] = i; }
    mn_sampling_params cases[4];
    cases[0] = mn_sampling_defaults();
    cases[1] = plain(1.0f); cases[1].top_p = 0.9f;
    cases[2] = plain(1.0f); cases[2].min_p = 0.5f;
    cases[3] = plain(1.0f); cases[3].top_k = 1;
    for (int k = 0; k < 4; k++) {
        mn_sampler *s = make(&cases[k], V);
        for (int r = 0; r < 10; r++) {
            int32_t t = sample_copy(s, l, V, w, NULL);
            assert_true(t >= 0 && t < V);
            if (k == 2) assert_true(l[t] >= best + logf(0.5f) - 1e-5f);
            if (k == 3) assert_int_equal(t, ids[0]);
        }
        mn_sampler_free(s);
    }
    free(l); free(w);
}

/* ---- validation ----------------------------------------------------------------------------- */

static void expect_bad(mn_sampling_params p, int32_t V, const char *field) {
    mn_errbuf eb = { { 0 } };
    mn_err e = mn_sampling_validate(&p, V, &eb);
    assert_int_not_equal(e, MN_OK);
    if (!strstr(eb.msg, field)) fail_msg("message '%s' does not name '%s'", eb.msg, field);
    mn_sampler *s = (mn_sampler *)&eb;
    assert_int_not_equal(mn_sampler_new(&p, V, &s, &eb), MN_OK);
    assert_null(s);
}

static void test_validate(void **st) {
    (void)st;
    mn_sampling_params d = mn_sampling_defaults(), p;
    mn_errbuf eb;
    assert_int_equal(mn_sampling_validate(&d, 100, &eb), MN_OK);
    p = d; p.temperature = -0.1f; expect_bad(p, 100, "temperature");
    p = d; p.temperature = 101.0f; expect_bad(p, 100, "temperature");
    p = d; p.temperature = NAN; expect_bad(p, 100, "temperature");
    p = d; p.top_k = -1; expect_bad(p, 100, "top_k");
    p = d; p.top_p = 0.0f; expect_bad(p, 100, "top_p");
    p = d; p.top_p = 1.5f; expect_bad(p, 100, "top_p");
    p = d; p.min_p = -0.1f; expect_bad(p, 100, "min_p");
    p = d; p.repeat_penalty = 0.0f; expect_bad(p, 100, "repeat_penalty");
    p = d; p.repeat_last_n = -2; expect_bad(p, 100, "repeat_last_n");
    p = d; p.frequency_penalty = 2.5f; expect_bad(p, 100, "frequency_penalty");
    p = d; p.presence_penalty = -2.5f; expect_bad(p, 100, "presence_penalty");
    p = d; p.n_logprobs = 21; expect_bad(p, 100, "n_logprobs");
    mn_logit_bias b[2] = { { 5, 1.0f }, { 100, 1.0f } };
    p = d; p.bias = b; p.n_bias = 2; expect_bad(p, 100, "logit_bias[1].token");
    b[1].token = 7; b[1].bias = 101.0f;
    expect_bad(p, 100, "logit_bias[1].bias");
    b[1].bias = -100.0f;
    assert_int_equal(mn_sampling_validate(&p, 100, &eb), MN_OK);
}

/* ---- stop strings -------------------------------------------------------------------------- */

static bool utf8_whole(const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        size_t k = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
        if (i + k > n) return false;
        i += k;
    }
    return true;
}

/* Feed text in pieces cut at cuts[0..nc) and compare with strstr over the whole text. */
static void run_stop(const char *const *stops, int ns, const char *text, const size_t *cuts, int nc) {
    mn_stop *m = NULL;
    mn_errbuf eb;
    assert_int_equal(mn_stop_new(stops, ns, &m, &eb), MN_OK);
    /* the stop that completes first wins (as when text arrives byte by byte); among
     * those completing at the same byte, the one starting first */
    size_t n = strlen(text), want = n, want_end = (size_t)-1, maxs = 0;
    bool want_stop = false;
    for (int k = 0; k < ns; k++) {
        const char *f = strstr(text, stops[k]);
        size_t L = strlen(stops[k]);
        if (f) {
            size_t at = (size_t)(f - text);
            if (at + L < want_end || (at + L == want_end && at < want)) {
                want = at; want_end = at + L; want_stop = true;
            }
        }
        if (L > maxs) maxs = L;
    }
    char out[4096];
    size_t got = 0, prev = 0;
    bool stopped = false;
    for (int c = 0; c <= nc && !stopped; c++) {
        size_t end = c < nc ? cuts[c] : n;
        size_t piece = end - prev;
        size_t w = mn_stop_feed(m, text + prev, piece, out + got, piece + maxs + 3, &stopped);
        if (!stopped) assert_true(utf8_whole(out + got, w));
        got += w;
        /* never emits past the first match; never holds more than a stop prefix + 3 */
        assert_true(got <= want);
        assert_memory_equal(out, text, got);
        if (!stopped && end <= want) assert_true(end - got + 1 <= maxs + 3);
        prev = end;
    }
    if (!stopped) got += mn_stop_flush(m, out + got, sizeof out - got);
    assert_int_equal(stopped, want_stop);
    assert_int_equal(got, want);
    assert_memory_equal(out, text, want);
    mn_stop_free(m);
}

static void stop_all_splits(const char *const *stops, int ns, const char *text) {
    size_t n = strlen(text);
    size_t cuts[512];
    for (size_t i = 1; i < n; i++) cuts[i - 1] = i;            /* byte at a time */
    run_stop(stops, ns, text, cuts, (int)(n - 1));
    for (size_t a = 0; a <= n; a++) {                           /* every split in two */
        cuts[0] = a;
        run_stop(stops, ns, text, cuts, 1);
        for (size_t b = a; b <= n && n < 40; b += 3) {          /* and some in three */
            cuts[1] = b;
            run_stop(stops, ns, text, cuts, 2);
        }
    }
}

static void test_stop_strings(void **st) {
    (void)st;
    const char *s1[] = { "</s>" };
    stop_all_splits(s1, 1, "hello <b> world </s> after");
    stop_all_splits(s1, 1, "no stop here <, </, </s and more");
    const char *s2[] = { "abcabd" };
    stop_all_splits(s2, 1, "xxabcabcabdyy");                     /* overlapping candidates */
    stop_all_splits(s2, 1, "abcababcabcab");                     /* ends in a possible prefix */
    const char *s3[] = { "TO", "STOP", "\n\nUser:" };
    stop_all_splits(s3, 3, "xxSTOPyy");                          /* "TO" completes first */
    const char *s5[] = { "TOP", "STOP" };
    stop_all_splits(s5, 2, "xxSTOPyy");                          /* same end: earliest start */
    stop_all_splits(s3, 3, "line\n\nUse\n\nUser: hi");
    const char *s4[] = { "ö!", "😃" };
    stop_all_splits(s4, 2, "héllo wörld 😀 ok ö? 𝄞 end");          /* UTF-8, no match */
    stop_all_splits(s4, 2, "héllo wörld 😀😃 tail");                 /* match after a near miss */
    stop_all_splits(NULL, 0, "plain ünïcödé");                   /* no stops: only the UTF-8 hold */

    /* precise holds */
    mn_stop *m;
    mn_errbuf eb;
    char out[64];
    bool stopped;
    assert_int_equal(mn_stop_new(s1, 1, &m, &eb), MN_OK);
    assert_int_equal(mn_stop_feed(m, "hello <", 7, out, sizeof out, &stopped), 6);
    assert_false(stopped);
    assert_int_equal(mn_stop_feed(m, "b>", 2, out, sizeof out, &stopped), 3);
    assert_memory_equal(out, "<b>", 3);
    assert_int_equal(mn_stop_feed(m, "\xc3", 1, out, sizeof out, &stopped), 0);   /* half of é */
    assert_int_equal(mn_stop_feed(m, "\xa9</", 3, out, sizeof out, &stopped), 2);
    assert_memory_equal(out, "\xc3\xa9", 2);
    assert_int_equal(mn_stop_flush(m, out, sizeof out), 2);                       /* no false hold */
    assert_memory_equal(out, "</", 2);
    mn_stop_free(m);

    /* errors name the index */
    const char *bad[] = { "ok", "" };
    assert_int_equal(mn_stop_new(bad, 2, &m, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "stop[1]"));
}

static void test_no_leaks(void **st) {
    (void)st;
    long live = mn_alloc_live();
    mn_sampling_params p = mn_sampling_defaults();
    mn_logit_bias b = { 1, 1.0f };
    p.bias = &b; p.n_bias = 1; p.repeat_last_n = -1;
    /* every allocation failing in turn: an error, never a crash or a leak */
    for (long k = 0; k < 6; k++) {
        mn_sampler *s = NULL;
        mn_alloc_fail_after(k);
        mn_err e = mn_sampler_new(&p, 100, &s, NULL);
        mn_alloc_fail_after(-1);
        if (e == MN_OK) {
            for (int i = 0; i < 200; i++) mn_sampler_accept(s, i % 100);
            mn_sampler_free(s);
        } else {
            assert_int_equal(e, MN_ENOMEM);
            assert_null(s);
        }
        assert_int_equal(mn_alloc_live(), live);
    }
    const char *stops[] = { "a", "bc" };
    for (long k = 0; k < 6; k++) {
        mn_stop *m = NULL;
        mn_alloc_fail_after(k);
        mn_err e = mn_stop_new(stops, 2, &m, NULL);
        mn_alloc_fail_after(-1);
        if (e == MN_OK) mn_stop_free(m);
        assert_int_equal(mn_alloc_live(), live);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_argmax_ties),
        cmocka_unit_test(test_temperature_distribution),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_min_p),
        cmocka_unit_test(test_penalties),
        cmocka_unit_test(test_seed),
        cmocka_unit_test(test_rng_save_restore),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_big_vocab_paths),
        cmocka_unit_test(test_validate),
        cmocka_unit_test(test_stop_strings),
        cmocka_unit_test(test_no_leaks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
