/* tests/fuzz/fuzz_safetensors.c — libFuzzer target for the safetensors reader.
 *
 * Parses the input with mn_st_parse and, when it parses, reads the first and last byte of
 * every tensor and converts its first and last element to f32, so that AddressSanitizer
 * sees any pointer the parser let out of the input. A parse error must come with a
 * message. Build and run: see tests/fuzz/README.md (same pattern as fuzz_gguf).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/safetensors.h"

static volatile unsigned sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* copy into an exact-size buffer so a read one past the end is caught */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    memcpy(copy, data, size);
    mn_safetensors *st = NULL;
    mn_errbuf eb = {{0}};
    if (mn_st_parse(copy, size, &st, &eb) == MN_OK) {
        unsigned acc = 0;
        for (int64_t i = 0; i < st->n_tensors; i++) {
            const mn_st_tensor *t = &st->tensors[i];
            acc += (unsigned)strlen(t->name);
            if (t->size) {
                const uint8_t *p = t->data;
                acc += p[0] + p[t->size - 1];
                int64_t n = (int64_t)(t->size / (uint64_t)mn_dtype_block_bytes(t->type));
                float f[2];
                mn_st_to_f32(t, 0, 1, f);
                mn_st_to_f32(t, n - 1, 1, f + 1);
                acc += f[0] > f[1];
            }
        }
        for (int64_t i = 0; i < st->n_meta; i++) acc += (unsigned)strlen(st->meta_keys[i]) + (unsigned)strlen(st->meta_values[i]);
        sink += acc;
        mn_st_free(st);
    } else if (eb.msg[0] == 0) {
        abort(); /* every error has a message */
    }
    free(copy);
    return 0;
}
