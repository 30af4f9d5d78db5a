/* kernels/cpu/ops_cpu.c — fast CPU versions of get_rows, rmsnorm, rope, kv_store,
 * attention, silu_mul and add (matmul lives in matmul*.c).
 *
 * Each mn_cpu_<op> is called by every thread of the pool with its own par->ith. The work
 * is split over independent units (rows or tokens with mn_par_range; for attention
 * (tile of tokens of one sequence, heads of one KV group) round-robin) and never inside
 * a reduction, so an output element's
 * value depends neither on the thread count nor on the other tokens of the batch.
 * Attention's one exception, decode over a long context, splits a token's positions into
 * fixed segments whose states every path folds in the same order (see MN__ATTN_SEG).
 * The per-unit work is done by the scalar functions below or, by mn__cpu_simd(), by
 * their AVX2 / AVX-512 twins in ops_cpu_avx2.c / ops_cpu_avx512.c.
 *
 * Precision against kernels/ref (what tests/unit/test_ops.c holds each op to):
 *   get_rows, rope, kv_store, add   bit-exact
 *   rmsnorm                         f32 sum of squares: |err| <= 1e-7 + 1e-5 |ref|
 *   silu_mul                        polynomial exp (~2 ulp): |err| <= 1e-7 + 1e-6 |ref|
 *   attention                       online softmax in f32: 1e-5 + 1e-4 max|V| (ops.h)
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "kernels/cpu/cpu_impl.h"
#include "kernels/cpu/ops_cpu_impl.h"
#include "kernels/ops.h"

/* ---- get_rows ------------------------------------------------------------------------ */

void mn_cpu_get_rows(const mn_get_rows_desc *d, void *work, const mn_par *par) {
    int64_t lo, hi;
    mn_par_range(par, d->T, &lo, &hi);
    mn__simd simd = mn__cpu_simd();
    for (int64_t t = lo; t < hi; t++) {
        const char *row = (const char *)d->table + (int64_t)d->ids[t] * d->row_bytes;
        float *y = d->y + t * d->y_stride;
        switch (d->type) {
        case MN_F32:
            memcpy(y, row, (size_t)d->D * sizeof(float));
            break;
        case MN_F16:
            if (simd >= MN__SIMD_AVX2) {
                mn__f16_to_f32_row_avx2((const uint16_t *)(const void *)row, y, d->D);
            } else {
                for (int64_t i = 0; i < d->D; i++) {
                    uint16_t h;
                    memcpy(&h, row + 2 * i, 2);
                    y[i] = mn_fp16_to_fp32(h);
                }
            }
            break;
        case MN_BF16:
            for (int64_t i = 0; i < d->D; i++) {
                uint16_t h;
                memcpy(&h, row + 2 * i, 2);
                uint32_t bits = (uint32_t)h << 16;
                memcpy(&y[i], &bits, 4);
            }
            break;
        default:
            /* The block formulas are exact float math, so the reference dequantizer is
             * already the right answer; a SIMD one only changes speed. */
            mn_ref_dequant_row(d->type, row, y, d->D);
            break;
        }
    }
}

/* ---- rmsnorm ------------------------------------------------------------------------- */

static void rmsnorm_row_scalar(const float *x, const float *w, float *y, int64_t D, float eps) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= D; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += x[i + j] * x[i + j];
    for (; i < D; i++) acc[0] += x[i] * x[i];
    float ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    float scale = 1.0f / sqrtf(ss / (float)D + eps);
    for (i = 0; i < D; i++) y[i] = x[i] * scale * w[i];
}

void mn_cpu_rmsnorm(const mn_rmsnorm_desc *d, void *work, const mn_par *par) {
    int64_t lo, hi;
    mn_par_range(par, d->T, &lo, &hi);
    mn__simd simd = mn__cpu_simd();
    for (int64_t t = lo; t < hi; t++) {
        const float *x = d->x + t * d->x_stride;
        float *y = d->y + t * d->y_stride;
        if (simd >= MN__SIMD_AVX512)
            mn__rmsnorm_row_avx512(x, d->w, y, d->D, d->eps);
        else if (simd >= MN__SIMD_AVX2)
            mn__rmsnorm_row_avx2(x, d->w, y, d->D, d->eps);
        else
            rmsnorm_row_scalar(x, d->w, y, d->D, d->eps);
    }
}

/* ---- rope ---------------------------------------------------------------------------- */

#define MN__ROPE_MAX_PAIRS 256

void mn_cpu_rope(const mn_rope_desc *d, void *work, const mn_par *par) {
    int32_t half = d->n_rot / 2;
    assert(half <= MN__ROPE_MAX_PAIRS);
    float cs[MN__ROPE_MAX_PAIRS], sn[MN__ROPE_MAX_PAIRS];
    int64_t lo, hi;
    mn_par_range(par, d->T, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        /* one cos/sin table per token, shared by all heads; the same expression as the
         * reference (float product, cosf/sinf, times attn_factor) gives the same bits */
        for (int32_t i = 0; i < half; i++) {
            float theta = (float)d->pos[t] * d->inv_freq[i];
            cs[i] = cosf(theta) * d->attn_factor;
            sn[i] = sinf(theta) * d->attn_factor;
        }
        for (int32_t h = 0; h < d->n_head; h++) {
            float *x = d->x + t * d->x_stride + (int64_t)h * d->head_dim;
            if (d->mode == MN_ROPE_NEOX) {
                for (int32_t i = 0; i < half; i++) mn_rope_rotate(&x[i], &x[i + half], cs[i], sn[i]);
            } else {
                for (int32_t i = 0; i < half; i++) mn_rope_rotate(&x[2 * i], &x[2 * i + 1], cs[i], sn[i]);
            }
        }
    }
}

/* ---- kv_store ------------------------------------------------------------------------ */

static void f32_to_f16_row(mn__simd simd, const float *x, uint16_t *y, int64_t n) {
    if (simd >= MN__SIMD_AVX2) {
        mn__f32_to_f16_row_avx2(x, y, n);
    } else {
        for (int64_t i = 0; i < n; i++) y[i] = mn_fp32_to_fp16(x[i]);
    }
}

void mn_cpu_kv_store(const mn_kv_store_desc *d, void *work, const mn_par *par) {
    const mn_kv_view *kv = &d->kv;
    mn__simd simd = mn__cpu_simd();
    int64_t lo, hi;
    mn_par_range(par, d->T, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        /* a token's heads are contiguous in the cache row, so one conversion per row */
        int64_t off = mn_kv_offset(kv, d->seq[t], d->pos[t], 0);
        int64_t n = (int64_t)kv->n_kv_head * kv->head_dim;
        f32_to_f16_row(simd, d->k + t * d->k_stride, kv->k + off, n);
        f32_to_f16_row(simd, d->v + t * d->v_stride, kv->v + off, n);
    }
}

/* ---- attention ----------------------------------------------------------------------- */

/* Scalar segment state (one token at a time): online softmax over chunks of
 * MN__ATTN_CHUNK positions of [p0, min(p1, pos+1)) for heads h0..h0+nh-1 of one KV group
 * of token t; writes acc[j*hd ..], m[j], l[j] (see mn__attn_part). */
static void attn_heads_scalar(const mn_attention_desc *d, int64_t t, int32_t h0, int32_t nh, int32_t p0, int32_t p1,
                              float *out_acc, float *out_m, float *out_l) {
    const mn_kv_view *kv = &d->kv;
    int32_t hd = d->head_dim, g = h0 / (d->n_head / d->n_kv_head);
    int32_t s = d->seq[t], n_pos = d->pos[t] + 1 < p1 ? d->pos[t] + 1 : p1;
    float acc[MN__ATTN_MAX_HEADS][MN__ATTN_MAX_HD];
    float sc[MN__ATTN_MAX_HEADS][MN__ATTN_CHUNK];
    float m[MN__ATTN_MAX_HEADS], l[MN__ATTN_MAX_HEADS];
    const float *q[MN__ATTN_MAX_HEADS];
    for (int32_t j = 0; j < nh; j++) {
        q[j] = d->q + t * d->q_stride + (int64_t)(h0 + j) * hd;
        m[j] = -INFINITY;
        l[j] = 0.0f;
        for (int32_t i = 0; i < hd; i++) acc[j][i] = 0.0f;
    }
    for (int32_t c0 = p0; c0 < n_pos; c0 += MN__ATTN_CHUNK) {
        int32_t n = n_pos - c0 < MN__ATTN_CHUNK ? n_pos - c0 : MN__ATTN_CHUNK;
        for (int32_t p = 0; p < n; p++) {
            const uint16_t *k = kv->k + mn_kv_offset(kv, s, c0 + p, g);
            for (int32_t j = 0; j < nh; j++) {
                float dot = 0.0f;
                for (int32_t i = 0; i < hd; i++) dot += q[j][i] * mn_fp16_to_fp32(k[i]);
                sc[j][p] = dot * d->scale;
            }
        }
        for (int32_t j = 0; j < nh; j++) {
            float cm = m[j];
            for (int32_t p = 0; p < n; p++) cm = sc[j][p] > cm ? sc[j][p] : cm;
            float alpha = expf(m[j] - cm), sum = 0.0f;
            for (int32_t p = 0; p < n; p++) {
                sc[j][p] = expf(sc[j][p] - cm);
                sum += sc[j][p];
            }
            l[j] = l[j] * alpha + sum;
            m[j] = cm;
            for (int32_t i = 0; i < hd; i++) acc[j][i] *= alpha;
        }
        for (int32_t p = 0; p < n; p++) {
            const uint16_t *v = kv->v + mn_kv_offset(kv, s, c0 + p, g);
            for (int32_t i = 0; i < hd; i++) {
                float vi = mn_fp16_to_fp32(v[i]);
                for (int32_t j = 0; j < nh; j++) acc[j][i] += sc[j][p] * vi;
            }
        }
    }
    for (int32_t j = 0; j < nh; j++) {
        memcpy(out_acc + (int64_t)j * hd, acc[j], (size_t)hd * sizeof(float));
        out_m[j] = m[j];
        out_l[j] = l[j];
    }
}

/* Segment state of a unit: tokens t0..t0+nt-1 (one sequence), heads h0..h0+nh-1 (one
 * KV group), positions [p0, p1). */
static void attn_part(mn__simd simd, const mn_attention_desc *d, int64_t t0, int32_t nt, int32_t h0, int32_t nh,
                      int32_t p0, int32_t p1, mn__attn_part *out) {
    if (simd >= MN__SIMD_AVX512) {
        mn__attn_part_avx512(d, t0, nt, h0, nh, p0, p1, out);
    } else if (simd >= MN__SIMD_AVX2) {
        mn__attn_part_avx2(d, t0, nt, h0, nh, p0, p1, out);
    } else {
        for (int32_t i = 0; i < nt; i++)
            attn_heads_scalar(d, t0 + i, h0, nh, p0, p1, out->acc + (int64_t)i * nh * d->head_dim, out->m[i],
                              out->l[i]);
    }
}

/* Folds one segment's state (pacc, pm, pl) into a token-head's running state, segments
 * in ascending order; the first segment (which always holds position 0) is copied. The
 * one place where states meet, so the split and the sequential paths agree bit for bit. */
static void attn_fold(float *acc, float *m, float *l, const float *pacc, float pm, float pl, int32_t hd, int first) {
    if (first) {
        memcpy(acc, pacc, (size_t)hd * sizeof(float));
        *m = pm;
        *l = pl;
        return;
    }
    float mx = pm > *m ? pm : *m;
    float a = expf(*m - mx), b = expf(pm - mx);
    *l = *l * a + pl * b;
    *m = mx;
    for (int32_t x = 0; x < hd; x++) acc[x] = acc[x] * a + pacc[x] * b;
}

static void attn_write(const float *acc, float l, float *o, int32_t hd) {
    float inv = 1.0f / l;
    for (int32_t x = 0; x < hd; x++) o[x] = acc[x] * inv;
}

/* The heads of a tile's unit r: run k = r % per of KV group r / per (runs of `run` heads,
 * the last one shorter when the group does not divide). */
static inline void unit_heads(int64_t r, int32_t per, int32_t run, int32_t group, int32_t *h0, int32_t *nh) {
    int32_t g = (int32_t)(r / per), k = (int32_t)(r % per);
    *h0 = g * group + k * run;
    *nh = group - k * run < run ? group - k * run : run;
}

/* Most heads a tile's running state is kept for (n_head of the models we run is far less). */
#define MN__ATTN_MAX_N_HEAD 256

/* The units of one tile that this thread owns (bit u0 + r of the round-robin for run r),
 * computed segment by segment: every owned unit takes segment k before any takes k + 1, so
 * a segment's K/V blocks are brought from memory once and used by all KV groups while they
 * are in cache (unit by unit, each group swept the whole context on its own and the other
 * groups' lines between its rows were fetched again, or never prefetched). Each unit still
 * folds its segments in ascending order, so its bits are those of any other schedule. The
 * running (unnormalised) state lives in the output rows until the last segment. */
static void attn_tile(mn__simd simd, const mn_attention_desc *d, int64_t t0, int32_t nt, int32_t per, int32_t run,
                      int64_t u0, const mn_par *par) {
    float pacc[MN__ATTN_TILE * MN__ATTN_MAX_HEADS * MN__ATTN_MAX_HD];
    static _Thread_local float tm[MN__ATTN_TILE][MN__ATTN_MAX_N_HEAD], tl[MN__ATTN_TILE][MN__ATTN_MAX_N_HEAD];
    mn__attn_part part = {.acc = pacc};
    int32_t hd = d->head_dim, group = d->n_head / d->n_kv_head, max_pos = 0;
    int64_t units = (int64_t)d->n_kv_head * per;
    for (int32_t i = 0; i < nt; i++) max_pos = d->pos[t0 + i] + 1 > max_pos ? d->pos[t0 + i] + 1 : max_pos;
    for (int32_t p0 = 0; p0 < max_pos; p0 += MN__ATTN_SEG) {
        for (int64_t r = 0; r < units; r++) {
            if ((u0 + r) % par->nth != par->ith) continue;
            int32_t h0, nh;
            unit_heads(r, per, run, group, &h0, &nh);
            attn_part(simd, d, t0, nt, h0, nh, p0, p0 + MN__ATTN_SEG, &part);
            for (int32_t i = 0; i < nt; i++) {
                if (d->pos[t0 + i] < p0) continue;
                float *o = d->out + (t0 + i) * d->out_stride;
                for (int32_t j = 0; j < nh; j++)
                    attn_fold(o + (int64_t)(h0 + j) * hd, &tm[i][h0 + j], &tl[i][h0 + j], pacc + (int64_t)(i * nh + j) * hd,
                              part.m[i][j], part.l[i][j], hd, p0 == 0);
            }
        }
    }
    for (int64_t r = 0; r < units; r++) {
        if ((u0 + r) % par->nth != par->ith) continue;
        int32_t h0, nh;
        unit_heads(r, per, run, group, &h0, &nh);
        for (int32_t i = 0; i < nt; i++)
            for (int32_t j = 0; j < nh; j++) {
                float *o = d->out + (t0 + i) * d->out_stride + (int64_t)(h0 + j) * hd;
                attn_write(o, tl[i][h0 + j], o, hd);
            }
    }
}

/* How the threads share an attention call. Tiles are runs of up to MN__ATTN_TILE
 * consecutive tokens of one sequence (they share each K/V chunk conversion); a unit is
 * (tile, run of heads of one KV group). When there are few units (decode, a short append)
 * and the context spans several segments, the segments themselves are spread over the
 * threads (split): their states go to work memory and are folded after a barrier.
 * Every thread, and mn_cpu_attention_work_bytes, computes the same plan. */
typedef struct attn_plan {
    int64_t n_tiles;
    int32_t tile;       /* tokens per tile: min(MN__ATTN_TILE, MN__ATTN_UNIT_ROWS / heads per unit) */
    int32_t per, run;   /* runs of heads per KV group, heads per run */
    int32_t nseg_max;   /* segments of the longest token */
    int split;
} attn_plan;

/* Work bytes of the split (0 where it is never used: one segment, many tokens, or over
 * MN__ATTN_SPLIT_MAX bytes). Independent of the thread count, so memory reserved for one
 * count fits any other. */
#define MN__ATTN_SPLIT_MAX ((size_t)64 << 20)
static size_t attn_split_bytes(const mn_attention_desc *d, int32_t nseg_max) {
    if (nseg_max < 2 || d->T > 64) return 0;
    size_t b = (size_t)d->T * (size_t)d->n_head * (size_t)nseg_max * (size_t)(d->head_dim + 2) * sizeof(float);
    return b <= MN__ATTN_SPLIT_MAX ? b : 0;
}

static attn_plan attn_plan_for(const mn_attention_desc *d, int nth) {
    attn_plan pl = {0};
    int32_t group = d->n_head / d->n_kv_head, max_pos = 0;
    /* the tile from the widest runs of heads (below, few units may narrow them to one head:
     * the tile stays, those units just hold fewer rows) */
    int32_t per0 = (group + MN__ATTN_MAX_HEADS - 1) / MN__ATTN_MAX_HEADS, run0 = (group + per0 - 1) / per0;
    pl.tile = MN__ATTN_UNIT_ROWS / run0 < MN__ATTN_TILE ? MN__ATTN_UNIT_ROWS / run0 : MN__ATTN_TILE;
    for (int64_t t = 0, len = 0; t < d->T; t++, len++) {
        if (t == 0 || len == pl.tile || d->seq[t] != d->seq[t - 1]) {
            pl.n_tiles++;
            len = 0;
        }
        max_pos = d->pos[t] + 1 > max_pos ? d->pos[t] + 1 : max_pos;
    }
    pl.nseg_max = (max_pos + MN__ATTN_SEG - 1) / MN__ATTN_SEG;
    pl.per = (group + MN__ATTN_MAX_HEADS - 1) / MN__ATTN_MAX_HEADS;
    pl.run = (group + pl.per - 1) / pl.per;
    int64_t units = pl.n_tiles * d->n_kv_head * pl.per;
    if (nth > 1 && units < 4 * (int64_t)nth && attn_split_bytes(d, pl.nseg_max)) {
        pl.split = 1;
    } else if (units < 2 * (int64_t)nth) {
        /* short context, few units: each head its own unit so the threads stay busy */
        pl.per = group;
        pl.run = 1;
    }
    return pl;
}

size_t mn_cpu_attention_work_bytes(const mn_attention_desc *d, int nth) {
    return nth > 1 ? attn_split_bytes(d, attn_plan_for(d, 1).nseg_max) : 0;
}

void mn_cpu_attention(const mn_attention_desc *d, void *work, const mn_par *par) {
    assert(d->head_dim <= MN__ATTN_MAX_HD && d->n_head % d->n_kv_head == 0 && d->n_head <= MN__ATTN_MAX_N_HEAD);
    int32_t group = d->n_head / d->n_kv_head, hd = d->head_dim;
    attn_plan pl = attn_plan_for(d, par->nth);
    int32_t per = pl.per, run = pl.run;
    int64_t units_per_tile = (int64_t)d->n_kv_head * per;
    mn__simd simd = mn__cpu_simd();
    if (!pl.split || !work) {
        /* Units go round-robin over the threads: under the causal mask later tokens cost
         * more, and interleaving keeps prefill balanced where contiguous ranges would not. */
        int64_t u = 0;
        for (int64_t t0 = 0; t0 < d->T; u += units_per_tile) {
            int32_t nt = 1;
            while (nt < pl.tile && t0 + nt < d->T && d->seq[t0 + nt] == d->seq[t0]) nt++;
            attn_tile(simd, d, t0, nt, per, run, u, par);
            t0 += nt;
        }
        return;
    }
    /* split: state of (token t, head h, segment k) at work + ((t*n_head + h)*nseg_max + k)*(hd + 2) */
    float *st = work;
    int64_t ld = hd + 2;
    float pacc[MN__ATTN_TILE * MN__ATTN_MAX_HEADS * MN__ATTN_MAX_HD];
    mn__attn_part part = {.acc = pacc};
    int64_t u = 0;
    for (int64_t t0 = 0; t0 < d->T;) {
        int32_t nt = 1, max_pos = d->pos[t0] + 1;
        while (nt < pl.tile && t0 + nt < d->T && d->seq[t0 + nt] == d->seq[t0]) {
            max_pos = d->pos[t0 + nt] + 1 > max_pos ? d->pos[t0 + nt] + 1 : max_pos;
            nt++;
        }
        /* segment-major, as in attn_tile: a segment's blocks serve every KV group at once */
        for (int32_t p0 = 0; p0 < max_pos; p0 += MN__ATTN_SEG) {
            for (int64_t r = 0; r < units_per_tile; r++, u++) {
                if (u % par->nth != par->ith) continue;
                int32_t h0, nh;
                unit_heads(r, per, run, group, &h0, &nh);
                attn_part(simd, d, t0, nt, h0, nh, p0, p0 + MN__ATTN_SEG, &part);
                for (int32_t i = 0; i < nt; i++) {
                    if (d->pos[t0 + i] < p0) continue;
                    for (int32_t j = 0; j < nh; j++) {
                        float *o = st + (((t0 + i) * d->n_head + h0 + j) * pl.nseg_max + p0 / MN__ATTN_SEG) * ld;
                        memcpy(o, pacc + (int64_t)(i * nh + j) * hd, (size_t)hd * sizeof(float));
                        o[hd] = part.m[i][j];
                        o[hd + 1] = part.l[i][j];
                    }
                }
            }
        }
        t0 += nt;
    }
    mn_par_barrier(par);
    int64_t lo, hi;
    mn_par_range(par, d->T * d->n_head, &lo, &hi);
    for (int64_t th = lo; th < hi; th++) {
        int64_t t = th / d->n_head, h = th % d->n_head;
        float acc[MN__ATTN_MAX_HD], m = 0.0f, l = 0.0f;
        const float *s0 = st + th * pl.nseg_max * ld;
        for (int32_t k = 0; k <= d->pos[t] / MN__ATTN_SEG; k++)
            attn_fold(acc, &m, &l, s0 + k * ld, s0[k * ld + hd], s0[k * ld + hd + 1], hd, k == 0);
        attn_write(acc, l, d->out + t * d->out_stride + h * hd, hd);
    }
}

/* ---- silu_mul and add ---------------------------------------------------------------- */

void mn_cpu_silu_mul(const mn_silu_mul_desc *d, void *work, const mn_par *par) {
    int64_t lo, hi;
    mn_par_range(par, d->T, &lo, &hi);
    mn__simd simd = mn__cpu_simd();
    for (int64_t t = lo; t < hi; t++) {
        const float *g = d->gate + t * d->gate_stride;
        const float *u = d->up + t * d->up_stride;
        float *y = d->y + t * d->y_stride;
        if (simd >= MN__SIMD_AVX512) {
            mn__silu_mul_row_avx512(g, u, y, d->F);
        } else if (simd >= MN__SIMD_AVX2) {
            mn__silu_mul_row_avx2(g, u, y, d->F);
        } else {
            for (int64_t i = 0; i < d->F; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
    }
}

void mn_cpu_add(const mn_add_desc *d, void *work, const mn_par *par) {
    int64_t lo, hi;
    mn_par_range(par, d->T, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        float *y = d->y + t * d->y_stride;
        const float *x = d->x + t * d->x_stride;
        for (int64_t i = 0; i < d->D; i++) y[i] += x[i];
    }
}
