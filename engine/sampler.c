/* engine/sampler.c — logits to the next token.
 *
 * One call of mn_sampler_sample runs, in this order (see sampler.h):
 *   bias -> penalties -> [logprobs from here] -> greedy | (temperature, top-k, top-p,
 *   min-p, draw).
 * The logits array keeps the biased, penalised logits (never divided by the
 * temperature), so logprobs of the chosen token are read from it afterwards.
 *
 * Speed matters at vocab 150k: nothing here sorts the whole vocabulary unless the
 * parameters force it.
 *   - top_k set: a k-heap over the logits (quickselect for k > 4096), sort only k.
 *   - min_p set: every survivor has l >= l_max + T*log(min_p), so one O(V) pass keeps
 *     only those (survivors are a prefix of the sorted order).
 *   - top_p without top_k: top-p's mass is measured against the full normaliser Z (one
 *     O(V) pass of exp); the cut is found by bucketing weights (a histogram over
 *     (l_max - l)/T), so only the one bucket holding the cut is sorted. Draws need no
 *     order, so the kept set stays unsorted.
 *   - nothing: draw straight from the unsorted softmax.
 * Candidates are ordered by (logit descending, id ascending), a strict total order, so
 * ties break toward the lowest id everywhere, and results never depend on the
 * quickselect's pivots.
 *
 * Penalty bookkeeping: counts[v] holds how often token v occurs in the window; a ring
 * of the last repeat_last_n tokens lets the oldest leave it. With repeat_last_n == -1
 * nothing leaves, and a list of distinct tokens seen stands in for the ring.
 */
#include "engine/sampler.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"

typedef struct mn__cand { float logit; int32_t id; } mn__cand;

struct mn_sampler {
    mn_sampling_params p;
    mn_logit_bias *bias;       /* own copy of p.bias */
    int32_t n_vocab;
    uint64_t rng[4];           /* xoshiro256** state */
    int32_t *counts;           /* [n_vocab] occurrences inside the window */
    int32_t *ring;             /* window > 0: [window] last tokens; window < 0: distinct tokens */
    int64_t ring_cap, ring_len, ring_pos;
    mn__cand *cand;            /* [n_vocab] scratch */
};

/* ---- parameters -------------------------------------------------------------------- */

mn_sampling_params mn_sampling_defaults(void) {
    mn_sampling_params p;
    memset(&p, 0, sizeof p);
    p.temperature = 0.8f;
    p.top_k = 40;
    p.top_p = 0.95f;
    p.min_p = 0.05f;
    p.repeat_penalty = 1.0f;
    p.repeat_last_n = 64;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    p.seed = 0;
    return p;
}

/* in_range also rejects NaN, which fails every comparison */
static bool in_range(float v, float lo, float hi) { return v >= lo && v <= hi; }

mn_err mn_sampling_validate(const mn_sampling_params *p, int32_t n_vocab, mn_errbuf *eb) {
    if (!p) return mn_errf(eb, MN_EINVALID, "sampling params: NULL");
    if (n_vocab <= 0) return mn_errf(eb, MN_EINVALID, "n_vocab must be > 0, got %d", (int)n_vocab);
    if (!in_range(p->temperature, 0.0f, 100.0f))
        return mn_errf(eb, MN_ERANGE, "temperature must be in [0, 100], got %g", (double)p->temperature);
    if (p->top_k < 0) return mn_errf(eb, MN_ERANGE, "top_k must be >= 0 (0: off), got %d", (int)p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return mn_errf(eb, MN_ERANGE, "top_p must be in (0, 1], got %g", (double)p->top_p);
    if (!in_range(p->min_p, 0.0f, 1.0f))
        return mn_errf(eb, MN_ERANGE, "min_p must be in [0, 1], got %g", (double)p->min_p);
    if (!(p->repeat_penalty > 0.0f && p->repeat_penalty <= 100.0f))
        return mn_errf(eb, MN_ERANGE, "repeat_penalty must be in (0, 100], got %g", (double)p->repeat_penalty);
    if (p->repeat_last_n < -1)
        return mn_errf(eb, MN_ERANGE, "repeat_last_n must be >= -1 (-1: whole history, 0: off), got %d",
                       (int)p->repeat_last_n);
    if (!in_range(p->frequency_penalty, -2.0f, 2.0f))
        return mn_errf(eb, MN_ERANGE, "frequency_penalty must be in [-2, 2], got %g", (double)p->frequency_penalty);
    if (!in_range(p->presence_penalty, -2.0f, 2.0f))
        return mn_errf(eb, MN_ERANGE, "presence_penalty must be in [-2, 2], got %g", (double)p->presence_penalty);
    if (p->n_bias < 0) return mn_errf(eb, MN_ERANGE, "n_bias must be >= 0, got %d", (int)p->n_bias);
    if (p->n_bias > 0 && !p->bias) return mn_errf(eb, MN_EINVALID, "bias: NULL with n_bias %d", (int)p->n_bias);
    for (int32_t i = 0; i < p->n_bias; i++) {
        if (p->bias[i].token < 0 || p->bias[i].token >= n_vocab)
            return mn_errf(eb, MN_ERANGE, "logit_bias[%d].token must be in [0, %d), got %d", (int)i,
                           (int)n_vocab, (int)p->bias[i].token);
        if (!in_range(p->bias[i].bias, -100.0f, 100.0f))
            return mn_errf(eb, MN_ERANGE, "logit_bias[%d].bias (token %d) must be in [-100, 100], got %g",
                           (int)i, (int)p->bias[i].token, (double)p->bias[i].bias);
    }
    if (p->n_logprobs < 0 || p->n_logprobs > 20)
        return mn_errf(eb, MN_ERANGE, "n_logprobs must be in [0, 20], got %d", (int)p->n_logprobs);
    return MN_OK;
}

/* ---- RNG: xoshiro256** seeded through splitmix64 ----------------------------------- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(uint64_t s[4]) {
    uint64_t r = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

/* uniform in [0, 1) with 53 random bits */
static double rng_uniform(uint64_t s[4]) { return (double)(xoshiro_next(s) >> 11) * (1.0 / 9007199254740992.0); }

void mn_sampler_get_rng(const mn_sampler *s, uint64_t state[4]) { memcpy(state, s->rng, sizeof s->rng); }
void mn_sampler_set_rng(mn_sampler *s, const uint64_t state[4]) { memcpy(s->rng, state, sizeof s->rng); }

/* ---- life cycle ---------------------------------------------------------------------- */

mn_err mn_sampler_new(const mn_sampling_params *p, int32_t n_vocab, mn_sampler **out, mn_errbuf *eb) {
    *out = NULL;
    mn_err e = mn_sampling_validate(p, n_vocab, eb);
    if (e) return e;
    mn_sampler *s = mn_calloc(1, sizeof *s);
    if (!s) return mn_errf(eb, MN_ENOMEM, "sampler: out of memory");
    s->p = *p;
    s->n_vocab = n_vocab;
    s->counts = mn_calloc((size_t)n_vocab, sizeof *s->counts);
    s->cand = mn_malloc((size_t)n_vocab * sizeof *s->cand);
    if (p->n_bias > 0) {
        s->bias = mn_malloc((size_t)p->n_bias * sizeof *s->bias);
        if (s->bias) memcpy(s->bias, p->bias, (size_t)p->n_bias * sizeof *s->bias);
    }
    s->p.bias = s->bias;
    s->ring_cap = p->repeat_last_n > 0 ? p->repeat_last_n : (p->repeat_last_n < 0 ? 64 : 0);
    if (s->ring_cap) s->ring = mn_malloc((size_t)s->ring_cap * sizeof *s->ring);
    if (!s->counts || !s->cand || (p->n_bias > 0 && !s->bias) || (s->ring_cap && !s->ring)) {
        mn_sampler_free(s);
        return mn_errf(eb, MN_ENOMEM, "sampler: out of memory for vocab %d", (int)n_vocab);
    }
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
    *out = s;
    return MN_OK;
}

void mn_sampler_free(mn_sampler *s) {
    if (!s) return;
    mn_free(s->bias);
    mn_free(s->counts);
    mn_free(s->ring);
    mn_free(s->cand);
    mn_free(s);
}

void mn_sampler_accept(mn_sampler *s, int32_t token) {
    if (token < 0 || token >= s->n_vocab || s->p.repeat_last_n == 0) return;
    if (s->p.repeat_last_n > 0) {
        if (s->ring_len == s->ring_cap) {            /* the oldest leaves the window */
            s->counts[s->ring[s->ring_pos]]--;
        } else {
            s->ring_len++;
        }
        s->ring[s->ring_pos] = token;
        s->ring_pos = (s->ring_pos + 1) % s->ring_cap;
        s->counts[token]++;
        return;
    }
    /* whole history: remember each distinct token once */
    if (s->counts[token]++ > 0) return;
    if (s->ring_len == s->ring_cap) {
        int32_t *r = mn_realloc(s->ring, (size_t)s->ring_cap * 2 * sizeof *r);
        if (!r) { s->counts[token]--; return; }      /* penalty for this token lost; never a crash */
        s->ring = r;
        s->ring_cap *= 2;
    }
    s->ring[s->ring_len++] = token;
}

/* ---- the pipeline ---------------------------------------------------------------------- */

static void apply_penalties(mn_sampler *s, float *logits) {
    const mn_sampling_params *p = &s->p;
    bool rep = p->repeat_penalty != 1.0f;
    if (!rep && p->frequency_penalty == 0.0f && p->presence_penalty == 0.0f) return;
    /* each distinct token once: its count is negated while visited, restored after */
    for (int64_t i = 0; i < s->ring_len; i++) {
        int32_t t = s->ring[i];
        int32_t c = s->counts[t];
        if (c <= 0) continue;
        float l = logits[t];
        if (rep) l = l > 0.0f ? l / p->repeat_penalty : l * p->repeat_penalty;
        l -= (float)c * p->frequency_penalty + p->presence_penalty;
        logits[t] = l;
        s->counts[t] = -c;
    }
    for (int64_t i = 0; i < s->ring_len; i++) {
        int32_t t = s->ring[i];
        if (s->counts[t] < 0) s->counts[t] = -s->counts[t];
    }
}

/* a before b in the candidate order: higher logit, then lower id */
static inline bool cand_before(mn__cand a, mn__cand b) {
    return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

static void cand_swap(mn__cand *a, mn__cand *b) { mn__cand t = *a; *a = *b; *b = t; }

/* Rearrange c[0..n) so that its first k are the k best (in any order). */
static void cand_select(mn__cand *c, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    uint64_t r = 0x2545F4914F6CDD1Dull;    /* fixed pivot stream: deterministic run time */
    while (lo < hi) {
        r ^= r << 13; r ^= r >> 7; r ^= r << 17;
        int64_t pi = lo + (int64_t)(r % (uint64_t)(hi - lo + 1));
        cand_swap(&c[pi], &c[hi]);
        mn__cand pv = c[hi];
        int64_t st = lo;
        for (int64_t i = lo; i < hi; i++)
            if (cand_before(c[i], pv)) cand_swap(&c[i], &c[st++]);
        cand_swap(&c[st], &c[hi]);
        if (st == k - 1 || st == k) return;
        if (st < k) lo = st + 1; else hi = st - 1;
    }
}

static int cand_cmp(const void *a, const void *b) {
    const mn__cand *x = a, *y = b;
    return cand_before(*x, *y) ? -1 : (cand_before(*y, *x) ? 1 : 0);
}

static void cand_sort(mn__cand *c, int64_t n) { qsort(c, (size_t)n, sizeof *c, cand_cmp); }

/* The k best of logits[0..V) into c[0..k), sorted. A min-heap of the k best so far
 * rejects most tokens with one comparison against its root (about k*ln(V/k) inserts
 * on typical logits), far cheaper than partitioning all V for small k. */
static void top_k_heap(const float *logits, int32_t V, int32_t k, mn__cand *c) {
    /* heap order: c[0] is the worst kept candidate */
    for (int32_t i = 0; i < V; i++) {
        mn__cand x = { logits[i], i };
        int64_t j;
        if (i < k) {
            j = i;                                   /* sift up */
            while (j > 0 && cand_before(c[(j - 1) / 2], x)) { c[j] = c[(j - 1) / 2]; j = (j - 1) / 2; }
            c[j] = x;
            continue;
        }
        if (!cand_before(x, c[0])) continue;
        j = 0;                                       /* replace the root, sift down */
        for (;;) {
            int64_t a = 2 * j + 1, b = a + 1, w = j;
            mn__cand wv = x;
            if (a < k && cand_before(wv, c[a])) { w = a; wv = c[a]; }
            if (b < k && cand_before(wv, c[b])) { w = b; wv = c[b]; }
            if (w == j) break;
            c[j] = c[w];
            j = w;
        }
        c[j] = x;
    }
    cand_sort(c, k);
}

/* Top-p over unsorted candidates c[0..n) whose mass is measured against z (the
 * normaliser of the whole set they came from). Without a full sort: bucket the
 * candidates by (lmax - l)/T, find the bucket where the running mass reaches p*z, keep
 * everything above it unsorted and sort only that bucket to place the exact cut.
 * Returns the new n; c[0..n) is the kept set (in no particular order). */
enum { MN__TOPP_BUCKETS = 4096 };
static int64_t top_p_buckets(mn__cand *c, int64_t n, float lmax, float T, double z, float p) {
    static const double span = 40.0;                 /* weights below e^-40 share the last bucket */
    double mass[MN__TOPP_BUCKETS] = { 0 };
    double scale = MN__TOPP_BUCKETS / span, inv = 1.0 / T;
    for (int64_t i = 0; i < n; i++) {
        double x = ((double)lmax - c[i].logit) * inv;
        int b = x < span ? (int)(x * scale) : MN__TOPP_BUCKETS - 1;
        mass[b] += expf((float)-x);
    }
    double want = (double)p * z, acc = 0.0;
    int bc = 0;
    while (bc < MN__TOPP_BUCKETS && acc + mass[bc] < want) acc += mass[bc++];
    if (bc == MN__TOPP_BUCKETS) return n;            /* rounding: p never reached, keep all */
    /* partition: buckets < bc first, then bucket bc, the rest dropped */
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        double x = ((double)lmax - c[i].logit) * inv;
        int b = x < span ? (int)(x * scale) : MN__TOPP_BUCKETS - 1;
        if (b < bc) cand_swap(&c[i], &c[m++]);
    }
    int64_t t = m;
    for (int64_t i = m; i < n; i++) {
        double x = ((double)lmax - c[i].logit) * inv;
        int b = x < span ? (int)(x * scale) : MN__TOPP_BUCKETS - 1;
        if (b == bc) cand_swap(&c[i], &c[t++]);
    }
    cand_sort(c + m, t - m);
    for (int64_t i = m; i < t; i++) {
        acc += exp(((double)c[i].logit - lmax) * inv);
        if (acc >= want) return i + 1;
    }
    return t;
}

/* Sum over logits of exp((l - lmax) / T) in double; terms below e^-40 are skipped (their
 * total is under 1e-12 of Z even at vocab 1e5). */
static double softmax_z(const float *l, int64_t n, float lmax, float T) {
    double z = 0.0;
    float inv = 1.0f / T, floor_l = lmax - 40.0f * T;
    for (int64_t i = 0; i < n; i++)
        if (l[i] >= floor_l) z += expf((l[i] - lmax) * inv);   /* float exp: 2x faster, 1e-7 rel */
    return z;
}

/* top-n logprobs: a small insertion list, since n <= 20 */
static void fill_top_logprobs(const float *l, int32_t n_vocab, int32_t n, double lse, mn_sample_info *info) {
    mn__cand top[20];
    int32_t m = 0;
    for (int32_t i = 0; i < n_vocab; i++) {
        mn__cand c = { l[i], i };
        if (m == n && !cand_before(c, top[m - 1])) continue;
        int32_t j = m < n ? m++ : m - 1;
        while (j > 0 && cand_before(c, top[j - 1])) { top[j] = top[j - 1]; j--; }
        top[j] = c;
    }
    info->n_top = m;
    for (int32_t i = 0; i < m; i++) {
        info->top[i].token = top[i].id;
        info->top[i].logprob = (float)((double)top[i].logit - lse);
    }
}

/* Draw from c[0..n) with weights exp((l - lmax)/T). */
static int32_t draw(mn_sampler *s, const mn__cand *c, int64_t n, float lmax, float T) {
    float inv = 1.0f / T;
    double z = 0.0;
    for (int64_t i = 0; i < n; i++) z += expf((c[i].logit - lmax) * inv);
    double target = rng_uniform(s->rng) * z, acc = 0.0;
    for (int64_t i = 0; i < n; i++) {
        acc += expf((c[i].logit - lmax) * inv);
        if (acc > target) return c[i].id;
    }
    /* rounding left target past the sum: the last token with any weight */
    for (int64_t i = n - 1; i > 0; i--)
        if (expf((c[i].logit - lmax) * inv) > 0.0f) return c[i].id;
    return c[0].id;
}

/* Length of the shortest prefix of sorted c[0..n) whose mass (against Z) reaches p,
 * or -1 if the whole prefix falls short. */
static int64_t top_p_cut(const mn__cand *c, int64_t n, float lmax, float T, double z, float p) {
    double inv = 1.0 / T, acc = 0.0, want = (double)p * z;
    for (int64_t i = 0; i < n; i++) {
        acc += exp(((double)c[i].logit - lmax) * inv);
        if (acc >= want) return i + 1;
    }
    return -1;
}

int32_t mn_sampler_sample(mn_sampler *s, float *logits, mn_sample_info *info) {
    const mn_sampling_params *p = &s->p;
    const int32_t V = s->n_vocab;

    for (int32_t i = 0; i < p->n_bias; i++) logits[s->bias[i].token] += s->bias[i].bias;
    apply_penalties(s, logits);

    /* NaN would poison every comparison below: it counts as -inf */
    float lmax = -INFINITY;
    int32_t amax = 0;
    for (int32_t i = 0; i < V; i++) {
        float l = logits[i];
        if (l != l) { logits[i] = -INFINITY; continue; }
        if (l > lmax) { lmax = l; amax = i; }
    }

    double lse = 0.0;
    if (info) {
        lse = lmax == -INFINITY ? 0.0 : (double)lmax + log(softmax_z(logits, V, lmax, 1.0f));
        fill_top_logprobs(logits, V, p->n_logprobs, lse, info);
    }

    int32_t chosen = amax;
    float T = p->temperature;
    if (T > 0.0f && lmax > -INFINITY) {
        mn__cand *c = s->cand;
        int64_t n = 0;
        bool use_k = p->top_k > 0 && p->top_k < V;
        bool use_p = p->top_p < 1.0f;
        bool use_min = p->min_p > 0.0f;
        /* min-p's threshold in logit space; -inf when min_p is off */
        float min_l = use_min ? lmax + T * logf(p->min_p) : -INFINITY;

        if (use_k) {
            if (p->top_k <= 4096) {
                top_k_heap(logits, V, p->top_k, c);
            } else {
                for (int32_t i = 0; i < V; i++) { c[i].logit = logits[i]; c[i].id = i; }
                cand_select(c, V, p->top_k);
                cand_sort(c, p->top_k);
            }
            n = p->top_k;
            if (use_p) {
                double z = 0.0;
                for (int64_t i = 0; i < n; i++) z += exp(((double)c[i].logit - lmax) / T);
                int64_t cut = top_p_cut(c, n, lmax, T, z, p->top_p);
                if (cut > 0) n = cut;
            }
            while (n > 1 && c[n - 1].logit < min_l) n--;
        } else if (use_p || use_min) {
            /* min-p survivors are a prefix of the sorted order, so pruning them first
             * and then cutting top-p (against the full Z) inside them is exact */
            for (int32_t i = 0; i < V; i++)
                if (logits[i] >= min_l) { c[n].logit = logits[i]; c[n].id = i; n++; }
            if (use_p) {
                double z = softmax_z(logits, V, lmax, T);
                n = top_p_buckets(c, n, lmax, T, z, p->top_p);
            }
        } else {
            for (int32_t i = 0; i < V; i++) { c[i].logit = logits[i]; c[i].id = i; }
            n = V;
        }
        if (n < 1) n = 1;
        chosen = draw(s, c, n, lmax, T);
    }

    if (info) info->logprob = lmax == -INFINITY ? 0.0f : (float)((double)logits[chosen] - lse);
    return chosen;
}
