/* tests/unit/sample_check.h — what the sample-op tests share (C and C++): logit rows of
 * awkward kinds, and the contract's tolerance (kernels/ops.h, MN_SAMPLE_TOL) written out.
 *
 * A token that differs from mn_ref_sample's is accepted only if it is what the contract
 * allows in a boundary case, recomputed here from scratch (sort, double sums): for every
 * kept-set length n the tolerance allows (the top-p cut within MN_SAMPLE_TOL * Zk of
 * top_p * Zk, the min-p trim within MN_SAMPLE_TOL * (1 + |min_l|) of min_l), the token is
 * kept and u * Zd lies within MN_SAMPLE_TOL * Zd of its interval in the id-order walk.
 * Greedy tokens and top ids must be exact; logprobs within MN_SAMPLE_TOL * (1 + |lp|).
 */
#ifndef MN_TESTS_SAMPLE_CHECK_H
#define MN_TESTS_SAMPLE_CHECK_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"

typedef struct sc_cand { float l; int32_t id; } sc_cand;

static uint64_t sc_rng = 0x853c49e6748fea9bull;
static double sc_rand(void) {   /* the tests' own generator */
    sc_rng = sc_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(sc_rng >> 11) / 9007199254740992.0;
}

static float sc_read(const float *l, int32_t i) { return l[i] != l[i] ? -INFINITY : l[i]; }

static int sc_cmp(const void *a, const void *b) {
    const sc_cand *x = (const sc_cand *)a, *y = (const sc_cand *)b;
    if (x->l != y->l) return x->l > y->l ? -1 : 1;
    return x->id < y->id ? -1 : (x->id > y->id);
}

enum { SC_KINDS = 6 };
/* kind 0: uniform [-s, s]; 1: integers (ties everywhere); 2: mostly -inf, NaN, a few finite;
 * 3: all equal; 4: a peaked distribution (a few spikes over noise), +-0.0; 5: two values. */
static void sc_fill(float *l, int32_t V, int kind) {
    float s = (float)(1.0 + 19.0 * sc_rand());
    for (int32_t i = 0; i < V; i++) {
        double r = sc_rand();
        switch (kind) {
        case 0: l[i] = (float)((2.0 * r - 1.0) * s); break;
        case 1: l[i] = (float)floor(r * 12.0); break;
        case 2: l[i] = r < 0.9 ? -INFINITY : (r < 0.93 ? NAN : (float)(r * 10.0)); break;
        case 3: l[i] = 1.5f; break;
        case 4: l[i] = r < 0.001 ? (float)(15.0 + 5.0 * sc_rand()) : (float)(sc_rand() * 4.0 - 2.0); break;
        default: l[i] = r < 0.5 ? 0.0f : -0.0f; if (r > 0.8) l[i] = 2.0f; break;
        }
    }
}

/* The candidate order of l (NaN as -inf) into c[0..V). */
static void sc_sort(const float *l, int32_t V, sc_cand *c) {
    for (int32_t i = 0; i < V; i++) { c[i].l = sc_read(l, i); c[i].id = i; }
    qsort(c, (size_t)V, sizeof *c, sc_cmp);
}

/* Kept-set lengths the contract allows with tolerance tol: [*lo, *hi] (tol 0: exact). */
static void sc_range(const sc_cand *c, int32_t V, const mn_sample_params *p, double tol, int64_t *lo, int64_t *hi) {
    float lmax = c[0].l, T = p->temperature, invT = 1.0f / T;
    int64_t nk = p->top_k > 0 && p->top_k < V ? p->top_k : V, a = nk, b = nk;
    if (p->top_p < 1.0f) {
        double zk = 0.0, acc = 0.0;
        for (int64_t j = 0; j < nk; j++) zk += expf((c[j].l - lmax) * invT);
        double want = (double)p->top_p * zk, e = tol * zk;
        int64_t fa = -1, fb = -1;
        for (int64_t j = 0; j < nk; j++) {
            acc += expf((c[j].l - lmax) * invT);
            if (fa < 0 && acc >= want - e) fa = j + 1;
            if (fb < 0 && acc >= want + e) fb = j + 1;
        }
        a = fa < 0 ? nk : fa;
        b = fb < 0 ? nk : fb;
        if (tol == 0.0) b = a;
    }
    if (p->min_p > 0.0f) {
        float min_l = lmax + T * logf(p->min_p);
        double d = tol * (1.0 + fabs((double)min_l));
        int64_t strict = 0, loose = 0;
        while (strict < V && (double)c[strict].l >= (double)min_l + d) strict++;
        while (loose < V && (double)c[loose].l >= (double)min_l - d) loose++;
        if (tol == 0.0) strict = loose;
        a = a < strict ? a : strict;
        b = b < loose ? b : loose;
        if (a < 1) a = 1;
        if (b < 1) b = 1;
    }
    *lo = a;
    *hi = b;
}

/* The id-order walk over the first n of c: Zd, and the interval [*before, *after) of token
 * (both -1 if token is not kept). kept[V] is scratch. */
static double sc_walk(const float *l, int32_t V, const sc_cand *c, int64_t n, float invT, int32_t token, char *kept,
                      double *before, double *after) {
    float lmax = c[0].l;
    memset(kept, 0, (size_t)V);
    for (int64_t j = 0; j < n; j++) kept[c[j].id] = 1;
    double acc = 0.0;
    *before = *after = -1.0;
    for (int32_t i = 0; i < V; i++) {
        if (!kept[i]) continue;
        if (i == token) *before = acc;
        acc += expf((sc_read(l, i) - lmax) * invT);
        if (i == token) *after = acc;
    }
    return acc;
}

/* u that puts target exactly on the boundary after the j-th kept token (j-th by id, from
 * the exact kept set), or 0.5 when greedy. */
static double sc_boundary_u(const float *l, int32_t V, const mn_sample_params *p, double frac) {
    if (p->temperature <= 0.0f) return 0.5;
    sc_cand *c = (sc_cand *)malloc((size_t)V * sizeof *c);
    char *kept = (char *)malloc((size_t)V);
    sc_sort(l, V, c);
    double u = 0.5;
    if (c[0].l > -INFINITY) {
        int64_t lo, hi;
        sc_range(c, V, p, 0.0, &lo, &hi);
        float invT = 1.0f / p->temperature;
        int32_t tok = c[(int64_t)(frac * (double)(lo - 1))].id;   /* a kept token */
        double before, after;
        double zd = sc_walk(l, V, c, lo, invT, tok, kept, &before, &after);
        u = after / zd;
        if (u >= 1.0) u = before / zd;
    }
    free(c);
    free(kept);
    return u;
}

/* The draw u of a test row by mode: 0, the largest double below 1, random, or exactly on
 * a boundary of the kept set (sc_boundary_u). */
static double sc_u(int mode, const float *l, int32_t V, const mn_sample_params *p) {
    switch (mode) {
    case 0: return 0.0;
    case 1: return 1.0 - 1.0 / 9007199254740992.0;
    case 2: return sc_rand();
    default: return sc_boundary_u(l, V, p, sc_rand());
    }
}

/* 1 if (token, logprob, top) is what the contract allows for row l, p, given the
 * reference's top ids; else 0 with the reason in why. *boundary is set when the token
 * differs from ref_token (an allowed boundary case). */
static int sc_check(const float *l, int32_t V, const mn_sample_params *p, int32_t token, const float *logprob,
                    const int32_t *top_id, const float *top_lp, int32_t ref_token, const int32_t *ref_top_id,
                    char *why, size_t why_n, int *boundary) {
    sc_cand *c = (sc_cand *)malloc((size_t)V * sizeof *c);
    char *kept = (char *)malloc((size_t)V);
    int ok = 1;
    *boundary = 0;
    sc_sort(l, V, c);
    float lmax = c[0].l;
    double lse = 0.0;
    if (lmax > -INFINITY) {
        double z = 0.0;
        for (int32_t i = 0; i < V; i++) z += exp((double)sc_read(l, i) - lmax);
        lse = (double)lmax + log(z);
    }
    int32_t n_top = p->n_logprobs < V ? p->n_logprobs : V;
    for (int32_t j = 0; top_id && j < n_top && ok; j++) {
        double want = (double)c[j].l - lse;
        if (top_id[j] != ref_top_id[j] || top_id[j] != c[j].id) {
            snprintf(why, why_n, "top[%d] id %d, want %d", (int)j, (int)top_id[j], (int)c[j].id);
            ok = 0;
        } else if (!(fabs((double)top_lp[j] - want) <= MN_SAMPLE_TOL * (1.0 + fabs(want))) &&
                   !(isinf(want) && top_lp[j] == (float)want)) {
            snprintf(why, why_n, "top[%d] logprob %.9g, want %.9g", (int)j, (double)top_lp[j], want);
            ok = 0;
        }
    }
    if (ok && (token < 0 || token >= V)) {
        snprintf(why, why_n, "token %d out of range", (int)token);
        ok = 0;
    }
    if (ok && token != ref_token) {
        *boundary = 1;
        if (p->temperature <= 0.0f || lmax == -INFINITY) {
            snprintf(why, why_n, "greedy token %d, want %d", (int)token, (int)ref_token);
            ok = 0;
        } else {
            int64_t lo, hi;
            sc_range(c, V, p, MN_SAMPLE_TOL, &lo, &hi);
            float invT = 1.0f / p->temperature;
            int allowed = 0;
            for (int64_t n = lo; n <= hi && !allowed; n++) {
                double before, after;
                double zd = sc_walk(l, V, c, n, invT, token, kept, &before, &after);
                double target = p->u * zd, e = MN_SAMPLE_TOL * zd;
                if (before >= 0.0 && after > before && before - e <= target && target < after + e) allowed = 1;
            }
            if (!allowed) {
                snprintf(why, why_n, "token %d, want %d (kept lengths %lld..%lld, not a boundary case)", (int)token,
                         (int)ref_token, (long long)lo, (long long)hi);
                ok = 0;
            }
        }
    }
    if (ok && logprob) {
        double want = lmax == -INFINITY ? 0.0 : (double)sc_read(l, token) - lse;
        if (!(fabs((double)*logprob - want) <= MN_SAMPLE_TOL * (1.0 + fabs(want)))) {
            snprintf(why, why_n, "logprob %.9g, want %.9g", (double)*logprob, want);
            ok = 0;
        }
    }
    free(c);
    free(kept);
    return ok;
}

/* One parameter set from an index (every combination over the index range), u set later. */
static mn_sample_params sc_params(int idx, int32_t V) {
    static const float Ts[] = { 0.0f, 0.3f, 1.0f, 2.5f };
    static const float Ps[] = { 1.0f, 0.95f, 0.5f, 0.01f };
    static const float Ms[] = { 0.0f, 0.05f, 0.5f, 1.0f };
    static const int Ns[] = { 0, 1, 20 };
    int32_t Ks[] = { 0, 1, 2, 40, V - 1, V, V + 5 };
    mn_sample_params p;
    memset(&p, 0, sizeof p);
    p.temperature = Ts[idx % 4]; idx /= 4;
    p.top_k = Ks[idx % 7]; idx /= 7;
    if (p.top_k < 0) p.top_k = 0;
    p.top_p = Ps[idx % 4]; idx /= 4;
    p.min_p = Ms[idx % 4]; idx /= 4;
    p.n_logprobs = Ns[idx % 3];
    return p;
}
enum { SC_NPARAMS = 4 * 7 * 4 * 4 * 3 };

#endif
