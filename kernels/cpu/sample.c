/* kernels/cpu/sample.c — the sample op on the CPU (contract: kernels/ops.h), rows split
 * across the threads, each thread with its own 2 * V candidates of scratch.
 *
 * Nothing here sorts the whole vocabulary unless the parameters force it (top_k > 4096
 * sorts k):
 *   - top_k set: a k-heap over the logits (quickselect for k > 4096), sort only k; top-p
 *     and min-p cut that sorted list; the kept list is then sorted by id for the draw.
 *   - min_p set without top_k: every survivor has l >= min_l, so one O(V) pass keeps
 *     only those, in id order (survivors are a prefix of the candidate order).
 *   - top_p without top_k: its mass is measured against the whole vocabulary's Z (one
 *     O(V) pass of expf); the cut is found by bucketing weights (a histogram over
 *     (lmax - l) / T), and only the bucket holding the cut is copied and sorted. The cut
 *     is a (logit, id) threshold; the kept list keeps its id order.
 *   - nothing: the draw walks all V.
 * Candidates are ordered by (logit descending, id ascending), a strict total order, so
 * results never depend on the quickselect's pivots. Sums whose order differs from the
 * reference's (bucket masses; Z and Z1 skip weights below e^-40) stay far inside
 * MN_SAMPLE_TOL.
 */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"

typedef struct cand { float l; int32_t id; } cand;

size_t mn_cpu_sample_work_bytes(const mn_sample_desc *d, int nth) {
    return (size_t)nth * 2 * (size_t)d->V * sizeof(cand);
}

/* Inlined into each caller twice, with nan a constant: rows without NaN (the lmax pass
 * finds out) read the logits without the NaN test in every later pass. */
#define MN__AI static inline __attribute__((always_inline))
MN__AI float logit_at(const float *l, int32_t i, bool nan) {
    float x = l[i];
    return nan && x != x ? -INFINITY : x;
}

/* a before b in the candidate order */
static inline bool before(cand a, cand b) { return a.l > b.l || (a.l == b.l && a.id < b.id); }
static inline void swap_c(cand *a, cand *b) { cand t = *a; *a = *b; *b = t; }

static int cmp_order(const void *a, const void *b) {
    const cand *x = a, *y = b;
    return before(*x, *y) ? -1 : (before(*y, *x) ? 1 : 0);
}
static int cmp_id(const void *a, const void *b) {
    const cand *x = a, *y = b;
    return (x->id > y->id) - (x->id < y->id);
}

/* Rearrange c[0..n) so that its first k are the k best (in any order). */
static void select_k(cand *c, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    uint64_t r = 0x2545F4914F6CDD1Dull;    /* fixed pivot stream: deterministic run time */
    while (lo < hi) {
        r ^= r << 13; r ^= r >> 7; r ^= r << 17;
        int64_t pi = lo + (int64_t)(r % (uint64_t)(hi - lo + 1));
        swap_c(&c[pi], &c[hi]);
        cand pv = c[hi];
        int64_t st = lo;
        for (int64_t i = lo; i < hi; i++)
            if (before(c[i], pv)) swap_c(&c[i], &c[st++]);
        swap_c(&c[st], &c[hi]);
        if (st == k - 1 || st == k) return;
        if (st < k) lo = st + 1; else hi = st - 1;
    }
}

/* The k best of l[0..V) into c[0..k), sorted. A min-heap of the k best so far rejects
 * most tokens with one comparison against its root. */
MN__AI void top_k_heap(const float *l, int32_t V, int32_t k, cand *c, bool nan) {
    for (int32_t i = 0; i < V; i++) {            /* c[0] is the worst kept candidate */
        cand x = { logit_at(l, i, nan), i };
        int64_t j;
        if (i < k) {
            j = i;
            while (j > 0 && before(c[(j - 1) / 2], x)) { c[j] = c[(j - 1) / 2]; j = (j - 1) / 2; }
            c[j] = x;
            continue;
        }
        if (!before(x, c[0])) continue;
        j = 0;
        for (;;) {
            int64_t a = 2 * j + 1, b = a + 1, w = j;
            cand wv = x;
            if (a < k && before(wv, c[a])) { w = a; wv = c[a]; }
            if (b < k && before(wv, c[b])) { w = b; wv = c[b]; }
            if (w == j) break;
            c[j] = c[w];
            j = w;
        }
        c[j] = x;
    }
    qsort(c, (size_t)k, sizeof *c, cmp_order);
}

/* Top-p over c[0..n) in id order (a prefix of the candidate order, cut by min-p) against
 * want = top_p * Z of the whole vocabulary: bucket the weights, sort only the cut bucket
 * (copied to tmp), filter c in place keeping its id order. Returns the new n. */
enum { TOPP_BUCKETS = 4096 };
static int64_t top_p_buckets(cand *c, int64_t n, cand *tmp, float lmax, float invT, double want) {
    static const double span = 40.0;             /* weights below e^-40 share the last bucket */
    double mass[TOPP_BUCKETS] = { 0 };
    double scale = TOPP_BUCKETS / span;
#define BUCKET(lv) ((((double)lmax - (lv)) * invT) < span ? (int)((((double)lmax - (lv)) * invT) * scale) : TOPP_BUCKETS - 1)
    for (int64_t i = 0; i < n; i++) mass[BUCKET(c[i].l)] += expf((c[i].l - lmax) * invT);
    double acc = 0.0;
    int bc = 0;
    while (bc < TOPP_BUCKETS && acc + mass[bc] < want) acc += mass[bc++];
    if (bc == TOPP_BUCKETS) return n;            /* rounding: never reached, keep all */
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++)
        if (BUCKET(c[i].l) == bc) tmp[m++] = c[i];
    qsort(tmp, (size_t)m, sizeof *tmp, cmp_order);
    cand thr = tmp[m - 1];
    for (int64_t i = 0; i < m; i++) {
        acc += expf((tmp[i].l - lmax) * invT);
        if (acc >= want) { thr = tmp[i]; break; }
    }
#undef BUCKET
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++)
        if (!before(thr, c[i])) c[k++] = c[i];   /* c[i] at or before the threshold */
    return k;
}

/* Draw from c[0..n) (ascending ids): the contract's walk. */
static int32_t draw_list(const cand *c, int64_t n, float lmax, float invT, double u) {
    double zd = 0.0;
    for (int64_t i = 0; i < n; i++) zd += expf((c[i].l - lmax) * invT);
    double target = u * zd, acc = 0.0;
    for (int64_t i = 0; i < n; i++) {
        acc += expf((c[i].l - lmax) * invT);
        if (acc > target) return c[i].id;
    }
    for (int64_t i = n - 1; i > 0; i--)
        if (expf((c[i].l - lmax) * invT) > 0.0f) return c[i].id;
    return c[0].id;
}

/* Draw over the whole vocabulary. */
MN__AI int32_t draw_all(const float *l, int32_t V, float lmax, float invT, double u, bool nan) {
    double zd = 0.0;
    for (int32_t i = 0; i < V; i++) zd += expf((logit_at(l, i, nan) - lmax) * invT);
    double target = u * zd, acc = 0.0;
    int32_t last = 0;
    for (int32_t i = 0; i < V; i++) {
        float w = expf((logit_at(l, i, nan) - lmax) * invT);
        acc += w;
        if (acc > target) return i;
        if (w > 0.0f) last = i;
    }
    return last;
}

/* Sum of expf((l - lmax) * invT) in double; weights below e^-40 are skipped (under 1e-12
 * of Z at vocab 1e5). */
MN__AI double softmax_z(const float *l, int32_t V, float lmax, float T, float invT, bool nan) {
    double z = 0.0;
    float floor_l = lmax - 40.0f * T;
    for (int32_t i = 0; i < V; i++) {
        float x = logit_at(l, i, nan);
        if (x >= floor_l) z += expf((x - lmax) * invT);
    }
    return z;
}

/* The row after its lmax pass (lmax, amax; nan: the row holds a NaN). */
MN__AI void sample_rest(const mn_sample_desc *d, int32_t r, cand *c, float lmax, int32_t amax, bool nan) {
    const int32_t V = d->V;
    const float *l = d->logits + (int64_t)r * d->logits_stride;
    const mn_sample_params *p = &d->params[r];
    int32_t n_top = d->top_id ? (p->n_logprobs < V ? p->n_logprobs : V) : 0;
    double lse = 0.0;
    if ((d->logprob || n_top > 0) && lmax > -INFINITY) lse = (double)lmax + log(softmax_z(l, V, lmax, 1.0f, 1.0f, nan));
    if (n_top > 0) {                             /* a small insertion list, n <= 20 */
        cand top[MN_SAMPLE_MAX_TOP];
        int32_t m = 0;
        for (int32_t i = 0; i < V; i++) {
            cand x = { logit_at(l, i, nan), i };
            if (m == n_top && !before(x, top[m - 1])) continue;
            int32_t j = m < n_top ? m++ : m - 1;
            while (j > 0 && before(x, top[j - 1])) { top[j] = top[j - 1]; j--; }
            top[j] = x;
        }
        for (int32_t j = 0; j < m; j++) {
            d->top_id[(int64_t)r * MN_SAMPLE_MAX_TOP + j] = top[j].id;
            d->top_logprob[(int64_t)r * MN_SAMPLE_MAX_TOP + j] = (float)((double)top[j].l - lse);
        }
    }

    int32_t chosen = amax;
    float T = p->temperature;
    if (T > 0.0f && lmax > -INFINITY) {
        float invT = 1.0f / T;
        bool use_k = p->top_k > 0 && p->top_k < V, use_p = p->top_p < 1.0f, use_min = p->min_p > 0.0f;
        float min_l = use_min ? lmax + T * logf(p->min_p) : -INFINITY;
        int64_t n;
        if (use_k) {
            if (p->top_k <= 4096) {
                top_k_heap(l, V, p->top_k, c, nan);
            } else {
                for (int32_t i = 0; i < V; i++) { c[i].l = logit_at(l, i, nan); c[i].id = i; }
                select_k(c, V, p->top_k);
                qsort(c, (size_t)p->top_k, sizeof *c, cmp_order);
            }
            n = p->top_k;
            if (use_p) {
                double zk = 0.0, acc = 0.0;
                for (int64_t i = 0; i < n; i++) zk += expf((c[i].l - lmax) * invT);
                double want = (double)p->top_p * zk;
                for (int64_t i = 0; i < n; i++) {
                    acc += expf((c[i].l - lmax) * invT);
                    if (acc >= want) { n = i + 1; break; }
                }
            }
            while (n > 1 && c[n - 1].l < min_l) n--;
            qsort(c, (size_t)n, sizeof *c, cmp_id);
            chosen = draw_list(c, n, lmax, invT, p->u);
        } else if (use_p || use_min) {
            /* min-p survivors are a prefix of the candidate order: pruning them first and
             * then cutting top-p (against the whole Z) inside them is the contract's order */
            n = 0;
            for (int32_t i = 0; i < V; i++) {
                float x = logit_at(l, i, nan);
                if (x >= min_l) { c[n].l = x; c[n].id = i; n++; }
            }
            if (use_p) {
                double want = (double)p->top_p * softmax_z(l, V, lmax, T, invT, nan);
                n = top_p_buckets(c, n, c + V, lmax, invT, want);
            }
            chosen = draw_list(c, n, lmax, invT, p->u);
        } else {
            chosen = draw_all(l, V, lmax, invT, p->u, nan);
        }
    }
    d->token[r] = chosen;
    if (d->logprob) d->logprob[r] = lmax == -INFINITY ? 0.0f : (float)((double)logit_at(l, chosen, nan) - lse);
}

static void sample_row(const mn_sample_desc *d, int32_t r, cand *c) {
    const float *l = d->logits + (int64_t)r * d->logits_stride;
    float lmax = -INFINITY;
    int32_t amax = 0;
    bool nan = false;
    for (int32_t i = 0; i < d->V; i++) {
        float x = l[i];
        nan |= x != x;
        if (x > lmax) { lmax = x; amax = i; }     /* NaN is never > lmax */
    }
    if (nan) sample_rest(d, r, c, lmax, amax, true);
    else sample_rest(d, r, c, lmax, amax, false);
}

void mn_cpu_sample(const mn_sample_desc *d, void *work, const mn_par *par) {
    int64_t lo, hi;
    mn_par_range(par, d->n_rows, &lo, &hi);
    cand *c = (cand *)work + (size_t)par->ith * 2 * (size_t)d->V;
    for (int64_t r = lo; r < hi; r++) sample_row(d, (int32_t)r, c);
}
