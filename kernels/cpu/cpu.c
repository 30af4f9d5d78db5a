/* kernels/cpu/cpu.c — run-time choice of the SIMD variant of the CPU kernels. */
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_impl.h"
#include "kernels/ops.h"

static mn__simd best_level = MN__SIMD_SCALAR;
static mn__simd level = MN__SIMD_SCALAR;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static const char *const level_names[] = {"scalar", "avx2", "avx512", "avx512-vnni"};

static void detect(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    mn__simd l = MN__SIMD_SCALAR;
    unsigned a, b, c, d;
    int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C); /* clang's builtin lacks "f16c" */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c)
        l = MN__SIMD_AVX2;
    if (l == MN__SIMD_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        l = MN__SIMD_AVX512;
    if (l == MN__SIMD_AVX512 && __builtin_cpu_supports("avx512vnni"))
        l = MN__SIMD_AVX512VNNI;
    best_level = level = l;
#endif
    /* MNEME_SIMD=scalar|avx2|avx512|avx512-vnni caps the level (debugging, comparisons) */
    const char *env = getenv("MNEME_SIMD");
    for (int i = 0; env && i < 4; i++)
        if (strcmp(env, level_names[i]) == 0 && (mn__simd)i <= best_level) level = (mn__simd)i;
}

void mn_cpu_init(void) { pthread_once(&once, detect); }

mn__simd mn__cpu_simd(void) { return level; }

const char *mn_cpu_simd_name(void) {
    mn_cpu_init();
    return level_names[level];
}

int mn_cpu_set_simd(const char *name) {
    mn_cpu_init();
    for (int i = 0; i < 4; i++) {
        if (strcmp(name, level_names[i]) == 0) {
            if ((mn__simd)i > best_level) return 0;
            level = (mn__simd)i;
            return 1;
        }
    }
    return 0;
}
