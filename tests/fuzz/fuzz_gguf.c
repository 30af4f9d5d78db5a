/* tests/fuzz/fuzz_gguf.c — libFuzzer target for the GGUF reader.
 *
 * Parses the input with mn_gguf_open_memory and, when it parses, reads every value,
 * array element, string byte and the first and last byte of every tensor, so that
 * AddressSanitizer sees any pointer the parser let out of the input. A parse error must
 * come with a message. Build and run: see tests/fuzz/README.md.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/gguf.h"

static volatile unsigned sink;

static unsigned walk_value(const mn_gguf_value *v) {
    unsigned acc = 0;
    if (v->type == MN_GGUF_STRING) {
        for (uint64_t i = 0; i < v->v.str.len; i++) acc += (unsigned char)v->v.str.ptr[i];
    } else if (v->type == MN_GGUF_ARRAY) {
        mn_gguf_type et = v->v.arr.elem_type;
        for (uint64_t i = 0; i < v->v.arr.n; i++) {
            if (et == MN_GGUF_STRING || et == MN_GGUF_ARRAY) acc += walk_value(&v->v.arr.items[i]);
            else if (et == MN_GGUF_FLOAT32 || et == MN_GGUF_FLOAT64) acc += mn_gguf_arr_float(v, i) > 0;
            else acc += (unsigned)mn_gguf_arr_int(v, i);
        }
    } else {
        acc += (unsigned)v->v.u64;
    }
    return acc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* copy into an exact-size buffer so a read one past the end is caught */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    memcpy(copy, data, size);
    mn_gguf *g = NULL;
    mn_errbuf eb;
    eb.msg[0] = 0;
    mn_err e = mn_gguf_open_memory(copy, size, &g, &eb);
    if (e != MN_OK) {
        if (g != NULL || eb.msg[0] == 0) abort(); /* failures must leave no object and say why */
        free(copy);
        return 0;
    }
    unsigned acc = 0;
    for (int64_t i = 0; i < mn_gguf_n_kv(g); i++) {
        const mn_gguf_kv *kv = mn_gguf_kv_at(g, i);
        if (mn_gguf_find(g, kv->key) != &kv->value) abort();
        acc += walk_value(&kv->value);
    }
    for (int64_t i = 0; i < mn_gguf_n_tensors(g); i++) {
        const mn_gguf_tensor *t = mn_gguf_tensor_at(g, i);
        if (mn_gguf_find_tensor(g, t->name) != t) abort();
        const uint8_t *d = t->data;
        if (d < copy || t->nbytes > size || d + t->nbytes > copy + size) abort();
        acc += d[0] + d[t->nbytes - 1];
    }
    sink = acc;
    mn_gguf_close(g);
    free(copy);
    return 0;
}
