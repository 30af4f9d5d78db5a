/* kernels/ref/ref_lora.c — scalar reference of the batched LoRA apply (kernels/ops.h).
 *
 * Plain loops in contract order: per segment, per row, shrink into v (double sums,
 * rounded to f32 as the contract says v is), then each output's expand in double.
 * Fused, v lives on the stack (a shrink width is at most MN_REF_LORA_MAX_R); split
 * phases (MN_LORA_SHRINK / MN_LORA_EXPAND) write or read it in d->v instead.
 */
#include <assert.h>

#include "kernels/ops.h"

#define MN_REF_LORA_MAX_R 4096

/* element i of an F32 / F16 / BF16 array, as f32 (exact) */
static double elem(const void *p, mn_dtype t, int64_t i) {
    if (t == MN_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return t == MN_F16 ? mn_fp16_to_fp32(h) : mn_bf16_to_fp32(h);
}

void mn_ref_lora(const mn_lora_desc *d) {
    float vbuf[MN_REF_LORA_MAX_R];
    const int64_t lda = d->a_ld ? d->a_ld : d->K;
    float *vs = d->v;   /* split phases: this segment's v in d->v */
    for (int32_t s = 0; s < d->n_seg; s++) {
        const mn_lora_seg *g = &d->seg[s];
        assert(g->r <= MN_REF_LORA_MAX_R);
        for (int32_t i = 0; i < g->n_rows; i++) {
            int64_t t = d->rows[g->start + i];
            const float *x = d->x + t * d->x_stride;
            float *v = d->phase == MN_LORA_FUSED ? vbuf : vs + (int64_t)i * g->r;
            for (int32_t j = 0; d->phase != MN_LORA_EXPAND && j < g->r; j++) {
                double acc = 0.0;
                for (int64_t k = 0; k < d->K; k++) acc += (double)x[k] * elem(g->a, g->type, (int64_t)j * lda + k);
                v[j] = (float)acc;
            }
            for (int32_t o = 0; d->phase != MN_LORA_SHRINK && o < d->n_out; o++) {
                if (!g->b[o]) continue;
                const int64_t ldb = d->b_ld[o] ? d->b_ld[o] : d->N[o];
                float *y = d->y[o] + t * d->y_stride[o];
                const float *vo = v + g->r_off[o];
                for (int64_t n = 0; n < d->N[o]; n++) {
                    double acc = 0.0;
                    for (int32_t j = 0; j < g->r_out[o]; j++) acc += (double)vo[j] * elem(g->b[o], g->type, j * ldb + n);
                    y[n] = (float)((double)y[n] + (double)g->scale[o] * acc);
                }
            }
        }
        if (vs) vs += (int64_t)g->n_rows * g->r;
    }
}
