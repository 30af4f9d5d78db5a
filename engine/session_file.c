/* engine/session_file.c — writer and reader of the session file (docs/session-format.md).
 *
 * Layout (all little-endian): a 176-byte header, the tokens section (n_tokens int32 ids,
 * then n_tokens role bytes), the chunk table (32 bytes per KV block), then the chunks (one
 * kvcodec stream per block, back to back). Every byte is covered by a checksum and there is
 * no padding, so any corruption is detected.
 *
 * The writer knows every offset before compressing (the header, tokens and table have fixed
 * sizes), so it streams the chunks out first, one block of memory at a time, and writes the
 * table, tokens and header last, at their offsets. The same code writes to a file (pwrite)
 * or to a growing memory buffer. The reader goes the other way through a source that is
 * either memory or pread, and checks a part before it reads the next one.
 */
#include "engine/session_file.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/kvcodec.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "session files store KV as little-endian f16");

static const uint8_t MAGIC[8] = {'M', 'N', 'E', 'M', 'E', 'S', 'E', 'S'};
enum {
    HDR_BYTES = 176,          /* v1 header, checksum included */
    HDR_MAX = 4096,           /* any version's header_bytes must be within [HDR_BYTES, HDR_MAX] */
    ENTRY_BYTES = 32,         /* chunk table entry: offset, compressed, raw, hash */
    CODEC_SHUFFLE16_LZ4 = 1,
    /* header flag: a chunk whose compressed_bytes equals raw_bytes is stored as it is (no
     * shuffle, no LZ4): what the writer does when LZ4 would save under 1/32 of the block,
     * so reading such KV back costs a copy instead of a decode */
    FLAG_STORED_CHUNKS = 1,
    /* field offsets in the header */
    O_VERSION = 8, O_HDRBYTES = 12, O_NLAYER = 16, O_NKVHEAD = 20, O_HEADDIM = 24, O_BLOCKSIZE = 28,
    O_NTOKENS = 32, O_NBLOCKS = 36, O_MODELFP = 40, O_ADAPTERFP = 56, O_RNG = 72, O_CODEC = 104, O_FLAGS = 108,
    O_TOKOFF = 112, O_TOKBYTES = 120, O_TOKHASH = 128, O_TABOFF = 136, O_TABBYTES = 144, O_TABHASH = 152,
    O_FILEBYTES = 160, O_HDRHASH = 168,
};
/* LZ4 emits at least one byte per 255 bytes it decodes: a chunk claiming more raw bytes
 * than that from its compressed size is refused before anything is allocated for it. */
#define LZ4_MAX_RATIO 255u

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void fp_hex(const uint8_t fp[16], char out[33]) {
    static const char H[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = H[fp[i] >> 4];
        out[2 * i + 1] = H[fp[i] & 15];
    }
    out[32] = 0;
}

uint64_t mn_session_block_bytes(int32_t n_layer, int32_t n_kv_head, int32_t head_dim, int32_t block_size) {
    if (n_layer < 1 || n_layer > MN_SESSION_MAX_LAYERS || n_kv_head < 1 || n_kv_head > MN_SESSION_MAX_KV_HEADS ||
        head_dim < 1 || head_dim > MN_SESSION_MAX_HEAD_DIM || block_size < 1 || block_size > MN_SESSION_MAX_BLOCK_SIZE)
        return 0;
    uint64_t b = (uint64_t)n_layer * 2u * (uint64_t)block_size * (uint64_t)n_kv_head * (uint64_t)head_dim * 2u;
    return b <= MN_SESSION_MAX_CHUNK_BYTES ? b : 0;
}

/* The slots of the last block at positions >= n_tokens, per layer and K/V: [from, to) in
 * f16 elements relative to one K (or V) run. from == to when the block is full. */
static void tail_range(const mn_session_image *im, uint64_t *from, uint64_t *to) {
    uint64_t kv_dim = (uint64_t)im->n_kv_head * (uint64_t)im->head_dim;
    int64_t used = (int64_t)im->n_tokens - (int64_t)(im->n_blocks - 1) * im->block_size;
    *from = (uint64_t)used * kv_dim;
    *to = (uint64_t)im->block_size * kv_dim;
}

/* ---- writer ------------------------------------------------------------------------------ */

typedef struct sink {
    int fd;                  /* >= 0: a file (pwrite) */
    const char *name;        /* for messages */
    uint8_t *buf;            /* fd < 0: a growing buffer */
    size_t len, cap;
} sink;

static mn_err sink_put(sink *s, uint64_t off, const void *p, size_t n, mn_errbuf *eb) {
    if (s->fd >= 0) {
        const uint8_t *q = p;
        while (n > 0) {
            ssize_t w = pwrite(s->fd, q, n, (off_t)off);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0)
                return mn_errf(eb, MN_EIO, "session file %s: write of %zu bytes at offset %" PRIu64 " failed: %s",
                               s->name, n, off, w < 0 ? strerror(errno) : "no progress");
            q += w;
            n -= (size_t)w;
            off += (uint64_t)w;
        }
        return MN_OK;
    }
    if (off > SIZE_MAX - n) return mn_errf(eb, MN_ENOMEM, "session stream: %" PRIu64 " bytes do not fit memory", off);
    size_t end = (size_t)off + n;
    if (end > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < end) cap = cap > SIZE_MAX / 2 ? end : cap * 2;
        uint8_t *nb = mn_realloc(s->buf, cap);
        if (!nb) return mn_errf(eb, MN_ENOMEM, "session stream: out of memory growing to %zu bytes", cap);
        s->buf = nb;
        s->cap = cap;
    }
    memcpy(s->buf + off, p, n);
    if (end > s->len) s->len = end;
    return MN_OK;
}

static mn_err check_image(const mn_session_image *im, uint64_t *block_bytes, mn_errbuf *eb) {
    uint64_t bb = mn_session_block_bytes(im->n_layer, im->n_kv_head, im->head_dim, im->block_size);
    if (bb == 0)
        return mn_errf(eb, MN_EINVALID,
                       "session image: geometry n_layer %d n_kv_head %d head_dim %d block_size %d outside the limits "
                       "(%d, %d, %d, %d; %" PRIu64 " bytes per block)",
                       im->n_layer, im->n_kv_head, im->head_dim, im->block_size, MN_SESSION_MAX_LAYERS,
                       MN_SESSION_MAX_KV_HEADS, MN_SESSION_MAX_HEAD_DIM, MN_SESSION_MAX_BLOCK_SIZE,
                       MN_SESSION_MAX_CHUNK_BYTES);
    if (im->n_tokens < 0 || im->n_tokens > MN_SESSION_MAX_TOKENS)
        return mn_errf(eb, MN_EINVALID, "session image: n_tokens %d outside [0, %d]", im->n_tokens,
                       MN_SESSION_MAX_TOKENS);
    int32_t want = (int32_t)(((int64_t)im->n_tokens + im->block_size - 1) / im->block_size);
    if (im->n_blocks != want)
        return mn_errf(eb, MN_EINVALID, "session image: n_blocks %d, expected ceil(%d / %d) = %d", im->n_blocks,
                       im->n_tokens, im->block_size, want);
    if (im->n_tokens > 0 && (!im->tokens || !im->kv))
        return mn_errf(eb, MN_EINVALID, "session image: %d tokens but no %s array", im->n_tokens,
                       im->tokens ? "kv" : "tokens");
    for (int32_t i = 0; i < im->n_tokens; i++)
        if (im->tokens[i] < 0) return mn_errf(eb, MN_EINVALID, "session image: token %d is negative (%d)", i, im->tokens[i]);
    *block_bytes = bb;
    return MN_OK;
}

static mn_err write_image(const mn_session_image *im, sink *s, mn_errbuf *eb) {
    uint64_t bb = 0;
    mn_err e = check_image(im, &bb, eb);
    if (e != MN_OK) return e;
    uint64_t n = (uint64_t)im->n_tokens, nb = (uint64_t)im->n_blocks;
    uint64_t tok_off = HDR_BYTES, tok_bytes = 5 * n, tab_off = tok_off + tok_bytes, tab_bytes = ENTRY_BYTES * nb;
    uint64_t data_off = tab_off + tab_bytes;
    size_t bound = nb ? mn_kvcodec_bound((size_t)bb) : 0;
    uint8_t *sec = mn_malloc((size_t)tok_bytes), *tab = mn_malloc((size_t)tab_bytes);
    uint8_t *stage = nb ? mn_aligned_alloc(64, (size_t)bb) : NULL, *scratch = nb ? mn_malloc((size_t)bb) : NULL;
    uint8_t *comp = nb ? mn_malloc(bound) : NULL;
    if (!sec || !tab || (nb && (!stage || !scratch || !comp))) {
        e = mn_errf(eb, MN_ENOMEM, "session write: out of memory (%" PRIu64 "-byte blocks, %" PRIu64 " tokens)", bb, n);
        goto done;
    }
    uint64_t off = data_off;
    for (uint64_t b = 0; b < nb && e == MN_OK; b++) {
        const uint16_t *src = im->kv + b * (bb / 2);
        if (b == nb - 1) {
            /* the unused slots of the last block become zeros: a pool block may hold another
             * session's stale KV there, which must not leave the process */
            uint64_t from, to, run = bb / 2 / (2u * (uint64_t)im->n_layer);
            tail_range(im, &from, &to);
            memcpy(stage, src, (size_t)bb);
            for (uint64_t r = 0; r < 2u * (uint64_t)im->n_layer; r++)
                memset((uint16_t *)stage + r * run + from, 0, (size_t)(to - from) * 2);
            src = (const uint16_t *)stage;
        }
        size_t cb;
        e = mn_kvcodec_compress_ex(src, (size_t)bb, comp, bound, scratch, 1, &cb, eb);
        if (e != MN_OK) break;
        const uint8_t *chunk = comp;
        if (cb >= bb - bb / 32) { /* LZ4 saves (almost) nothing: store the block (FLAG_STORED_CHUNKS) */
            chunk = (const uint8_t *)src;
            cb = (size_t)bb;
        }
        uint8_t *t = tab + b * ENTRY_BYTES;
        put64(t, off);
        put64(t + 8, cb);
        put64(t + 16, bb);
        put64(t + 24, mn_hash64(chunk, cb, 0));
        e = sink_put(s, off, chunk, cb, eb);
        off += cb;
    }
    if (e != MN_OK) goto done;
    for (uint64_t i = 0; i < n; i++) {
        put32(sec + 4 * i, (uint32_t)im->tokens[i]);
        sec[4 * n + i] = im->roles ? im->roles[i] : 0;
    }
    uint8_t h[HDR_BYTES];
    memset(h, 0, sizeof h);
    memcpy(h, MAGIC, 8);
    put32(h + O_VERSION, MN_SESSION_FILE_VERSION);
    put32(h + O_HDRBYTES, HDR_BYTES);
    put32(h + O_NLAYER, (uint32_t)im->n_layer);
    put32(h + O_NKVHEAD, (uint32_t)im->n_kv_head);
    put32(h + O_HEADDIM, (uint32_t)im->head_dim);
    put32(h + O_BLOCKSIZE, (uint32_t)im->block_size);
    put32(h + O_NTOKENS, (uint32_t)im->n_tokens);
    put32(h + O_NBLOCKS, (uint32_t)im->n_blocks);
    memcpy(h + O_MODELFP, im->model_fp, 16);
    memcpy(h + O_ADAPTERFP, im->adapter_fp, 16);
    for (int i = 0; i < 4; i++) put64(h + O_RNG + 8 * i, im->rng[i]);
    put32(h + O_CODEC, CODEC_SHUFFLE16_LZ4);
    put32(h + O_FLAGS, FLAG_STORED_CHUNKS);
    put64(h + O_TOKOFF, tok_off);
    put64(h + O_TOKBYTES, tok_bytes);
    put64(h + O_TOKHASH, mn_hash64(sec, (size_t)tok_bytes, 0));
    put64(h + O_TABOFF, tab_off);
    put64(h + O_TABBYTES, tab_bytes);
    put64(h + O_TABHASH, mn_hash64(tab, (size_t)tab_bytes, 0));
    put64(h + O_FILEBYTES, off);
    put64(h + O_HDRHASH, mn_hash64(h, O_HDRHASH, 0));
    e = sink_put(s, tab_off, tab, (size_t)tab_bytes, eb);
    if (e == MN_OK) e = sink_put(s, tok_off, sec, (size_t)tok_bytes, eb);
    if (e == MN_OK) e = sink_put(s, 0, h, HDR_BYTES, eb);
done:
    mn_free(sec);
    mn_free(tab);
    mn_free(stage);
    mn_free(scratch);
    mn_free(comp);
    return e;
}

mn_err mn_session_write_mem(const mn_session_image *img, uint8_t **out, size_t *len, mn_errbuf *eb) {
    sink s = {.fd = -1, .name = "stream"};
    mn_err e = write_image(img, &s, eb);
    if (e != MN_OK) {
        mn_free(s.buf);
        return e;
    }
    *out = s.buf;
    *len = s.len;
    return MN_OK;
}

/* fsync the directory holding path, so the rename itself survives a power loss. */
static mn_err sync_dir(const char *path, mn_errbuf *eb) {
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 1;
    if (slash && n == 0) n = 1;   /* "/file" lives in "/" */
    char *dir = mn_malloc(n + 1);
    if (!dir) return mn_errf(eb, MN_ENOMEM, "session file %s: out of memory", path);
    memcpy(dir, slash ? path : ".", n);
    dir[n] = 0;
    mn_err e = MN_OK;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || (fsync(fd) != 0 && errno != EINVAL))   /* EINVAL: the fs cannot sync dirs */
        e = mn_errf(eb, MN_EIO, "session file %s: renamed, but syncing directory %s failed: %s", path, dir,
                    strerror(errno));
    if (fd >= 0) close(fd);
    mn_free(dir);
    return e;
}

mn_err mn_session_write_file(const char *path, const mn_session_image *img, mn_errbuf *eb) {
    size_t pl = strlen(path);
    char *tmp = mn_malloc(pl + 32);
    if (!tmp) return mn_errf(eb, MN_ENOMEM, "session file %s: out of memory", path);
    snprintf(tmp, pl + 32, "%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        mn_err e = mn_errf(eb, MN_EIO, "session file %s: cannot create %s: %s", path, tmp, strerror(errno));
        mn_free(tmp);
        return e;
    }
    sink s = {.fd = fd, .name = tmp};
    mn_err e = write_image(img, &s, eb);
    if (e == MN_OK && fsync(fd) != 0) e = mn_errf(eb, MN_EIO, "session file %s: fsync failed: %s", tmp, strerror(errno));
    if (close(fd) != 0 && e == MN_OK) e = mn_errf(eb, MN_EIO, "session file %s: close failed: %s", tmp, strerror(errno));
    if (e == MN_OK && rename(tmp, path) != 0)
        e = mn_errf(eb, MN_EIO, "session file %s: rename from %s failed: %s", path, tmp, strerror(errno));
    if (e != MN_OK) {
        unlink(tmp);
        mn_free(tmp);
        return e;
    }
    mn_free(tmp);
    return sync_dir(path, eb);
}

/* ---- reader ------------------------------------------------------------------------------ */

typedef struct source {
    const uint8_t *mem;      /* non-NULL: read from memory */
    int fd;                  /* else pread from fd */
    const char *name;        /* "session file <path>" or "session stream" */
    uint64_t len;
} source;

/* Get n bytes at off (already checked to lie within len): a pointer into memory, or tmp
 * filled by pread. */
static mn_err src_get(const source *s, uint64_t off, size_t n, uint8_t *tmp, const uint8_t **out, const char *part,
                      mn_errbuf *eb) {
    if (s->mem) {
        *out = s->mem + off;
        return MN_OK;
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(s->fd, tmp + got, n - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0)
            return mn_errf(eb, MN_EIO, "%s: reading %s at offset %" PRIu64 ": %s", s->name, part, off + got,
                           strerror(errno));
        if (r == 0)
            return mn_errf(eb, MN_EFORMAT, "%s: truncated in %s at offset %" PRIu64 " (file shrank while reading)",
                           s->name, part, off + got);
        got += (size_t)r;
    }
    *out = tmp;
    return MN_OK;
}

void mn_session_loaded_free(mn_session_loaded *s) {
    if (!s) return;
    mn_free(s->tokens);
    mn_free(s->roles);
    mn_free(s->kv);
    mn_free(s);
}

/* The last block's slots past n_tokens must be zeros (writers write them so). */
static mn_err check_tail(const mn_session_image *im, const uint16_t *last, uint64_t bb, const char *nm, uint64_t nb,
                         mn_errbuf *eb) {
    uint64_t from, to, run = bb / 2 / (2u * (uint64_t)im->n_layer);
    tail_range(im, &from, &to);
    for (uint64_t r = 0; r < 2u * (uint64_t)im->n_layer; r++)
        for (uint64_t i = from; i < to; i++)
            if (last[r * run + i])
                return mn_errf(eb, MN_EFORMAT, "%s: chunk %" PRIu64 ": KV past n_tokens (layer %" PRIu64 " %c, element %"
                               PRIu64 ") is not zero", nm, nb - 1, r / 2, r % 2 ? 'V' : 'K', i);
    return MN_OK;
}

/* Check the header; on success *im holds its fields (pointers NULL), *tab_off etc. the
 * layout, all consistent with each other and with s->len. */
static mn_err read_header(const source *s, const uint8_t *expect, mn_session_image *im, uint64_t *tok_hash,
                          uint64_t *tab_hash, uint64_t *block_bytes, uint32_t *flags_out, mn_errbuf *eb) {
    uint8_t buf[HDR_MAX];
    const uint8_t *h;
    const char *nm = s->name;
    if (s->len < 16) {
        size_t k = s->len < 8 ? (size_t)s->len : 8;
        mn_err e = src_get(s, 0, (size_t)s->len, buf, &h, "the header", eb);
        if (e != MN_OK) return e;
        if (memcmp(h, MAGIC, k) != 0) return mn_errf(eb, MN_EFORMAT, "%s: not a session file (bad magic at offset 0)", nm);
        return mn_errf(eb, MN_EFORMAT, "%s: truncated in the header at offset %" PRIu64 " (a header is %d bytes)", nm,
                       s->len, HDR_BYTES);
    }
    mn_err e = src_get(s, 0, 16, buf, &h, "the header", eb);
    if (e != MN_OK) return e;
    if (memcmp(h, MAGIC, 8) != 0) return mn_errf(eb, MN_EFORMAT, "%s: not a session file (bad magic at offset 0)", nm);
    uint32_t version = get32(h + O_VERSION), hb = get32(h + O_HDRBYTES);
    if (hb < HDR_BYTES || hb > HDR_MAX)
        return mn_errf(eb, MN_EFORMAT, "%s: header: header_bytes %u at offset %d outside [%d, %d]", nm, hb, O_HDRBYTES,
                       HDR_BYTES, HDR_MAX);
    if (s->len < hb)
        return mn_errf(eb, MN_EFORMAT, "%s: truncated in the header at offset %" PRIu64 " (the header is %u bytes)", nm,
                       s->len, hb);
    e = src_get(s, 0, hb, buf, &h, "the header", eb);
    if (e != MN_OK) return e;
    /* every version keeps its header checksum in the header's last 8 bytes, so a corrupt
     * version field is told apart from a genuinely newer file */
    if (mn_hash64(h, hb - 8, 0) != get64(h + hb - 8))
        return mn_errf(eb, MN_EFORMAT, "%s: header (bytes 0..%u): checksum mismatch at offset %u", nm, hb, hb - 8);
    if (version != MN_SESSION_FILE_VERSION)
        return mn_errf(eb, MN_EUNSUPPORTED, "%s: version %u at offset %d; this build reads version %u", nm, version,
                       O_VERSION, MN_SESSION_FILE_VERSION);
    if (hb != HDR_BYTES)
        return mn_errf(eb, MN_EFORMAT, "%s: header: header_bytes %u at offset %d, version 1 has %d", nm, hb, O_HDRBYTES,
                       HDR_BYTES);
    memset(im, 0, sizeof *im);
    memcpy(im->model_fp, h + O_MODELFP, 16);
    memcpy(im->adapter_fp, h + O_ADAPTERFP, 16);
    if (expect && memcmp(expect, im->model_fp, 16) != 0) {
        char a[33], b[33];
        fp_hex(im->model_fp, a);
        fp_hex(expect, b);
        return mn_errf(eb, MN_EMISMATCH,
                       "%s: saved by another model (file's model fingerprint %s, this model's %s)", nm, a, b);
    }
    uint32_t codec = get32(h + O_CODEC), flags = get32(h + O_FLAGS);
    if (codec != CODEC_SHUFFLE16_LZ4)
        return mn_errf(eb, MN_EFORMAT, "%s: header: codec %u at offset %d unknown (1 = shuffle16+lz4)", nm, codec, O_CODEC);
    if (flags & ~(uint32_t)FLAG_STORED_CHUNKS)
        return mn_errf(eb, MN_EFORMAT, "%s: header: flags %#x at offset %d, only bit 0 (stored chunks) is defined", nm, flags,
                       O_FLAGS);
    *flags_out = flags;
    im->n_layer = (int32_t)get32(h + O_NLAYER);
    im->n_kv_head = (int32_t)get32(h + O_NKVHEAD);
    im->head_dim = (int32_t)get32(h + O_HEADDIM);
    im->block_size = (int32_t)get32(h + O_BLOCKSIZE);
    im->n_tokens = (int32_t)get32(h + O_NTOKENS);
    im->n_blocks = (int32_t)get32(h + O_NBLOCKS);
    for (int i = 0; i < 4; i++) im->rng[i] = get64(h + O_RNG + 8 * i);
    uint64_t bb = mn_session_block_bytes(im->n_layer, im->n_kv_head, im->head_dim, im->block_size);
    if (bb == 0)
        return mn_errf(eb, MN_EFORMAT,
                       "%s: header: KV geometry (offsets %d..%d) n_layer %d n_kv_head %d head_dim %d block_size %d "
                       "outside the limits",
                       nm, O_NLAYER, O_BLOCKSIZE + 3, im->n_layer, im->n_kv_head, im->head_dim, im->block_size);
    if (im->n_tokens < 0 || im->n_tokens > MN_SESSION_MAX_TOKENS)
        return mn_errf(eb, MN_EFORMAT, "%s: header: n_tokens %d at offset %d outside [0, %d]", nm, im->n_tokens,
                       O_NTOKENS, MN_SESSION_MAX_TOKENS);
    int32_t want = (int32_t)(((int64_t)im->n_tokens + im->block_size - 1) / im->block_size);
    if (im->n_blocks != want)
        return mn_errf(eb, MN_EFORMAT, "%s: header: n_blocks %d at offset %d, ceil(n_tokens / block_size) is %d", nm,
                       im->n_blocks, O_NBLOCKS, want);
    uint64_t n = (uint64_t)im->n_tokens, nb = (uint64_t)im->n_blocks;
    uint64_t tok_off = get64(h + O_TOKOFF), tok_bytes = get64(h + O_TOKBYTES);
    uint64_t tab_off = get64(h + O_TABOFF), tab_bytes = get64(h + O_TABBYTES), fb = get64(h + O_FILEBYTES);
    if (tok_off != HDR_BYTES || tok_bytes != 5 * n)
        return mn_errf(eb, MN_EFORMAT, "%s: header: tokens section at %" PRIu64 " (%" PRIu64
                       " bytes), expected %d (%" PRIu64 " bytes)", nm, tok_off, tok_bytes, HDR_BYTES, 5 * n);
    if (tab_off != tok_off + tok_bytes || tab_bytes != ENTRY_BYTES * nb)
        return mn_errf(eb, MN_EFORMAT, "%s: header: chunk table at %" PRIu64 " (%" PRIu64
                       " bytes), expected %" PRIu64 " (%" PRIu64 " bytes)", nm, tab_off, tab_bytes, tok_off + tok_bytes,
                       ENTRY_BYTES * nb);
    if (fb < tab_off + tab_bytes + nb)   /* every chunk has at least one byte */
        return mn_errf(eb, MN_EFORMAT, "%s: header: file_bytes %" PRIu64 " at offset %d too small for its %" PRIu64
                       " chunks", nm, fb, O_FILEBYTES, nb);
    if (s->len < fb)
        return mn_errf(eb, MN_EFORMAT, "%s: truncated: %" PRIu64 " bytes, the header says %" PRIu64 " (ends in %s)", nm,
                       s->len, fb, s->len < tab_off ? "the tokens section" : s->len < tab_off + tab_bytes ? "the chunk table" : "the chunks");
    if (s->len > fb)
        return mn_errf(eb, MN_EFORMAT, "%s: %" PRIu64 " unexpected bytes after the end at offset %" PRIu64, nm,
                       s->len - fb, fb);
    *tok_hash = get64(h + O_TOKHASH);
    *tab_hash = get64(h + O_TABHASH);
    *block_bytes = bb;
    return MN_OK;
}

static mn_err read_image(const source *s, const uint8_t *expect, mn_session_block_fn fn, void *ctx,
                         mn_session_loaded **out, mn_errbuf *eb) {
    mn_session_image im;
    uint64_t tok_hash = 0, tab_hash = 0, bb = 0;
    uint32_t flags = 0;
    const char *nm = s->name;
    mn_err e = read_header(s, expect, &im, &tok_hash, &tab_hash, &bb, &flags, eb);
    if (e != MN_OK) return e;
    uint64_t n = (uint64_t)im.n_tokens, nb = (uint64_t)im.n_blocks;
    uint64_t tok_off = HDR_BYTES, tab_off = tok_off + 5 * n, data_off = tab_off + ENTRY_BYTES * nb;
    /* sizes below are bounded by the stream's length, already checked */
    size_t bound = nb ? mn_kvcodec_bound((size_t)bb) : 0;
    mn_session_loaded *L = mn_calloc(1, sizeof *L);
    uint8_t *tmp = NULL, *table = NULL, *scratch = NULL;
    if (!L) return mn_errf(eb, MN_ENOMEM, "%s: out of memory", nm);
    L->tokens = mn_malloc((size_t)n * 4);
    L->roles = mn_malloc((size_t)n);
    table = mn_malloc((size_t)(ENTRY_BYTES * nb));
    size_t tmp_bytes = (size_t)(5 * n > bound ? 5 * n : bound);
    if (!s->mem) tmp = mn_malloc(tmp_bytes > ENTRY_BYTES * nb ? tmp_bytes : (size_t)(ENTRY_BYTES * nb));
    if (!L->tokens || !L->roles || !table || (!s->mem && !tmp)) {
        e = mn_errf(eb, MN_ENOMEM, "%s: out of memory for %" PRIu64 " tokens", nm, n);
        goto fail;
    }
    const uint8_t *p;
    if ((e = src_get(s, tok_off, (size_t)(5 * n), tmp, &p, "the tokens section", eb)) != MN_OK) goto fail;
    if (mn_hash64(p, (size_t)(5 * n), 0) != tok_hash) {
        e = mn_errf(eb, MN_EFORMAT, "%s: tokens section at offset %" PRIu64 " (%" PRIu64 " bytes): checksum mismatch",
                    nm, tok_off, 5 * n);
        goto fail;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint32_t t = get32(p + 4 * i);
        if (t > INT32_MAX) {
            e = mn_errf(eb, MN_EFORMAT, "%s: tokens section: token %" PRIu64 " at offset %" PRIu64 " is negative", nm,
                        i, tok_off + 4 * i);
            goto fail;
        }
        L->tokens[i] = (int32_t)t;
    }
    memcpy(L->roles, p + 4 * n, (size_t)n);
    if ((e = src_get(s, tab_off, (size_t)(ENTRY_BYTES * nb), tmp, &p, "the chunk table", eb)) != MN_OK) goto fail;
    if (mn_hash64(p, (size_t)(ENTRY_BYTES * nb), 0) != tab_hash) {
        e = mn_errf(eb, MN_EFORMAT, "%s: chunk table at offset %" PRIu64 " (%" PRIu64 " bytes): checksum mismatch", nm,
                    tab_off, ENTRY_BYTES * nb);
        goto fail;
    }
    memcpy(table, p, (size_t)(ENTRY_BYTES * nb));
    uint64_t off = data_off;
    for (uint64_t b = 0; b < nb; b++) {
        const uint8_t *t = table + b * ENTRY_BYTES;
        uint64_t at = tab_off + b * ENTRY_BYTES, co = get64(t), cb = get64(t + 8), rb = get64(t + 16);
        if (co != off) e = mn_errf(eb, MN_EFORMAT, "%s: chunk table entry %" PRIu64 " at offset %" PRIu64
                                   ": chunk offset %" PRIu64 ", expected %" PRIu64, nm, b, at, co, off);
        else if (rb != bb) e = mn_errf(eb, MN_EFORMAT, "%s: chunk table entry %" PRIu64 " at offset %" PRIu64
                                       ": raw size %" PRIu64 ", the geometry gives %" PRIu64, nm, b, at + 16, rb, bb);
        else if (cb == 0 || cb > bound || cb * LZ4_MAX_RATIO + 1024 < rb || cb > s->len - co)
            e = mn_errf(eb, MN_EFORMAT, "%s: chunk table entry %" PRIu64 " at offset %" PRIu64
                        ": compressed size %" PRIu64 " impossible for %" PRIu64 " raw bytes at offset %" PRIu64 " of %" PRIu64,
                        nm, b, at + 8, cb, rb, co, s->len);
        if (e != MN_OK) goto fail;
        off += cb;
    }
    if (off != s->len) {
        e = mn_errf(eb, MN_EFORMAT, "%s: chunk table: chunks end at offset %" PRIu64 ", the stream at %" PRIu64, nm, off,
                    s->len);
        goto fail;
    }
    /* nb*bb <= 255 * stream length + nb*1024 here, by the per-chunk ratio check */
    if (nb && nb > SIZE_MAX / bb) {
        e = mn_errf(eb, MN_ENOMEM, "%s: %" PRIu64 " blocks of %" PRIu64 " bytes do not fit memory", nm, nb, bb);
        goto fail;
    }
    /* with a sink: one block buffer, reused (it stays in cache), instead of the image */
    L->kv = nb ? mn_aligned_alloc(64, (size_t)(fn ? bb : nb * bb)) : NULL;
    scratch = nb ? mn_malloc((size_t)bb) : NULL;
    if (nb && (!L->kv || !scratch)) {
        e = mn_errf(eb, MN_ENOMEM, "%s: out of memory for %" PRIu64 " bytes of KV", nm, nb * bb);
        goto fail;
    }
    for (uint64_t b = 0; b < nb; b++) {
        const uint8_t *t = table + b * ENTRY_BYTES;
        uint64_t co = get64(t), cb = get64(t + 8);
        uint16_t *dst = fn ? L->kv : L->kv + b * (bb / 2);
        int stored = (flags & FLAG_STORED_CHUNKS) && cb == bb;
        /* a stored chunk is read straight into its place (one copy from the page cache) */
        if ((e = src_get(s, co, (size_t)cb, stored ? (uint8_t *)dst : tmp, &p, "a chunk", eb)) != MN_OK) goto fail;
        if (mn_hash64(p, (size_t)cb, 0) != get64(t + 24)) {
            e = mn_errf(eb, MN_EFORMAT, "%s: chunk %" PRIu64 " at offset %" PRIu64 " (%" PRIu64 " bytes): checksum mismatch",
                        nm, b, co, cb);
            goto fail;
        }
        mn_errbuf ceb;
        const uint16_t *blk = dst;
        if (stored) {
            /* a sink reads a stored chunk where it lies in memory (2-byte aligned) */
            if (fn && p != (const uint8_t *)dst && (uintptr_t)p % 2 == 0) blk = (const uint16_t *)p;
            else if (p != (const uint8_t *)dst) memcpy(dst, p, (size_t)bb);
        } else if (mn_kvcodec_decompress_ex(p, (size_t)cb, dst, (size_t)bb, scratch, &ceb) != MN_OK) {
            e = mn_errf(eb, MN_EFORMAT, "%s: chunk %" PRIu64 " at offset %" PRIu64 ": %s", nm, b, co, ceb.msg);
            goto fail;
        }
        if (fn) {
            if (b + 1 == nb && (e = check_tail(&im, blk, bb, nm, nb, eb)) != MN_OK) goto fail;
            if ((e = fn(ctx, &im, (int32_t)b, blk, eb)) != MN_OK) goto fail;
        }
    }
    if (nb && !fn) {
        if ((e = check_tail(&im, L->kv + (nb - 1) * (bb / 2), bb, nm, nb, eb)) != MN_OK) goto fail;
    }
    if (fn) { /* the blocks went to the sink */
        mn_free(L->kv);
        L->kv = NULL;
    }
    L->img = im;
    L->img.tokens = L->tokens;
    L->img.roles = L->roles;
    L->img.kv = L->kv;
    L->file_bytes = s->len;
    L->kv_compressed_bytes = s->len - data_off;
    mn_free(tmp);
    mn_free(table);
    mn_free(scratch);
    *out = L;
    return MN_OK;
fail:
    mn_free(tmp);
    mn_free(table);
    mn_free(scratch);
    mn_session_loaded_free(L);
    return e;
}

mn_err mn_session_read_mem_blocks(const void *p, size_t len, const uint8_t expect_model_fp[16], mn_session_block_fn fn,
                                  void *ctx, mn_session_loaded **out, mn_errbuf *eb) {
    static const uint8_t empty[1] = {0};
    source s = {.mem = p ? p : empty, .fd = -1, .name = "session stream", .len = p ? len : 0};
    return read_image(&s, expect_model_fp, fn, ctx, out, eb);
}

mn_err mn_session_read_mem(const void *p, size_t len, const uint8_t expect_model_fp[16], mn_session_loaded **out,
                           mn_errbuf *eb) {
    return mn_session_read_mem_blocks(p, len, expect_model_fp, NULL, NULL, out, eb);
}

mn_err mn_session_read_file(const char *path, const uint8_t expect_model_fp[16], mn_session_loaded **out,
                            mn_errbuf *eb) {
    return mn_session_read_file_blocks(path, expect_model_fp, NULL, NULL, out, eb);
}

mn_err mn_session_read_file_blocks(const char *path, const uint8_t expect_model_fp[16], mn_session_block_fn fn,
                                   void *ctx, mn_session_loaded **out, mn_errbuf *eb) {
    size_t nl = strlen(path) + 16;
    char *name = mn_malloc(nl);
    if (!name) return mn_errf(eb, MN_ENOMEM, "session file %s: out of memory", path);
    snprintf(name, nl, "session file %s", path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    mn_err e;
    if (fd < 0)
        e = mn_errf(eb, errno == ENOENT ? MN_ENOT_FOUND : MN_EIO, "%s: cannot open: %s", name, strerror(errno));
    else if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        e = mn_errf(eb, MN_EIO, "%s: not a regular file", name);
    else {
        source s = {.mem = NULL, .fd = fd, .name = name, .len = (uint64_t)st.st_size};
        e = read_image(&s, expect_model_fp, fn, ctx, out, eb);
    }
    if (fd >= 0) close(fd);
    mn_free(name);
    return e;
}

mn_err mn_session_check_adapter(const mn_session_loaded *s, const uint8_t expect[16], mn_errbuf *eb) {
    static const uint8_t none[16] = {0};
    if (!expect) expect = none;
    if (memcmp(s->img.adapter_fp, expect, 16) == 0) return MN_OK;
    char a[33], b[33];
    fp_hex(s->img.adapter_fp, a);
    fp_hex(expect, b);
    return mn_errf(eb, MN_EMISMATCH, "session saved with another adapter (file's adapter fingerprint %s, expected %s; "
                   "all zeros = no adapter)", a, b);
}
