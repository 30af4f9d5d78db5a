/* engine/session_impl.h — internal to engine/session*.c: the engine and session structs. */
#ifndef MN_SESSION_IMPL_H
#define MN_SESSION_IMPL_H

#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/session.h"

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
    void *ud;
    int32_t n_generated;
    mn_finish finish;
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
};

struct mn_engine {
    mn_model *m;
    mn_kv_pool *kv;
    mn_forward *f;
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
};


/* shared between session.c and session_io.c */
mn_err mn__session_new(mn_engine *e, mn_session **out, mn_errbuf *eb);
mn_err mn__session_add_tokens(mn_session *s, const int32_t *toks, int32_t n, mn_role role, mn_errbuf *eb);
mn_err mn__session_run_until_done(mn_engine *e, mn_session *s, mn_errbuf *eb);

#endif
