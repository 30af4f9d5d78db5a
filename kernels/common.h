/* kernels/common.h — definitions shared by host C and CUDA kernels.
 *
 * MN_HD marks a function that is compiled for both host and device, so the math
 * that the reference C, the CPU kernels and the CUDA kernels share (fp16/bf16
 * conversion, RoPE pair rotation, KV block-table addressing) is written once and
 * exercised on every CI run. Everything here is header-only and allocation-free.
 */
#ifndef MN_KERNELS_COMMON_H
#define MN_KERNELS_COMMON_H

#include <stdint.h>
#include <string.h>
#include <math.h>

#ifdef __CUDACC__
#define MN_HD __host__ __device__ static inline
#else
#define MN_HD static inline
#endif

/* IEEE binary16 -> float, exact for every input (NaN payloads kept, subnormals handled). */
MN_HD float mn_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            int e = -1;
            do { man <<= 1; e++; } while ((man & 0x400u) == 0);
            man &= 0x3ffu;
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + (127 - 15)) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> IEEE binary16, round to nearest even; overflow gives inf, NaN stays NaN. */
MN_HD uint16_t mn_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
    if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf */
    if (absx < 0x38800000u) { /* result is subnormal or zero */
        if (absx < 0x33000000u) return (uint16_t)sign; /* < 2^-25 rounds to 0 */
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t half = 1u << (shift - 1);
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = absx - 0x38000000u; /* rebias exponent 127 -> 15 */
    uint32_t lsb = (r >> 13) & 1u;
    r += 0xfffu + lsb;
    return (uint16_t)(sign | (r >> 13));
}

MN_HD float mn_bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> bfloat16, round to nearest even; NaN stays NaN. */
MN_HD uint16_t mn_fp32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* RoPE: rotate one pair (a, b) by angle theta = pos * inv_freq. Both layouts use it:
 * NORM pairs are (x[2i], x[2i+1]) (llama GGUF, whose Q/K rows are pre-permuted),
 * NEOX pairs are (x[i], x[i + n_rot/2]) (qwen2). cosf/sinf in float on purpose:
 * reference and CPU kernels then produce the same bits. */
MN_HD void mn_rope_rotate(float *a, float *b, float cos_t, float sin_t) {
    float x0 = *a, x1 = *b;
    *a = x0 * cos_t - x1 * sin_t;
    *b = x0 * sin_t + x1 * cos_t;
}

#endif
