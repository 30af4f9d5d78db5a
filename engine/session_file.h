/* engine/session_file.h — the session file: a session's tokens, roles, sampler state and
 * compressed KV in one checksummed, versioned byte stream (docs/session-format.md).
 *
 * This module knows nothing of engines or KV pools: the caller gathers a session into an
 * mn_session_image (plain arrays it owns) and gets back an mn_session_loaded (arrays this
 * module owns). The same bytes serve the T3 disk tier (one file per session) and
 * export/import between servers.
 *
 * Writing a file is atomic: the bytes go to "<path>.tmp.<pid>", which is fsynced and renamed
 * over path, then the directory is fsynced. A crash at any point leaves either the previous
 * file or the new one at path, never a mix; a failed write removes its temp file.
 * Reading checks everything before trusting it (magic, version, checksums of header, tokens,
 * chunk table and every chunk, sizes against limits and against the file's length) and
 * allocates nothing whose size was not first checked against the bytes actually present.
 * Errors: MN_EFORMAT (corrupt or truncated; the message names the part and byte offset),
 * MN_EMISMATCH (saved by another model / adapter), MN_EUNSUPPORTED (a newer version),
 * MN_EIO (the file system), MN_ENOMEM, MN_EINVALID (a bad image given to a writer).
 * Thread-safe: no shared state.
 */
#ifndef MN_SESSION_FILE_H
#define MN_SESSION_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

#define MN_SESSION_FILE_VERSION 1u
/* Limits a reader enforces (a writer too): far above real models, low enough that every
 * product below fits 64 bits and one chunk fits an LZ4 block. */
#define MN_SESSION_MAX_LAYERS 1024
#define MN_SESSION_MAX_KV_HEADS 1024
#define MN_SESSION_MAX_HEAD_DIM 1024
#define MN_SESSION_MAX_BLOCK_SIZE 4096
#define MN_SESSION_MAX_TOKENS (1 << 24)
#define MN_SESSION_MAX_CHUNK_BYTES ((uint64_t)1 << 30)   /* raw KV bytes of one block (all layers) */

/** A session as plain arrays (all borrowed by the writer, owned by mn_session_loaded after
 *  a read). KV is "block-major": block b, layer l holds K then V, each block_elems =
 *  block_size*n_kv_head*head_dim f16 laid out [slot][kv_head][head_dim] (the pool's layout
 *  within one layer), at kv + ((size_t)b*n_layer + l)*2*block_elems. So one block's KV of
 *  every layer is one contiguous run, and the writer compresses it as one chunk.
 *  Slots at positions >= n_tokens of the last block are written as zeros whatever the
 *  caller's buffer holds (stale pool data never leaves the process), and read back as zeros. */
typedef struct mn_session_image {
    uint8_t model_fp[16], adapter_fp[16];   /* fingerprints (all-zero adapter = none) */
    int32_t n_layer, n_kv_head, head_dim, block_size;   /* KV geometry */
    int32_t n_tokens;          /* positions with KV */
    const int32_t *tokens;     /* [n_tokens] token ids (>= 0; the vocabulary is checked by the caller) */
    const uint8_t *roles;      /* [n_tokens] role of each token (0..255) */
    uint64_t rng[4];           /* sampler state */
    int32_t n_blocks;          /* ceil(n_tokens / block_size) */
    const uint16_t *kv;        /* [n_blocks][n_layer][K|V][block_elems] f16, see above */
} mn_session_image;

/** A session read back: img points into the arrays below, which the struct owns. */
typedef struct mn_session_loaded {
    mn_session_image img;
    int32_t *tokens;           /* [n_tokens] */
    uint8_t *roles;            /* [n_tokens] */
    uint16_t *kv;              /* [n_blocks * n_layer * 2 * block_elems], 64-byte aligned */
    uint64_t file_bytes;       /* size of the stream it came from */
    uint64_t kv_compressed_bytes;   /* sum of the chunk sizes */
} mn_session_loaded;

/** Free a loaded session and everything it owns; NULL is fine. */
void mn_session_loaded_free(mn_session_loaded *s);

/** Raw KV bytes of one block (all layers, K and V): the size of one chunk before
 *  compression; 0 if the geometry is outside the limits above. */
uint64_t mn_session_block_bytes(int32_t n_layer, int32_t n_kv_head, int32_t head_dim, int32_t block_size);

/** Write img to path atomically (see the top of this file). MN_EINVALID for an image that
 *  breaks the limits or whose n_blocks is not ceil(n_tokens/block_size); MN_EIO (naming the
 *  file and errno) when the file system fails; on any error path is untouched. */
mn_err mn_session_write_file(const char *path, const mn_session_image *img, mn_errbuf *eb);
/** The same bytes in memory: *out (mn_malloc'ed, freed by the caller with mn_free) and *len. */
mn_err mn_session_write_mem(const mn_session_image *img, uint8_t **out, size_t *len, mn_errbuf *eb);

/** Read a session file. expect_model_fp (may be NULL to skip the check) must equal the
 *  file's model fingerprint, else MN_EMISMATCH naming both in hex. *out is set only on
 *  success. The adapter fingerprint is returned in (*out)->img.adapter_fp; check it with
 *  mn_session_check_adapter. */
mn_err mn_session_read_file(const char *path, const uint8_t expect_model_fp[16], mn_session_loaded **out,
                            mn_errbuf *eb);
/** Read the same format from memory (len bytes at p; nothing past p+len is read). */
mn_err mn_session_read_mem(const void *p, size_t len, const uint8_t expect_model_fp[16], mn_session_loaded **out,
                           mn_errbuf *eb);

/** A sink for the blocks of a session being read: block b's KV of every layer
 *  ([layer][K|V][block_elems] f16, as in mn_session_image), already checked (checksum,
 *  decompression, the last block's zero tail), valid only during the call; im is the
 *  checked header (its pointers NULL). Blocks come in order 0, 1, ...; an error returned
 *  stops the read and is its result. */
typedef mn_err (*mn_session_block_fn)(void *ctx, const mn_session_image *im, int32_t b, const uint16_t *kv,
                                      mn_errbuf *eb);
/** mn_session_read_file / _mem handing each block to fn instead of keeping an image:
 *  (*out)->kv and img.kv are NULL. The whole KV never sits in one fresh buffer (a T3 or
 *  T2 restore on the CPU backend writes it straight into pool blocks). On an error the
 *  sink may have seen some blocks: the caller undoes what it did with them. */
mn_err mn_session_read_file_blocks(const char *path, const uint8_t expect_model_fp[16], mn_session_block_fn fn,
                                   void *ctx, mn_session_loaded **out, mn_errbuf *eb);
mn_err mn_session_read_mem_blocks(const void *p, size_t len, const uint8_t expect_model_fp[16], mn_session_block_fn fn,
                                  void *ctx, mn_session_loaded **out, mn_errbuf *eb);
/** MN_EMISMATCH (both fingerprints in hex) unless s was saved with adapter expect
 *  (all zeros = no adapter). */
mn_err mn_session_check_adapter(const mn_session_loaded *s, const uint8_t expect[16], mn_errbuf *eb);

#endif
