/* kernels/dtype.h — tensor element types and the byte layout of quantized blocks.
 *
 * Type ids equal GGML's (the numbers stored in GGUF files), so a GGUF tensor type
 * maps to mn_dtype without a table. Block layouts are the on-disk GGUF layouts
 * (little-endian, no padding); the _Static_asserts below pin their sizes.
 * Header-only; shared by host C and CUDA.
 */
#ifndef MN_KERNELS_DTYPE_H
#define MN_KERNELS_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include "kernels/common.h"

typedef enum mn_dtype {
    MN_F32 = 0,
    MN_F16 = 1,
    MN_Q4_0 = 2,
    MN_Q4_1 = 3,
    MN_Q5_0 = 6,
    MN_Q5_1 = 7,
    MN_Q8_0 = 8,
    MN_Q8_1 = 9,   /* activation format only (see mn_block_q8_1) */
    MN_Q2_K = 10,
    MN_Q3_K = 11,
    MN_Q4_K = 12,
    MN_Q5_K = 13,
    MN_Q6_K = 14,
    MN_Q8_K = 15,  /* activation format only (see mn_block_q8_K) */
    MN_BF16 = 30,
    MN_DTYPE_COUNT = 31
} mn_dtype;

#define MN_QK 32    /* elements per block of the legacy quants */
#define MN_QK_K 256 /* elements per super-block of the K-quants */
#define MN_K_SCALE_SIZE 12

/* Q4_0: x = d * (q - 8), q in 0..15; qs[j] holds element j (low nibble) and j+16 (high). */
typedef struct { uint16_t d; uint8_t qs[MN_QK / 2]; } mn_block_q4_0;
/* Q4_1: x = d * q + m, same nibble order as Q4_0. */
typedef struct { uint16_t d; uint16_t m; uint8_t qs[MN_QK / 2]; } mn_block_q4_1;
/* Q5_0: x = d * (q - 16), q in 0..31: the low 4 bits as Q4_0's nibbles (qs[j]: element j
 * low, j+16 high), the fifth bit of element i is bit i of qh read as a little-endian uint32. */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[MN_QK / 2]; } mn_block_q5_0;
/* Q5_1: x = d * q + m, the bits as Q5_0. */
typedef struct { uint16_t d; uint16_t m; uint8_t qh[4]; uint8_t qs[MN_QK / 2]; } mn_block_q5_1;
/* Q8_0: x = d * q. */
typedef struct { uint16_t d; int8_t qs[MN_QK]; } mn_block_q8_0;
/* Q2_K: 16 sub-blocks of 16, scales[s] = sc | m << 4 (4 bits each); x = (d*sc)*q - (dmin*m),
 * q in 0..3: element 128h + 32j + l (h 0..1, j 0..3, l 0..31) is (qs[32h + l] >> 2j) & 3. */
typedef struct { uint8_t scales[MN_QK_K / 16]; uint8_t qs[MN_QK_K / 4]; uint16_t d; uint16_t dmin; } mn_block_q2_K;
/* Q3_K: 16 sub-blocks of 16 with 6-bit scales (sc - 32) packed in scales[12]; x = d*sc*q,
 * q in -4..3 = 2 low bits - (high bit ? 0 : 4). Element 128h + 32j + l (h 0..1, j 0..3,
 * l 0..31): low bits (qs[32h + l] >> 2j) & 3, high bit (hmask[l] >> (4h + j)) & 1. */
typedef struct { uint8_t hmask[MN_QK_K / 8]; uint8_t qs[MN_QK_K / 4]; uint8_t scales[MN_K_SCALE_SIZE]; uint16_t d; } mn_block_q3_K;
/* Q4_K: 8 sub-blocks of 32, each with a 6-bit scale and 6-bit min packed in scales[12];
 * x = d*sc*q - dmin*m. qs: for each 64-element chunk, 32 bytes: low nibbles are
 * elements 0..31 of the chunk, high nibbles 32..63. */
typedef struct { uint16_t d; uint16_t dmin; uint8_t scales[MN_K_SCALE_SIZE]; uint8_t qs[MN_QK_K / 2]; } mn_block_q4_K;
/* Q5_K: as Q4_K plus a fifth bit per element in qh. */
typedef struct { uint16_t d; uint16_t dmin; uint8_t scales[MN_K_SCALE_SIZE]; uint8_t qh[MN_QK_K / 8]; uint8_t qs[MN_QK_K / 2]; } mn_block_q5_K;
/* Q6_K: 16 sub-blocks of 16 with int8 scales; 4 low bits in ql, 2 high bits in qh; x = d*sc*(q-32). */
typedef struct { uint8_t ql[MN_QK_K / 2]; uint8_t qh[MN_QK_K / 4]; int8_t scales[MN_QK_K / 16]; uint16_t d; } mn_block_q6_K;

/* Activation blocks (mneme-internal, never in files). x is quantized to these before
 * a dot with quantized weights; float scales keep the activation error small.
 * q8_1: d = max|x|/127, qs = round(x/d), s = d * sum(qs) (needed by Q4_1's min term). */
typedef struct { float d; float s; int8_t qs[MN_QK]; } mn_block_q8_1;
/* q8_K: one scale per 256, bsums[i] = sum of qs[16i .. 16i+15] (needed by the K-quant mins). */
typedef struct { float d; int8_t qs[MN_QK_K]; int16_t bsums[MN_QK_K / 16]; } mn_block_q8_K;

#ifndef __cplusplus
_Static_assert(sizeof(mn_block_q4_0) == 18, "q4_0 layout");
_Static_assert(sizeof(mn_block_q4_1) == 20, "q4_1 layout");
_Static_assert(sizeof(mn_block_q5_0) == 22, "q5_0 layout");
_Static_assert(sizeof(mn_block_q5_1) == 24, "q5_1 layout");
_Static_assert(sizeof(mn_block_q8_0) == 34, "q8_0 layout");
_Static_assert(sizeof(mn_block_q2_K) == 84, "q2_K layout");
_Static_assert(sizeof(mn_block_q3_K) == 110, "q3_K layout");
_Static_assert(sizeof(mn_block_q4_K) == 144, "q4_K layout");
_Static_assert(sizeof(mn_block_q5_K) == 176, "q5_K layout");
_Static_assert(sizeof(mn_block_q6_K) == 210, "q6_K layout");
_Static_assert(sizeof(mn_block_q8_1) == 40, "q8_1 layout");
_Static_assert(sizeof(mn_block_q8_K) == 292, "q8_K layout");
#endif

/* Elements per block (1 for plain float types); 0 for an unknown type. */
MN_HD int64_t mn_dtype_block_elems(mn_dtype t) {
    switch (t) {
    case MN_F32: case MN_F16: case MN_BF16: return 1;
    case MN_Q4_0: case MN_Q4_1: case MN_Q5_0: case MN_Q5_1: case MN_Q8_0: case MN_Q8_1: return MN_QK;
    case MN_Q2_K: case MN_Q3_K: case MN_Q4_K: case MN_Q5_K: case MN_Q6_K: case MN_Q8_K: return MN_QK_K;
    default: return 0;
    }
}

/* Bytes per block; 0 for an unknown type. */
MN_HD int64_t mn_dtype_block_bytes(mn_dtype t) {
    switch (t) {
    case MN_F32: return 4;
    case MN_F16: case MN_BF16: return 2;
    case MN_Q4_0: return sizeof(mn_block_q4_0);
    case MN_Q4_1: return sizeof(mn_block_q4_1);
    case MN_Q5_0: return sizeof(mn_block_q5_0);
    case MN_Q5_1: return sizeof(mn_block_q5_1);
    case MN_Q8_0: return sizeof(mn_block_q8_0);
    case MN_Q8_1: return sizeof(mn_block_q8_1);
    case MN_Q2_K: return sizeof(mn_block_q2_K);
    case MN_Q3_K: return sizeof(mn_block_q3_K);
    case MN_Q4_K: return sizeof(mn_block_q4_K);
    case MN_Q5_K: return sizeof(mn_block_q5_K);
    case MN_Q6_K: return sizeof(mn_block_q6_K);
    case MN_Q8_K: return sizeof(mn_block_q8_K);
    default: return 0;
    }
}

/* Bytes of a row of n elements; -1 if n is not a whole number of blocks or the type is unknown. */
MN_HD int64_t mn_dtype_row_bytes(mn_dtype t, int64_t n) {
    int64_t be = mn_dtype_block_elems(t);
    if (be == 0 || n < 0 || n % be != 0) return -1;
    return n / be * mn_dtype_block_bytes(t);
}

/* True for the types a model file may hold as weights. */
MN_HD int mn_dtype_is_weight_type(mn_dtype t) {
    switch (t) {
    case MN_F32: case MN_F16: case MN_BF16: case MN_Q4_0: case MN_Q4_1: case MN_Q5_0: case MN_Q5_1: case MN_Q8_0:
    case MN_Q2_K: case MN_Q3_K: case MN_Q4_K: case MN_Q5_K: case MN_Q6_K: return 1;
    default: return 0;
    }
}

static inline const char *mn_dtype_name(mn_dtype t) {
    switch (t) {
    case MN_F32: return "F32";
    case MN_F16: return "F16";
    case MN_BF16: return "BF16";
    case MN_Q4_0: return "Q4_0";
    case MN_Q4_1: return "Q4_1";
    case MN_Q5_0: return "Q5_0";
    case MN_Q5_1: return "Q5_1";
    case MN_Q8_0: return "Q8_0";
    case MN_Q8_1: return "Q8_1";
    case MN_Q2_K: return "Q2_K";
    case MN_Q3_K: return "Q3_K";
    case MN_Q4_K: return "Q4_K";
    case MN_Q5_K: return "Q5_K";
    case MN_Q6_K: return "Q6_K";
    case MN_Q8_K: return "Q8_K";
    default: return "unknown";
    }
}

#endif
