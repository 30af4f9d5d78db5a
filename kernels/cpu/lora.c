/* kernels/cpu/lora.c — batched LoRA apply on the CPU (contract in kernels/ops.h; the body
 * is kernels/cpu/lora_impl.h). Picks the AVX2 compilation (kernels/cpu/lora_avx2.c) when
 * the CPU has it; both give the same bits. */
#include <stdint.h>

#include "kernels/cpu/cpu_impl.h"
#include "kernels/ops.h"

static inline float w_at(const void *w, mn_dtype t, int64_t i) {
    if (t == MN_F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    return t == MN_F16 ? mn_fp16_to_fp32(h) : mn_bf16_to_fp32(h);
}

static float lora_dot(const float *x, const void *w, mn_dtype t, int64_t n) {
    float acc[32] = {0};
    for (int64_t k = 0; k < n; k++) acc[k % 32] += x[k] * w_at(w, t, k);
    float s[8];
    for (int l = 0; l < 8; l++) s[l] = (acc[l] + acc[8 + l]) + (acc[16 + l] + acc[24 + l]);
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

static void lora_axpy(float *acc, float v, const void *w, mn_dtype t, int64_t n) {
    for (int64_t i = 0; i < n; i++) acc[i] += v * w_at(w, t, i);
}

#include "kernels/cpu/lora_impl.h"

void mn__cpu_lora_avx2(const mn_lora_desc *d, void *work, const mn_par *par);

size_t mn_cpu_lora_work_bytes(const mn_lora_desc *d) {
    size_t n = 0;
    for (int32_t s = 0; s < d->n_seg; s++) n += (size_t)d->seg[s].n_rows * (size_t)d->seg[s].r;
    return n * sizeof(float);
}

void mn_cpu_lora(const mn_lora_desc *d, void *work, const mn_par *par) {
    if (mn__cpu_simd() >= MN__SIMD_AVX2) mn__cpu_lora_avx2(d, work, par);
    else lora_body(d, work, par);
}
