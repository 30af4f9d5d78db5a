/* engine/session_impl.h — internal to engine/session*.c: the engine and session structs. */
#ifndef MN_SESSION_IMPL_H
#define MN_SESSION_IMPL_H

#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/session.h"
#include "engine/session_file.h"

#define PREFIX_EMPTY (-1)

typedef struct prefix_entry {
    uint64_t hash;       /* chain hash of this block (covers every block before it) */
    int32_t block;       /* PREFIX_EMPTY for a free slot */
    int32_t *tokens;     /* the block's tokens, to verify a hit exactly */
} prefix_entry;

typedef struct gen_state {
    mn_gen_params p;
    mn_sampler *sampler;
    mn_stop *stop;
    mn_detok detok;
    mn_token_cb cb;
    mn_gen_done_cb done;   /* non-NULL: started with mn_session_generate_start */
    void *ud;
    int32_t n_generated;
    mn_finish finish;
    /* a token the sample op chose on the backend in the last step (its u already drawn
     * from sampler), waiting for the next step's gen_advance to emit it, as a token
     * sampled from host logits would be: same callback order and timing either way */
    bool has_token;
    int32_t token;
    mn_sample_info info;   /* its logprobs, when p.sampling.n_logprobs > 0 */
} gen_state;

struct mn_session {
    char id[33];
    int32_t *tokens;
    uint8_t *roles;
    int32_t n_tokens, cap;
    int32_t n_computed;
    mn_kv_seq seq;
    uint64_t *block_hash;  /* chain hash of each full computed block */
    int32_t n_hashed, cap_hashed;
    float *logits;         /* [n_vocab] after the last computed token */
    bool logits_valid;
    double last_use;
    gen_state *gen;        /* non-NULL while generating */
    const mn_lora *lora;   /* adapter (registry-owned; re-found by fingerprint each step) */
    char lora_name[128];
    uint8_t adapter_fp[16];  /* all zero: no adapter */
    uint64_t hash_seed;    /* prefix-cache chain start: 0, or derived from adapter_fp */
    mn_computed_cb computed_cb;  /* mn_session_on_computed */
    void *computed_ud;
    bool failed;           /* the last step failed for it: report at the end of the step */
    mn_err fail_err;
    char fail_msg[512];
    /* tiering: where the KV of [0, n_computed) lives when it is not in the pool (T0) */
    int tier;              /* 0 resident; 1 host image; 2 compressed host bytes; 3 file */
    uint16_t *host_kv;     /* T1: block-major image (session_file.h layout) */
    mn_buffer *host_buf;   /* T1: the pinned buffer holding host_kv (NULL: mn_aligned_alloc'd) */
    mn_event host_ready;   /* T1: host_kv is complete once this copy event is (ticket 0: it is) */
    int32_t host_blocks;
    uint8_t *packed;       /* T2: a session stream (lz4 chunks, checksums) */
    size_t packed_len;
    char *file;            /* T3: path of the session file */
    bool file_kept;        /* the file is the caller's (mn_session_adopt_file): never deleted here */
    int64_t host_bytes;    /* bytes it holds in T1 or T2 */
    struct mn__tier_job *job;  /* background work in flight: a demotion of its T1 image, or a lift */
    int64_t last_step;     /* the engine step that last computed for it or brought it to T0 */
};

struct mn_engine {
    mn_model *m;
    mn_kv_pool *kv;        /* TP: rank 0's pool of the group (borrowed), which keeps every rank's block ids */
    mn_forward *f;         /* TP: NULL, the group runs the steps */
    mn_tp *tp;             /* borrowed; NULL: one backend */
    int32_t bs, max_batch;
    mn_session **sessions;
    int32_t n_sessions, cap_sessions;
    prefix_entry *prefix;  /* open addressing, power-of-two capacity */
    int32_t prefix_cap, prefix_count;
    int64_t hit_tokens, computed_tokens;
    /* step scratch, sized for max_batch rows */
    int32_t *b_tok, *b_seq, *b_pos, *b_rows;
    mn_session **b_sess;
    mn_kv_seq **b_seqs;
    float *b_logits, *sample_scratch;
    /* sampling on the backend (mn_batch_sample), [max_batch] rows: the op's parameters and
     * outputs, and the logits rows' batch rows while the out rows are ordered */
    bool sample_backend;
    mn_sample_params *b_sparams;
    int32_t *b_stok, *b_stop, *b_lrows;      /* b_stop: [max_batch][MN_SAMPLE_MAX_TOP] */
    float *b_slp, *b_stoplp;                 /* b_stoplp: [max_batch][MN_SAMPLE_MAX_TOP] */
    int64_t sampled_backend, sampled_host, logits_bytes;
    mn_session **b_notify;  /* end-of-step callback list */
    int32_t *b_adapter;     /* [max_batch] adapter table index per token, -1 none */
    mn_lora_registry *adapters;
    int32_t cap_notify;
    /* tiers */
    bool t1_pinned;                         /* T1 images in pinned host memory when there is room */
    int64_t tier_budget[4], tier_used[4];   /* [1] T1, [2] T2 bytes (0 = unlimited) */
    char *persist_dir;                      /* T3; NULL: no disk tier */
    int64_t swapped_out[4], swapped_in[4];  /* bytes moved to / from each tier */
    struct mn__tier_worker *worker;         /* background T1 -> T2/T3 demotion (tier.c) */
    /* layer-wise restore (tier.c): the step's restores' per-layer copy events, and the T1
     * images they read, freed once the copies are done */
    mn_event *restore_ready;                /* [n_layer] */
    struct { uint16_t *kv; mn_buffer *buf; } *retired;
    int32_t n_retired, cap_retired;
    /* background demotion T0 -> T1 (tier.c): blocks whose copy out is in flight, given
     * back to the pool once it is done */
    struct { int32_t *blocks; int32_t n; mn_event done; } *draining;
    int32_t n_draining, cap_draining;
    /* the KV reserve (tier.c: mn__tier_refill): a watermark of reclaimable blocks kept by
     * background demotion while the pool has run short lately */
    int32_t reserve;                        /* blocks; 0: off */
    int32_t *held;                          /* [n_blocks] scratch: resident sessions' references */
    int64_t n_steps;                        /* engine steps begun */
    int64_t short_step;                     /* the last step at which make_room found too few free blocks */
    int64_t demoted_waited, demoted_background, reserve_demoted, drain_waits;
};


/* shared between session.c and session_io.c */
/* KV heads of the model: e->kv's, or under TP the sum over the ranks' pools. A session
 * image (T1/T2/T3, files) always holds every head, so it does not depend on the TP size. */
int32_t mn__engine_kv_heads(const mn_engine *e);
/* Elements (f16) of one block of a session image: every layer, K and V, every head. */
int64_t mn__image_block_elems(const mn_engine *e);
/* KV bytes per token of the whole model (every rank's pool under TP). */
int64_t mn__engine_bytes_per_token(const mn_engine *e);
mn_err mn__session_new(mn_engine *e, mn_session **out, mn_errbuf *eb);
mn_err mn__session_add_tokens(mn_session *s, const int32_t *toks, int32_t n, mn_role role, mn_errbuf *eb);
mn_err mn__session_run_until_done(mn_engine *e, mn_session *s, mn_errbuf *eb);
/* session_io.c: move a session's KV between the pool and a block-major host image */
/* s's KV as a block-major image. With pinned non-NULL and the engine's T1 images pinned,
 * the image goes into a pinned buffer if the backend's pinned budget has room (*pinned set;
 * else NULL and the image is mn_aligned_alloc'd). done NULL: returns when the image is
 * complete; else the copies are only enqueued and *done is their event. */
mn_err mn__session_gather_kv(mn_engine *e, const mn_session *s, uint16_t **kv_out, int32_t *n_blocks, mn_buffer **pinned,
                             mn_event *done, mn_errbuf *eb);
/* kv into freshly reserved blocks of s. layer_done NULL: returns when the copies are done;
 * else [n_layer] events, layer l's recorded after its copies, and kv must stay alive until
 * the last is done. */
mn_err mn__session_scatter_kv(mn_engine *e, mn_session *s, const uint16_t *kv, int32_t n_tokens, mn_event *layer_done,
                              mn_errbuf *eb);
/* One block of a block-major image ([layer][K|V][block_elems]) into pool block id, with
 * plain stores: only for a pool in host memory (the CPU backend). */
void mn__session_put_block(const mn_kv_pool *p, int32_t id, const uint16_t *kv);
/* MN_EMISMATCH naming both unless the image's KV geometry is e's pool's */
mn_err mn__session_check_geometry(const mn_engine *e, const mn_session_image *img, mn_errbuf *eb);
/* checks an image against e; *lora gets the loaded adapter it was made with (NULL: none) */
mn_err mn__session_check_image(const mn_engine *e, const mn_session_loaded *ld, const mn_lora **lora, mn_errbuf *eb);
/* binds s (empty or being restored) to lora (may be NULL) */
void mn__session_bind_adapter(mn_session *s, const mn_lora *lora);
/* the adapter of the registry with this fingerprint, NULL if none is loaded */
const mn_lora *mn__engine_find_adapter(const mn_engine *e, const uint8_t fp[16]);
void mn__session_fill_image(const mn_engine *e, const mn_session *s, const uint16_t *kv, int32_t n_blocks,
                            mn_session_image *img);
/* tier.c */
mn_err mn__tier_ensure_resident(mn_engine *e, mn_session *s, mn_errbuf *eb);
mn_err mn__tier_make_room(mn_engine *e, int32_t blocks, const mn_session *keep, mn_errbuf *eb);
void mn__tier_drop(mn_engine *e, mn_session *s);
const char *mn__tier_name(int t);
/* install finished background demotions (engine thread; cheap when none finished) */
void mn__tier_collect(mn_engine *e);
/* stop the background worker, dropping queued work (mn_engine_free) */
void mn__tier_worker_free(mn_engine *e);
/* start bringing a T2/T3 session up to T1 on the worker (no-op if not below T1 or already
 * on its way); the step promotes it to T0 once the lift is installed */
mn_err mn__tier_lift_start(mn_engine *e, mn_session *s, mn_errbuf *eb);
bool mn__tier_lifting(const mn_session *s);
/* T1 -> T0 for the step: copies enqueued layer by layer, the next forward's layer l waits
 * for layer l's (falls back to mn__tier_ensure_resident off T1 or with a job in flight) */
mn_err mn__tier_restore_pipelined(mn_engine *e, mn_session *s, mn_errbuf *eb);
/* end of the step: wait for the restores' copies (done already if the forward ran) and
 * free the images they read */
void mn__tier_restore_finish(mn_engine *e);
/* end of a step: refill the KV reserve by background demotions (see mn_engine_step) */
void mn__tier_refill(mn_engine *e);
/* give finished background demotions' blocks back to the pool; wait: also the others */
void mn__tier_drain(mn_engine *e, bool wait);
/* wait up to `seconds` for any background job to finish, then install what finished;
 * true if a job had finished (something was installed or given back) */
bool mn__tier_wait_any(mn_engine *e, double seconds);
/* session.c */
void mn__prefix_evict_unused(mn_engine *e);
/* a step (or a lift) failed for s: drop its pending tokens; reported at the end of the step */
void mn__session_fail(mn_engine *e, mn_session *s, mn_err err, const char *msg);

#endif
