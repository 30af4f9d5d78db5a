/* engine/kvcodec.h — compression of f16 KV bytes (byte shuffle + LZ4) and the 64-bit hash
 * used for every checksum of mneme's session data.
 *
 * Why shuffle: an f16 value is a low byte (8 mantissa bits, nearly random) and a high byte
 * (sign, exponent, 2 mantissa bits). Neighbouring KV values have similar magnitudes, so the
 * high bytes repeat a lot, but interleaved with the random low bytes LZ4 finds no matches.
 * The codec stores all low bytes first, then all high bytes, and LZ4-compresses that.
 *
 * Compressed layout: one raw LZ4 block (no frame, no header) of the shuffled bytes. The raw
 * size is not stored: the caller knows it (it is fixed by the KV geometry) and must pass
 * it exactly to decompress. Odd raw sizes are refused (the data is f16).
 *
 * Memory: the plain calls allocate one scratch of raw_bytes per call (mn_malloc) and free it
 * before returning; the _ex calls take a caller-owned scratch of raw_bytes and allocate
 * nothing (for worker threads that compress many blocks).
 * All functions are thread-safe (no shared state).
 */
#ifndef MN_KVCODEC_H
#define MN_KVCODEC_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

/* Largest raw input (bytes) the codec accepts: LZ4's limit for one block, rounded down to
 * an even number. */
#define MN_KVCODEC_MAX_RAW ((size_t)0x7E000000)

/** Bytes dst must hold so that compressing raw_bytes always succeeds (LZ4_compressBound);
 *  0 if raw_bytes is larger than MN_KVCODEC_MAX_RAW. */
size_t mn_kvcodec_bound(size_t raw_bytes);

/** Shuffle raw (raw_bytes/2 f16 values) into dst: every low byte in order, then every high
 *  byte. raw_bytes must be even; src and dst must not overlap. */
void mn_kvcodec_shuffle(const void *src, void *dst, size_t raw_bytes);
/** Inverse of mn_kvcodec_shuffle. */
void mn_kvcodec_unshuffle(const void *src, void *dst, size_t raw_bytes);

/** Compress raw (raw_bytes, even) into dst (cap bytes); *out_bytes receives the compressed
 *  size. MN_EINVALID for an odd or oversized raw_bytes, MN_ELIMIT if cap is too small (cap >=
 *  mn_kvcodec_bound(raw_bytes) never is), MN_ENOMEM if the per-call scratch can't be had. */
mn_err mn_kvcodec_compress(const void *raw, size_t raw_bytes, void *dst, size_t cap, size_t *out_bytes,
                           mn_errbuf *eb);
/** Like mn_kvcodec_compress with a caller scratch of raw_bytes (NULL: allocate one for this
 *  call) and LZ4 acceleration accel (<= 1: LZ4's default; higher is faster, compresses less). */
mn_err mn_kvcodec_compress_ex(const void *raw, size_t raw_bytes, void *dst, size_t cap, void *scratch, int accel,
                              size_t *out_bytes, mn_errbuf *eb);

/** Decompress src (src_bytes) into raw, which must be exactly raw_bytes long: a stream that
 *  is malformed or decodes to any other size is MN_EFORMAT (never a read or write outside
 *  the given buffers). raw's contents are unspecified after an error. */
mn_err mn_kvcodec_decompress(const void *src, size_t src_bytes, void *raw, size_t raw_bytes, mn_errbuf *eb);
/** Like mn_kvcodec_decompress with a caller scratch of raw_bytes (NULL: allocate one). */
mn_err mn_kvcodec_decompress_ex(const void *src, size_t src_bytes, void *raw, size_t raw_bytes, void *scratch,
                                mn_errbuf *eb);

/** 64-bit hash of n bytes (XXH3_64bits_withSeed from libxxhash): the checksum of session
 *  files and block hashes. Stable across runs and machines. */
uint64_t mn_hash64(const void *p, size_t n, uint64_t seed);

#endif
