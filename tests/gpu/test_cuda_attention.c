/* tests/gpu/test_cuda_attention.c — CUDA attention at long contexts, its batch invariance,
 * and its decode speed.
 *
 * Each case of `acases` builds a paged pool of four sequences (lengths L, 3L/4+1, L/2+3,
 * 37; blocks shuffled; block_stride = block_size*n_kv_head*head_dim + gap, an odd gap
 * turning off the kernel's paired f16 loads) and a batch of T query tokens:
 *   run  all T tokens are one run of sequence 0 at positions L-T .. L-1 (a prefill chunk
 *        at long context; T = 1 is a plain decode step);
 *   mix  the first ceil(T/2) tokens are such a run, the others single tokens of
 *        sequences 1..3 at positions 0, 255, 256, the last one or random ones.
 * Checked, per case:
 *   1. mn_cuda_attention (split over segments when its scratch applies) against
 *      mn_ref_attention within the ops.h tolerance 1e-4 * max|V| + 1e-5, NaN/inf failing,
 *      and every byte outside the output rows (stride gaps, 64 guard bytes) unchanged;
 *   2. the same call without scratch (each block walks its segments): bit-identical;
 *   3. every token alone (T = 1, its own max_pos and scratch): bit-identical to its row
 *      of the batch — the batch-invariance contract of ops.h.
 * Then timing lines (not checks): decode (one token per sequence, all at the last
 * position) at 8K and 32K positions, batch 1 and 16, llama-8B-like heads (32/8, 128),
 * split and unsplit, with the K/V bytes read per call over the time (GB/s) next to the
 * device's own copy bandwidth (cudaMemcpy device to device, read + write bytes).
 * Called by test_cuda_ops.c's main once a device is known to exist.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/ops_cuda.h"
#include "tests/gpu/gpu_test_util.h"

int gt_attention_long(cudaStream_t s);

enum { NSEQ = 4 };

typedef struct acase {
    int32_t T, L, nh, nkv, hd, bs, gap;
    int mix;
    uint32_t seed;
} acase;

static const acase acases[] = {
    /* decode */
    {1, 2048, 4, 4, 64, 16, 8, 0, 300},    {1, 8192, 16, 4, 128, 16, 8, 0, 301},
    {1, 32768, 32, 4, 128, 16, 8, 0, 302}, {1, 32768, 8, 2, 80, 32, 8, 0, 303},
    /* short appends */
    {5, 2048, 16, 2, 80, 16, 8, 0, 310},   {5, 8192, 4, 4, 128, 7, 3, 0, 311},
    {5, 32768, 8, 2, 64, 16, 8, 0, 312},
    /* prefill chunks at long context */
    {64, 2048, 8, 2, 128, 16, 8, 0, 320},  {64, 8192, 16, 2, 64, 16, 8, 0, 321},
    {64, 32768, 4, 4, 80, 16, 8, 0, 322},  {64, 32768, 8, 1, 128, 16, 8, 0, 323},
    /* mixed batches: a run plus single tokens of other sequences */
    {24, 8192, 8, 2, 128, 16, 8, 1, 330},  {16, 2048, 16, 2, 80, 7, 3, 1, 331},
    {40, 32768, 8, 2, 64, 16, 8, 1, 332},  {9, 1000, 9, 3, 256, 16, 8, 1, 333},
};

/* Host inputs of a case in arena a; the descriptor points at host memory. Returns max|V|. */
static float build_case(gt_arena *a, const acase *c, mn_attention_desc *d, int *out_idx) {
    int32_t L[NSEQ] = {c->L, c->L * 3 / 4 + 1, c->L / 2 + 3, 37 < c->L ? 37 : c->L};
    int32_t nb[NSEQ], total = 3; /* a few spare blocks */
    for (int s = 0; s < NSEQ; s++) {
        nb[s] = (L[s] + c->bs - 1) / c->bs;
        total += nb[s];
    }
    int32_t *perm = gt_shuffled(a, total);
    int32_t *indptr = gt_host(a, (NSEQ + 1) * sizeof(int32_t), NULL);
    int32_t *indices = gt_host(a, (size_t)(total - 3) * sizeof(int32_t), NULL);
    for (int s = 0; s < NSEQ; s++) {
        indptr[s + 1] = indptr[s] + nb[s];
        for (int32_t b = 0; b < nb[s]; b++) indices[indptr[s] + b] = perm[indptr[s] + b];
    }
    memset(d, 0, sizeof *d);
    d->kv.block_size = c->bs;
    d->kv.n_kv_head = c->nkv;
    d->kv.head_dim = c->hd;
    d->kv.block_stride = (int64_t)c->bs * c->nkv * c->hd + c->gap;
    size_t half = (size_t)total * (size_t)d->kv.block_stride;
    uint16_t *pool = gt_host(a, 2 * half * sizeof(uint16_t), NULL);
    memset(pool, 0xff, 2 * half * sizeof(uint16_t)); /* free slots are NaN */
    d->kv.k = pool;
    d->kv.v = pool + half;
    d->kv.block_indptr = indptr;
    d->kv.block_indices = indices;
    float vmax = 0.0f;
    for (int s = 0; s < NSEQ; s++)
        for (int32_t p = 0; p < L[s]; p++)
            for (int32_t h = 0; h < c->nkv; h++) {
                int64_t off = mn_kv_offset(&d->kv, s, p, h);
                for (int32_t i = 0; i < c->hd; i++) {
                    d->kv.k[off + i] = mn_fp32_to_fp16(gt_unif(-1, 1));
                    d->kv.v[off + i] = mn_fp32_to_fp16(gt_unif(-2, 2));
                    vmax = fmaxf(vmax, fabsf(mn_fp16_to_fp32(d->kv.v[off + i])));
                }
            }
    d->T = c->T;
    d->n_head = c->nh;
    d->n_kv_head = c->nkv;
    d->head_dim = c->hd;
    d->scale = 1.0f / sqrtf((float)c->hd);
    d->q_stride = (int64_t)c->nh * c->hd + 4;
    d->q = gt_matrix(a, c->T, (int64_t)c->nh * c->hd, d->q_stride, -3, 3, NULL);
    int32_t *seq = gt_host(a, (size_t)c->T * sizeof(int32_t), NULL);
    int32_t *pos = gt_host(a, (size_t)c->T * sizeof(int32_t), NULL);
    int32_t run = c->mix ? (c->T + 1) / 2 : c->T;
    for (int32_t t = 0; t < c->T; t++) {
        if (t < run) {
            seq[t] = 0;
            pos[t] = L[0] - run + t;
            continue;
        }
        int32_t s = 1 + (t - run) % (NSEQ - 1);
        static const int32_t fixed[] = {0, 255, 256};
        int32_t k = (t - run) / (NSEQ - 1);
        int32_t p = k < 3 ? fixed[k] : (k == 3 ? L[s] - 1 : gt_rnd_int(L[s]));
        seq[t] = s;
        pos[t] = p < L[s] ? p : L[s] - 1;
    }
    d->seq = seq;
    d->pos = pos;
    for (int32_t t = 0; t < c->T; t++) d->max_pos = pos[t] + 1 > d->max_pos ? pos[t] + 1 : d->max_pos;
    d->out_stride = (int64_t)c->nh * c->hd + 3;
    d->out = gt_out(a, c->T, (int64_t)c->nh * c->hd, d->out_stride, out_idx);
    return vmax;
}

static void to_dev(gt_arena *a, mn_attention_desc *d) {
    d->q = gt_dev_of(a, d->q);
    d->seq = gt_dev_of(a, d->seq);
    d->pos = gt_dev_of(a, d->pos);
    d->out = gt_dev_of(a, d->out);
    d->kv.k = gt_dev_of(a, d->kv.k);
    d->kv.v = gt_dev_of(a, d->kv.v);
    d->kv.block_indptr = gt_dev_of(a, d->kv.block_indptr);
    d->kv.block_indices = gt_dev_of(a, d->kv.block_indices);
}

/* Run d (device pointers) into the output allocation dev_out (reset to init first) and
 * copy the allocation back into got. */
static int run_into(const mn_attention_desc *d, void *work, size_t work_bytes, void *dev_out, const uint8_t *init,
                    uint8_t *got, size_t bytes, cudaStream_t s, char *why, size_t why_len) {
    mn_errbuf eb = {{0}};
    if (cudaMemcpy(dev_out, init, bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
        snprintf(why, why_len, "resetting the output failed");
        return 0;
    }
    mn_err e = mn_cuda_attention(d, work, work_bytes, s, &eb);
    cudaError_t ce = cudaStreamSynchronize(s);
    if (e == MN_OK && ce == cudaSuccess) ce = cudaMemcpy(got, dev_out, bytes, cudaMemcpyDeviceToHost);
    if (e != MN_OK || ce != cudaSuccess) {
        snprintf(why, why_len, "%s", e != MN_OK ? eb.msg : cudaGetErrorString(ce));
        return 0;
    }
    return 1;
}

/* First float index where a and b differ, or -1. */
static int64_t first_diff(const uint8_t *a, const uint8_t *b, size_t bytes) {
    for (size_t i = 0; i < bytes; i++)
        if (a[i] != b[i]) return (int64_t)(i / 4);
    return -1;
}

static int run_acase(const acase *c, cudaStream_t s) {
    gt_arena a;
    gt_arena_init(&a);
    gt_seed(c->seed);
    mn_attention_desc d;
    int oi;
    float vmax = build_case(&a, c, &d, &oi);
    const size_t bytes = a.bytes[oi];
    const double tol = 1e-4 * vmax + 1e-5;
    uint8_t *init = malloc(bytes), *split = malloc(bytes), *other = malloc(bytes);
    char why[640] = "";
    int ok = 0, split_used = 0;
    double worst = 0.0;
    void *work = NULL;
    mn_errbuf eb = {{0}};
    mn_attention_desc dd = d;
    /* scratch: enough for the batch and for any of its tokens alone */
    size_t work_bytes = mn_cuda_attention_work_bytes(&d);
    for (int32_t t = 0; t < c->T; t++) {
        mn_attention_desc one = d;
        one.T = 1;
        one.max_pos = d.pos[t] + 1;
        size_t w = mn_cuda_attention_work_bytes(&one);
        if (w > work_bytes) work_bytes = w;
    }
    if (!init || !split || !other) {
        snprintf(why, sizeof why, "out of host memory");
        goto done;
    }
    memcpy(init, a.host[oi], bytes);
    if (gt_upload(&a, &eb) != MN_OK || (work_bytes && cudaMalloc(&work, work_bytes) != cudaSuccess)) {
        snprintf(why, sizeof why, "upload: %s", eb.msg[0] ? eb.msg : "cudaMalloc of scratch failed");
        goto done;
    }
    to_dev(&a, &dd);
    mn_ref_attention(&d);
    const uint8_t *want = a.host[oi];
    split_used = mn_cuda_attention_work_bytes(&d) > 0;

    /* 1. against the reference */
    if (!run_into(&dd, work, work_bytes, a.dev[oi], init, split, bytes, s, why, sizeof why)) goto done;
    const int64_t cols = (int64_t)c->nh * c->hd;
    for (size_t i = 0; i + 4 <= bytes; i += 4) {
        int64_t e = (int64_t)(i / 4), r = e / d.out_stride, col = e % d.out_stride;
        float g, w;
        memcpy(&g, split + i, 4);
        memcpy(&w, want + i, 4);
        if (r >= c->T || col >= cols) {
            if (memcmp(split + i, init + i, 4) != 0) {
                snprintf(why, sizeof why, "wrote outside the output at float %lld", (long long)e);
                goto done;
            }
            continue;
        }
        double err = fabs((double)g - (double)w);
        if (!isfinite(g) || !(err <= tol)) {
            snprintf(why, sizeof why, "token %lld (seq %d pos %d) col %lld: got %.9g want %.9g (tol %.3g)", (long long)r,
                     d.seq[r], d.pos[r], (long long)col, g, w, tol);
            goto done;
        }
        if (err > worst) worst = err;
    }
    for (size_t i = (bytes / 4) * 4; i < bytes; i++)
        if (split[i] != init[i]) {
            snprintf(why, sizeof why, "wrote into the guard bytes");
            goto done;
        }

    /* 2. without scratch: each block folds its own segments */
    if (!run_into(&dd, NULL, 0, a.dev[oi], init, other, bytes, s, why, sizeof why)) goto done;
    int64_t f = first_diff(split, other, bytes);
    if (f >= 0) {
        snprintf(why, sizeof why, "unsplit differs from split at token %lld col %lld", (long long)(f / d.out_stride),
                 (long long)(f % d.out_stride));
        goto done;
    }

    /* 3. every token alone */
    if (cudaMemcpy(a.dev[oi], init, bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
        snprintf(why, sizeof why, "resetting the output failed");
        goto done;
    }
    for (int32_t t = 0; t < c->T; t++) {
        mn_attention_desc one = dd;
        one.T = 1;
        one.q = dd.q + (int64_t)t * dd.q_stride;
        one.seq = dd.seq + t;
        one.pos = dd.pos + t;
        one.out = dd.out + (int64_t)t * dd.out_stride;
        one.max_pos = d.pos[t] + 1;
        if (mn_cuda_attention(&one, work, work_bytes, s, &eb) != MN_OK) {
            snprintf(why, sizeof why, "token %d alone: %s", t, eb.msg);
            goto done;
        }
    }
    cudaError_t ce = cudaStreamSynchronize(s);
    if (ce == cudaSuccess) ce = cudaMemcpy(other, a.dev[oi], bytes, cudaMemcpyDeviceToHost);
    if (ce != cudaSuccess) {
        snprintf(why, sizeof why, "tokens alone: %s", cudaGetErrorString(ce));
        goto done;
    }
    f = first_diff(split, other, bytes);
    if (f >= 0) {
        int64_t r = f / d.out_stride;
        snprintf(why, sizeof why, "token %lld (seq %d pos %d) alone differs from its batch row at col %lld", (long long)r,
                 r < c->T ? d.seq[r] : -1, r < c->T ? d.pos[r] : -1, (long long)(f % d.out_stride));
        goto done;
    }
    ok = 1;
done:;
    char shape[96];
    snprintf(shape, sizeof shape, "T=%d L=%d h=%d/%d hd=%d bs=%d%s%s", c->T, c->L, c->nh, c->nkv, c->hd, c->bs,
             c->mix ? " mix" : "", c->gap % 2 ? " odd-stride" : "");
    if (ok)
        printf("attn-long %-50s err=%-8.2g r=%-5.3f %s, =unsplit, =alone  ok\n", shape, worst, worst / tol,
               split_used ? "split" : "unsplit");
    else
        printf("attn-long %-50s FAIL: %s\n", shape, why);
    if (work) cudaFree(work);
    free(init);
    free(split);
    free(other);
    gt_arena_free(&a);
    return ok;
}

/* Device-to-device copy bandwidth (read + write bytes per second), the yardstick for the
 * attention decode lines and the GEMV timing lines (test_cuda_gemv.c); 0 if it cannot be
 * measured. */
double gt_copy_gbps(cudaStream_t s) {
    const size_t n = (size_t)1 << 30;
    void *src = NULL, *dst = NULL;
    double gbps = 0.0;
    cudaEvent_t e0 = NULL, e1 = NULL;
    if (cudaMalloc(&src, n) != cudaSuccess || cudaMalloc(&dst, n) != cudaSuccess) goto out;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, s); /* warm up */
    cudaEventRecord(e0, s);
    for (int r = 0; r < 5; r++) cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, s);
    cudaEventRecord(e1, s);
    float ms = 0;
    if (cudaEventSynchronize(e1) == cudaSuccess && cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess && ms > 0)
        gbps = 2.0 * 5.0 * (double)n / (ms * 1e-3) / 1e9;
out:
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(src);
    cudaFree(dst);
    cudaGetLastError();
    return gbps;
}

/* Decode timing: B sequences of L positions each (contiguous blocks of 16), one token per
 * sequence at position L-1. K/V and q are constant bytes (cudaMemset): the time does not
 * depend on the values. Returns 0 if the output was not finite. */
static int time_decode(int32_t B, int32_t L, double copy, cudaStream_t s) {
    const int32_t nh = 32, nkv = 8, hd = 128, bs = 16;
    const int32_t nb = (L + bs - 1) / bs;
    mn_attention_desc d = {0};
    d.T = B;
    d.n_head = nh;
    d.n_kv_head = nkv;
    d.head_dim = hd;
    d.scale = 1.0f / sqrtf((float)hd);
    d.q_stride = d.out_stride = (int64_t)nh * hd;
    d.max_pos = L;
    d.kv.block_size = bs;
    d.kv.n_kv_head = nkv;
    d.kv.head_dim = hd;
    d.kv.block_stride = (int64_t)bs * nkv * hd;
    size_t half = (size_t)B * nb * (size_t)d.kv.block_stride;
    int32_t *h_meta = malloc(sizeof(int32_t) * (size_t)(2 * B + B + 1 + B * nb));
    void *pool = NULL, *q = NULL, *out = NULL, *meta = NULL, *work = NULL;
    size_t work_bytes = mn_cuda_attention_work_bytes(&d);
    int ok = 0;
    char why[640] = "";
    mn_errbuf eb = {{0}};
    if (!h_meta) {
        snprintf(why, sizeof why, "out of host memory");
        goto done;
    }
    int32_t *seq = h_meta, *pos = seq + B, *indptr = pos + B, *indices = indptr + B + 1;
    for (int32_t b = 0; b < B; b++) {
        seq[b] = b;
        pos[b] = L - 1;
        indptr[b] = b * nb;
    }
    indptr[B] = B * nb;
    for (int32_t i = 0; i < B * nb; i++) indices[i] = i;
    size_t meta_bytes = sizeof(int32_t) * (size_t)(2 * B + B + 1 + B * nb);
    if (cudaMalloc(&pool, 2 * half * sizeof(uint16_t)) != cudaSuccess ||
        cudaMalloc(&q, (size_t)B * nh * hd * sizeof(float)) != cudaSuccess ||
        cudaMalloc(&out, (size_t)B * nh * hd * sizeof(float)) != cudaSuccess ||
        cudaMalloc(&meta, meta_bytes) != cudaSuccess || (work_bytes && cudaMalloc(&work, work_bytes) != cudaSuccess) ||
        cudaMemset(pool, 0x3c, 2 * half * sizeof(uint16_t)) != cudaSuccess || /* f16 0x3c3c = 1.06 */
        cudaMemset(q, 0, (size_t)B * nh * hd * sizeof(float)) != cudaSuccess ||
        cudaMemcpy(meta, h_meta, meta_bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
        snprintf(why, sizeof why, "device memory: %s", cudaGetErrorString(cudaGetLastError()));
        goto done;
    }
    d.kv.k = pool;
    d.kv.v = (uint16_t *)pool + half;
    d.q = q;
    d.out = out;
    d.seq = (int32_t *)meta;
    d.pos = d.seq + B;
    d.kv.block_indptr = d.pos + B;
    d.kv.block_indices = d.kv.block_indptr + B + 1;
    const double kv_bytes = 2.0 * B * (double)L * nkv * hd * sizeof(uint16_t);
    double us[2] = {0, 0};
    for (int v = 0; v < 2; v++) { /* 0: split (as the backend runs it), 1: unsplit */
        void *w = v == 0 ? work : NULL;
        size_t wb = v == 0 ? work_bytes : 0;
        cudaEvent_t e0, e1;
        cudaEventCreate(&e0);
        cudaEventCreate(&e1);
        mn_err e = mn_cuda_attention(&d, w, wb, s, &eb);
        cudaEventRecord(e0, s);
        for (int r = 0; r < 20 && e == MN_OK; r++) e = mn_cuda_attention(&d, w, wb, s, &eb);
        cudaEventRecord(e1, s);
        cudaError_t ce = cudaEventSynchronize(e1);
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
        if (e != MN_OK || ce != cudaSuccess) {
            snprintf(why, sizeof why, "%s", e != MN_OK ? eb.msg : cudaGetErrorString(ce));
            goto done;
        }
        us[v] = ms * 1e3 / 20.0;
    }
    float o[4];
    if (cudaMemcpy(o, out, sizeof o, cudaMemcpyDeviceToHost) != cudaSuccess || !isfinite(o[0]) || !isfinite(o[3])) {
        snprintf(why, sizeof why, "output not finite");
        goto done;
    }
    ok = 1;
    printf("attn-decode B=%-2d ctx=%-5d h=32/8 hd=128  K/V %7.1f MB  split %8.1f us %7.1f GB/s%s  unsplit %8.1f us %7.1f GB/s",
           B, L, kv_bytes / 1e6, us[0], kv_bytes / (us[0] * 1e-6) / 1e9, work_bytes ? "" : "(n/a)", us[1],
           kv_bytes / (us[1] * 1e-6) / 1e9);
    if (copy > 0) printf("  (d2d copy %.0f GB/s)", copy);
    printf("\n");
done:
    if (!ok) printf("attn-decode B=%d ctx=%d FAIL: %s\n", B, L, why);
    cudaFree(pool);
    cudaFree(q);
    cudaFree(out);
    cudaFree(meta);
    cudaFree(work);
    free(h_meta);
    return ok;
}

/* Returns 1 if every case passed (timing lines are not checks, but a failing launch is). */
int gt_attention_long(cudaStream_t s) {
    int n = (int)(sizeof acases / sizeof acases[0]), pass = 0;
    for (int i = 0; i < n; i++) pass += run_acase(&acases[i], s);
    printf("attention long-context: %d/%d passed\n", pass, n);
    double copy = gt_copy_gbps(s);
    int timed = 1;
    static const int32_t ctx[2] = {8192, 32768}, batch[2] = {1, 16};
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) timed &= time_decode(batch[j], ctx[i], copy, s);
    return pass == n && timed;
}
