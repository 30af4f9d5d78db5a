/* kernels/cuda/sample_block.cuh — one block's work in the sample op (contract: kernels/ops.h
 * mn_sample_desc), the source the device kernel of kernels/cuda/sample.cu runs, and that
 * tests/unit/test_sample_block.cu runs on the host with a block of host threads in
 * lockstep (no GPU needed).
 *
 * Every function is a template over the block B, which gives B::tid() (0 .. n-1),
 * B::n() (a power of two, 32 .. MN__SMP_MAX_THREADS), B::sync() (__syncthreads) and
 * B::atomic_add(double *, double) on the shared area. Reductions go through shared memory
 * only (no warp shuffles), so the host block needs nothing but a barrier and a lock.
 *
 * One row, no sort of the vocabulary:
 *   1. lmax / amax: a block reduction in the candidate order (logit desc, id asc); the
 *      top-n logprobs are n more such reductions, each over the tokens after the last.
 *   2. top-k: a radix select over the logits' order-preserving 32-bit keys, 8 bits per
 *      pass, a 256-bin histogram of counts per pass (shared memory, one per warp, summed
 *      after): after 4 passes the k-th key is known exactly; among tokens of that key the
 *      lowest ids are taken (a block scan of per-thread tie counts over contiguous ids).
 *   3. top-p: the same select with the bins holding weight mass (double) instead of
 *      counts, over the top-k set, against top_p * Zk: the cut's key, then its id.
 *   4. min-p: a plain logit threshold; the draw: each thread sums the kept weights of its
 *      contiguous id range (double), a block scan of those sums gives Zd and the thread
 *      whose range holds u * Zd, which walks its range in id order.
 * The kept set is "at or before the threshold (l*, id*) in the candidate order, and
 * l >= min_l or the first token": no candidate list is ever materialised. CUDA C++ only.
 */
#ifndef MN_KERNELS_CUDA_SAMPLE_BLOCK_CUH
#define MN_KERNELS_CUDA_SAMPLE_BLOCK_CUH

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/ops.h"

#define MN__SMP_MAX_THREADS 512
#define MN__SMP_BINS 256
/* The select, top-p and draw passes load MN__SMP_BATCH of a thread's logits before using
 * any: one block serves a row, and a pass that waited on each load in turn was
 * latency-bound (H200, V = 128256, the default parameters: 798 -> 666 us a row). Each
 * thread still takes its elements in the same order, so nothing else changes. One block
 * a row is the real limit: a multi-block select is the next step. */
#define MN__SMP_BATCH 8

/* The block's shared area (about 42 KiB). */
struct mn__smp_smem {
    double d[MN__SMP_MAX_THREADS];   /* sums and scans */
    float f[MN__SMP_MAX_THREADS];    /* argmax: logit */
    int32_t i[MN__SMP_MAX_THREADS];  /* argmax: id; int reductions */
    double hist[MN__SMP_BINS];
    double whist[MN__SMP_MAX_THREADS / 32][MN__SMP_BINS];   /* one histogram per warp */
    uint32_t prefix;                 /* select: broadcast from thread 0 */
    int32_t found;
    double above;
    int64_t need;
    float thr_l;                     /* select / draw results */
    int32_t thr_id;
};

__host__ __device__ inline float mn__smp_load(const float *l, int64_t i) {
    float x = l[i];
    return x != x ? -INFINITY : x;   /* NaN counts as -inf */
}

/* (al, ai) strictly before (bl, bi) in the candidate order */
__host__ __device__ inline bool mn__smp_before(float al, int32_t ai, float bl, int32_t bi) {
    return al > bl || (al == bl && ai < bi);
}

/* Order-preserving key: a > b as floats <=> key(a) > key(b); -0.0 maps to +0.0's key. */
__host__ __device__ inline uint32_t mn__smp_key(float l) {
    if (l == 0.0f) l = 0.0f;
    uint32_t u;
    memcpy(&u, &l, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__host__ __device__ inline float mn__smp_unkey(uint32_t k) {
    uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float l;
    memcpy(&l, &u, 4);
    return l;
}

#pragma nv_exec_check_disable
template <class B>
__host__ __device__ inline double mn__smp_sum(double v, mn__smp_smem *sh, const B &b) {
    int t = b.tid();
    sh->d[t] = v;
    b.sync();
    for (int s = b.n() / 2; s > 0; s >>= 1) {
        if (t < s) sh->d[t] += sh->d[t + s];
        b.sync();
    }
    double r = sh->d[0];
    b.sync();
    return r;
}

/* min (want_max false) or max of v over the block */
#pragma nv_exec_check_disable
template <class B>
__host__ __device__ inline int32_t mn__smp_minmax(int32_t v, bool want_max, mn__smp_smem *sh, const B &b) {
    int t = b.tid();
    sh->i[t] = v;
    b.sync();
    for (int s = b.n() / 2; s > 0; s >>= 1) {
        if (t < s) {
            int32_t o = sh->i[t + s];
            if (want_max ? o > sh->i[t] : o < sh->i[t]) sh->i[t] = o;
        }
        b.sync();
    }
    int32_t r = sh->i[0];
    b.sync();
    return r;
}

/* Inclusive scan of v over thread order (Hillis-Steele); *excl is the previous thread's
 * inclusive value (exactly), *total the last thread's. */
#pragma nv_exec_check_disable
template <class B>
__host__ __device__ inline double mn__smp_scan(double v, double *excl, double *total, mn__smp_smem *sh, const B &b) {
    int t = b.tid(), n = b.n();
    sh->d[t] = v;
    b.sync();
    for (int off = 1; off < n; off <<= 1) {
        double x = t >= off ? sh->d[t - off] : 0.0;
        b.sync();
        if (t >= off) sh->d[t] += x;
        b.sync();
    }
    double incl = sh->d[t];
    *excl = t ? sh->d[t - 1] : 0.0;
    *total = sh->d[n - 1];
    b.sync();
    return incl;
}

/* The first token in the candidate order strictly after (pl, pid) (has_prev false: the
 * very first), into (*l, *id) on every thread. */
#pragma nv_exec_check_disable
template <class B>
__host__ __device__ inline void mn__smp_next(const float *lg, int32_t V, bool has_prev, float pl, int32_t pid, float *l,
                                             int32_t *id, mn__smp_smem *sh, const B &b) {
    int t = b.tid();
    float bl = -INFINITY;
    int32_t bi = INT32_MAX;
    /* not batched: measured slower so on the H200 (greedy + 5 logprobs 124 -> 168 us) */
    for (int32_t i = t; i < V; i += b.n()) {
        float x = mn__smp_load(lg, i);
        if (has_prev && !mn__smp_before(pl, pid, x, i)) continue;
        if (mn__smp_before(x, i, bl, bi)) { bl = x; bi = i; }
    }
    sh->f[t] = bl;
    sh->i[t] = bi;
    b.sync();
    for (int s = b.n() / 2; s > 0; s >>= 1) {
        if (t < s && mn__smp_before(sh->f[t + s], sh->i[t + s], sh->f[t], sh->i[t])) {
            sh->f[t] = sh->f[t + s];
            sh->i[t] = sh->i[t + s];
        }
        b.sync();
    }
    *l = sh->f[0];
    *id = sh->i[0];
    b.sync();
}

/* Weight of logit l: the contract's expf((l - lmax) * invT). */
__host__ __device__ inline float mn__smp_w(float l, float lmax, float invT) { return expf((l - lmax) * invT); }

/* In S = the tokens at or before (sl, sid) in the candidate order, the first token (in
 * that order) at which the running sum of weights reaches target: MASS, the weight
 * mn__smp_w; else 1 per token (a count: the target-th token). False (on every thread) if
 * S's total falls short of target. Four radix passes over the keys find the token's
 * key; the ties of that key are then counted in id order. */
#pragma nv_exec_check_disable
template <bool MASS, class B>
__host__ __device__ inline bool mn__smp_select(const float *lg, int32_t V, float sl, int32_t sid, float lmax, float invT,
                                               double target, float *out_l, int32_t *out_id, mn__smp_smem *sh,
                                               const B &b) {
    int t = b.tid(), n = b.n();
    uint32_t prefix = 0, mask = 0;
    double above = 0.0;
    for (int pass = 0; pass < 4; pass++) {
        int shift = 24 - 8 * pass;
        /* Most logits share a few bins (the first pass sees sign and exponent): a bin per
         * warp, and each thread adding up a run of one bin before its atomic, keep the
         * atomics on one address few. */
        int nw = (n + 31) / 32;
        for (int j = t; j < nw * MN__SMP_BINS; j += n) sh->whist[j / MN__SMP_BINS][j % MN__SMP_BINS] = 0.0;
        b.sync();
        double *wh = sh->whist[t / 32];
        int32_t run_bin = -1;
        double run = 0.0;
        for (int32_t i0 = t; i0 < V; i0 += MN__SMP_BATCH * n) {
            float xb[MN__SMP_BATCH];
            for (int u = 0; u < MN__SMP_BATCH; u++) xb[u] = i0 + u * n < V ? mn__smp_load(lg, i0 + u * n) : 0.0f;
            for (int u = 0; u < MN__SMP_BATCH; u++) {
                const int32_t i = i0 + u * n;
                if (i >= V) break;
                const float x = xb[u];
                if (mn__smp_before(sl, sid, x, i)) continue;   /* outside S */
                uint32_t k = mn__smp_key(x);
                if ((k & mask) != prefix) continue;
                int32_t bin = (int32_t)((k >> shift) & 255u);
                double v = MASS ? (double)mn__smp_w(x, lmax, invT) : 1.0;
                if (bin == run_bin) {
                    run += v;
                    continue;
                }
                if (run_bin >= 0) b.atomic_add(&wh[run_bin], run);
                run_bin = bin;
                run = v;
            }
        }
        if (run_bin >= 0) b.atomic_add(&wh[run_bin], run);
        b.sync();
        for (int j = t; j < MN__SMP_BINS; j += n) {
            double h = 0.0;
            for (int w = 0; w < nw; w++) h += sh->whist[w][j];
            sh->hist[j] = h;
        }
        b.sync();
        if (t == 0) {
            int32_t found = 0, low = -1;
            double above0 = above;
            for (int bin = MN__SMP_BINS - 1; bin >= 0; bin--) {
                if (sh->hist[bin] > 0.0) low = bin;
                if (above + sh->hist[bin] >= target) {
                    prefix |= (uint32_t)bin << shift;
                    found = 1;
                    break;
                }
                above += sh->hist[bin];
            }
            /* after pass 0 the target lies in this prefix's range; if the bins (summed in
             * another order) fall short by rounding, it is the range's last token */
            if (!found && pass > 0 && low >= 0) {
                above = above0;
                for (int bin = MN__SMP_BINS - 1; bin > low; bin--) above += sh->hist[bin];
                prefix |= (uint32_t)low << shift;
                found = 1;
            }
            sh->found = found;
            sh->prefix = prefix;
            sh->above = above;
        }
        b.sync();
        int32_t found = sh->found;
        prefix = sh->prefix;
        above = sh->above;
        mask |= 255u << shift;
        b.sync();
        if (!found) return false;
    }
    float kl = mn__smp_unkey(prefix);
    /* ties of key `prefix` inside S, in id order: thread t counts its id range */
    int32_t seg = (V + n - 1) / n, lo = t * seg < V ? t * seg : V, hi = lo + seg < V ? lo + seg : V;
    int32_t cnt = 0;
    for (int32_t i0 = lo; i0 < hi; i0 += MN__SMP_BATCH) {
        float xb[MN__SMP_BATCH];
        for (int u = 0; u < MN__SMP_BATCH; u++) xb[u] = i0 + u < hi ? mn__smp_load(lg, i0 + u) : 0.0f;
        for (int u = 0; u < MN__SMP_BATCH && i0 + u < hi; u++)
            if (mn__smp_key(xb[u]) == prefix && !mn__smp_before(sl, sid, xb[u], i0 + u)) cnt++;
    }
    double excl, total;
    double incl = mn__smp_scan((double)cnt, &excl, &total, sh, b);
    if (t == 0) {
        int64_t nt = (int64_t)total, need;
        if (MASS) {    /* smallest need with above + need * w >= target */
            double w = (double)mn__smp_w(kl, lmax, invT);
            double q = w > 0.0 ? ceil((target - above) / w) : 1.0;
            need = q < 1.0 ? 1 : (q > (double)nt ? nt : (int64_t)q);
            while (need > 1 && above + (double)(need - 1) * w >= target) need--;
            while (need < nt && above + (double)need * w < target) need++;
        } else {
            need = (int64_t)(target - above);
        }
        sh->need = need < 1 ? 1 : need;
    }
    b.sync();
    int64_t need = sh->need;
    if ((double)need > excl && (double)need <= incl) {
        int64_t c = (int64_t)excl;
        for (int32_t i = lo; i < hi; i++) {
            float x = mn__smp_load(lg, i);
            if (mn__smp_key(x) == prefix && !mn__smp_before(sl, sid, x, i) && ++c == need) {
                sh->thr_l = x;
                sh->thr_id = i;
                break;
            }
        }
    }
    b.sync();
    *out_l = sh->thr_l;
    *out_id = sh->thr_id;
    b.sync();
    return true;
}

/* kept: at or before (tl, tid) and (l >= min_l or the first token amax) */
__host__ __device__ inline bool mn__smp_kept(float x, int32_t i, float tl, int32_t tid, float min_l, int32_t amax) {
    return !mn__smp_before(tl, tid, x, i) && (x >= min_l || i == amax);
}

/* The draw over the kept set in id order (contract's walk), the token on every thread. */
#pragma nv_exec_check_disable
template <class B>
__host__ __device__ inline int32_t mn__smp_draw(const float *lg, int32_t V, float tl, int32_t tid, float min_l,
                                                int32_t amax, float lmax, float invT, double u, mn__smp_smem *sh,
                                                const B &b) {
    int t = b.tid(), n = b.n();
    int32_t seg = (V + n - 1) / n, lo = t * seg < V ? t * seg : V, hi = lo + seg < V ? lo + seg : V;
    double s = 0.0;
    for (int32_t i0 = lo; i0 < hi; i0 += MN__SMP_BATCH) {
        float xb[MN__SMP_BATCH];
        for (int u = 0; u < MN__SMP_BATCH; u++) xb[u] = i0 + u < hi ? mn__smp_load(lg, i0 + u) : 0.0f;
        for (int u = 0; u < MN__SMP_BATCH && i0 + u < hi; u++)
            if (mn__smp_kept(xb[u], i0 + u, tl, tid, min_l, amax)) s += mn__smp_w(xb[u], lmax, invT);
    }
    double excl, zd;
    double incl = mn__smp_scan(s, &excl, &zd, sh, b);
    double target = u * zd;
    int32_t first = mn__smp_minmax(incl > target ? t : n, false, sh, b);
    int32_t owner = first < n ? first : mn__smp_minmax(s > 0.0 ? t : -1, true, sh, b);
    if (t == 0) sh->thr_id = amax;
    b.sync();
    if (t == owner) {
        double acc = excl;
        int32_t pick = -1, last = -1;
        for (int32_t i = lo; i < hi; i++) {
            float x = mn__smp_load(lg, i);
            if (!mn__smp_kept(x, i, tl, tid, min_l, amax)) continue;
            float w = mn__smp_w(x, lmax, invT);
            acc += w;
            if (w > 0.0f) last = i;
            if (first < n && acc > target) { pick = i; break; }
        }
        if (pick < 0) pick = last;                     /* rounding: the last with weight */
        if (pick >= 0) sh->thr_id = pick;
    }
    b.sync();
    int32_t r = sh->thr_id;
    b.sync();
    return r;
}

/* Row r of d: the whole op for one row (every thread of the block calls it). */
#pragma nv_exec_check_disable
template <class B>
__host__ __device__ inline void mn__sample_row(const mn_sample_desc &d, int32_t r, mn__smp_smem *sh, const B &b) {
    const int32_t V = d.V;
    const float *lg = d.logits + (int64_t)r * d.logits_stride;
    const mn_sample_params p = d.params[r];
    int t = b.tid();
    float lmax;
    int32_t amax;
    mn__smp_next(lg, V, false, 0.0f, 0, &lmax, &amax, sh, b);

    int32_t n_top = d.top_id ? (p.n_logprobs < V ? p.n_logprobs : V) : 0;
    double lse = 0.0;
    if ((d.logprob || n_top > 0) && lmax > -INFINITY) {
        double z = 0.0;
        for (int32_t i = t; i < V; i += b.n()) z += expf(mn__smp_load(lg, i) - lmax);
        lse = (double)lmax + log(mn__smp_sum(z, sh, b));
    }
    float pl = lmax;
    int32_t pid = amax;
    for (int32_t j = 0; j < n_top; j++) {
        if (j > 0) mn__smp_next(lg, V, true, pl, pid, &pl, &pid, sh, b);
        if (t == 0) {
            d.top_id[(int64_t)r * MN_SAMPLE_MAX_TOP + j] = pid;
            d.top_logprob[(int64_t)r * MN_SAMPLE_MAX_TOP + j] = (float)((double)pl - lse);
        }
    }

    int32_t chosen = amax;
    float T = p.temperature;
    if (T > 0.0f && lmax > -INFINITY) {
        float invT = 1.0f / T;
        float tl = -INFINITY;             /* threshold: everything */
        int32_t tid = INT32_MAX;
        if (p.top_k > 0 && p.top_k < V)
            mn__smp_select<false>(lg, V, -INFINITY, INT32_MAX, lmax, invT, (double)p.top_k, &tl, &tid, sh, b);
        if (p.top_p < 1.0f) {
            double z = 0.0;
            const int32_t n = b.n();
            for (int32_t i0 = t; i0 < V; i0 += MN__SMP_BATCH * n) {
                float xb[MN__SMP_BATCH];
                for (int u = 0; u < MN__SMP_BATCH; u++) xb[u] = i0 + u * n < V ? mn__smp_load(lg, i0 + u * n) : 0.0f;
                for (int u = 0; u < MN__SMP_BATCH && i0 + u * n < V; u++)
                    if (!mn__smp_before(tl, tid, xb[u], i0 + u * n)) z += mn__smp_w(xb[u], lmax, invT);
            }
            double want = (double)p.top_p * mn__smp_sum(z, sh, b);
            float ql;
            int32_t qid;
            if (mn__smp_select<true>(lg, V, tl, tid, lmax, invT, want, &ql, &qid, sh, b)) { tl = ql; tid = qid; }
        }
        float min_l = p.min_p > 0.0f ? lmax + T * logf(p.min_p) : -INFINITY;
        chosen = mn__smp_draw(lg, V, tl, tid, min_l, amax, lmax, invT, p.u, sh, b);
    }
    if (t == 0) {
        d.token[r] = chosen;
        if (d.logprob)
            d.logprob[r] = lmax == -INFINITY ? 0.0f : (float)((double)mn__smp_load(lg, chosen) - lse);
    }
}

#endif
