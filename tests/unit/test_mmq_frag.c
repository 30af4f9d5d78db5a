/* tests/unit/test_mmq_frag.c — the int8 tensor-core matmul's lane arithmetic, on the CPU.
 *
 * kernels/cuda/matmul_mmq.cu builds each lane's mma fragments and each block's value with
 * the host-and-device functions of kernels/cuda/matmul_mmq.h. Here every lane of a warp
 * builds them on the host for 16 random W rows (Q4_0, Q4_1, Q8_0; signed scales, every
 * nibble and byte value) and 8 tokens' q8_1 blocks (mn_ref_quantize_row_q8_1), the
 * mma.sync.m16n8k32 s8 product is emulated from the PTX fragment layout (written out
 * independently below, not through the header), and each lane's four products, turned into
 * block values by mn_mmq_value, must equal mn_vdot_*_q8_1 (the reference's block dot) for
 * that (row, token) bit for bit. A wrong nibble order, row or token mapping, or sign
 * fails. Also: mn_mmq_nib_minus8 against a plain loop over all 16 nibbles in every byte.
 * What this cannot check: the mma instruction itself and the kernel's loads and sums (the
 * GPU suite's "mmq" lines do, tests/gpu/test_cuda_gemv.c).
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/matmul_mmq.h"
#include "tests/unit/weight_fill.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static uint32_t rnd_byte(void) { return rnd() & 0xff; }
static float frand(float lo, float hi) { return lo + (hi - lo) * (float)(rnd() & 0xffffff) / 16777216.0f; }

static int8_t byte_of(uint32_t v, int i) { return (int8_t)(uint8_t)(v >> (8 * i)); }

/* mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 with zero C, from the PTX ISA's fragment
 * layout: lane = 4g + t; A[g][4t+i] = a0 byte i, A[g+8][4t+i] = a1, A[g][16+4t+i] = a2,
 * A[g+8][16+4t+i] = a3; B[4t+i][g] = b0 byte i, B[16+4t+i][g] = b1; out c0 = C[g][2t],
 * c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]. Every A and B element is set once. */
static void emulate_mma(const uint32_t a[32][4], const uint32_t b[32][2], int32_t c[32][4]) {
    int A[16][32], B[32][8], seenA[16][32] = {{0}}, seenB[32][8] = {{0}};
    for (int lane = 0; lane < 32; lane++) {
        const int g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; i++) {
            A[g][4 * t + i] = byte_of(a[lane][0], i), seenA[g][4 * t + i]++;
            A[g + 8][4 * t + i] = byte_of(a[lane][1], i), seenA[g + 8][4 * t + i]++;
            A[g][16 + 4 * t + i] = byte_of(a[lane][2], i), seenA[g][16 + 4 * t + i]++;
            A[g + 8][16 + 4 * t + i] = byte_of(a[lane][3], i), seenA[g + 8][16 + 4 * t + i]++;
            B[4 * t + i][g] = byte_of(b[lane][0], i), seenB[4 * t + i][g]++;
            B[16 + 4 * t + i][g] = byte_of(b[lane][1], i), seenB[16 + 4 * t + i][g]++;
        }
    }
    for (int r = 0; r < 16; r++)
        for (int k = 0; k < 32; k++) assert_int_equal(seenA[r][k], 1);
    for (int k = 0; k < 32; k++)
        for (int n = 0; n < 8; n++) assert_int_equal(seenB[k][n], 1);
    int C[16][8];
    for (int r = 0; r < 16; r++)
        for (int n = 0; n < 8; n++) {
            C[r][n] = 0;
            for (int k = 0; k < 32; k++) C[r][n] += A[r][k] * B[k][n];
        }
    for (int lane = 0; lane < 32; lane++) {
        const int g = lane / 4, t = lane % 4;
        c[lane][0] = C[g][2 * t], c[lane][1] = C[g][2 * t + 1];
        c[lane][2] = C[g + 8][2 * t], c[lane][3] = C[g + 8][2 * t + 1];
    }
}

static float vdot(mn_dtype ty, const char *row, int64_t b, const mn_block_q8_1 *xb) {
    if (ty == MN_Q4_0) return mn_vdot_q4_0_q8_1((const mn_block_q4_0 *)row + b, xb);
    if (ty == MN_Q4_1) return mn_vdot_q4_1_q8_1((const mn_block_q4_1 *)row + b, xb);
    return mn_vdot_q8_0_q8_1((const mn_block_q8_0 *)row + b, xb);
}

static void check_type(mn_dtype ty) {
    enum { ROWS = 16, TOK = 8, NB = 5, K = NB * 32 };
    const int64_t rb = mn_dtype_row_bytes(ty, K);
    char *w = malloc((size_t)(ROWS * rb));
    mn_block_q8_1 xq[TOK][NB];
    float x[K];
    for (int rep = 0; rep < 20; rep++) {
        mn_test_fill_weights(ty, w, ROWS, K, rnd_byte, frand);
        for (int tok = 0; tok < TOK; tok++) {
            const float scale = tok == 3 ? 0.0f : frand(0.01f, 4.0f); /* token 3: all zero, d = 0 */
            for (int k = 0; k < K; k++) x[k] = scale * frand(-1.0f, 1.0f);
            mn_ref_quantize_row_q8_1(x, xq[tok], K);
        }
        for (int64_t b = 0; b < NB; b++) {
            uint32_t a[32][4], bf[32][2];
            float dm[32][4];
            int32_t c[32][4];
            for (int lane = 0; lane < 32; lane++) {
                const int g = lane / 4, t = lane % 4;
                mn_mmq_wfrag(ty, w + g * rb, w + (g + 8) * rb, b, t, a[lane], dm[lane]);
                mn_mmq_xfrag(&xq[g][b], t, &bf[lane][0], &bf[lane][1]);
            }
            emulate_mma(a, bf, c);
            for (int lane = 0; lane < 32; lane++) {
                const int g = lane / 4, t = lane % 4;
                for (int e = 0; e < 4; e++) {
                    const int row = e < 2 ? g : g + 8, tok = 2 * t + (e & 1);
                    const float got = mn_mmq_value(ty, c[lane][e], dm[lane][e < 2 ? 0 : 1], dm[lane][e < 2 ? 2 : 3],
                                                   &xq[tok][b]);
                    const float want = vdot(ty, w + row * rb, b, &xq[tok][b]);
                    if (memcmp(&got, &want, sizeof got) != 0)
                        fail_msg("%s rep %d block %lld lane %d element %d (row %d, token %d): %.9g, reference %.9g",
                                 mn_dtype_name(ty), rep, (long long)b, lane, e, row, tok, got, want);
                }
            }
        }
    }
    free(w);
}

static void test_mmq_nib_minus8(void **state) {
    (void)state;
    for (int r = 0; r < 20000; r++) {
        uint32_t v = rnd() ^ (rnd() << 16), got = mn_mmq_nib_minus8(v);
        for (int i = 0; i < 4; i++) assert_int_equal(byte_of(got, i), (int)((v >> (8 * i)) & 0xf) - 8);
    }
}

static void test_mmq_q4_0(void **state) { (void)state; check_type(MN_Q4_0); }
static void test_mmq_q4_1(void **state) { (void)state; check_type(MN_Q4_1); }
static void test_mmq_q8_0(void **state) { (void)state; check_type(MN_Q8_0); }

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mmq_nib_minus8),
        cmocka_unit_test(test_mmq_q4_0),
        cmocka_unit_test(test_mmq_q4_1),
        cmocka_unit_test(test_mmq_q8_0),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
