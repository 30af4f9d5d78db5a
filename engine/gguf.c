/* engine/gguf.c — GGUF v2/v3 reader.
 *
 * The whole file is mapped read-only and parsed in one pass over a bounds-checked
 * cursor: every read first checks that the bytes it needs lie inside the file, and
 * every count read from the file (n_kv, n_tensors, array and string lengths) is checked
 * against the bytes that are left before anything is allocated for it, so a hostile file
 * can only make us allocate memory proportional to its own size.
 *
 * Memory: keys and tensor names are copied NUL-terminated into an arena (a list of
 * chunks owned by the mn_gguf); strings and scalar-array payloads stay in the mapping.
 * Key and tensor-name lookups go through two open-addressing hash tables (FNV-1a),
 * built while parsing, which is also how duplicates are found.
 *
 * Error messages look like
 *   gguf: offset 1234: tensor 'blk.0.attn_q.weight': data [x, y) past end of file (size z)
 * where the offset is the file position of the field that is wrong.
 */
#include "engine/gguf.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/alloc.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gguf.c reads little-endian values with memcpy; port it before using a big-endian host"
#endif

#define MN__GGUF_DEFAULT_ALIGN 32u
/* Counts beyond these are refused outright: real models have ~1000 tensors and ~50
 * keys; the limit keeps the hash-table slot type at 32 bits. */
#define MN__GGUF_MAX_COUNT (1u << 24)
/* Nested arrays recurse; a hostile file must not be able to exhaust the stack. */
#define MN__GGUF_MAX_DEPTH 16
/* Smallest encodings, used to bound counts by the bytes left in the file. */
#define MN__KV_MIN_BYTES 13      /* u64 key length + u32 type + 1-byte value */
#define MN__TINFO_MIN_BYTES 32   /* u64 name length + u32 n_dims + u64 ne + u32 type + u64 offset */
#define MN__ARR_MIN_BYTES 12     /* u32 elem type + u64 n */

/* ---- arena ------------------------------------------------------------------------- */

typedef struct mn__chunk {
    struct mn__chunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
} mn__chunk;

struct mn_gguf {
    const uint8_t *base;
    uint64_t size;
    int mapped;            /* 1: base came from mmap and is unmapped at close */
    uint32_t version;
    uint64_t alignment;
    uint64_t data_off;
    int64_t n_kv;
    mn_gguf_kv *kvs;
    int64_t n_tensors;
    mn_gguf_tensor *tensors;
    uint32_t *kv_slots;    /* 0 = empty, else index + 1 */
    uint64_t kv_mask;
    uint32_t *t_slots;
    uint64_t t_mask;
    mn__chunk *chunks;
};

/* Bump allocation, 16-byte aligned; NULL when out of memory. */
static void *mn__arena_alloc(mn_gguf *g, size_t n) {
    n = (n + 15u) & ~(size_t)15u;
    mn__chunk *c = g->chunks;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        if (cap > SIZE_MAX - sizeof(mn__chunk)) return NULL;
        c = mn_malloc(sizeof(mn__chunk) + cap);
        if (!c) return NULL;
        c->next = g->chunks;
        c->used = 0;
        c->cap = cap;
        g->chunks = c;
    }
    void *p = c->data + c->used;
    c->used += n;
    return p;
}

/* ---- cursor and errors ---------------------------------------------------------------- */

typedef struct mn__cur {
    const uint8_t *b;
    uint64_t size;
    uint64_t pos;
    mn_errbuf *eb;
    char ctx[128];         /* "key 'x'" / "tensor 'y'" / "tensor #3", or empty */
} mn__cur;

static uint64_t mn__left(const mn__cur *c) { return c->size - c->pos; }

/* Copy a name from the file into the context, making non-printable bytes visible and
 * shortening long names, so a message stays one readable line. */
static void mn__set_ctx(mn__cur *c, const char *kind, const char *s, uint64_t len) {
    char tmp[72];
    uint64_t n = len < 64 ? len : 64;
    for (uint64_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        tmp[i] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
    }
    tmp[n] = 0;
    snprintf(c->ctx, sizeof c->ctx, "%s '%s%s'", kind, tmp, len > 64 ? "..." : "");
}

static mn_err mn__fail_e(mn__cur *c, mn_err e, uint64_t off, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static mn_err mn__fail_e(mn__cur *c, mn_err e, uint64_t off, const char *fmt, ...) {
    if (c->eb) {
        char what[384];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(what, sizeof what, fmt, ap);
        va_end(ap);
        mn_errf(c->eb, e, "gguf: offset %llu: %s%s%s", (unsigned long long)off, c->ctx,
                c->ctx[0] ? ": " : "", what);
    }
    return e;
}
#define mn__fail(c, off, ...) mn__fail_e((c), MN_EFORMAT, (off), __VA_ARGS__)

static mn_err mn__nomem(mn__cur *c, const char *what) {
    return mn__fail_e(c, MN_ENOMEM, c->pos, "out of memory for %s", what);
}

static mn_err mn__need(mn__cur *c, uint64_t n, const char *what) {
    if (n > mn__left(c))
        return mn__fail(c, c->pos, "%s needs %llu bytes, only %llu left (file size %llu)", what,
                        (unsigned long long)n, (unsigned long long)mn__left(c),
                        (unsigned long long)c->size);
    return MN_OK;
}

static mn_err mn__rd(mn__cur *c, void *dst, uint64_t n, const char *what) {
    mn_err e = mn__need(c, n, what);
    if (e) return e;
    memcpy(dst, c->b + c->pos, (size_t)n);
    c->pos += n;
    return MN_OK;
}

static mn_err mn__rd_u32(mn__cur *c, uint32_t *v, const char *what) { return mn__rd(c, v, 4, what); }
static mn_err mn__rd_u64(mn__cur *c, uint64_t *v, const char *what) { return mn__rd(c, v, 8, what); }

static mn_err mn__rd_str(mn__cur *c, mn_str *s, const char *what) {
    uint64_t at = c->pos, len;
    mn_err e = mn__rd_u64(c, &len, what);
    if (e) return e;
    if (len > mn__left(c))
        return mn__fail(c, at, "%s: string length %llu past end of file (%llu bytes left, size %llu)",
                        what, (unsigned long long)len, (unsigned long long)mn__left(c),
                        (unsigned long long)c->size);
    s->ptr = (const char *)c->b + c->pos;
    s->len = len;
    c->pos += len;
    return MN_OK;
}

/* ---- value types ------------------------------------------------------------------- */

const char *mn_gguf_type_name(mn_gguf_type t) {
    switch (t) {
    case MN_GGUF_UINT8: return "UINT8";
    case MN_GGUF_INT8: return "INT8";
    case MN_GGUF_UINT16: return "UINT16";
    case MN_GGUF_INT16: return "INT16";
    case MN_GGUF_UINT32: return "UINT32";
    case MN_GGUF_INT32: return "INT32";
    case MN_GGUF_FLOAT32: return "FLOAT32";
    case MN_GGUF_BOOL: return "BOOL";
    case MN_GGUF_STRING: return "STRING";
    case MN_GGUF_ARRAY: return "ARRAY";
    case MN_GGUF_UINT64: return "UINT64";
    case MN_GGUF_INT64: return "INT64";
    case MN_GGUF_FLOAT64: return "FLOAT64";
    }
    return "unknown";
}

/* Bytes of one scalar of type t; 0 for STRING/ARRAY (variable) and -1 for unknown. */
static int mn__scalar_size(uint32_t t) {
    switch (t) {
    case MN_GGUF_UINT8: case MN_GGUF_INT8: case MN_GGUF_BOOL: return 1;
    case MN_GGUF_UINT16: case MN_GGUF_INT16: return 2;
    case MN_GGUF_UINT32: case MN_GGUF_INT32: case MN_GGUF_FLOAT32: return 4;
    case MN_GGUF_UINT64: case MN_GGUF_INT64: case MN_GGUF_FLOAT64: return 8;
    case MN_GGUF_STRING: case MN_GGUF_ARRAY: return 0;
    default: return -1;
    }
}

static int mn__is_int(mn_gguf_type t) {
    return t == MN_GGUF_UINT8 || t == MN_GGUF_INT8 || t == MN_GGUF_UINT16 || t == MN_GGUF_INT16 ||
           t == MN_GGUF_UINT32 || t == MN_GGUF_INT32 || t == MN_GGUF_UINT64 || t == MN_GGUF_INT64;
}
static int mn__is_signed(mn_gguf_type t) {
    return t == MN_GGUF_INT8 || t == MN_GGUF_INT16 || t == MN_GGUF_INT32 || t == MN_GGUF_INT64;
}

/* Decode one little-endian scalar at p into v (v->type already set). */
static void mn__decode_scalar(const uint8_t *p, mn_gguf_value *v) {
    switch (v->type) {
    case MN_GGUF_UINT8: v->v.u64 = p[0]; break;
    case MN_GGUF_INT8: v->v.i64 = (int8_t)p[0]; break;
    case MN_GGUF_BOOL: v->v.b = p[0] != 0; break;
    case MN_GGUF_UINT16: { uint16_t x; memcpy(&x, p, 2); v->v.u64 = x; break; }
    case MN_GGUF_INT16: { int16_t x; memcpy(&x, p, 2); v->v.i64 = x; break; }
    case MN_GGUF_UINT32: { uint32_t x; memcpy(&x, p, 4); v->v.u64 = x; break; }
    case MN_GGUF_INT32: { int32_t x; memcpy(&x, p, 4); v->v.i64 = x; break; }
    case MN_GGUF_FLOAT32: { float x; memcpy(&x, p, 4); v->v.f64 = x; break; }
    case MN_GGUF_UINT64: { uint64_t x; memcpy(&x, p, 8); v->v.u64 = x; break; }
    case MN_GGUF_INT64: { int64_t x; memcpy(&x, p, 8); v->v.i64 = x; break; }
    case MN_GGUF_FLOAT64: { double x; memcpy(&x, p, 8); v->v.f64 = x; break; }
    default: assert(0 && "not a scalar");
    }
}

static mn_err mn__parse_value(mn_gguf *g, mn__cur *c, mn_gguf_value *v, int depth);

/* An array body: u32 element type, u64 count, then the elements. */
static mn_err mn__parse_array(mn_gguf *g, mn__cur *c, mn_gguf_value *v, int depth) {
    uint64_t at = c->pos;
    if (depth >= MN__GGUF_MAX_DEPTH)
        return mn__fail(c, at, "arrays nested deeper than %d", MN__GGUF_MAX_DEPTH);
    uint32_t et;
    uint64_t n;
    mn_err e = mn__rd_u32(c, &et, "array element type");
    if (e) return e;
    int esz = mn__scalar_size(et);
    if (esz < 0) return mn__fail(c, at, "unknown array element type %u", et);
    e = mn__rd_u64(c, &n, "array length");
    if (e) return e;
    v->type = MN_GGUF_ARRAY;
    v->v.arr.elem_type = (mn_gguf_type)et;
    v->v.arr.n = n;
    v->v.arr.data = NULL;
    v->v.arr.items = NULL;
    uint64_t min = esz > 0 ? (uint64_t)esz : et == MN_GGUF_STRING ? 8 : MN__ARR_MIN_BYTES;
    if (n > mn__left(c) / min)
        return mn__fail(c, at + 4, "array of %llu %s needs at least %llu bytes per element, only %llu bytes left",
                        (unsigned long long)n, mn_gguf_type_name((mn_gguf_type)et),
                        (unsigned long long)min, (unsigned long long)mn__left(c));
    if (esz > 0) {
        v->v.arr.data = c->b + c->pos;
        if (et == MN_GGUF_BOOL) {
            for (uint64_t i = 0; i < n; i++)
                if (c->b[c->pos + i] > 1)
                    return mn__fail(c, c->pos + i, "bool array element %llu is %u, not 0 or 1",
                                    (unsigned long long)i, c->b[c->pos + i]);
        }
        c->pos += n * (uint64_t)esz;
        return MN_OK;
    }
    /* n <= bytes left / 8, so n * sizeof(value) cannot overflow */
    mn_gguf_value *items = n ? mn__arena_alloc(g, (size_t)n * sizeof *items) : NULL;
    if (n && !items) return mn__nomem(c, "array items");
    for (uint64_t i = 0; i < n; i++) {
        items[i].type = (mn_gguf_type)et;
        e = mn__parse_value(g, c, &items[i], depth + 1);
        if (e) return e;
    }
    v->v.arr.items = items;
    return MN_OK;
}

/* The payload of a value whose type v->type is already known. */
static mn_err mn__parse_value(mn_gguf *g, mn__cur *c, mn_gguf_value *v, int depth) {
    if (v->type == MN_GGUF_STRING) return mn__rd_str(c, &v->v.str, "string value");
    if (v->type == MN_GGUF_ARRAY) return mn__parse_array(g, c, v, depth);
    int esz = mn__scalar_size(v->type);
    assert(esz > 0);
    mn_err e = mn__need(c, (uint64_t)esz, mn_gguf_type_name(v->type));
    if (e) return e;
    if (v->type == MN_GGUF_BOOL && c->b[c->pos] > 1)
        return mn__fail(c, c->pos, "bool value is %u, not 0 or 1", c->b[c->pos]);
    mn__decode_scalar(c->b + c->pos, v);
    c->pos += (uint64_t)esz;
    return MN_OK;
}

/* ---- hash index --------------------------------------------------------------------- */

static uint64_t mn__hash(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* Slot array with at least twice as many slots as entries (load <= 1/2). */
static uint32_t *mn__slots_new(mn_gguf *g, uint64_t n, uint64_t *mask) {
    uint64_t cap = 8;
    while (cap < 2 * n) cap *= 2;
    *mask = cap - 1;
    uint32_t *s = mn__arena_alloc(g, (size_t)cap * sizeof *s);
    if (s) memset(s, 0, (size_t)cap * sizeof *s);
    return s;
}

typedef const char *(*mn__name_fn)(const mn_gguf *g, uint32_t i);
static const char *mn__kv_name(const mn_gguf *g, uint32_t i) { return g->kvs[i].key; }
static const char *mn__t_name(const mn_gguf *g, uint32_t i) { return g->tensors[i].name; }

/* Index of name, or -1. With insert_at >= 0, a missing name is inserted at that index. */
static int64_t mn__slots_find(const mn_gguf *g, uint32_t *slots, uint64_t mask, mn__name_fn nf,
                              const char *name, int64_t insert_at) {
    if (!slots) return -1;
    for (uint64_t h = mn__hash(name) & mask;; h = (h + 1) & mask) {
        if (slots[h] == 0) {
            if (insert_at >= 0) slots[h] = (uint32_t)insert_at + 1;
            return -1;
        }
        if (strcmp(nf(g, slots[h] - 1), name) == 0) return slots[h] - 1;
    }
}

/* Copy a key or name out of the file, refusing ones that C strings cannot represent. */
static mn_err mn__dup_name(mn_gguf *g, mn__cur *c, uint64_t at, mn_str s, const char *kind,
                           const char **out) {
    if (s.len == 0) return mn__fail(c, at, "empty %s", kind);
    if (memchr(s.ptr, 0, (size_t)s.len)) return mn__fail(c, at, "%s contains a NUL byte", kind);
    char *p = mn__arena_alloc(g, (size_t)s.len + 1);
    if (!p) return mn__nomem(c, kind);
    memcpy(p, s.ptr, (size_t)s.len);
    p[s.len] = 0;
    *out = p;
    return MN_OK;
}

/* ---- the parser --------------------------------------------------------------------- */

static mn_err mn__parse_header(mn_gguf *g, mn__cur *c, uint64_t *n_tensors, uint64_t *n_kv) {
    uint8_t magic[4];
    mn_err e = mn__rd(c, magic, 4, "magic");
    if (e) return e;
    if (memcmp(magic, "GGUF", 4) != 0)
        return mn__fail(c, 0, "bad magic %02x %02x %02x %02x, expected \"GGUF\"", magic[0], magic[1],
                        magic[2], magic[3]);
    if ((e = mn__rd_u32(c, &g->version, "version"))) return e;
    if (g->version == 1)
        return mn__fail(c, 4, "GGUF version 1 is not supported (it uses 32-bit counts); only versions 2 and 3 are read");
    if (g->version == 0x02000000u || g->version == 0x03000000u)
        return mn__fail(c, 4, "big-endian GGUF (version bytes 0x%08x) is not supported", g->version);
    if (g->version != 2 && g->version != 3)
        return mn__fail(c, 4, "GGUF version %u is not supported; only versions 2 and 3 are read", g->version);
    if ((e = mn__rd_u64(c, n_tensors, "tensor count"))) return e;
    if ((e = mn__rd_u64(c, n_kv, "key/value count"))) return e;
    if (*n_tensors > MN__GGUF_MAX_COUNT || *n_tensors > mn__left(c) / MN__TINFO_MIN_BYTES)
        return mn__fail(c, 8, "tensor count %llu is more than the file can hold (%llu bytes left, limit %u)",
                        (unsigned long long)*n_tensors, (unsigned long long)mn__left(c), MN__GGUF_MAX_COUNT);
    if (*n_kv > MN__GGUF_MAX_COUNT || *n_kv > mn__left(c) / MN__KV_MIN_BYTES)
        return mn__fail(c, 16, "key/value count %llu is more than the file can hold (%llu bytes left, limit %u)",
                        (unsigned long long)*n_kv, (unsigned long long)mn__left(c), MN__GGUF_MAX_COUNT);
    return MN_OK;
}

static mn_err mn__parse_kvs(mn_gguf *g, mn__cur *c, uint64_t n_kv) {
    g->kvs = n_kv ? mn__arena_alloc(g, (size_t)n_kv * sizeof *g->kvs) : NULL;
    g->kv_slots = mn__slots_new(g, n_kv, &g->kv_mask);
    if ((n_kv && !g->kvs) || !g->kv_slots) return mn__nomem(c, "key/value table");
    uint64_t align_at = 0; /* where general.alignment's value is, for messages */
    for (uint64_t i = 0; i < n_kv; i++) {
        uint64_t at = c->pos;
        snprintf(c->ctx, sizeof c->ctx, "key #%llu", (unsigned long long)i);
        mn_str key;
        mn_err e = mn__rd_str(c, &key, "key");
        if (e) return e;
        mn_gguf_kv *kv = &g->kvs[i];
        if ((e = mn__dup_name(g, c, at, key, "key", &kv->key))) return e;
        mn__set_ctx(c, "key", key.ptr, key.len);
        int64_t prev = mn__slots_find(g, g->kv_slots, g->kv_mask, mn__kv_name, kv->key, (int64_t)i);
        if (prev >= 0) return mn__fail(c, at, "duplicate key (first is key #%lld)", (long long)prev);
        g->n_kv = (int64_t)i + 1; /* the slot now refers to it; keep it visible for lookups */
        uint64_t tat = c->pos;
        uint32_t t;
        if ((e = mn__rd_u32(c, &t, "value type"))) return e;
        if (mn__scalar_size(t) < 0) return mn__fail(c, tat, "unknown value type %u", t);
        kv->value.type = (mn_gguf_type)t;
        if (strcmp(kv->key, "general.alignment") == 0) align_at = c->pos;
        if ((e = mn__parse_value(g, c, &kv->value, 0))) return e;
    }
    c->ctx[0] = 0;
    const mn_gguf_value *al = mn_gguf_find(g, "general.alignment");
    if (al) {
        snprintf(c->ctx, sizeof c->ctx, "key 'general.alignment'");
        if (al->type != MN_GGUF_UINT32)
            return mn__fail(c, align_at - 4, "type %s, expected UINT32", mn_gguf_type_name(al->type));
        if (al->v.u64 == 0 || (al->v.u64 & (al->v.u64 - 1)) != 0)
            return mn__fail(c, align_at, "alignment %llu is not a power of two", (unsigned long long)al->v.u64);
        g->alignment = al->v.u64;
        c->ctx[0] = 0;
    }
    return MN_OK;
}

static mn_err mn__parse_tensor_info(mn_gguf *g, mn__cur *c, uint64_t i, uint64_t *off_field) {
    mn_gguf_tensor *t = &g->tensors[i];
    uint64_t at = c->pos;
    snprintf(c->ctx, sizeof c->ctx, "tensor #%llu", (unsigned long long)i);
    mn_str name;
    mn_err e = mn__rd_str(c, &name, "tensor name");
    if (e) return e;
    if ((e = mn__dup_name(g, c, at, name, "tensor name", &t->name))) return e;
    mn__set_ctx(c, "tensor", name.ptr, name.len);
    int64_t prev = mn__slots_find(g, g->t_slots, g->t_mask, mn__t_name, t->name, (int64_t)i);
    if (prev >= 0) return mn__fail(c, at, "duplicate tensor name (first is tensor #%lld)", (long long)prev);
    g->n_tensors = (int64_t)i + 1;

    uint64_t dat = c->pos;
    uint32_t nd;
    if ((e = mn__rd_u32(c, &nd, "n_dims"))) return e;
    if (nd < 1 || nd > 4) return mn__fail(c, dat, "n_dims %u, expected 1..4", nd);
    t->n_dims = (int)nd;
    uint64_t nel = 1;
    for (int d = 0; d < 4; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < nd; d++) {
        uint64_t nat = c->pos, ne;
        if ((e = mn__rd_u64(c, &ne, "ne"))) return e;
        if (ne == 0 || ne > (uint64_t)INT64_MAX)
            return mn__fail(c, nat, "ne[%u] = %llu, expected 1..2^63-1", d, (unsigned long long)ne);
        if (nel > (uint64_t)INT64_MAX / ne)
            return mn__fail(c, nat, "element count overflows at ne[%u] = %llu", d, (unsigned long long)ne);
        nel *= ne;
        t->ne[d] = (int64_t)ne;
    }
    uint64_t tat = c->pos;
    uint32_t ty;
    if ((e = mn__rd_u32(c, &ty, "tensor type"))) return e;
    if (ty >= MN_DTYPE_COUNT || !mn_dtype_is_weight_type((mn_dtype)ty))
        return mn__fail(c, tat, "tensor type %u (%s) is not a supported weight type", ty,
                        ty < MN_DTYPE_COUNT ? mn_dtype_name((mn_dtype)ty) : "unknown");
    t->type = (mn_dtype)ty;
    uint64_t be = (uint64_t)mn_dtype_block_elems(t->type), bb = (uint64_t)mn_dtype_block_bytes(t->type);
    if ((uint64_t)t->ne[0] % be != 0)
        return mn__fail(c, tat, "ne[0] = %lld is not a multiple of the %s block size %llu",
                        (long long)t->ne[0], mn_dtype_name(t->type), (unsigned long long)be);
    if (nel / be > UINT64_MAX / bb)
        return mn__fail(c, tat, "byte size of %llu %s elements overflows", (unsigned long long)nel,
                        mn_dtype_name(t->type));
    t->nbytes = nel / be * bb;
    *off_field = c->pos;
    if ((e = mn__rd_u64(c, &t->offset, "tensor data offset"))) return e;
    if (t->offset % g->alignment != 0)
        return mn__fail(c, *off_field, "data offset %llu is not a multiple of the alignment %llu",
                        (unsigned long long)t->offset, (unsigned long long)g->alignment);
    return MN_OK;
}

static mn_err mn__parse_tensors(mn_gguf *g, mn__cur *c, uint64_t n) {
    if (n > mn__left(c) / MN__TINFO_MIN_BYTES)
        return mn__fail(c, 8, "tensor count %llu is more than the %llu bytes left after the keys can hold",
                        (unsigned long long)n, (unsigned long long)mn__left(c));
    g->tensors = n ? mn__arena_alloc(g, (size_t)n * sizeof *g->tensors) : NULL;
    g->t_slots = mn__slots_new(g, n, &g->t_mask);
    uint64_t *off_field = n ? mn__arena_alloc(g, (size_t)n * sizeof *off_field) : NULL;
    if ((n && (!g->tensors || !off_field)) || !g->t_slots) return mn__nomem(c, "tensor table");
    for (uint64_t i = 0; i < n; i++) {
        mn_err e = mn__parse_tensor_info(g, c, i, &off_field[i]);
        if (e) return e;
    }
    c->ctx[0] = 0;
    uint64_t rem = c->pos % g->alignment;
    g->data_off = c->pos + (rem ? g->alignment - rem : 0);
    if (n == 0) return MN_OK; /* a tokenizer-only file may end without padding */
    if (g->data_off > c->size)
        return mn__fail(c, c->pos, "data section at %llu (alignment %llu) starts past end of file (size %llu)",
                        (unsigned long long)g->data_off, (unsigned long long)g->alignment,
                        (unsigned long long)c->size);
    uint64_t room = c->size - g->data_off;
    for (uint64_t i = 0; i < n; i++) {
        mn_gguf_tensor *t = &g->tensors[i];
        if (t->offset > room || t->nbytes > room - t->offset) {
            mn__set_ctx(c, "tensor", t->name, strlen(t->name));
            if (t->nbytes > UINT64_MAX - g->data_off || t->offset > UINT64_MAX - g->data_off - t->nbytes)
                return mn__fail(c, off_field[i], "data offset %llu + %llu bytes past end of file (size %llu)",
                                (unsigned long long)t->offset, (unsigned long long)t->nbytes,
                                (unsigned long long)c->size);
            uint64_t a = g->data_off + t->offset;
            return mn__fail(c, off_field[i], "data [%llu, %llu) past end of file (size %llu)",
                            (unsigned long long)a, (unsigned long long)(a + t->nbytes),
                            (unsigned long long)c->size);
        }
        t->data = c->b + g->data_off + t->offset;
    }
    return MN_OK;
}

mn_err mn_gguf_open_memory(const void *data, size_t size, mn_gguf **out, mn_errbuf *eb) {
    *out = NULL;
    if (!data && size) return mn_errf(eb, MN_EINVALID, "gguf: NULL data with size %zu", size);
    mn_gguf *g = mn_calloc(1, sizeof *g);
    if (!g) return mn_errf(eb, MN_ENOMEM, "gguf: out of memory");
    g->base = data;
    g->size = size;
    g->alignment = MN__GGUF_DEFAULT_ALIGN;
    mn__cur c = {.b = data, .size = size, .pos = 0, .eb = eb, .ctx = ""};
    uint64_t n_tensors, n_kv;
    mn_err e = mn__parse_header(g, &c, &n_tensors, &n_kv);
    if (!e) e = mn__parse_kvs(g, &c, n_kv);
    if (!e) e = mn__parse_tensors(g, &c, n_tensors);
    if (e) {
        mn_gguf_close(g);
        return e;
    }
    *out = g;
    return MN_OK;
}

mn_err mn_gguf_open(const char *path, mn_gguf **out, mn_errbuf *eb) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return mn_errf(eb, errno == ENOENT ? MN_ENOT_FOUND : MN_EIO, "gguf: open '%s': %s", path,
                       strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int er = errno;
        close(fd);
        return mn_errf(eb, MN_EIO, "gguf: stat '%s': %s", path, strerror(er));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return mn_errf(eb, MN_EIO, "gguf: '%s' is not a regular file", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return mn_errf(eb, MN_EFORMAT, "gguf: offset 0: '%s' is empty, expected a GGUF header", path);
    }
    size_t size = (size_t)st.st_size;
    void *p = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int er = errno;
    close(fd); /* the mapping keeps the file alive */
    if (p == MAP_FAILED) return mn_errf(eb, MN_EIO, "gguf: mmap '%s' (%zu bytes): %s", path, size, strerror(er));
    mn_errbuf local;
    mn_err e = mn_gguf_open_memory(p, size, out, eb ? eb : &local);
    if (e) {
        munmap(p, size);
        if (eb) {
            /* prefix the path so the user knows which file was bad */
            char tmp[sizeof eb->msg];
            snprintf(tmp, sizeof tmp, "%s", eb->msg);
            mn_errf(eb, e, "%s: %s", path, tmp);
        }
        return e;
    }
    (*out)->mapped = 1;
    return MN_OK;
}

void mn_gguf_close(mn_gguf *g) {
    if (!g) return;
    if (g->mapped) munmap((void *)g->base, (size_t)g->size);
    for (mn__chunk *c = g->chunks, *next; c; c = next) {
        next = c->next;
        mn_free(c);
    }
    mn_free(g);
}

/* ---- accessors ---------------------------------------------------------------------- */

uint32_t mn_gguf_version(const mn_gguf *g) { return g->version; }
uint64_t mn_gguf_alignment(const mn_gguf *g) { return g->alignment; }
uint64_t mn_gguf_data_offset(const mn_gguf *g) { return g->data_off; }
uint64_t mn_gguf_file_size(const mn_gguf *g) { return g->size; }
const void *mn_gguf_file_data(const mn_gguf *g) { return g->base; }
int64_t mn_gguf_n_kv(const mn_gguf *g) { return g->n_kv; }
int64_t mn_gguf_n_tensors(const mn_gguf *g) { return g->n_tensors; }

const mn_gguf_kv *mn_gguf_kv_at(const mn_gguf *g, int64_t i) {
    return i >= 0 && i < g->n_kv ? &g->kvs[i] : NULL;
}
const mn_gguf_tensor *mn_gguf_tensor_at(const mn_gguf *g, int64_t i) {
    return i >= 0 && i < g->n_tensors ? &g->tensors[i] : NULL;
}

const mn_gguf_value *mn_gguf_find(const mn_gguf *g, const char *key) {
    int64_t i = mn__slots_find(g, g->kv_slots, g->kv_mask, mn__kv_name, key, -1);
    return i >= 0 ? &g->kvs[i].value : NULL;
}

const mn_gguf_tensor *mn_gguf_find_tensor(const mn_gguf *g, const char *name) {
    int64_t i = mn__slots_find(g, g->t_slots, g->t_mask, mn__t_name, name, -1);
    return i >= 0 ? &g->tensors[i] : NULL;
}

/* ---- typed getters ------------------------------------------------------------------ */

static mn_err mn__get(const mn_gguf *g, const char *key, const mn_gguf_value **v, mn_errbuf *eb) {
    *v = mn_gguf_find(g, key);
    if (!*v) return mn_errf(eb, MN_ENOT_FOUND, "gguf: key '%s' not found", key);
    return MN_OK;
}

static mn_err mn__wrong_type(const char *key, const char *want, const mn_gguf_value *v, mn_errbuf *eb) {
    if (v->type == MN_GGUF_ARRAY)
        return mn_errf(eb, MN_EFORMAT, "gguf: key '%s': expected %s, found ARRAY of %s", key, want,
                       mn_gguf_type_name(v->v.arr.elem_type));
    return mn_errf(eb, MN_EFORMAT, "gguf: key '%s': expected %s, found %s", key, want,
                   mn_gguf_type_name(v->type));
}

mn_err mn_gguf_get_i64(const mn_gguf *g, const char *key, int64_t *out, mn_errbuf *eb) {
    const mn_gguf_value *v;
    mn_err e = mn__get(g, key, &v, eb);
    if (e) return e;
    if (!mn__is_int(v->type)) return mn__wrong_type(key, "an integer", v, eb);
    if (!mn__is_signed(v->type) && v->v.u64 > (uint64_t)INT64_MAX)
        return mn_errf(eb, MN_ERANGE, "gguf: key '%s': %llu does not fit in int64", key,
                       (unsigned long long)v->v.u64);
    *out = mn__is_signed(v->type) ? v->v.i64 : (int64_t)v->v.u64;
    return MN_OK;
}

mn_err mn_gguf_get_u32(const mn_gguf *g, const char *key, uint32_t *out, mn_errbuf *eb) {
    const mn_gguf_value *v;
    mn_err e = mn__get(g, key, &v, eb);
    if (e) return e;
    if (!mn__is_int(v->type)) return mn__wrong_type(key, "an integer", v, eb);
    if (mn__is_signed(v->type) ? (v->v.i64 < 0 || v->v.i64 > (int64_t)UINT32_MAX) : v->v.u64 > UINT32_MAX) {
        if (mn__is_signed(v->type))
            return mn_errf(eb, MN_ERANGE, "gguf: key '%s': %lld does not fit in uint32", key, (long long)v->v.i64);
        return mn_errf(eb, MN_ERANGE, "gguf: key '%s': %llu does not fit in uint32", key,
                       (unsigned long long)v->v.u64);
    }
    *out = mn__is_signed(v->type) ? (uint32_t)v->v.i64 : (uint32_t)v->v.u64;
    return MN_OK;
}

mn_err mn_gguf_get_f32(const mn_gguf *g, const char *key, float *out, mn_errbuf *eb) {
    const mn_gguf_value *v;
    mn_err e = mn__get(g, key, &v, eb);
    if (e) return e;
    if (v->type == MN_GGUF_FLOAT32 || v->type == MN_GGUF_FLOAT64) *out = (float)v->v.f64;
    else if (mn__is_int(v->type)) *out = mn__is_signed(v->type) ? (float)v->v.i64 : (float)v->v.u64;
    else return mn__wrong_type(key, "a number", v, eb);
    return MN_OK;
}

mn_err mn_gguf_get_bool(const mn_gguf *g, const char *key, bool *out, mn_errbuf *eb) {
    const mn_gguf_value *v;
    mn_err e = mn__get(g, key, &v, eb);
    if (e) return e;
    if (v->type != MN_GGUF_BOOL) return mn__wrong_type(key, "BOOL", v, eb);
    *out = v->v.b;
    return MN_OK;
}

mn_err mn_gguf_get_str(const mn_gguf *g, const char *key, mn_str *out, mn_errbuf *eb) {
    const mn_gguf_value *v;
    mn_err e = mn__get(g, key, &v, eb);
    if (e) return e;
    if (v->type != MN_GGUF_STRING) return mn__wrong_type(key, "STRING", v, eb);
    *out = v->v.str;
    return MN_OK;
}

mn_err mn_gguf_get_arr(const mn_gguf *g, const char *key, mn_gguf_type elem, const mn_gguf_value **out,
                       mn_errbuf *eb) {
    const mn_gguf_value *v;
    mn_err e = mn__get(g, key, &v, eb);
    if (e) return e;
    if (v->type != MN_GGUF_ARRAY || v->v.arr.elem_type != elem) {
        char want[48];
        snprintf(want, sizeof want, "ARRAY of %s", mn_gguf_type_name(elem));
        return mn__wrong_type(key, want, v, eb);
    }
    *out = v;
    return MN_OK;
}

/* ---- scalar arrays -------------------------------------------------------------------- */

int64_t mn_gguf_arr_int(const mn_gguf_value *arr, uint64_t i) {
    assert(arr->type == MN_GGUF_ARRAY && i < arr->v.arr.n);
    mn_gguf_value x = {.type = arr->v.arr.elem_type};
    int esz = mn__scalar_size(x.type);
    assert(esz > 0 && (mn__is_int(x.type) || x.type == MN_GGUF_BOOL));
    mn__decode_scalar((const uint8_t *)arr->v.arr.data + i * (uint64_t)esz, &x);
    if (x.type == MN_GGUF_BOOL) return x.v.b;
    return mn__is_signed(x.type) ? x.v.i64 : (int64_t)x.v.u64;
}

double mn_gguf_arr_float(const mn_gguf_value *arr, uint64_t i) {
    assert(arr->type == MN_GGUF_ARRAY && i < arr->v.arr.n);
    mn_gguf_value x = {.type = arr->v.arr.elem_type};
    if (x.type != MN_GGUF_FLOAT32 && x.type != MN_GGUF_FLOAT64) return (double)mn_gguf_arr_int(arr, i);
    mn__decode_scalar((const uint8_t *)arr->v.arr.data + i * (uint64_t)mn__scalar_size(x.type), &x);
    return x.v.f64;
}
