/* kernels/cpu/cpu_impl.h — internal to kernels/cpu: the SIMD level chosen at run time. */
#ifndef MN_CPU_IMPL_H
#define MN_CPU_IMPL_H

typedef enum mn__simd {
    MN__SIMD_SCALAR = 0,
    MN__SIMD_AVX2 = 1,        /* AVX2 + FMA + F16C */
    MN__SIMD_AVX512 = 2,      /* + AVX-512 F/BW/VL/DQ */
    MN__SIMD_AVX512VNNI = 3,  /* + AVX-512 VNNI */
} mn__simd;

/** The level in force (the best the CPU has, unless mn_cpu_set_simd lowered it). */
mn__simd mn__cpu_simd(void);

#endif
