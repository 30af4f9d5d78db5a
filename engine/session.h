/* engine/session.h — sessions: conversations whose KV cache lives in the engine.
 *
 * An mn_engine owns one model's KV block pool, a prefix cache, and every session. A
 * session holds its tokens (with a role per token), references to the KV blocks of the
 * positions already computed, and, while generating, a sampler and stop rules.
 *
 * Work is done in steps: mn_engine_step() builds ONE batch from every session with
 * pending tokens (one decode token per generating session first, then prefill chunks
 * under max_batch_tokens), runs the forward pass, samples for generating sessions and
 * calls their token callbacks. The blocking calls (append, generate) run steps until
 * their own session is done; sessions started meanwhile progress in the same steps.
 * Appending k tokens to a session costs work for k tokens, never for the history.
 *
 * Prefix sharing: every full block that is computed is registered in the prefix cache
 * under a hash chain of (adapter, tokens of all blocks up to it). A session whose
 * pending tokens start with a known chain attaches those blocks (reference counted)
 * instead of computing them. Blocks shared by several sessions are copy-on-write.
 *
 * Ownership: the engine owns sessions (freed by mn_session_delete or mn_engine_free);
 * it borrows the model, which must outlive it. Session ids are 128-bit random values.
 * Not thread-safe: one thread drives an engine.
 */
#ifndef MN_SESSION_H
#define MN_SESSION_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/err.h"
#include "engine/lora.h"
#include "engine/model.h"
#include "engine/sampler.h"

typedef enum mn_role {
    MN_ROLE_NONE = 0,       /* raw text or tokens, no chat framing */
    MN_ROLE_SYSTEM = 1,
    MN_ROLE_USER = 2,
    MN_ROLE_ASSISTANT = 3,  /* also the role of generated tokens */
    MN_ROLE_THOUGHT = 4,    /* kept in the KV, hidden from transcripts */
} mn_role;

const char *mn_role_name(mn_role r);
/** Parse "system", "user", "assistant", "thought" or "none"; MN_EINVALID otherwise. */
mn_err mn_role_parse(const char *s, mn_role *out, mn_errbuf *eb);

/* Host memory of T1 images. Pinned (page-locked) memory lets a GPU copy at full PCIe
 * speed and asynchronously; an image that does not fit the backend's pinned budget falls
 * back to pageable memory. */
typedef enum mn_t1_memory {
    MN_T1_AUTO = 0,       /* pinned unless the backend is the CPU one */
    MN_T1_PINNED = 1,
    MN_T1_PAGEABLE = 2,
} mn_t1_memory;

/* Where a generating session's next token is chosen. On the backend, the sample op
 * (kernels/ops.h) runs in the step's forward right after the output head, and only the
 * token id (and any requested logprobs) comes back to the host, not n_vocab logits; the
 * draw u still comes from the session's sampler on the host, so a seed gives the same
 * tokens either way. A session whose sampling needs the host (logit bias, or a penalty
 * over a non-empty window: mn_sampler_op_params) is sampled on the host in any mode.
 * While such a backend-sampled token waits to be emitted (until the next step),
 * mn_session_logits of that session is NULL: its logits never reached the host. */
typedef enum mn_sample_on {
    MN_SAMPLE_ON_AUTO = 0,      /* the backend, on every backend: on the CPU backend too it is
                                 * no slower (no two n_vocab copies per session, rows split
                                 * over the threads; bench/README.md, bench_sample_step) */
    MN_SAMPLE_ON_HOST = 1,      /* every row's logits to the host, sampled there */
    MN_SAMPLE_ON_BACKEND = 2,
} mn_sample_on;

typedef struct mn_engine_params {
    int32_t block_size;        /* tokens per KV block (default 16) */
    int32_t n_blocks;          /* KV pool size in blocks (default: enough for 4 full contexts) */
    int32_t max_batch_tokens;  /* per step (default 512) */
    int64_t t1_budget;         /* bytes of host KV images (T1); 0 = unlimited */
    int64_t t2_budget;         /* bytes of compressed host KV (T2); 0 = unlimited */
    const char *persist_dir;   /* T3 directory (copied); NULL = no disk tier */
    mn_lora_registry *adapters; /* LoRA adapters sessions may use (borrowed); NULL = none */
    mn_t1_memory t1_memory;    /* where T1 images live (default: pinned on a GPU backend) */
    mn_sample_on sample_on;    /* where generating sessions sample (default: auto) */
    int32_t kv_reserve;        /* free-block watermark the steps refill by background demotion
                                * (see mn_engine_step); 0 = default (1/8 of the pool, at least
                                * one max-size step), < 0 = off; at most half the pool */
} mn_engine_params;

/** kv_reserve value that turns the reserve off. */
#define MN_KV_RESERVE_OFF (-1)

typedef struct mn_engine mn_engine;
typedef struct mn_session mn_session;

mn_err mn_engine_new(mn_model *m, const mn_engine_params *p, mn_engine **out, mn_errbuf *eb);

typedef struct mn_tp mn_tp;
/** An engine whose steps run on every rank of a tensor-parallel group (engine/tp.h,
 *  mn_tp_run_seqs): sessions, prefix cache, copy-on-write and the batches are those of
 *  mn_engine_new, over rank 0's KV pool, whose geometry (block_size, n_blocks: 0 in p, or
 *  equal) the group set. Borrows tp (which must outlive the engine, and must not run
 *  slots). The model is mn_tp_model(tp). Greedy tokens match a one-backend engine's up to
 *  the f32 reordering of TP's sums (mn_forward_new_tp).
 *  Tiers and session files work as at P = 1: a session's KV is copied between every
 *  rank's pool and one host image holding all heads, so a file saved at one TP size loads
 *  at any other (and at P = 1). Those copies are waited for under TP (no pinned images,
 *  no layer-wise restore, a background demotion's copy is made at once). Sampling on the
 *  backend runs the sample op on every rank (mn_tp_run_seqs). Adapters: the registry's
 *  host copies, as mn_tp_run_lora (CPU ranks; CUDA ranks refuse them per batch row).
 *  mn_engine_stats' bytes_per_token and a session's kv_bytes count every rank's heads. */
mn_err mn_engine_new_tp(mn_tp *tp, const mn_engine_params *p, mn_engine **out, mn_errbuf *eb);
void mn_engine_free(mn_engine *e);
const mn_model *mn_engine_model(const mn_engine *e);

typedef struct mn_engine_stats {
    int32_t n_sessions;
    int32_t blocks_total, blocks_free;
    int32_t block_size;            /* tokens per block: the pool holds blocks_total * block_size */
    int32_t prefix_entries;        /* blocks registered in the prefix cache */
    int64_t prefix_hit_tokens;     /* tokens attached from the cache instead of computed */
    int64_t computed_tokens;       /* tokens run through the model */
    int64_t bytes_per_token;
    int64_t tier_bytes[4];         /* bytes held in T1, T2 (T0: see blocks; T3: on disk) */
    int32_t tier_sessions[4];      /* sessions whose KV is in each tier */
    int64_t swapped_out[4], swapped_in[4];  /* bytes moved to / from each tier */
    int64_t adapter_budget;        /* device bytes for adapter copies (0: none or unlimited) */
    int64_t adapter_resident_bytes;
    int64_t adapter_page_ins;
    int64_t sampled_backend;       /* tokens generated by the sample op on the backend */
    int64_t sampled_host;          /* tokens generated by the host sampler (mn_sampler_sample) */
    int64_t logits_bytes;          /* bytes of logits copied to the host by the steps */
    int32_t blocks_reserve;        /* the watermark the steps keep reclaimable (0: off) */
    int32_t blocks_draining;       /* held until their background copy out of the pool is done */
    int64_t demotions_waited;      /* demotions out of the pool whose copy the engine thread waited
                                    * for (pool short with nothing reclaimable, mn_session_demote) */
    int64_t demotions_background;  /* T0 -> T1 demotions only enqueued (idle timer, reserve refill) */
    int64_t reserve_demotions;     /* of those, made to refill the reserve */
    int64_t drain_waits;           /* times blocks were needed and a copy out still in flight was
                                    * waited for (it started at an earlier step) */
} mn_engine_stats;
void mn_engine_stats_get(const mn_engine *e, mn_engine_stats *st);

/** Create an empty session; with system_prompt (may be NULL) a system message is appended
 *  and computed (or attached from the prefix cache). */
mn_err mn_session_create(mn_engine *e, const char *system_prompt, mn_session **out, mn_errbuf *eb);
/** Delete a session and drop its block references. */
void mn_session_delete(mn_engine *e, mn_session *s);
/** Bind an empty session to the adapter loaded under name in the engine's registry (NULL:
 *  no adapter). Its KV is made with that adapter and shared only with sessions of the same
 *  adapter content; saved files carry the adapter's fingerprint. MN_EBUSY if s has tokens,
 *  MN_ENOT_FOUND if no such adapter is loaded. */
mn_err mn_session_set_adapter(mn_engine *e, mn_session *s, const char *name, mn_errbuf *eb);
/** Name of s's adapter, NULL for none. */
const char *mn_session_adapter(const mn_session *s);
/** Sessions bound to the adapter loaded under name (an unload while > 0 strands them:
 *  their next step fails with MN_EMISMATCH). */
int32_t mn_engine_adapter_users(const mn_engine *e, const char *name);
/** Find a session by its 32-hex-digit id; NULL if unknown. */
mn_session *mn_session_find(mn_engine *e, const char *id_hex);
const char *mn_session_id(const mn_session *s);   /* 32 hex digits */

/** Append tokens (ids checked against the vocabulary; the message names the index) and
 *  compute them. */
mn_err mn_session_append_tokens(mn_engine *e, mn_session *s, const int32_t *tokens, int32_t n, mn_role role,
                                mn_errbuf *eb);
/** Append text; with a chat role it is framed as one message by the model's chat template
 *  (ChatML and Llama 3 families), MN_ROLE_NONE and MN_ROLE_THOUGHT append it raw. */
mn_err mn_session_append_text(mn_engine *e, mn_session *s, mn_role role, const char *text, size_t len,
                              mn_errbuf *eb);

typedef enum mn_finish { MN_FINISH_NONE, MN_FINISH_LENGTH, MN_FINISH_EOG, MN_FINISH_STOP, MN_FINISH_CANCELLED } mn_finish;

/** Called for every generated token with the text it releases (maybe empty: held back for
 *  UTF-8 or a possible stop string). Return false to stop generating (MN_FINISH_CANCELLED). */
typedef bool (*mn_token_cb)(void *ud, int32_t token, const char *text, size_t len, const mn_sample_info *info);

typedef struct mn_gen_params {
    mn_sampling_params sampling;
    int32_t max_tokens;            /* > 0 */
    const char *const *stops; int32_t n_stops;
    bool render_special;           /* emit text of special tokens */
    bool assistant_prefix;         /* chat: open an assistant turn first (template header) */
} mn_gen_params;

typedef struct mn_gen_result {
    int32_t n_generated;
    mn_finish finish;
} mn_gen_result;

/** Generate up to max_tokens; the tokens become part of the session (role assistant). An
 *  EOG token ends generation and is kept in the session (the turn is closed). */
mn_err mn_session_generate(mn_engine *e, mn_session *s, const mn_gen_params *p, mn_token_cb cb, void *ud,
                           mn_gen_result *res, mn_errbuf *eb);

/** Fork: a new session with the same history, sharing every KV block copy-on-write. */
mn_err mn_session_fork(mn_engine *e, mn_session *s, mn_session **out, mn_errbuf *eb);
/** Drop every token at position >= n (barge-in). MN_ERANGE if n > the session's length. */
mn_err mn_session_rewind(mn_engine *e, mn_session *s, int32_t n, mn_errbuf *eb);

typedef struct mn_session_info {
    int32_t n_tokens;           /* tokens in the session */
    int32_t n_computed;         /* tokens whose KV is in the cache */
    int32_t n_blocks, n_shared_blocks;
    int64_t kv_bytes;           /* bytes of the blocks it references */
    const char *tier;           /* "T0" (device) for now */
    double last_use;            /* monotonic seconds */
} mn_session_info;
void mn_session_info_get(const mn_engine *e, const mn_session *s, mn_session_info *info);
/** Tokens and roles of the session (valid until the next call that changes it). */
const int32_t *mn_session_tokens(const mn_session *s, const uint8_t **roles, int32_t *n);
/** Logits after the last computed token ([n_vocab]), or NULL if none were computed since
 *  the last append/rewind, or if they stayed on the backend: a generating session's step
 *  that sampled its next token there (mn_sample_on) brings back only the token. After a
 *  generation ends the last token's logits are on the host again (it is computed with the
 *  generation finished, so nothing samples from them). */
const float *mn_session_logits(const mn_session *s);

/* ---- persistence (docs/session-format.md) ----
 * A saved session holds the model fingerprint, tokens and roles, and the KV of every
 * computed position; pending tokens are computed before saving. Loading checks
 * everything and refuses a file saved by another model (MN_EMISMATCH) or a damaged
 * one (MN_EFORMAT naming the offset), leaving every other session untouched. A loaded
 * session continues bit-identically to the one that was saved. */
/** Write s to path atomically (temp file, fsync, rename). */
mn_err mn_session_save(mn_engine *e, mn_session *s, const char *path, mn_errbuf *eb);
/** Export s as a byte stream in the same format; *out (mn_malloc) is the caller's. */
mn_err mn_session_export(mn_engine *e, mn_session *s, uint8_t **out, size_t *len, mn_errbuf *eb);
/** Load a saved session as a new session (new id). */
mn_err mn_session_load(mn_engine *e, const char *path, mn_session **out, mn_errbuf *eb);
mn_err mn_session_import(mn_engine *e, const void *data, size_t len, mn_session **out, mn_errbuf *eb);

/* ---- tiers (engine/tier.c) ---- */
/** Move s's KV down to tier 1 (host image), 2 (compressed host) or 3 (file in the persist
 *  directory). Pending tokens are computed first. Access promotes it back to T0. */
mn_err mn_session_demote(mn_engine *e, mn_session *s, int tier, mn_errbuf *eb);
/** Demote sessions idle for longer than idle_seconds (T1), twice that (T2), four times
 *  (T3 when there is a persist directory); now is mn-style monotonic seconds. T0 -> T1 is
 *  a copy done here; T1 -> T2/T3 (compression, file write) runs on a worker thread and is
 *  installed by a later engine step, the next call of this, or mn_engine_tier_wait. */
mn_err mn_engine_demote_idle(mn_engine *e, double idle_seconds, double now, mn_errbuf *eb);

/* ---- non-blocking use (a server's engine thread) ----
 * The blocking calls above are these plus engine steps until their session is done. A
 * server submits work and runs mn_engine_step while mn_engine_has_work(); every session
 * with work progresses in the same steps (continuous batching: one decode token per
 * generating session first, then prefill chunks under max_batch_tokens). Everything runs
 * on the one thread that drives the engine, callbacks included. Done and computed
 * callbacks run at the end of a step and may submit to, cancel or delete their own session
 * (no other); a token callback calls nothing in the engine (it returns false to stop). */
/** Queue tokens (validated as in mn_session_append_tokens) without computing them. */
mn_err mn_session_submit_tokens(mn_engine *e, mn_session *s, const int32_t *tokens, int32_t n, mn_role role,
                                mn_errbuf *eb);
/** Queue text framed as in mn_session_append_text. */
mn_err mn_session_submit_text(mn_engine *e, mn_session *s, mn_role role, const char *text, size_t len,
                              mn_errbuf *eb);
/** Called exactly once when a started generation ends: from mn_engine_step (finish set;
 *  err != MN_OK with msg when the step failed for this session: its pending tokens were
 *  dropped), from mn_session_generate_cancel or from mn_session_delete (CANCELLED). */
typedef void (*mn_gen_done_cb)(void *ud, const mn_gen_result *res, mn_err err, const char *msg);
/** Start generating and return at once (validated as in mn_session_generate; p->stops are
 *  copied). cb gets each token from inside mn_engine_step, then done once. */
mn_err mn_session_generate_start(mn_engine *e, mn_session *s, const mn_gen_params *p, mn_token_cb cb,
                                 mn_gen_done_cb done, void *ud, mn_errbuf *eb);
/** End s's generation now: done(CANCELLED) is called before this returns; the tokens
 *  generated so far stay in the session. No-op when s is not generating. */
void mn_session_generate_cancel(mn_engine *e, mn_session *s);
/** Called when s's pending tokens are all computed (err MN_OK), or when a step failed for
 *  s (err and msg set; its pending tokens were dropped, and a generation ends too). */
typedef void (*mn_computed_cb)(void *ud, mn_session *s, mn_err err, const char *msg);
/** Register cb for s (one at a time; NULL clears); it fires once, at the end of the step
 *  that completed or failed s's pending tokens (at once if none are pending), then clears.
 *  mn_session_delete fires it with MN_ECANCELLED. */
void mn_session_on_computed(mn_engine *e, mn_session *s, mn_computed_cb cb, void *ud);
/** s is generating or has tokens not yet computed. */
bool mn_session_busy(const mn_session *s);
/** Some session is busy: mn_engine_step has work to do. */
bool mn_engine_has_work(const mn_engine *e);

/** Wait until every background demotion (mn_engine_demote_idle moves T1 images to T2/T3
 *  on a worker thread, so the engine step never waits for lz4 or a disk) has finished,
 *  and install the results. */
void mn_engine_tier_wait(mn_engine *e);
/** Sessions persisted by an earlier engine on the same persist directory (T3 files: a
 *  session demoted to tier 3 keeps its file when its engine is freed) join this engine
 *  under their own ids, in T3: validated now (model fingerprint, checksums, geometry),
 *  restored on first use. A file that fails validation is refused and left in place:
 *  *n_refused counts them and eb holds the last reason. MN_OK unless out of memory or the
 *  directory cannot be read. */
mn_err mn_engine_adopt_persisted(mn_engine *e, int32_t *n_adopted, int32_t *n_refused, mn_errbuf *eb);

/** List the session saved in path (mn_session_save) without loading its KV: validated now
 *  like mn_session_load (checksums, model, adapter, geometry), then in tier T3 reading
 *  from path, restored on first use (in the background for submitted work, like any T3
 *  session). It gets a fresh id. keep_file: path stays the caller's, never deleted or
 *  written here (a server's saved copy); false: the engine deletes it once the session
 *  is promoted or deleted, as with its own T3 files. Errors as mn_session_load. */
mn_err mn_session_adopt_file(mn_engine *e, const char *path, bool keep_file, mn_session **out, mn_errbuf *eb);
/** The caller's file s still stands for (adopted with keep_file and not promoted since:
 *  its state is exactly that file's), else NULL. */
const char *mn_session_source_file(const mn_session *s);

/** Run one engine step. *did_work is false when no session had anything to do.
 *  At its end the step keeps the KV reserve: when the pool has run short within the last
 *  MN_KV_RESERVE_WINDOW steps and fewer than kv_reserve blocks are reclaimable without a
 *  new copy (free, held only by the prefix cache, or draining after a copy already
 *  enqueued), it demotes idle T0 sessions to T1 in the background, least recently used
 *  first, until they are. Idle: not generating, nothing pending, no background job, and in
 *  neither this step's nor the previous step's batch. So the next step or restore that
 *  needs blocks finds them without waiting for a copy out; a pool that never runs short
 *  never demotes for the reserve (no thrash while the working set fits). */
#define MN_KV_RESERVE_WINDOW 256
mn_err mn_engine_step(mn_engine *e, bool *did_work, mn_errbuf *eb);

#endif
