/* kernels/cpu/matmul_avx512vnni.c — the avx512-vnni level of the matmul: the kernels of
 * matmul_x86.h with vpdpbusd (u8*s8, four products summed straight into i32). The quants
 * (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q4_K, Q5_K, Q6_K) run one lane per weight row: 8 rows per 256-bit
 * vector for decode, 16 rows per 512-bit vector for prefill, so both give the reference's
 * bits, as the avx2 level does. */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/matmul_impl.h"
#include "kernels/quant_math.h"


#define MN__DOT(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (s))
#define MN__Q8_VNNI 1
#define MN__Q8_CT 8
#define MN__ROWS_FN mn__mm_rows_avx512vnni
#include "kernels/cpu/matmul_x86.h"
