/* kernels/cpu/matmul_avx512vnni.c — the avx512-vnni level of the matmul: the kernels of
 * matmul_x86.h with vpdpbusd (u8*s8, four products summed straight into i32) on 256-bit
 * vectors, 2 rows x 4 tokens register tiles (4x4 measured slower on Zen 4). 256-bit rather
 * than 512-bit vectors keep one 32-element block per vector, so the per-element sequence
 * is the same as at the avx2 level and the two levels agree bit for bit.
 * Q8_0 has its own kernels (matmul_x86.h): 8 rows per 256-bit vector for decode, 16 rows per
 * 512-bit vector for prefill, one lane per row, so both give the reference's bits.
 */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/matmul_impl.h"
#include "kernels/quant_math.h"


#define MN__DOT(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (s))
#define MN__RT 2
#define MN__CT 4
#define MN__Q8_VNNI 1
#define MN__Q8_CT 8
#define MN__ROWS_FN mn__mm_rows_avx512vnni
#include "kernels/cpu/matmul_x86.h"
