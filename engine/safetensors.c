/* engine/safetensors.c — parse and validate a safetensors header (jansson for the JSON).
 *
 * Every number that comes from the file is checked before it is used as a size or an
 * offset: the header length against the file, offsets against the data section, the
 * shape product against overflow, and the tensors, sorted by offset, against each other.
 */
#include "engine/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "kernels/common.h"

#define MAX_HEADER (100u << 20)   /* the format's own limit on the JSON header */

void mn_st_free(mn_safetensors *st) {
    if (!st) return;
    for (int64_t i = 0; i < st->n_tensors; i++) mn_free(st->tensors[i].name);
    for (int64_t i = 0; i < st->n_meta; i++) {
        mn_free(st->meta_keys[i]);
        mn_free(st->meta_values[i]);
    }
    mn_free(st->tensors);
    mn_free(st->meta_keys);
    mn_free(st->meta_values);
    if (st->map) munmap(st->map, st->map_size);
    mn_free(st);
}

/* dtype name -> mn_dtype; 0 and *known set if the format knows it but mneme does not read it. */
static int parse_dtype(const char *s, mn_dtype *t, int *known) {
    static const char *const other[] = {"F64", "I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL",
                                        "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"};
    *known = 0;
    if (strcmp(s, "F32") == 0) { *t = MN_F32; return 1; }
    if (strcmp(s, "F16") == 0) { *t = MN_F16; return 1; }
    if (strcmp(s, "BF16") == 0) { *t = MN_BF16; return 1; }
    for (size_t i = 0; i < sizeof other / sizeof other[0]; i++)
        if (strcmp(s, other[i]) == 0) *known = 1;
    return 0;
}

static int cmp_offset(const void *a, const void *b) {
    const mn_st_tensor *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->size < y->size ? -1 : x->size > y->size;
}

/* Fill t from the header entry v of tensor name. data_size: bytes after the header. */
static mn_err parse_tensor(const char *name, json_t *v, uint64_t data_start, uint64_t data_size, mn_st_tensor *t,
                           mn_errbuf *eb) {
    if (!json_is_object(v)) return mn_errf(eb, MN_EFORMAT, "safetensors: tensor '%s': header entry is not an object", name);
    json_t *dt = json_object_get(v, "dtype"), *sh = json_object_get(v, "shape"), *of = json_object_get(v, "data_offsets");
    if (!json_is_string(dt)) return mn_errf(eb, MN_EFORMAT, "safetensors: tensor '%s': \"dtype\" missing or not a string", name);
    int known;
    if (!parse_dtype(json_string_value(dt), &t->type, &known))
        return mn_errf(eb, known ? MN_EUNSUPPORTED : MN_EFORMAT, "safetensors: tensor '%s': %s dtype '%s' (F32, F16 and BF16 are read)",
                       name, known ? "unsupported" : "unknown", json_string_value(dt));
    if (!json_is_array(sh)) return mn_errf(eb, MN_EFORMAT, "safetensors: tensor '%s': \"shape\" missing or not an array", name);
    size_t nd = json_array_size(sh);
    if (nd > MN_ST_MAX_DIMS) return mn_errf(eb, MN_EFORMAT, "safetensors: tensor '%s': %zu dims (at most %d)", name, nd, MN_ST_MAX_DIMS);
    t->n_dims = (int32_t)nd;
    uint64_t elems = 1;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(sh, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return mn_errf(eb, MN_EFORMAT, "safetensors: tensor '%s': shape[%zu] is not a non-negative integer", name, i);
        uint64_t n = (uint64_t)json_integer_value(d);
        if (n && elems > UINT64_MAX / 8 / n)
            return mn_errf(eb, MN_EFORMAT, "safetensors: tensor '%s': shape product overflows", name);
        elems *= n;
        t->shape[i] = (int64_t)n;
    }
    if (!json_is_array(of) || json_array_size(of) != 2 || !json_is_integer(json_array_get(of, 0)) ||
        !json_is_integer(json_array_get(of, 1)))
        return mn_errf(eb, MN_EFORMAT, "safetensors: tensor '%s': \"data_offsets\" must be [begin, end] integers", name);
    json_int_t b = json_integer_value(json_array_get(of, 0)), e = json_integer_value(json_array_get(of, 1));
    if (b < 0 || e < b)
        return mn_errf(eb, MN_EFORMAT, "safetensors: tensor '%s': data_offsets [%lld, %lld] are not 0 <= begin <= end", name,
                       (long long)b, (long long)e);
    if ((uint64_t)e > data_size)
        return mn_errf(eb, MN_EFORMAT, "safetensors: tensor '%s': data_offsets end %lld (file offset %llu) past the end of the "
                       "data (%llu bytes)", name, (long long)e, (unsigned long long)(data_start + (uint64_t)e),
                       (unsigned long long)data_size);
    uint64_t want = elems * (uint64_t)mn_dtype_block_bytes(t->type);
    if ((uint64_t)(e - b) != want)
        return mn_errf(eb, MN_EFORMAT, "safetensors: tensor '%s' at offset %lld: %lld bytes, but shape x %s needs %llu", name,
                       (long long)b, (long long)(e - b), mn_dtype_name(t->type), (unsigned long long)want);
    t->offset = data_start + (uint64_t)b;
    t->size = want;
    return MN_OK;
}

static char *dup_str(const char *s) { return mn_strdup(s); }

mn_err mn_st_parse(const void *buf, size_t n, mn_safetensors **out, mn_errbuf *eb) {
    *out = NULL;
    const unsigned char *p = buf;
    if (n < 8) return mn_errf(eb, MN_EFORMAT, "safetensors: file is %zu bytes, shorter than the 8-byte header length", n);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | p[i];
    if (hl > n - 8)
        return mn_errf(eb, MN_EFORMAT, "safetensors: header length %llu at offset 0 runs past the end of the file (%zu bytes)",
                       (unsigned long long)hl, n);
    if (hl > MAX_HEADER) return mn_errf(eb, MN_EFORMAT, "safetensors: header length %llu over the %u-byte limit", (unsigned long long)hl, MAX_HEADER);
    json_error_t je;
    json_t *root = json_loadb((const char *)p + 8, (size_t)hl, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return mn_errf(eb, MN_EFORMAT, "safetensors: header JSON at file offset %d: %s", 8 + je.position, je.text);
    mn_err e = MN_OK;
    mn_safetensors *st = NULL;
    if (!json_is_object(root)) {
        e = mn_errf(eb, MN_EFORMAT, "safetensors: header at offset 8 is not a JSON object");
        goto done;
    }
    st = mn_calloc(1, sizeof *st);
    size_t cap = json_object_size(root);
    if (!st || !(st->tensors = mn_calloc(cap ? cap : 1, sizeof *st->tensors))) {
        e = mn_errf(eb, MN_ENOMEM, "safetensors: out of memory");
        goto done;
    }
    st->header_len = hl;
    st->data_start = 8 + hl;
    st->file_size = n;
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0) {
            if (!json_is_object(v)) {
                e = mn_errf(eb, MN_EFORMAT, "safetensors: __metadata__ is not an object");
                goto done;
            }
            size_t m = json_object_size(v);
            st->meta_keys = mn_calloc(m ? m : 1, sizeof(char *));
            st->meta_values = mn_calloc(m ? m : 1, sizeof(char *));
            if (!st->meta_keys || !st->meta_values) {
                e = mn_errf(eb, MN_ENOMEM, "safetensors: out of memory");
                goto done;
            }
            const char *mk;
            json_t *mv;
            json_object_foreach(v, mk, mv) {
                if (!json_is_string(mv)) {
                    e = mn_errf(eb, MN_EFORMAT, "safetensors: __metadata__ '%s' is not a string", mk);
                    goto done;
                }
                char *k2 = dup_str(mk), *v2 = dup_str(json_string_value(mv));
                st->meta_keys[st->n_meta] = k2;
                st->meta_values[st->n_meta] = v2;
                st->n_meta++;
                if (!k2 || !v2) {
                    e = mn_errf(eb, MN_ENOMEM, "safetensors: out of memory");
                    goto done;
                }
            }
            continue;
        }
        mn_st_tensor *t = &st->tensors[st->n_tensors];
        if ((e = parse_tensor(key, v, st->data_start, n - st->data_start, t, eb)) != MN_OK) goto done;
        if (!(t->name = dup_str(key))) {
            e = mn_errf(eb, MN_ENOMEM, "safetensors: out of memory");
            goto done;
        }
        t->data = p + t->offset;
        st->n_tensors++;
    }
    qsort(st->tensors, (size_t)st->n_tensors, sizeof *st->tensors, cmp_offset);
    for (int64_t i = 1; i < st->n_tensors; i++) {
        const mn_st_tensor *a = &st->tensors[i - 1], *b = &st->tensors[i];
        /* empty tensors occupy no bytes and overlap nothing */
        if (b->size && a->size && b->offset < a->offset + a->size) {
            e = mn_errf(eb, MN_EFORMAT, "safetensors: tensor '%s' at offset %llu overlaps tensor '%s' (offsets %llu..%llu)",
                        b->name, (unsigned long long)b->offset, a->name, (unsigned long long)a->offset,
                        (unsigned long long)(a->offset + a->size));
            goto done;
        }
    }
done:
    json_decref(root);
    if (e != MN_OK) {
        mn_st_free(st);
        return e;
    }
    *out = st;
    return MN_OK;
}

mn_err mn_st_open(const char *path, mn_safetensors **out, mn_errbuf *eb) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mn_errf(eb, errno == ENOENT ? MN_ENOT_FOUND : MN_EIO, "safetensors: open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int er = errno;
        close(fd);
        return mn_errf(eb, MN_EIO, "safetensors: stat '%s': %s", path, strerror(er));
    }
    size_t size = (size_t)sb.st_size;
    void *map = NULL;
    if (size > 0) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int er = errno;
            close(fd);
            return mn_errf(eb, MN_EIO, "safetensors: mmap '%s' (%zu bytes): %s", path, size, strerror(er));
        }
    }
    close(fd);
    mn_safetensors *st;
    mn_err e = mn_st_parse(map ? map : "", size, &st, eb);
    if (e != MN_OK) {
        /* prefix the path: "safetensors: X" -> "safetensors 'path': X" */
        char msg[sizeof eb->msg];
        if (eb) {
            snprintf(msg, sizeof msg, "%s", eb->msg);
            const char *rest = strncmp(msg, "safetensors: ", 13) == 0 ? msg + 13 : msg;
            mn_errf(eb, e, "safetensors '%s': %s", path, rest);
        }
        if (map) munmap(map, size);
        return e;
    }
    st->map = map;
    st->map_size = size;
    *out = st;
    return MN_OK;
}

const mn_st_tensor *mn_st_find(const mn_safetensors *st, const char *name) {
    for (int64_t i = 0; i < st->n_tensors; i++)
        if (strcmp(st->tensors[i].name, name) == 0) return &st->tensors[i];
    return NULL;
}

const char *mn_st_meta(const mn_safetensors *st, const char *key) {
    for (int64_t i = 0; i < st->n_meta; i++)
        if (strcmp(st->meta_keys[i], key) == 0) return st->meta_values[i];
    return NULL;
}

void mn_st_to_f32(const mn_st_tensor *t, int64_t first, int64_t n, float *dst) {
    const unsigned char *src = t->data;
    for (int64_t i = 0; i < n; i++) {
        int64_t j = first + i;
        if (t->type == MN_F32) {
            memcpy(&dst[i], src + 4 * j, 4);
        } else {
            uint16_t h;
            memcpy(&h, src + 2 * j, 2);
            dst[i] = t->type == MN_F16 ? mn_fp16_to_fp32(h) : mn_bf16_to_fp32(h);
        }
    }
}
