/* kernels/cuda/attention.cu — causal attention over the paged KV cache (mn_kv_view):
 * one kernel for decode and prefill, split over segments of positions, and a fold.
 *
 * Work unit (one thread block): a tile of up to `tq` tokens that are adjacent in the batch
 * and belong to one sequence (any positions),
 * a run of up to ATT_ROWS heads of one KV group, and one or all segments of ATT_SEG
 * positions. Its "rows" are (token of the tile, head of the run) pairs, row
 * r = token * nh + head. The block walks its positions in waves of `par` chunks of
 * ATT_CHUNK (= 32, one position per lane): the chunks' K and V rows (f16, read once through
 * the block table with mn_kv_offset) are converted to f32 in shared memory and every row
 * of the block uses them, so GQA heads and prefill tokens share each K/V load. The wave's
 * (row, chunk) pairs are dealt to the warps; each row keeps its segment state (m, l,
 * unnormalised acc) in shared memory.
 *
 * Per row and chunk (the same instructions whatever the block holds), the chunk's own
 * partial state:
 *   lane p: s_p = scale * sum_i q[i] K[p][i] (four fma chains), -inf past the row's position;
 *   mc = warp max s; e_p = exp(s_p - mc); lc = butterfly sum of e;
 *   accc[i] = e_0 V[0][i] + e_1 V[1][i] + ... (an fma chain from 0)
 *   (positions past the row's own are never added, so neither NaN-filled free slots nor
 *   another token's later positions touch it), then folded into the row's segment state,
 *   chunks in ascending order: (mx, fa, fb) = att_fold_scales(m, mc); l = l*fa + lc*fb;
 *   acc = acc*fa + accc*fb (from the empty state m = -inf, l = 0, acc = 0 the first fold
 *   is exact). With par = 1 the warp that computed the pair folds it at once; with
 *   par > 1 (blocks of fewer rows than warps: a decode token's GQA group) the pairs of a
 *   wave run on different warps at once, leave their partials in shared memory, and the
 *   row's warp folds them in chunk order: the same operations, the same bits.
 *   (Until 2026-11-30 each chunk updated a running max directly; that order could not
 *   use more than one warp per row, and a decode token's four rows left half the warps
 *   idle: 54 us a layer at 1024 positions on the H200.)
 * A row's segment state therefore depends only on its token, head and segment, never on
 * which tokens or heads share the block: decode and prefill, any batch, give the same
 * bits. Segments are folded in ascending order with att_fold_scales (the first is copied),
 * then acc * (1 / l) is written:
 *   split   grid y = segments; each block writes its rows' state to scratch
 *           [T][n_head][nseg_max][head_dim + 2] (acc..., m, l); attention_fold_kernel
 *           then folds and normalises one (token, head, dim) per thread;
 *   unsplit grid y = 1; the block walks its segments itself and folds each one as it
 *           finishes, the running acc in the output row, m and l in shared memory.
 * Both paths run the same float operations in the same order (-fmad=false), so which one
 * runs (it depends on the batch: scratch is sized by the plan's max_pos) never changes a
 * result: batch invariance holds bit for bit.
 *
 * Tiles are found without a host plan: token b starts a tile when b % tq == 0 or its
 * sequence differs from token b-1's; the tile runs to the next start. Grid x enumerates
 * every token as a possible start and the other blocks return at once; grid z is
 * (KV head, run of heads). The block shape (tq, heads per run) follows the device's
 * shared memory and changes speed only, never a result; so does `par`. head_dim 64 and
 * 128 run instances with it fixed at compile time (loops unrolled), others a generic one.
 * K/V chunks come in with 16-byte loads, all issued before any is used, when the pool's
 * rows allow (vec8), and the score dot and the V sums are explicit fmaf chains (four for
 * the dot): the first H200 run spent 150 us a layer on one decode token at 1024
 * positions, most of it waiting on one 4-byte load after another. Tried on the H200 and
 * dropped: 64-position segments (better for one token at 1K positions, worse for batches
 * and long contexts) and two rows per warp pass with the next chunk's loads in flight
 * (more registers, fewer blocks per SM: slower everywhere).
 * Precision: f32 online softmax, within the ops.h tolerance 1e-4 * max|V| + 1e-5 of the
 * reference for decode and prefill alike (tests/gpu/test_cuda_attention.c).
 */
#include "kernels/cuda/cuda_common.cuh"

enum {
    ATT_WARPS = 8,                         /* rows are dealt to warps: more warps, more rows at once */
    ATT_CHUNK = 32,                        /* positions per chunk: one per lane */
    ATT_SEG = 256,                         /* positions per segment (a multiple of ATT_CHUNK) */
    ATT_ROWS = 64,                         /* most (token, head) rows in one block */
    ATT_TQ = 16,                           /* most tokens in one tile */
    ATT_TQ_SPLIT = 4,                      /* the same when the call is split over segments */
    ATT_PER_LANE = MN_CUDA_MAX_HEAD_DIM / 32,
    ATT_SPLIT_MAX_T = 64,                  /* split only batches of at most this many tokens */
    ATT_PAR_MAX = 2,                       /* most chunks a block holds at once */
};
/* Largest split scratch; past it the op runs unsplit (same bits, fewer blocks). */
#define ATT_SPLIT_MAX_BYTES ((size_t)64 << 20)

/* The launch shape of one call (host side; the kernels get it by value). */
typedef struct att_shape {
    int32_t nh;       /* heads per run (<= ATT_ROWS) */
    int32_t runs;     /* runs per KV group */
    int32_t tq;       /* tokens per tile */
    int32_t ks;       /* floats between K rows in shared memory (odd: no bank conflicts) */
    int32_t nseg_max; /* split: segments of the longest token; 0: unsplit */
    int32_t vec2;     /* K/V rows can be read as pairs of f16 (4-byte aligned) */
    int32_t vec8;     /* ... and as 8 f16 at a time (16-byte aligned) */
    int32_t par;      /* chunks a wave (1 or ATT_PAR_MAX): blocks of few rows give each warp a (row, chunk) pair */
} att_shape;

__device__ static inline void att_store8(float *dst, uint4 h) {
    const uint32_t u[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        dst[2 * i] = mn_fp16_to_fp32((uint16_t)(u[i] & 0xffffu));
        dst[2 * i + 1] = mn_fp16_to_fp32((uint16_t)(u[i] >> 16));
    }
}

/* Fold a segment state (pm, pl) into the running (m, l): the scales of the two. */
__device__ static inline void att_fold_scales(float m, float pm, float *mx, float *a, float *b) {
    *mx = fmaxf(m, pm);
    *a = expf(m - *mx);
    *b = expf(pm - *mx);
}

/* Shared memory of the main kernel, carved from one dynamic array. */
static size_t att_smem_bytes(int32_t rows, int32_t hd, int32_t ks, int32_t par) {
    return (size_t)par * ATT_CHUNK * sizeof(int64_t)        /* KV offsets of a wave (first: aligned) */
         + (size_t)rows * hd * 2 * sizeof(float)            /* q, acc */
         + (size_t)par * ATT_CHUNK * (ks + hd) * sizeof(float) /* K, V of a wave's chunks */
         + (size_t)rows * 4 * sizeof(float)                 /* m, l, running m, running l */
         + (par > 1 ? (size_t)rows * par * (hd + 2) * sizeof(float) : 0); /* chunk partials */
}

/* One (row, chunk) pair's share: the chunk's partial softmax state for that row, folded into
 * the row's segment state (m_s, l_s, acc_s) unless part != NULL, where it is stored instead
 * (part[0..hd) = acc, part[hd] = m, part[hd+1] = l; m = -inf: no position of the row) for the
 * fold pass. HD: head_dim when known at compile time (loops unrolled), else 0. The float
 * operations are the same either way, so both give the same bits. */
template <int HD>
__device__ static inline void att_pair(const mn_attention_desc &d, const att_shape &sh, int32_t hd_rt, int32_t r,
                                       int32_t n, const float *q_s, const float *k_c, const float *v_c, float *acc_s,
                                       float *m_s, float *l_s, float *part) {
    const int32_t hd = HD ? HD : hd_rt;
    const int lane = threadIdx.x & 31;
    float s = -INFINITY;
    if (lane < n) {
        const float *qr = q_s + r * hd, *kr = k_c + lane * sh.ks;
        /* four independent fma chains (one would wait on each add) */
        float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
        int32_t i = 0;
#pragma unroll
        for (; i + 4 <= hd; i += 4) {
            d0 = fmaf(qr[i], kr[i], d0);
            d1 = fmaf(qr[i + 1], kr[i + 1], d1);
            d2 = fmaf(qr[i + 2], kr[i + 2], d2);
            d3 = fmaf(qr[i + 3], kr[i + 3], d3);
        }
        for (; i < hd; i++) d0 = fmaf(qr[i], kr[i], d0);
        s = ((d0 + d1) + (d2 + d3)) * d.scale;
    }
    const float mc = mn__warp_max(s); /* n >= 1: finite */
    const float e = lane < n ? expf(s - mc) : 0.0f;
    const float lc = mn__warp_sum(e);
    constexpr int PL = HD ? (HD + 31) / 32 : ATT_PER_LANE;
    float a[PL];
#pragma unroll
    for (int j = 0; j < PL; j++) a[j] = 0.0f;
    for (int32_t p = 0; p < n; p++) {
        const float ep = __shfl_sync(0xffffffffu, e, p);
#pragma unroll
        for (int j = 0; j < PL; j++) {
            int32_t i = lane + 32 * j;
            if (i < hd) a[j] = fmaf(ep, v_c[p * hd + i], a[j]);
        }
    }
    if (part) {
#pragma unroll
        for (int j = 0; j < PL; j++) {
            int32_t i = lane + 32 * j;
            if (i < hd) part[i] = a[j];
        }
        if (lane == 0) {
            part[hd] = mc;
            part[hd + 1] = lc;
        }
        return;
    }
    float mx, fa, fb;
    att_fold_scales(m_s[r], mc, &mx, &fa, &fb);
    const float l_new = l_s[r] * fa + lc * fb;
#pragma unroll
    for (int j = 0; j < PL; j++) {
        int32_t i = lane + 32 * j;
        if (i < hd) acc_s[r * hd + i] = acc_s[r * hd + i] * fa + a[j] * fb;
    }
    __syncwarp();
    if (lane == 0) {
        m_s[r] = mx;
        l_s[r] = l_new;
    }
    __syncwarp();
}

template <int HD>
__global__ static void __launch_bounds__(ATT_WARPS * 32) attention_kernel(mn_attention_desc d, att_shape sh, float *state) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int32_t hd = HD ? HD : d.head_dim, T = (int32_t)d.T;
    const int32_t b = (int32_t)blockIdx.x;
    /* is token b the start of a tile? */
    int32_t seq = d.seq[b];
    if (b % sh.tq != 0 && d.seq[b - 1] == seq) return;
    int32_t nt = 1, max_pos = d.pos[b];
    while (nt < sh.tq && b + nt < T && (b + nt) % sh.tq != 0 && d.seq[b + nt] == seq) {
        max_pos = max(max_pos, d.pos[b + nt]);
        nt++;
    }
    const int32_t g = (int32_t)blockIdx.z / sh.runs, run = (int32_t)blockIdx.z % sh.runs;
    const int32_t group = d.n_head / d.n_kv_head;
    const int32_t h0 = g * group + run * sh.nh;
    const int32_t nh = min(sh.nh, group - run * sh.nh);
    const int32_t rows = nt * nh;
    const int32_t seg_lo = sh.nseg_max ? (int32_t)blockIdx.y : 0;
    const int32_t seg_hi = sh.nseg_max ? seg_lo + 1 : max_pos / ATT_SEG + 1;
    if (seg_lo * ATT_SEG > max_pos) return;
    const int32_t P = sh.par; /* chunks a wave */

    /* shared memory, rows sized for the launch's largest block */
    const int32_t rows_cap = sh.tq * sh.nh;
    int64_t *off_s = (int64_t *)smem_raw;                 /* [P][ATT_CHUNK] */
    float *q_s = (float *)(off_s + P * ATT_CHUNK);        /* [rows_cap][hd] */
    float *acc_s = q_s + (size_t)rows_cap * hd;           /* [rows_cap][hd] */
    float *k_s = acc_s + (size_t)rows_cap * hd;           /* [P][ATT_CHUNK][ks] */
    float *v_s = k_s + (size_t)P * ATT_CHUNK * sh.ks;     /* [P][ATT_CHUNK][hd] */
    float *m_s = v_s + (size_t)P * ATT_CHUNK * hd;        /* [rows_cap] each */
    float *l_s = m_s + rows_cap, *rm_s = l_s + rows_cap, *rl_s = rm_s + rows_cap;
    float *part_s = rl_s + rows_cap;                      /* P > 1: [rows_cap][P][hd + 2] */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int32_t x = threadIdx.x; x < rows * hd; x += blockDim.x) {
        int32_t r = x / hd, i = x % hd;
        int32_t t = b + r / nh, h = h0 + r % nh;
        q_s[x] = d.q[(int64_t)t * d.q_stride + (int64_t)h * hd + i];
    }

    for (int32_t k = seg_lo; k < seg_hi; k++) {
        const int32_t p_seg = k * ATT_SEG;
        const int32_t p_end = min(p_seg + ATT_SEG, max_pos + 1); /* positions any row needs */
        for (int32_t r = warp; r < rows; r += ATT_WARPS) {
            for (int32_t i = lane; i < hd; i += 32) acc_s[r * hd + i] = 0.0f;
            if (lane == 0) {
                m_s[r] = -INFINITY;
                l_s[r] = 0.0f;
            }
        }
        for (int32_t c0 = p_seg; c0 < p_end; c0 += P * ATT_CHUNK) {
            const int32_t np = min(P, (p_end - c0 + ATT_CHUNK - 1) / ATT_CHUNK); /* chunks of this wave */
            const int32_t n_wave = min(P * ATT_CHUNK, p_end - c0);               /* positions to load */
            __syncthreads(); /* the previous wave is no longer read */
            for (int32_t p = threadIdx.x; p < P * ATT_CHUNK; p += blockDim.x)
                off_s[p] = p < n_wave ? mn_kv_offset(&d.kv, seq, c0 + p, g) : 0;
            __syncthreads();
            /* K, V of the wave's positions: position p goes to chunk p / ATT_CHUNK, row p % ATT_CHUNK
             * (k_s / v_s of chunk c at c * ATT_CHUNK rows: the same flat index) */
            if (sh.vec8) {
                /* every load of the wave issued before any is used: one memory round trip */
                /* (known head_dim: a whole wave's loads at once; generic: a chunk's) */
                constexpr int LOADS =
                    (HD ? ATT_PAR_MAX : 1) * ATT_CHUNK * ((HD ? HD : MN_CUDA_MAX_HEAD_DIM) / 8) / (ATT_WARPS * 32);
                const int32_t h8 = hd / 8, total = np * ATT_CHUNK * h8;
                for (int32_t x0 = 0; x0 < total; x0 += LOADS * ATT_WARPS * 32) {
                    uint4 kq[LOADS], vq[LOADS];
#pragma unroll
                    for (int it = 0; it < LOADS; it++) {
                        const int32_t x = x0 + (int32_t)threadIdx.x + it * (int32_t)blockDim.x, p = x / h8,
                                      i = 8 * (x % h8);
                        kq[it] = vq[it] = make_uint4(0u, 0u, 0u, 0u);
                        if (x < total && p < n_wave) {
                            kq[it] = *(const uint4 *)(d.kv.k + off_s[p] + i);
                            vq[it] = *(const uint4 *)(d.kv.v + off_s[p] + i);
                        }
                    }
#pragma unroll
                    for (int it = 0; it < LOADS; it++) {
                        const int32_t x = x0 + (int32_t)threadIdx.x + it * (int32_t)blockDim.x, p = x / h8,
                                      i = 8 * (x % h8);
                        if (x < total) {
                            att_store8(k_s + p * sh.ks + i, kq[it]);
                            att_store8(v_s + p * hd + i, vq[it]);
                        }
                    }
                }
            } else if (sh.vec2) {
                const int32_t hp = hd / 2;
                for (int32_t x = threadIdx.x; x < np * ATT_CHUNK * hp; x += blockDim.x) {
                    int32_t p = x / hp, i = 2 * (x % hp);
                    float k0 = 0.0f, k1 = 0.0f, v0 = 0.0f, v1 = 0.0f;
                    if (p < n_wave) {
                        uint32_t kk = *(const uint32_t *)(d.kv.k + off_s[p] + i);
                        uint32_t vv = *(const uint32_t *)(d.kv.v + off_s[p] + i);
                        k0 = mn_fp16_to_fp32((uint16_t)(kk & 0xffffu));
                        k1 = mn_fp16_to_fp32((uint16_t)(kk >> 16));
                        v0 = mn_fp16_to_fp32((uint16_t)(vv & 0xffffu));
                        v1 = mn_fp16_to_fp32((uint16_t)(vv >> 16));
                    }
                    k_s[p * sh.ks + i] = k0;
                    k_s[p * sh.ks + i + 1] = k1;
                    v_s[p * hd + i] = v0;
                    v_s[p * hd + i + 1] = v1;
                }
            } else {
                for (int32_t x = threadIdx.x; x < np * ATT_CHUNK * hd; x += blockDim.x) {
                    int32_t p = x / hd, i = x % hd;
                    int live = p < n_wave;
                    k_s[p * sh.ks + i] = live ? mn_fp16_to_fp32(d.kv.k[off_s[p] + i]) : 0.0f;
                    v_s[p * hd + i] = live ? mn_fp16_to_fp32(d.kv.v[off_s[p] + i]) : 0.0f;
                }
            }
            __syncthreads();
            /* the wave's (row, chunk) pairs, dealt to the warps */
            for (int32_t pr = warp; pr < rows * np; pr += ATT_WARPS) {
                const int32_t r = pr / np, c = pr % np;
                const int32_t cc = c0 + c * ATT_CHUNK;
                const int32_t n = min(ATT_CHUNK, d.pos[b + r / nh] + 1 - cc); /* this row's positions */
                float *part = P > 1 ? part_s + ((int64_t)r * P + c) * (hd + 2) : NULL;
                if (n <= 0) {
                    if (part && lane == 0) part[hd] = -INFINITY;
                    continue;
                }
                att_pair<HD>(d, sh, hd, r, n, q_s, k_s + (size_t)c * ATT_CHUNK * sh.ks, v_s + (size_t)c * ATT_CHUNK * hd,
                             acc_s, m_s, l_s, part);
            }
            if (P > 1) {
                __syncthreads();
                /* fold the wave's partials into each row's state, chunks in ascending order */
                for (int32_t r = warp; r < rows; r += ATT_WARPS) {
                    for (int32_t c = 0; c < np; c++) {
                        const float *pt = part_s + ((int64_t)r * P + c) * (hd + 2);
                        const float mc = pt[hd];
                        if (mc == -INFINITY) continue; /* no position of this row in the chunk */
                        float mx, fa, fb;
                        att_fold_scales(m_s[r], mc, &mx, &fa, &fb);
                        const float l_new = l_s[r] * fa + pt[hd + 1] * fb;
                        for (int32_t i = lane; i < hd; i += 32) acc_s[r * hd + i] = acc_s[r * hd + i] * fa + pt[i] * fb;
                        __syncwarp();
                        if (lane == 0) {
                            m_s[r] = mx;
                            l_s[r] = l_new;
                        }
                        __syncwarp();
                    }
                }
            }
        }
        /* the segment is done: every row with a position in it hands its state on */
        for (int32_t r = warp; r < rows; r += ATT_WARPS) {
            const int32_t t = b + r / nh, h = h0 + r % nh;
            if (d.pos[t] < p_seg) continue;
            const float pm = m_s[r], pl = l_s[r];
            if (sh.nseg_max) {
                float *st = state + (((int64_t)t * d.n_head + h) * sh.nseg_max + k) * (hd + 2);
                for (int32_t i = lane; i < hd; i += 32) st[i] = acc_s[r * hd + i];
                if (lane == 0) {
                    st[hd] = pm;
                    st[hd + 1] = pl;
                }
                continue;
            }
            float *o = d.out + (int64_t)t * d.out_stride + (int64_t)h * hd;
            if (k == 0) {
                for (int32_t i = lane; i < hd; i += 32) o[i] = acc_s[r * hd + i];
                __syncwarp();
                if (lane == 0) {
                    rm_s[r] = pm;
                    rl_s[r] = pl;
                }
            } else {
                float mx, fa, fb;
                att_fold_scales(rm_s[r], pm, &mx, &fa, &fb);
                const float l_new = rl_s[r] * fa + pl * fb;
                for (int32_t i = lane; i < hd; i += 32) o[i] = o[i] * fa + acc_s[r * hd + i] * fb;
                __syncwarp();
                if (lane == 0) {
                    rm_s[r] = mx;
                    rl_s[r] = l_new;
                }
            }
            __syncwarp();
        }
    }
    if (sh.nseg_max) return;
    /* unsplit: every row of the block has its final state; normalise */
    for (int32_t r = warp; r < rows; r += ATT_WARPS) {
        const int32_t t = b + r / nh, h = h0 + r % nh;
        const float inv = 1.0f / rl_s[r];
        float *o = d.out + (int64_t)t * d.out_stride + (int64_t)h * hd;
        for (int32_t i = lane; i < hd; i += 32) o[i] = o[i] * inv;
    }
}

/* Split path, second kernel: one thread per (token, head, dim) folds that element's
 * segment states in ascending order (the same float operations as the unsplit path) and
 * normalises. A token past the plan's max_pos is a caller bug: its row is set to NaN so
 * the error is visible instead of silently short. */
__global__ static void attention_fold_kernel(mn_attention_desc d, int32_t nseg_max, const float *state) {
    const int32_t hd = d.head_dim;
    const int64_t n = d.T * d.n_head * hd;
    for (int64_t x = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; x < n; x += (int64_t)gridDim.x * blockDim.x) {
        const int64_t th = x / hd;
        const int32_t i = (int32_t)(x % hd);
        const int64_t t = th / d.n_head;
        const int32_t h = (int32_t)(th % d.n_head);
        float *o = d.out + t * d.out_stride + (int64_t)h * hd + i;
        const int32_t nk = d.pos[t] / ATT_SEG + 1;
        if (nk > nseg_max) {
            *o = __int_as_float(0x7fc00000);
            continue;
        }
        const float *st = state + th * nseg_max * (hd + 2);
        float acc = st[i], m = st[hd], l = st[hd + 1];
        for (int32_t k = 1; k < nk; k++) {
            const float *sk = st + (int64_t)k * (hd + 2);
            float mx, fa, fb;
            att_fold_scales(m, sk[hd], &mx, &fa, &fb);
            l = l * fa + sk[hd + 1] * fb;
            acc = acc * fa + sk[i] * fb;
            m = mx;
        }
        *o = acc * (1.0f / l);
    }
}

/* Segments of the longest token when the split applies to d, else 0. */
static int32_t att_split_segments(const mn_attention_desc *d) {
    if (d->max_pos <= 0 || d->T > ATT_SPLIT_MAX_T) return 0;
    int32_t nseg = (d->max_pos + ATT_SEG - 1) / ATT_SEG;
    return nseg >= 2 ? nseg : 0;
}

int32_t mn_cuda_attention_launch_key(const mn_attention_desc *d) { return att_split_segments(d); }

size_t mn_cuda_attention_work_bytes(const mn_attention_desc *d) {
    int32_t nseg = att_split_segments(d);
    if (!nseg || d->T <= 0 || d->n_head <= 0 || d->head_dim <= 0) return 0;
    size_t b = (size_t)d->T * (size_t)d->n_head * (size_t)nseg * (size_t)(d->head_dim + 2) * sizeof(float);
    return b <= ATT_SPLIT_MAX_BYTES ? b : 0;
}

mn_err mn_cuda_attention(const mn_attention_desc *d, void *work, size_t work_bytes, cudaStream_t s, mn_errbuf *eb) {
    if (d->head_dim <= 0 || d->head_dim > MN_CUDA_MAX_HEAD_DIM || d->n_kv_head <= 0 || d->n_head <= 0 ||
        d->n_head % d->n_kv_head != 0)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda attention: head_dim %d (max %d), n_head %d, n_kv_head %d",
                       d->head_dim, MN_CUDA_MAX_HEAD_DIM, d->n_head, d->n_kv_head);
    if (d->T <= 0) return MN_OK;
    if (d->T > 0x7fffffffLL)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda attention: T = %lld tokens in one call", (long long)d->T);
    const int32_t group = d->n_head / d->n_kv_head, hd = d->head_dim;
    att_shape sh = {};
    size_t need = mn_cuda_attention_work_bytes(d);
    if (need && work && work_bytes >= need) sh.nseg_max = att_split_segments(d);
    sh.ks = hd | 1;
    sh.vec2 = hd % 2 == 0 && d->kv.block_stride % 2 == 0 && ((uintptr_t)d->kv.k & 3) == 0 &&
              ((uintptr_t)d->kv.v & 3) == 0;
    sh.vec8 = hd % 8 == 0 && d->kv.block_stride % 8 == 0 && ((uintptr_t)d->kv.k & 15) == 0 &&
              ((uintptr_t)d->kv.v & 15) == 0;
    /* rows per block: as many as the device's shared memory holds, at most ATT_ROWS (the
     * shape changes only speed, never a result) */
    int dev = 0, smem_max = 0;
    MN_CUDA_CHECK(eb, cudaGetDevice(&dev));
    MN_CUDA_CHECK(eb, cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    int32_t rows_max = ATT_ROWS;
    while (rows_max > 1 && att_smem_bytes(rows_max, hd, sh.ks, 1) > (size_t)smem_max) rows_max--;
    if (att_smem_bytes(rows_max, hd, sh.ks, 1) > (size_t)smem_max)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda attention: head_dim %d needs %zu bytes of shared memory, device has %d",
                       hd, att_smem_bytes(1, hd, sh.ks, 1), smem_max);
    sh.runs = (group + rows_max - 1) / rows_max;
    sh.nh = (group + sh.runs - 1) / sh.runs;
    sh.tq = rows_max / sh.nh;
    /* split (few tokens, long context): the segments give the parallelism, and a tile of
     * many token slots would mostly hold one token (decode batches) */
    const int32_t tq_cap = sh.nseg_max ? ATT_TQ_SPLIT : ATT_TQ;
    if (sh.tq > tq_cap) sh.tq = tq_cap;
    if (sh.tq > d->T) sh.tq = (int32_t)d->T;
    /* unsplit with few blocks (a prefill chunk of one sequence over a long context, too
     * many states for the scratch): smaller tiles give more blocks, at the price of more
     * K/V reads */
    int sms = 0;
    MN_CUDA_CHECK(eb, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    while (!sh.nseg_max && sh.tq > 1 && (d->T + sh.tq - 1) / sh.tq * d->n_kv_head * sh.runs < 2 * (int64_t)sms)
        sh.tq = (sh.tq + 1) / 2;
    if ((int64_t)d->n_kv_head * sh.runs > 65535)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda attention: %d KV heads x %d head runs (max 65535 blocks in z)",
                       d->n_kv_head, sh.runs);
    if (sh.nseg_max > 65535)
        return mn_errf(eb, MN_EUNSUPPORTED, "cuda attention: %d segments (max 65535 blocks in y)", sh.nseg_max);

    /* blocks of fewer rows than warps hold two chunks at once, so every warp has a (row,
     * chunk) pair (decode: one token's GQA group); the shape changes no result */
    sh.par = 1;
    if (sh.tq * sh.nh * ATT_PAR_MAX <= ATT_WARPS &&
        att_smem_bytes(sh.tq * sh.nh, hd, sh.ks, ATT_PAR_MAX) <= (size_t)smem_max)
        sh.par = ATT_PAR_MAX;
    size_t smem = att_smem_bytes(sh.tq * sh.nh, hd, sh.ks, sh.par);
    dim3 grid((unsigned)d->T, (unsigned)(sh.nseg_max ? sh.nseg_max : 1), (unsigned)(d->n_kv_head * sh.runs));
    float *st = sh.nseg_max ? (float *)work : NULL;
    /* head_dim 64 and 128 get loops unrolled at compile time; others take the generic code */
    void (*kern)(mn_attention_desc, att_shape, float *) =
        hd == 128 ? attention_kernel<128> : hd == 64 ? attention_kernel<64> : attention_kernel<0>;
    if (smem > 48 * 1024)
        MN_CUDA_CHECK(eb, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    kern<<<grid, ATT_WARPS * 32, smem, s>>>(*d, sh, st);
    MN_CUDA_CHECK_LAUNCH(eb, "attention_kernel");
    if (sh.nseg_max) {
        attention_fold_kernel<<<mn__cuda_blocks(d->T * d->n_head * hd), MN__CUDA_THREADS, 0, s>>>(*d, sh.nseg_max,
                                                                                                   (const float *)work);
        MN_CUDA_CHECK_LAUNCH(eb, "attention_fold_kernel");
    }
    return MN_OK;
}
