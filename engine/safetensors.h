/* engine/safetensors.h — a bounds-checked reader of safetensors files.
 *
 * Layout of a file:
 *   u64 LE header length H | H bytes of JSON | data
 * The JSON is one object: "__metadata__" (optional, string -> string) and, per tensor,
 *   "name": {"dtype": "F32"|"F16"|"BF16"|..., "shape": [d0, d1, ...], "data_offsets": [begin, end]}
 * with offsets relative to the start of the data section. Checked at open: the header
 * length against the file size, JSON syntax (duplicate keys are refused), each field's
 * type, every offset against the data size, end - begin == product(shape) * element size
 * (with overflow checks), and no two tensors overlapping. A failure is MN_EFORMAT (or
 * MN_EUNSUPPORTED for a known dtype mneme does not read) naming the tensor and the offset,
 * and nothing is returned.
 * Ownership: the mn_safetensors owns its tensor table and, for mn_st_open, the mmap of
 * the file; tensor data pointers stay valid until mn_st_free. mn_st_parse borrows the
 * caller's buffer, which must outlive the result.
 */
#ifndef MN_SAFETENSORS_H
#define MN_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"
#include "kernels/dtype.h"

#define MN_ST_MAX_DIMS 8

typedef struct mn_st_tensor {
    char *name;
    mn_dtype type;                   /* MN_F32, MN_F16 or MN_BF16 */
    int32_t n_dims;
    int64_t shape[MN_ST_MAX_DIMS];   /* outermost first, as in the file ([rows, cols]) */
    uint64_t offset;                 /* of the first byte, from the start of the file */
    uint64_t size;                   /* bytes */
    const void *data;                /* into the file's bytes */
} mn_st_tensor;

typedef struct mn_safetensors {
    int64_t n_tensors;
    mn_st_tensor *tensors;           /* sorted by offset */
    int64_t n_meta;
    char **meta_keys, **meta_values; /* __metadata__ pairs */
    uint64_t header_len, data_start, file_size;
    void *map;                       /* mmap owned by mn_st_open, else NULL */
    size_t map_size;
} mn_safetensors;

/** Open and validate the file at path (mmapped read-only). */
mn_err mn_st_open(const char *path, mn_safetensors **out, mn_errbuf *eb);
/** Validate a file image already in memory (tests, fuzzing). Borrows buf. */
mn_err mn_st_parse(const void *buf, size_t n, mn_safetensors **out, mn_errbuf *eb);
void mn_st_free(mn_safetensors *st);
/** The tensor called name, or NULL. */
const mn_st_tensor *mn_st_find(const mn_safetensors *st, const char *name);
/** The __metadata__ value of key, or NULL. */
const char *mn_st_meta(const mn_safetensors *st, const char *key);
/** Copy element i.. of a tensor to f32 (exact for F16/BF16). n elements from element first. */
void mn_st_to_f32(const mn_st_tensor *t, int64_t first, int64_t n, float *dst);

#endif
