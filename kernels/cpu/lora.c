/* kernels/cpu/lora.c — batched LoRA apply on the CPU (contract in kernels/ops.h).
 *
 * Two phases separated by one barrier:
 *   shrink: the (segment, row, j) dot products x_t . a_j, split evenly over the threads,
 *           written to v in work (segment by segment, row-major [n_rows, r]);
 *   expand: the output columns of all outputs, split over the threads; for each column n
 *           every row of every segment adds scale * v_row . b[n] (b's row n is contiguous).
 * Each dot runs in 8 independent lanes summed in a fixed order (the compiler maps them to
 * SIMD registers), so every element is computed the same way whatever the thread count or
 * the other rows: batch invariant.
 */
#include "kernels/ops.h"

static float dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[k + l] * b[k + l];
    for (int l = 0; k < n; k++, l++) acc[l] += a[k] * b[k];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

size_t mn_cpu_lora_work_bytes(const mn_lora_desc *d) {
    size_t n = 0;
    for (int32_t s = 0; s < d->n_seg; s++) n += (size_t)d->seg[s].n_rows * (size_t)d->seg[s].r;
    return n * sizeof(float);
}

void mn_cpu_lora(const mn_lora_desc *d, void *work, const mn_par *par) {
    float *v = work;
    int64_t total = 0;
    for (int32_t s = 0; s < d->n_seg; s++) total += (int64_t)d->seg[s].n_rows * d->seg[s].r;
    int64_t lo, hi;
    mn_par_range(par, total, &lo, &hi);
    /* shrink: item i of segment s is (row i / r, j = i % r); base = first item of s */
    int64_t base = 0;
    for (int32_t s = 0; s < d->n_seg && base < hi; s++) {
        const mn_lora_seg *g = &d->seg[s];
        int64_t n = (int64_t)g->n_rows * g->r;
        int64_t a = lo > base ? lo - base : 0, b = hi - base < n ? hi - base : n;
        for (int64_t i = a; i < b; i++) {
            int64_t row = i / g->r, j = i % g->r;
            const float *x = d->x + (int64_t)d->rows[g->start + row] * d->x_stride;
            v[base + i] = dot(x, g->a + j * d->K, d->K);
        }
        base += n;
    }
    mn_par_barrier(par);
    /* expand: columns of output 0, then output 1, ... */
    int64_t cols = 0;
    for (int32_t o = 0; o < d->n_out; o++) cols += d->N[o];
    mn_par_range(par, cols, &lo, &hi);
    int64_t c0 = 0;
    for (int32_t o = 0; o < d->n_out && c0 < hi; o++) {
        int64_t n0 = lo > c0 ? lo - c0 : 0, n1 = hi - c0 < d->N[o] ? hi - c0 : d->N[o];
        c0 += d->N[o];
        if (n0 >= n1) continue;
        const float *vs = v;
        for (int32_t s = 0; s < d->n_seg; s++) {
            const mn_lora_seg *g = &d->seg[s];
            if (g->b[o]) {
                for (int32_t i = 0; i < g->n_rows; i++) {
                    const float *vr = vs + (int64_t)i * g->r + g->r_off[o];
                    float *y = d->y[o] + (int64_t)d->rows[g->start + i] * d->y_stride[o];
                    for (int64_t n = n0; n < n1; n++)
                        y[n] += g->scale[o] * dot(vr, g->b[o] + n * g->r_out[o], g->r_out[o]);
                }
            }
            vs += (int64_t)g->n_rows * g->r;
        }
    }
}
