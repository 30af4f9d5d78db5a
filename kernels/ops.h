/* kernels/ops.h — the ops of the forward pass: one descriptor and one contract per op.
 *
 * Every op exists three times under one name and one contract:
 *   mn_ref_<op>(const desc *)                         kernels/ref/   scalar C, obviously correct
 *   mn_cpu_<op>(const desc *, void *work, mn_par *)   kernels/cpu/   SIMD + threads
 *   mn_cuda_<op>(const desc *, stream)                kernels/cuda/  (CUDA issue)
 * Pointers in a descriptor are backend memory (host memory for ref and cpu). Shapes are
 * written next to each pointer; strides are in elements. No op allocates: an op that
 * needs scratch memory says how much through mn_cpu_<op>_work_bytes() and the caller
 * provides it (plan per batch, run per layer).
 *
 * Batch invariance (a contract of every op): the value of an output element never
 * depends on the other rows/tokens in the call nor on the thread count. Each element's
 * reduction runs in one fixed order. This makes a sequence's logits bit-identical
 * whether it runs alone or batched with others, and on any thread count.
 *
 * Threading (cpu): every thread of the pool calls mn_cpu_<op>(d, work, par) with its
 * own par->ith in [0, par->nth); the op splits the work itself and may call
 * mn_par_barrier(par) (every thread must reach the same barriers).
 */
#ifndef MN_KERNELS_OPS_H
#define MN_KERNELS_OPS_H

#include <stddef.h>
#include <stdint.h>
#include "kernels/common.h"
#include "kernels/dtype.h"

/* ---- threading context handed to cpu kernels ---------------------------------------- */
typedef struct mn_par {
    int ith, nth;                     /* this thread, thread count */
    void (*barrier)(void *ctx);       /* waits until all nth threads arrive */
    void *ctx;
} mn_par;

static inline void mn_par_barrier(const mn_par *p) { if (p->nth > 1) p->barrier(p->ctx); }
/* Split [0, n) into nth nearly equal contiguous parts; this thread gets [*lo, *hi). */
static inline void mn_par_range(const mn_par *p, int64_t n, int64_t *lo, int64_t *hi) {
    int64_t per = (n + p->nth - 1) / p->nth;
    *lo = per * p->ith; if (*lo > n) *lo = n;
    *hi = *lo + per;    if (*hi > n) *hi = n;
}

/* ---- paged KV cache view (one layer) --------------------------------------------------
 * A pool of blocks; each block holds block_size tokens; one token's K row is
 * n_kv_head*head_dim f16 values, contiguous (head h at h*head_dim). The same block id
 * addresses K in k and V in v. Sequence s owns the blocks
 * block_indices[block_indptr[s] .. block_indptr[s+1]) in position order, so position p
 * of s lives in block block_indices[block_indptr[s] + p / block_size], slot p % block_size.
 * Passed by value; the index arrays are read-only for kernels. */
typedef struct mn_kv_view {
    uint16_t *k;                  /* f16 [n_blocks][block_size][n_kv_head][head_dim] with block stride */
    uint16_t *v;                  /* f16, same layout as k */
    int64_t block_stride;         /* f16 elements between consecutive blocks (>= block_size*n_kv_head*head_dim) */
    int32_t block_size;           /* tokens per block */
    int32_t n_kv_head, head_dim;
    const int32_t *block_indptr;  /* [n_seq+1] */
    const int32_t *block_indices; /* [block_indptr[n_seq]] */
} mn_kv_view;

/* Element offset of (sequence s, position p, kv head h, dim 0) in k or v. */
MN_HD int64_t mn_kv_offset(const mn_kv_view *kv, int32_t s, int32_t p, int32_t h) {
    int32_t blk = kv->block_indices[kv->block_indptr[s] + p / kv->block_size];
    return (int64_t)blk * kv->block_stride +
           ((int64_t)(p % kv->block_size) * kv->n_kv_head + h) * kv->head_dim;
}

/* ---- descriptors ---------------------------------------------------------------------- */

/* get_rows (embedding gather): y[t, 0:D] = dequant(table row ids[t]). Bit-exact in all
 * implementations (dequantization is exact float math of the block formula). */
typedef struct mn_get_rows_desc {
    int64_t T, D;
    const int32_t *ids;           /* [T], each in [0, n_rows) — checked by the caller */
    const void *table;            /* row r at (const char *)table + r*row_bytes */
    mn_dtype type;
    int64_t row_bytes;
    float *y; int64_t y_stride;   /* [T, D] */
} mn_get_rows_desc;

/* rmsnorm: y[t,:] = x[t,:] / sqrt(mean(x[t,:]^2) + eps) * w[:]. y may equal x. */
typedef struct mn_rmsnorm_desc {
    int64_t T, D;
    const float *x; int64_t x_stride; /* [T, D] */
    const float *w;                   /* [D] */
    float eps;
    float *y; int64_t y_stride;       /* [T, D] */
} mn_rmsnorm_desc;

/* matmul: y[t,n] (+)= sum_k x[t,k] * W[n,k] (+ bias[n]).
 * W is N rows of K elements of w_type, row n at (const char *)w + n*w_row_bytes.
 * Precision contract: for F32/F16/BF16 weights the dot is in f32 on dequantized values.
 * For quantized weights x is first quantized per row: to mn_block_q8_1 for Q4_0, Q4_1,
 * Q5_0, Q5_1 and Q8_0 (d = amax/127, q = nearest integer of x/d, s = d*sum q), to mn_block_q8_K
 * for the K-quants (d = amax/127, same rounding); the block dot is then an exact
 * integer sum, scaled by the two block scales (and min terms) in f32.
 * Tolerance against ref: |y - y_ref| <= 1e-4 * (sum_k |x_k w_k| + |bias|) (f32 order).
 * K must be a multiple of the weight's block size. */
typedef struct mn_matmul_desc {
    int64_t T, N, K;
    const float *x; int64_t x_stride;   /* [T, K] */
    const void *w; mn_dtype w_type; int64_t w_row_bytes; /* [N, K] */
    const float *bias;                  /* [N] or NULL */
    float *y; int64_t y_stride;         /* [T, N] */
    int accumulate;                     /* 0: y = x W^T + b;  1: y += x W^T + b */
} mn_matmul_desc;

enum { MN_ROPE_NORM = 0, MN_ROPE_NEOX = 2 };

/* rope, in place: for each token t and head h, rotate the first n_rot dims of
 * x[t, h*head_dim : ...] by pos[t]*inv_freq[i], pairs as in mn_rope_rotate; dims past
 * n_rot are unchanged. cos and sin are cosf/sinf(pos*inv_freq[i]) times attn_factor.
 * inv_freq (n_rot/2 values) already holds base^(-2i/n_rot), freq_scale and any
 * llama3 / yarn scaling: the model computes it once. */
typedef struct mn_rope_desc {
    int64_t T;
    int32_t n_head, head_dim, n_rot;
    int32_t mode;                   /* MN_ROPE_NORM or MN_ROPE_NEOX */
    float *x; int64_t x_stride;     /* [T, n_head*head_dim] */
    const int32_t *pos;             /* [T] */
    const float *inv_freq;          /* [n_rot/2] */
    float attn_factor;              /* 1.0 unless yarn */
} mn_rope_desc;

/* kv_store: write token t's K and V rows (f32 -> f16, round to nearest even) into the
 * cache at (seq[t], pos[t]). Blocks for those positions must already be in the table. */
typedef struct mn_kv_store_desc {
    int64_t T;
    const float *k; int64_t k_stride;  /* [T, n_kv_head*head_dim] */
    const float *v; int64_t v_stride;  /* [T, n_kv_head*head_dim] */
    const int32_t *seq, *pos;          /* [T] */
    mn_kv_view kv;
} mn_kv_store_desc;

/* attention (causal, paged): for token t and head h (kv head g = h / (n_head/n_kv_head)),
 *   out[t, h*hd:(h+1)*hd] = sum_{p<=pos[t]} softmax_p(scale * q[t,h]·K[seq[t],p,g]) V[seq[t],p,g]
 * with K/V f16 from the cache (kv_store of every position <= pos[t] done before).
 * Softmax in f32 with max subtraction. Tolerance against ref: 1e-4 * max|V| + 1e-5.
 * max_pos is a plan hint: max over t of pos[t] + 1 (0 = unknown). Backends whose pos is
 * device memory (CUDA) size their split scratch from it; ref and cpu ignore it. A pos[t]
 * past it is a caller bug (the CUDA split writes NaN for that token). out must not overlap
 * q (the CPU kernel keeps its running state in out until a token's last segment). */
typedef struct mn_attention_desc {
    int64_t T;
    int32_t n_head, n_kv_head, head_dim;
    const float *q; int64_t q_stride;  /* [T, n_head*head_dim] */
    const int32_t *seq, *pos;          /* [T] */
    mn_kv_view kv;
    float scale;                       /* usually 1/sqrt(head_dim) */
    float *out; int64_t out_stride;    /* [T, n_head*head_dim] */
    int32_t max_pos;                   /* plan: max pos[t] + 1, or 0 = unknown */
} mn_attention_desc;

/* silu_mul: y[t,i] = silu(gate[t,i]) * up[t,i], silu(g) = g / (1 + expf(-g)). y may equal gate. */
typedef struct mn_silu_mul_desc {
    int64_t T, F;
    const float *gate; int64_t gate_stride; /* [T, F] */
    const float *up; int64_t up_stride;     /* [T, F] */
    float *y; int64_t y_stride;             /* [T, F] */
} mn_silu_mul_desc;

/* add: y[t,i] += x[t,i] (residual). Bit-exact in all implementations. */
typedef struct mn_add_desc {
    int64_t T, D;
    float *y; int64_t y_stride;        /* [T, D] */
    const float *x; int64_t x_stride;  /* [T, D] */
} mn_add_desc;

/* lora (batched LoRA apply, many adapters in one call): for each segment s and each of its
 * rows t = rows[seg[s].start + i], i < seg[s].n_rows:
 *   shrink  v[j] = sum_k x[t,k] * a[j,k]                     j < r   (v rounded to f32)
 *   expand  y_o[t,n] += scale_o * sum_j v[r_off_o + j] * b_o[j,n]   j < r_out_o, every output o with b_o
 * (b_o is B transposed, [r_out, N]: the expand streams its rows). a and b hold elements of
 * the segment's type (F32, F16 or BF16: an adapter keeps its file's 16-bit type, halving
 * the bytes a decode step reads); they are converted to f32 exactly before each product.
 * Up to MN_LORA_MAX_OUT outputs share x and one shrink: Q/K/V (or gate/up) of a layer pass
 * their A's as one [r_q + r_k + r_v, K] matrix (rows adjacent in memory). Each segment has
 * its own rank, so mixed ranks need no padding; rows in no segment (tokens without an
 * adapter) are not touched and cost nothing. A row appears in at most one segment.
 * Work (cpu): mn_cpu_lora_work_bytes() floats for v. seg and rows are backend memory like
 * every pointer of a descriptor (host for the CPU backend, device for CUDA, where the
 * forward uploads them once per batch). max_rows / max_r are the batch plan's largest
 * segment length and shrink width: the CUDA kernels size their launch from them (max_r
 * is required there, <= MN_CUDA_LORA_MAX_R; max_rows == 1 picks the gathered decode
 * variant, 0 = unknown); ref and cpu ignore them.
 * Tolerance against ref (which accumulates in double):
 *   |y - y_ref| <= 1e-4 * (|y_in| + |scale| * sum_j (sum_k |x_k a_jk|) |b_nj|).
 * Strided views (tensor parallelism, engine/forward.c): a_ld is the element distance
 * between rows of every a (0: K), b_ld[o] between rows of every b_o (0: N_o). A rank that
 * holds input features [k0, k0 + K) of a wider linear passes a + k0 with a_ld = the full
 * input width; one that holds output features [n0, n0 + N_o) passes b_o + n0 with
 * b_ld[o] = the full output width: views into the adapter, nothing copied.
 * Split phases (phase, v): MN_LORA_FUSED does both halves with v in scratch. MN_LORA_SHRINK
 * only writes v to d->v and touches no y; MN_LORA_EXPAND only reads v from d->v (as the
 * shrink wrote it, or summed over ranks) and adds the expand to y. d->v holds, segment by
 * segment in seg order, row-major [n_rows, r] floats: mn_lora_v_floats() in all. The
 * expand's bits from a given v are the fused op's bits from the same v. */
#define MN_LORA_MAX_OUT 3
/* Widest shrink (r_q + r_k + r_v) the CUDA kernels keep in shared memory. */
#define MN_CUDA_LORA_MAX_R 1024
typedef struct mn_lora_seg {
    int32_t start, n_rows;                  /* rows[start .. start + n_rows) */
    int32_t r;                              /* rows of a (shrink width) */
    mn_dtype type;                          /* of a and b: MN_F32, MN_F16 or MN_BF16 */
    const void *a;                          /* [r, K] */
    const void *b[MN_LORA_MAX_OUT];         /* [r_out_o, N_o] (B^T), or NULL: output o not adapted */
    int32_t r_off[MN_LORA_MAX_OUT], r_out[MN_LORA_MAX_OUT];
    float scale[MN_LORA_MAX_OUT];
} mn_lora_seg;

typedef struct mn_lora_desc {
    int64_t K;
    const float *x; int64_t x_stride;                 /* [T, K] */
    int32_t n_out;                                    /* 1 .. MN_LORA_MAX_OUT */
    int64_t N[MN_LORA_MAX_OUT];
    float *y[MN_LORA_MAX_OUT];                        /* [T, N_o] each */
    int64_t y_stride[MN_LORA_MAX_OUT];
    int32_t n_seg;
    const mn_lora_seg *seg;                           /* [n_seg] */
    const int32_t *rows;                              /* batch rows, grouped by segment */
    int32_t max_rows, max_r;                          /* plan: max over seg of n_rows, r */
    int64_t a_ld;                                     /* row stride of a, elements; 0: K */
    int64_t b_ld[MN_LORA_MAX_OUT];                    /* row stride of b_o, elements; 0: N_o */
    int32_t phase;                                    /* mn_lora_phase; 0: fused */
    float *v;                                         /* [mn_lora_v_floats] for SHRINK / EXPAND, else NULL */
} mn_lora_desc;

typedef enum mn_lora_phase { MN_LORA_FUSED = 0, MN_LORA_SHRINK = 1, MN_LORA_EXPAND = 2 } mn_lora_phase;

/* Floats of v for seg[0 .. n_seg): sum of n_rows * r; also the offset of segment n_seg in v. */
MN_HD int64_t mn_lora_v_floats(const mn_lora_seg *seg, int32_t n_seg) {
    int64_t n = 0;
    for (int32_t s = 0; s < n_seg; s++) n += (int64_t)seg[s].n_rows * seg[s].r;
    return n;
}

/* sample (logits to tokens, kernels/ref/ref_sample.c, cpu/sample.c, cuda/sample.cu): for each
 * row r < n_rows, logits l[0:V] = logits + r * logits_stride, parameters params[r]. What
 * crosses PCIe after the op is token[r], logprob[r] and the top-n pairs, never the logits.
 * Logit bias and the repetition / frequency / presence penalties are NOT part of the op:
 * the caller applies them to the logits first (engine/sampler.c does, on the host).
 * Logits are read-only; a NaN logit counts as -inf everywhere, and -0.0 equals +0.0;
 * +inf is outside the contract (the weights would be NaN).
 *
 * Candidate order: (logit descending, id ascending), a strict total order, so every tie
 * goes to the lowest id. lmax = the largest logit, amax = the first token in that order.
 *   logprobs: Z1 = sum_i expf(l_i - lmax) (float expf, double sum), lse = lmax + log(Z1)
 *     (double); logprob(i) = (float)((double)l_i - lse). logprob[r] is the chosen token's;
 *     top_id / top_logprob [r * MN_SAMPLE_MAX_TOP + j], j < min(n_logprobs, V), are the
 *     first tokens of the candidate order (highest first). All logits -inf: token 0,
 *     logprob[r] = 0, top logprobs -inf.
 *   greedy (temperature <= 0, or all logits -inf): token = amax.
 *   sampling: invT = 1.0f / T (float), weight w_i = expf((l_i - lmax) * invT) (float).
 *     The kept set is a prefix of the candidate order, of length n:
 *       n = top_k if 0 < top_k < V, else V;                                    (top-k)
 *       top_p < 1: Zk = sum of w over the first n (double); n = the shortest m <= n whose
 *         prefix sum (double, in candidate order) >= (double)top_p * Zk; n unchanged if
 *         no prefix reaches it (rounding);                                       (top-p)
 *       min_p > 0: min_l = lmax + T * logf(min_p) (float); drop from the end of the prefix
 *         while n > 1 and the last logit < min_l (the first token always stays).  (min-p)
 *     Draw: Zd = sum of w over the kept set (double); target = u * Zd (double); walk the
 *     kept tokens in ASCENDING ID order accumulating w (double) and take the first whose
 *     running sum > target; if rounding leaves none, the kept token of highest id with
 *     w > 0. (Id order, not candidate order: a device walks it with one scan, no sort.)
 * Agreement (tolerance of all three implementations, and of the tests): the summation
 * order of the double sums and expf / logf (ref and cpu: libm; CUDA: its expf, logf,
 * within 2 ulp) are free, so the token must equal the reference's except in a boundary
 * case, where a decision lies within MN_SAMPLE_TOL relative of a threshold:
 *   draw:  |target - (a running sum of the walk)| <= MN_SAMPLE_TOL * Zd;
 *   top-p: |(a prefix sum at the cut) - top_p * Zk| <= MN_SAMPLE_TOL * Zk;
 *   min-p: |l_i - min_l| <= MN_SAMPLE_TOL * (1 + |min_l|) for a token i of the prefix.
 * Logprobs: |lp - lp_ref| <= MN_SAMPLE_TOL * (1 + |lp_ref|); top ids are exact.
 * Work (cpu): mn_cpu_sample_work_bytes(d, nth); rows are split across threads. CUDA: one
 * block per row, no scratch. logprob, top_id and top_logprob may be NULL (not computed:
 * logprob NULL skips the O(V) normaliser when every n_logprobs is 0). */
#define MN_SAMPLE_MAX_TOP 20
#define MN_SAMPLE_TOL 1e-5
typedef struct mn_sample_params {
    float temperature;       /* <= 0: greedy */
    int32_t top_k;           /* <= 0 or >= V: off */
    float top_p;             /* >= 1: off; in (0, 1] */
    float min_p;             /* <= 0: off; in [0, 1] */
    double u;                /* uniform draw in [0, 1), from the caller's RNG */
    int32_t n_logprobs;      /* 0 .. MN_SAMPLE_MAX_TOP */
} mn_sample_params;

typedef struct mn_sample_desc {
    int32_t n_rows, V;
    const float *logits; int64_t logits_stride;   /* [n_rows, V] */
    const mn_sample_params *params;              /* [n_rows] */
    int32_t *token;                              /* [n_rows] */
    float *logprob;                              /* [n_rows] or NULL */
    int32_t *top_id; float *top_logprob;         /* [n_rows, MN_SAMPLE_MAX_TOP] or NULL */
} mn_sample_desc;

/* ---- dequantization (shared by get_rows, tests and the CUDA load path) --------------
 * y[0:n] = values of the n elements at src (n a multiple of the block size). */
void mn_ref_dequant_row(mn_dtype type, const void *src, float *y, int64_t n);
/* Quantize activations x[0:n] to q8_1 blocks (n % 32 == 0) or q8_K blocks (n % 256 == 0). */
void mn_ref_quantize_row_q8_1(const float *x, mn_block_q8_1 *y, int64_t n);
void mn_ref_quantize_row_q8_K(const float *x, mn_block_q8_K *y, int64_t n);

/* ---- reference implementations (kernels/ref/) ---------------------------------------- */
void mn_ref_get_rows(const mn_get_rows_desc *d);
void mn_ref_rmsnorm(const mn_rmsnorm_desc *d);
void mn_ref_matmul(const mn_matmul_desc *d);
void mn_ref_rope(const mn_rope_desc *d);
void mn_ref_kv_store(const mn_kv_store_desc *d);
void mn_ref_attention(const mn_attention_desc *d);
void mn_ref_silu_mul(const mn_silu_mul_desc *d);
void mn_ref_add(const mn_add_desc *d);
void mn_ref_lora(const mn_lora_desc *d);
void mn_ref_sample(const mn_sample_desc *d);

/* ---- fast CPU implementations (kernels/cpu/) ------------------------------------------
 * Call mn_cpu_init() once (idempotent, thread-safe) before any of them: it picks the
 * SIMD variants the CPU supports (AVX2+FMA, AVX-512, AVX-512-VNNI) at run time. */
void mn_cpu_init(void);
const char *mn_cpu_simd_name(void);   /* e.g. "avx512-vnni", "avx2", "scalar" */
/* Set the SIMD level explicitly (tests use it to cover every variant the CPU has);
 * level names as returned by mn_cpu_simd_name; returns 0 if unsupported on this CPU. */
int mn_cpu_set_simd(const char *name);

size_t mn_cpu_matmul_work_bytes(const mn_matmul_desc *d, int nth);
void mn_cpu_get_rows(const mn_get_rows_desc *d, void *work, const mn_par *par);
void mn_cpu_rmsnorm(const mn_rmsnorm_desc *d, void *work, const mn_par *par);
void mn_cpu_matmul(const mn_matmul_desc *d, void *work, const mn_par *par);
/* mn_cpu_matmul (same bits) that, while its rows are computed, asks for the share [f0, f1)
 * (fractions of the whole) of the head of the adapter weights the LoRA op lora will read
 * (its first 256 KB, kernels/cpu/lora.c) to be brought into cache: prefetch hints, no
 * effect on any result. The CPU backend passes the LoRA op that follows a run of matmuls
 * on the same input. In a decode batch of many adapters the op's A and B rows are cold
 * from DRAM (rank 16, all targets, 32 adapters: ~10 MB a layer); the op streams them in a
 * few KB ahead of its own loops, and the matmuls before it warm the start of that stream.
 * (Asking for all of it here evicted most of it from L2 again before the op ran.) */
void mn_cpu_matmul_prefetch_lora(const mn_matmul_desc *d, const mn_lora_desc *lora, double f0, double f1, void *work,
                                 const mn_par *par);
void mn_cpu_rope(const mn_rope_desc *d, void *work, const mn_par *par);
void mn_cpu_kv_store(const mn_kv_store_desc *d, void *work, const mn_par *par);
void mn_cpu_attention(const mn_attention_desc *d, void *work, const mn_par *par);
/* Scratch for nth threads: non-zero when a few tokens over a long context are split by
 * segments across threads. With work == NULL the op runs unsplit (same bits, slower). */
size_t mn_cpu_attention_work_bytes(const mn_attention_desc *d, int nth);
void mn_cpu_silu_mul(const mn_silu_mul_desc *d, void *work, const mn_par *par);
void mn_cpu_add(const mn_add_desc *d, void *work, const mn_par *par);
size_t mn_cpu_lora_work_bytes(const mn_lora_desc *d);
void mn_cpu_lora(const mn_lora_desc *d, void *work, const mn_par *par);
/* Scratch of mn_cpu_sample: 2 * V (logit, id) pairs per thread. */
size_t mn_cpu_sample_work_bytes(const mn_sample_desc *d, int nth);
void mn_cpu_sample(const mn_sample_desc *d, void *work, const mn_par *par);

#endif
