/* kernels/cpu/cpu_impl.h — internal to kernels/cpu: the SIMD level chosen at run time. */
#ifndef MN_CPU_IMPL_H
#define MN_CPU_IMPL_H

#include <stdint.h>

typedef enum mn__simd {
    MN__SIMD_SCALAR = 0,
    MN__SIMD_AVX2 = 1,        /* AVX2 + FMA + F16C */
    MN__SIMD_AVX512 = 2,      /* + AVX-512 F/BW/VL/DQ */
    MN__SIMD_AVX512VNNI = 3,  /* + AVX-512 VNNI */
} mn__simd;

/** The level in force (the best the CPU has, unless mn_cpu_set_simd lowered it). */
mn__simd mn__cpu_simd(void);

/* kernels/cpu/lora.c: how many bytes of the adapter weights a LoRA op reads the matmuls
 * before it should ask for (the head of its read sequence: the segments' A rows, then
 * their B rows output by output), and prefetch hints for bytes [lo, hi) of that sequence
 * (mn_cpu_matmul_prefetch_lora). */
struct mn_lora_desc;
int64_t mn__cpu_lora_prefetch_bytes(const struct mn_lora_desc *d);
void mn__cpu_lora_prefetch_span(const struct mn_lora_desc *d, int64_t lo, int64_t hi);

#endif
