/* engine/gguf.h — read-only GGUF model files (versions 2 and 3).
 *
 * The file is mmapped; tensor data and scalar-array payloads point into the mapping and
 * stay valid until mn_gguf_close. Every offset and length is checked against the file
 * size while parsing; a malformed file gives MN_EFORMAT with a message naming the byte
 * offset and the key or tensor concerned, never a crash. The mn_gguf owns all memory it
 * returns pointers to; callers free nothing but the mn_gguf itself.
 *
 * Format: header (magic "GGUF", u32 version, u64 n_tensors, u64 n_kv), n_kv key/value
 * pairs, n_tensors tensor infos (name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset),
 * padding to general.alignment (default 32), then the tensor data section.
 */
#ifndef MN_GGUF_H
#define MN_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"
#include "kernels/dtype.h"

typedef enum mn_gguf_type {
    MN_GGUF_UINT8 = 0, MN_GGUF_INT8 = 1, MN_GGUF_UINT16 = 2, MN_GGUF_INT16 = 3,
    MN_GGUF_UINT32 = 4, MN_GGUF_INT32 = 5, MN_GGUF_FLOAT32 = 6, MN_GGUF_BOOL = 7,
    MN_GGUF_STRING = 8, MN_GGUF_ARRAY = 9, MN_GGUF_UINT64 = 10, MN_GGUF_INT64 = 11,
    MN_GGUF_FLOAT64 = 12
} mn_gguf_type;

/* A string inside the mapping: not NUL-terminated, may contain any bytes. */
typedef struct mn_str { const char *ptr; uint64_t len; } mn_str;

typedef struct mn_gguf_value mn_gguf_value;
struct mn_gguf_value {
    mn_gguf_type type;
    union {
        uint64_t u64;     /* UINT8..UINT64 (zero-extended) */
        int64_t i64;      /* INT8..INT64 (sign-extended) */
        double f64;       /* FLOAT32, FLOAT64 */
        bool b;           /* BOOL */
        mn_str str;       /* STRING */
        struct {
            mn_gguf_type elem_type;
            uint64_t n;
            /* elem_type scalar: n packed little-endian values in the file (maybe unaligned);
             * read them with mn_gguf_arr_* below. */
            const void *data;
            /* elem_type STRING or ARRAY: n parsed values, owned by the mn_gguf. */
            const mn_gguf_value *items;
        } arr;
    } v;
};

typedef struct mn_gguf_kv {
    const char *key;      /* NUL-terminated copy */
    mn_gguf_value value;
} mn_gguf_kv;

typedef struct mn_gguf_tensor {
    const char *name;     /* NUL-terminated copy */
    int n_dims;           /* 1..4 */
    int64_t ne[4];        /* ne[0] is the innermost (row) length; unused dims are 1 */
    mn_dtype type;
    uint64_t offset;      /* from the start of the data section */
    const void *data;     /* in the mapping */
    uint64_t nbytes;
} mn_gguf_tensor;

typedef struct mn_gguf mn_gguf;

/** Map and parse the file at path. On success *out owns the mapping. */
mn_err mn_gguf_open(const char *path, mn_gguf **out, mn_errbuf *eb);
/** Parse size bytes at data (not copied: data must outlive the mn_gguf). For fuzzing and tests. */
mn_err mn_gguf_open_memory(const void *data, size_t size, mn_gguf **out, mn_errbuf *eb);
/** Unmap and free everything; NULL is allowed. */
void mn_gguf_close(mn_gguf *g);

uint32_t mn_gguf_version(const mn_gguf *g);
uint64_t mn_gguf_alignment(const mn_gguf *g);
uint64_t mn_gguf_data_offset(const mn_gguf *g);   /* file offset of the data section */
uint64_t mn_gguf_file_size(const mn_gguf *g);
/** The whole mapped file (used for hashing the weights into a fingerprint). */
const void *mn_gguf_file_data(const mn_gguf *g);

int64_t mn_gguf_n_kv(const mn_gguf *g);
const mn_gguf_kv *mn_gguf_kv_at(const mn_gguf *g, int64_t i);
/** The value for key, or NULL if absent. */
const mn_gguf_value *mn_gguf_find(const mn_gguf *g, const char *key);

int64_t mn_gguf_n_tensors(const mn_gguf *g);
const mn_gguf_tensor *mn_gguf_tensor_at(const mn_gguf *g, int64_t i);
/** The tensor called name, or NULL if absent. */
const mn_gguf_tensor *mn_gguf_find_tensor(const mn_gguf *g, const char *name);

/* Typed getters. They return MN_ENOT_FOUND if the key is absent (message names the key)
 * and MN_EFORMAT if it has a type that cannot convert (message names key, expected and
 * found types). Integers convert between widths when the value fits (else MN_ERANGE). */
mn_err mn_gguf_get_u32(const mn_gguf *g, const char *key, uint32_t *out, mn_errbuf *eb);
mn_err mn_gguf_get_i64(const mn_gguf *g, const char *key, int64_t *out, mn_errbuf *eb);
mn_err mn_gguf_get_f32(const mn_gguf *g, const char *key, float *out, mn_errbuf *eb);
mn_err mn_gguf_get_bool(const mn_gguf *g, const char *key, bool *out, mn_errbuf *eb);
mn_err mn_gguf_get_str(const mn_gguf *g, const char *key, mn_str *out, mn_errbuf *eb);
/** An array value whose elements have type elem (MN_GGUF_ARRAY for nested). */
mn_err mn_gguf_get_arr(const mn_gguf *g, const char *key, mn_gguf_type elem,
                       const mn_gguf_value **out, mn_errbuf *eb);

/* Element i of a scalar array (no bounds check beyond an assert: i < arr.n). */
int64_t mn_gguf_arr_int(const mn_gguf_value *arr, uint64_t i);     /* any integer or bool type */
double mn_gguf_arr_float(const mn_gguf_value *arr, uint64_t i);    /* FLOAT32/FLOAT64 (ints convert) */

const char *mn_gguf_type_name(mn_gguf_type t);

#endif
