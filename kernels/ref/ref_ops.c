/* kernels/ref/ref_ops.c — scalar reference of every op of the forward pass except
 * matmul and dequantization (ref_matmul.c, ref_quant.c).
 *
 * These are the truth the CPU and CUDA kernels are tested against, so they are plain
 * loops in the most obvious order. Where a reduction is involved (rmsnorm's sum of
 * squares, attention's dot products and softmax) the reference accumulates in double,
 * so its own rounding is far below the tolerance the fast kernels are held to.
 * No allocation: attention keeps its per-head accumulator on the stack (head_dim <= 256)
 * and recomputes the scores in a second pass instead of storing them.
 */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "kernels/ops.h"

void mn_ref_get_rows(const mn_get_rows_desc *d) {
    for (int64_t t = 0; t < d->T; t++) {
        const char *row = (const char *)d->table + (int64_t)d->ids[t] * d->row_bytes;
        float *y = d->y + t * d->y_stride;
        switch (d->type) {
        case MN_F32:
            memcpy(y, row, (size_t)d->D * sizeof(float));
            break;
        case MN_F16:
            for (int64_t i = 0; i < d->D; i++) {
                uint16_t h;
                memcpy(&h, row + 2 * i, 2);
                y[i] = mn_fp16_to_fp32(h);
            }
            break;
        case MN_BF16:
            for (int64_t i = 0; i < d->D; i++) {
                uint16_t h;
                memcpy(&h, row + 2 * i, 2);
                y[i] = mn_bf16_to_fp32(h);
            }
            break;
        default:
            mn_ref_dequant_row(d->type, row, y, d->D);
            break;
        }
    }
}

void mn_ref_rmsnorm(const mn_rmsnorm_desc *d) {
    for (int64_t t = 0; t < d->T; t++) {
        const float *x = d->x + t * d->x_stride;
        float *y = d->y + t * d->y_stride;
        double ss = 0.0;
        for (int64_t i = 0; i < d->D; i++) ss += (double)x[i] * x[i];
        float scale = (float)(1.0 / sqrt(ss / (double)d->D + (double)d->eps));
        for (int64_t i = 0; i < d->D; i++) y[i] = x[i] * scale * d->w[i];
    }
}

/* cos/sin of one rotation angle; written exactly like the CPU kernel so both give the
 * same bits (the float product pos*inv_freq, then cosf/sinf, then attn_factor). */
static void rope_cs(int32_t pos, float inv_freq, float attn_factor, float *c, float *s) {
    float theta = (float)pos * inv_freq;
    *c = cosf(theta) * attn_factor;
    *s = sinf(theta) * attn_factor;
}

void mn_ref_rope(const mn_rope_desc *d) {
    int32_t half = d->n_rot / 2;
    for (int64_t t = 0; t < d->T; t++) {
        for (int32_t h = 0; h < d->n_head; h++) {
            float *x = d->x + t * d->x_stride + (int64_t)h * d->head_dim;
            for (int32_t i = 0; i < half; i++) {
                float c, s;
                rope_cs(d->pos[t], d->inv_freq[i], d->attn_factor, &c, &s);
                if (d->mode == MN_ROPE_NEOX)
                    mn_rope_rotate(&x[i], &x[i + half], c, s);
                else
                    mn_rope_rotate(&x[2 * i], &x[2 * i + 1], c, s);
            }
        }
    }
}

void mn_ref_kv_store(const mn_kv_store_desc *d) {
    const mn_kv_view *kv = &d->kv;
    for (int64_t t = 0; t < d->T; t++) {
        for (int32_t h = 0; h < kv->n_kv_head; h++) {
            int64_t off = mn_kv_offset(kv, d->seq[t], d->pos[t], h);
            const float *k = d->k + t * d->k_stride + (int64_t)h * kv->head_dim;
            const float *v = d->v + t * d->v_stride + (int64_t)h * kv->head_dim;
            for (int32_t i = 0; i < kv->head_dim; i++) {
                kv->k[off + i] = mn_fp32_to_fp16(k[i]);
                kv->v[off + i] = mn_fp32_to_fp16(v[i]);
            }
        }
    }
}

/* scale * q·K[s,p,g] in double. */
static double ref_score(const mn_attention_desc *d, const float *q, int32_t s, int32_t p, int32_t g) {
    const uint16_t *k = d->kv.k + mn_kv_offset(&d->kv, s, p, g);
    double dot = 0.0;
    for (int32_t i = 0; i < d->head_dim; i++) dot += (double)q[i] * (double)mn_fp16_to_fp32(k[i]);
    return dot * (double)d->scale;
}

void mn_ref_attention(const mn_attention_desc *d) {
    int32_t hd = d->head_dim;
    int32_t group = d->n_head / d->n_kv_head;
    assert(hd <= 256 && d->n_head % d->n_kv_head == 0);
    double acc[256];
    for (int64_t t = 0; t < d->T; t++) {
        int32_t s = d->seq[t], last = d->pos[t];
        for (int32_t h = 0; h < d->n_head; h++) {
            int32_t g = h / group;
            const float *q = d->q + t * d->q_stride + (int64_t)h * hd;
            /* pass 1: the maximum score, so every exp below is <= 1 */
            double m = -INFINITY;
            for (int32_t p = 0; p <= last; p++) {
                double sc = ref_score(d, q, s, p, g);
                if (sc > m) m = sc;
            }
            /* pass 2: weights, their sum and the weighted sum of V */
            double sum = 0.0;
            for (int32_t i = 0; i < hd; i++) acc[i] = 0.0;
            for (int32_t p = 0; p <= last; p++) {
                double w = exp(ref_score(d, q, s, p, g) - m);
                const uint16_t *v = d->kv.v + mn_kv_offset(&d->kv, s, p, g);
                sum += w;
                for (int32_t i = 0; i < hd; i++) acc[i] += w * (double)mn_fp16_to_fp32(v[i]);
            }
            float *o = d->out + t * d->out_stride + (int64_t)h * hd;
            for (int32_t i = 0; i < hd; i++) o[i] = (float)(acc[i] / sum);
        }
    }
}

void mn_ref_silu_mul(const mn_silu_mul_desc *d) {
    for (int64_t t = 0; t < d->T; t++) {
        const float *g = d->gate + t * d->gate_stride;
        const float *u = d->up + t * d->up_stride;
        float *y = d->y + t * d->y_stride;
        for (int64_t i = 0; i < d->F; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

void mn_ref_add(const mn_add_desc *d) {
    for (int64_t t = 0; t < d->T; t++) {
        float *y = d->y + t * d->y_stride;
        const float *x = d->x + t * d->x_stride;
        for (int64_t i = 0; i < d->D; i++) y[i] += x[i];
    }
}
