/* engine/sampler.c — logits to the next token.
 *
 * One call of mn_sampler_sample runs, in this order (see sampler.h):
 *   bias -> penalties (here, on the host, in place) -> the sample op (kernels/ops.h:
 *   logprobs, greedy | temperature, top-k, top-p, min-p, draw), run by mn_cpu_sample on
 *   one row with this sampler's scratch. The sampler's RNG draws the op's u (only when
 *   temperature > 0), so the CPU, CUDA and reference ops pick the same token from the
 *   same logits and RNG state. The logits array keeps the biased, penalised logits.
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
#include "kernels/ops.h"

struct mn_sampler {
    mn_sampling_params p;
    mn_logit_bias *bias;       /* own copy of p.bias */
    int32_t n_vocab;
    uint64_t rng[4];           /* xoshiro256** state */
    int32_t *counts;           /* [n_vocab] occurrences inside the window */
    int32_t *ring;             /* window > 0: [window] last tokens; window < 0: distinct tokens */
    int64_t ring_cap, ring_len, ring_pos;
    void *work;                /* mn_cpu_sample_work_bytes for one row, one thread */
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
    mn_sample_desc wd = { .n_rows = 1, .V = n_vocab };
    s->work = mn_malloc(mn_cpu_sample_work_bytes(&wd, 1));
    if (p->n_bias > 0) {
        s->bias = mn_malloc((size_t)p->n_bias * sizeof *s->bias);
        if (s->bias) memcpy(s->bias, p->bias, (size_t)p->n_bias * sizeof *s->bias);
    }
    s->p.bias = s->bias;
    s->ring_cap = p->repeat_last_n > 0 ? p->repeat_last_n : (p->repeat_last_n < 0 ? 64 : 0);
    if (s->ring_cap) s->ring = mn_malloc((size_t)s->ring_cap * sizeof *s->ring);
    if (!s->counts || !s->work || (p->n_bias > 0 && !s->bias) || (s->ring_cap && !s->ring)) {
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
    mn_free(s->work);
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

/* The op's parameters for one token; draws u (only when the row samples) */
static mn_sample_params op_params(mn_sampler *s, bool want_logprobs) {
    const mn_sampling_params *p = &s->p;
    mn_sample_params sp = {
        .temperature = p->temperature, .top_k = p->top_k, .top_p = p->top_p, .min_p = p->min_p,
        .u = p->temperature > 0.0f ? rng_uniform(s->rng) : 0.0, .n_logprobs = want_logprobs ? p->n_logprobs : 0,
    };
    return sp;
}

bool mn_sampler_op_params(mn_sampler *s, bool want_logprobs, mn_sample_params *out) {
    const mn_sampling_params *p = &s->p;
    /* exactly when apply_penalties would change a logit: it visits the window's tokens */
    bool penalised = s->ring_len > 0 &&
                     (p->repeat_penalty != 1.0f || p->frequency_penalty != 0.0f || p->presence_penalty != 0.0f);
    if (p->n_bias > 0 || penalised) return false;
    *out = op_params(s, want_logprobs);
    return true;
}

void mn_sampler_fill_info(const mn_sampler *s, float logprob, const int32_t *top_id, const float *top_logprob,
                          mn_sample_info *info) {
    info->logprob = logprob;
    info->n_top = s->p.n_logprobs < s->n_vocab ? s->p.n_logprobs : s->n_vocab;
    for (int32_t j = 0; j < info->n_top; j++) {
        info->top[j].token = top_id[j];
        info->top[j].logprob = top_logprob[j];
    }
}

int32_t mn_sampler_sample(mn_sampler *s, float *logits, mn_sample_info *info) {
    const mn_sampling_params *p = &s->p;
    for (int32_t i = 0; i < p->n_bias; i++) logits[s->bias[i].token] += s->bias[i].bias;
    apply_penalties(s, logits);

    /* the rest is the sample op (kernels/ops.h), one row, one thread; u is drawn here,
     * from the sampler's RNG, only when the row samples */
    mn_sample_params sp = op_params(s, info != NULL);
    int32_t token = 0, top_id[MN_SAMPLE_MAX_TOP];
    float logprob = 0.0f, top_lp[MN_SAMPLE_MAX_TOP];
    mn_sample_desc d = {
        .n_rows = 1, .V = s->n_vocab, .logits = logits, .logits_stride = s->n_vocab, .params = &sp,
        .token = &token, .logprob = info ? &logprob : NULL, .top_id = info ? top_id : NULL,
        .top_logprob = info ? top_lp : NULL,
    };
    mn_par par = { 0, 1, NULL, NULL };
    mn_cpu_sample(&d, s->work, &par);
    if (info) mn_sampler_fill_info(s, logprob, top_id, top_lp, info);
    return token;
}
