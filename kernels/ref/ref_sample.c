/* kernels/ref/ref_sample.c — scalar reference of the sample op (contract: kernels/ops.h).
 *
 * The obvious way: sort the whole vocabulary into the candidate order (qsort), take the
 * prefixes of top-k / top-p / min-p off the sorted list, mark the kept tokens, then walk
 * the ids in ascending order for the draw. Every sum is a plain double loop in the order
 * the contract writes it. It allocates its sort buffer (malloc): the reference runs in
 * tests only, never in the forward path.
 */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

#include "kernels/ops.h"

typedef struct ref_cand { float l; int32_t id; } ref_cand;

/* NaN counts as -inf, -0.0 as +0.0 (the comparisons below already treat them equal) */
static float ref_logit(const float *l, int32_t i) { return l[i] != l[i] ? -INFINITY : l[i]; }

static int ref_cmp(const void *a, const void *b) {
    const ref_cand *x = a, *y = b;
    if (x->l != y->l) return x->l > y->l ? -1 : 1;
    return x->id < y->id ? -1 : (x->id > y->id);
}

static void ref_sample_row(const mn_sample_desc *d, int32_t r, ref_cand *c, bool *kept) {
    const int32_t V = d->V;
    const float *l = d->logits + (int64_t)r * d->logits_stride;
    const mn_sample_params *p = &d->params[r];
    for (int32_t i = 0; i < V; i++) { c[i].l = ref_logit(l, i); c[i].id = i; }
    qsort(c, (size_t)V, sizeof *c, ref_cmp);
    float lmax = c[0].l;
    int32_t amax = c[0].id;

    double lse = 0.0;
    if (lmax > -INFINITY) {
        double z1 = 0.0;
        for (int32_t i = 0; i < V; i++) z1 += expf(ref_logit(l, i) - lmax);
        lse = (double)lmax + log(z1);
    }
    if (d->top_id) {
        int32_t n = p->n_logprobs < V ? p->n_logprobs : V;
        for (int32_t j = 0; j < n; j++) {
            d->top_id[(int64_t)r * MN_SAMPLE_MAX_TOP + j] = c[j].id;
            d->top_logprob[(int64_t)r * MN_SAMPLE_MAX_TOP + j] = (float)((double)c[j].l - lse);
        }
    }

    int32_t chosen = amax;
    float T = p->temperature;
    if (T > 0.0f && lmax > -INFINITY) {
        float invT = 1.0f / T;
        int64_t n = p->top_k > 0 && p->top_k < V ? p->top_k : V;
        if (p->top_p < 1.0f) {
            double zk = 0.0;
            for (int64_t j = 0; j < n; j++) zk += expf((c[j].l - lmax) * invT);
            double want = (double)p->top_p * zk, acc = 0.0;
            for (int64_t j = 0; j < n; j++) {
                acc += expf((c[j].l - lmax) * invT);
                if (acc >= want) { n = j + 1; break; }
            }
        }
        if (p->min_p > 0.0f) {
            float min_l = lmax + T * logf(p->min_p);
            while (n > 1 && c[n - 1].l < min_l) n--;
        }
        for (int32_t i = 0; i < V; i++) kept[i] = false;
        for (int64_t j = 0; j < n; j++) kept[c[j].id] = true;
        double zd = 0.0;
        for (int32_t i = 0; i < V; i++)
            if (kept[i]) zd += expf((ref_logit(l, i) - lmax) * invT);
        double target = p->u * zd, acc = 0.0;
        int32_t last = -1;
        chosen = -1;
        for (int32_t i = 0; i < V && chosen < 0; i++) {
            if (!kept[i]) continue;
            float w = expf((ref_logit(l, i) - lmax) * invT);
            acc += w;
            if (w > 0.0f) last = i;
            if (acc > target) chosen = i;
        }
        if (chosen < 0) chosen = last;
    }
    d->token[r] = chosen;
    if (d->logprob) d->logprob[r] = lmax == -INFINITY ? 0.0f : (float)((double)ref_logit(l, chosen) - lse);
}

void mn_ref_sample(const mn_sample_desc *d) {
    ref_cand *c = malloc((size_t)d->V * sizeof *c);
    bool *kept = malloc((size_t)d->V * sizeof *kept);
    if (c && kept)
        for (int32_t r = 0; r < d->n_rows; r++) ref_sample_row(d, r, c, kept);
    free(c);
    free(kept);
}
