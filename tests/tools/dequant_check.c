/* tests/tools/dequant_check.c — checks mn_ref_dequant_row against values computed
 * elsewhere (tests/python/test_dequant.py writes them with gguf-py's dequantize).
 *
 * Usage: dequant_check FILE. FILE is a sequence of records, little-endian:
 *   u32 ggml type id, u64 n (elements), row bytes of n elements of that type,
 *   n f32 expected values.
 * Every value must match bit for bit (the block formulas are exact float math, done in
 * the same order as gguf-py). Prints one line per record; exit 0 iff all match, 1 on a
 * mismatch, 2 on a malformed file.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "kernels/ops.h"

static int read_exact(FILE *f, void *p, size_t n) { return fread(p, 1, n, f) == n; }

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    int bad = 0, records = 0;
    for (;;) {
        uint32_t type;
        uint64_t n;
        if (!read_exact(f, &type, 4)) break; /* clean end of file */
        if (!read_exact(f, &n, 8) || n == 0 || n > (1u << 26)) {
            fprintf(stderr, "record %d: bad element count\n", records);
            return 2;
        }
        int64_t rb = mn_dtype_row_bytes((mn_dtype)type, (int64_t)n);
        if (type >= MN_DTYPE_COUNT || rb <= 0 || !mn_dtype_is_weight_type((mn_dtype)type)) {
            fprintf(stderr, "record %d: type %u with %llu elements is not a weight row\n", records, type,
                    (unsigned long long)n);
            return 2;
        }
        void *src = mn_malloc((size_t)rb);
        float *want = mn_malloc(n * sizeof(float)), *got = mn_malloc(n * sizeof(float));
        if (!src || !want || !got || !read_exact(f, src, (size_t)rb) || !read_exact(f, want, n * sizeof(float))) {
            fprintf(stderr, "record %d: truncated\n", records);
            return 2;
        }
        mn_ref_dequant_row((mn_dtype)type, src, got, (int64_t)n);
        uint64_t mism = 0, first = 0;
        for (uint64_t i = 0; i < n; i++)
            if (memcmp(&got[i], &want[i], 4) != 0 && !(got[i] != got[i] && want[i] != want[i]) && mism++ == 0) first = i;
        printf("%-5s n=%-8llu %s", mn_dtype_name((mn_dtype)type), (unsigned long long)n, mism ? "MISMATCH" : "ok");
        if (mism)
            printf(" (%llu values; first at %llu: got %.9g want %.9g)", (unsigned long long)mism,
                   (unsigned long long)first, got[first], want[first]);
        printf("\n");
        bad |= mism != 0;
        records++;
        mn_free(src); mn_free(want); mn_free(got);
    }
    fclose(f);
    if (records == 0) {
        fprintf(stderr, "no records\n");
        return 2;
    }
    return bad;
}
