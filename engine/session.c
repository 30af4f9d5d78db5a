/* engine/session.c — sessions over the paged KV pool: append, generate, fork, rewind,
 * prefix sharing, and the engine step that batches every session's pending work.
 *
 * A session's tokens split into [0, n_computed) whose KV is in its blocks and
 * [n_computed, n_tokens) pending. A step computes pending tokens (decode tokens of
 * generating sessions first, then prefill chunks under max_batch_tokens); a generating
 * session whose pending tokens are all computed samples its next token, which becomes
 * pending for the next step. */
#include "engine/session.h"

#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/session_impl.h"
#include "engine/tp.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

const char *mn_role_name(mn_role r) {
    static const char *const names[] = {"none", "system", "user", "assistant", "thought"};
    return (unsigned)r <= MN_ROLE_THOUGHT ? names[r] : "?";
}

mn_err mn_role_parse(const char *s, mn_role *out, mn_errbuf *eb) {
    for (int r = 0; r <= MN_ROLE_THOUGHT; r++)
        if (strcmp(s, mn_role_name((mn_role)r)) == 0) { *out = (mn_role)r; return MN_OK; }
    return mn_errf(eb, MN_EINVALID, "role must be one of system, user, assistant, thought, none; got '%.40s'", s);
}

/* ---- prefix cache ----------------------------------------------------------------------- */

static uint64_t mix64(uint64_t x) {
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27; x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Chain hash: the hash of block b covers its tokens and (through parent) all before it.
 * Collisions are harmless: a hit is verified against the stored tokens. */
static uint64_t block_hash(uint64_t parent, const int32_t *toks, int32_t n) {
    uint64_t h = mix64(parent ^ 0x6d6e656d65ull);
    for (int32_t i = 0; i < n; i++) h = mix64(h ^ (uint32_t)toks[i]);
    return h ? h : 1;
}

static int32_t prefix_find(const mn_engine *e, uint64_t h, const int32_t *toks) {
    if (!e->prefix_cap) return -1;
    for (int32_t i = (int32_t)(h & (uint64_t)(e->prefix_cap - 1));; i = (i + 1) & (e->prefix_cap - 1)) {
        const prefix_entry *pe = &e->prefix[i];
        if (pe->block == PREFIX_EMPTY) return -1;
        if (pe->hash == h && memcmp(pe->tokens, toks, (size_t)e->bs * sizeof(int32_t)) == 0) return i;
    }
}

static mn_err prefix_insert(mn_engine *e, uint64_t h, const int32_t *toks, int32_t block, mn_errbuf *eb) {
    if ((e->prefix_count + 1) * 2 > e->prefix_cap) { /* keep load <= 1/2 */
        int32_t ncap = e->prefix_cap ? e->prefix_cap * 2 : 256;
        prefix_entry *np = mn_malloc((size_t)ncap * sizeof *np);
        if (!np) return mn_errf(eb, MN_ENOMEM, "prefix cache: out of memory");
        for (int32_t i = 0; i < ncap; i++) np[i].block = PREFIX_EMPTY;
        for (int32_t i = 0; i < e->prefix_cap; i++) {
            prefix_entry *pe = &e->prefix[i];
            if (pe->block == PREFIX_EMPTY) continue;
            int32_t j = (int32_t)(pe->hash & (uint64_t)(ncap - 1));
            while (np[j].block != PREFIX_EMPTY) j = (j + 1) & (ncap - 1);
            np[j] = *pe;
        }
        mn_free(e->prefix);
        e->prefix = np;
        e->prefix_cap = ncap;
    }
    int32_t *copy = mn_malloc((size_t)e->bs * sizeof(int32_t));
    if (!copy) return mn_errf(eb, MN_ENOMEM, "prefix cache: out of memory");
    memcpy(copy, toks, (size_t)e->bs * sizeof(int32_t));
    int32_t j = (int32_t)(h & (uint64_t)(e->prefix_cap - 1));
    while (e->prefix[j].block != PREFIX_EMPTY) j = (j + 1) & (e->prefix_cap - 1);
    e->prefix[j] = (prefix_entry){h, block, copy};
    mn_kv_block_retain(e->kv, block);
    e->prefix_count++;
    return MN_OK;
}

/* Drop cache entries that no session uses (the cache holds the only reference), so their
 * blocks return to the pool. Rebuilds the table (deletion from linear probing). */
void mn__prefix_evict_unused(mn_engine *e) {
    if (!e->prefix_count) return;
    prefix_entry *old = e->prefix;
    int32_t cap = e->prefix_cap;
    e->prefix = NULL;
    e->prefix_cap = 0;
    e->prefix_count = 0;
    mn_errbuf eb;
    for (int32_t i = 0; i < cap; i++) {
        prefix_entry *pe = &old[i];
        if (pe->block == PREFIX_EMPTY) continue;
        if (e->kv->refs[pe->block] > 1 && prefix_insert(e, pe->hash, pe->tokens, pe->block, &eb) == MN_OK) {
            mn_kv_block_release(e->kv, pe->block); /* insert took its own reference */
        } else {
            mn_kv_block_release(e->kv, pe->block);
        }
        mn_free(pe->tokens);
    }
    mn_free(old);
}

/* Register every newly full computed block of s. */
static mn_err register_blocks(mn_engine *e, mn_session *s, mn_errbuf *eb) {
    while ((s->n_hashed + 1) * e->bs <= s->n_computed) {
        int32_t b = s->n_hashed;
        if (b >= s->cap_hashed) {
            int32_t nc = s->cap_hashed ? s->cap_hashed * 2 : 16;
            uint64_t *nh = mn_realloc(s->block_hash, (size_t)nc * sizeof(uint64_t));
            if (!nh) return mn_errf(eb, MN_ENOMEM, "session: out of memory");
            s->block_hash = nh;
            s->cap_hashed = nc;
        }
        const int32_t *toks = s->tokens + (int64_t)b * e->bs;
        uint64_t h = block_hash(b ? s->block_hash[b - 1] : s->hash_seed, toks, e->bs);
        s->block_hash[b] = h;
        s->n_hashed++;
        if (prefix_find(e, h, toks) < 0) {
            mn_err err = prefix_insert(e, h, toks, s->seq.blocks[b], eb);
            if (err != MN_OK) return err;
        }
    }
    return MN_OK;
}

/* Attach cached blocks for the pending tokens of s, leaving at least one token pending
 * (its logits are needed to continue). */
static mn_err attach_cached(mn_engine *e, mn_session *s, mn_errbuf *eb) {
    while (s->n_computed % e->bs == 0 && s->n_hashed * e->bs == s->n_computed &&
           s->seq.n_blocks == s->n_computed / e->bs && s->n_computed + e->bs < s->n_tokens) {
        int32_t b = s->n_computed / e->bs;
        const int32_t *toks = s->tokens + s->n_computed;
        uint64_t h = block_hash(b ? s->block_hash[b - 1] : s->hash_seed, toks, e->bs);
        int32_t slot = prefix_find(e, h, toks);
        if (slot < 0) break;
        if (b >= s->cap_hashed) {
            int32_t nc = s->cap_hashed ? s->cap_hashed * 2 : 16;
            while (nc <= b) nc *= 2;
            uint64_t *nh = mn_realloc(s->block_hash, (size_t)nc * sizeof(uint64_t));
            if (!nh) return mn_errf(eb, MN_ENOMEM, "session: out of memory");
            s->block_hash = nh;
            s->cap_hashed = nc;
        }
        mn_err err = mn_kv_seq_attach(e->kv, &s->seq, e->prefix[slot].block, eb);
        if (err != MN_OK) return err;
        s->block_hash[b] = h;
        s->n_hashed++;
        s->n_computed += e->bs;
        s->seq.n_tokens = s->n_computed;
        e->hit_tokens += e->bs;
    }
    return MN_OK;
}

/* ---- engine ------------------------------------------------------------------------------ */

/* The group made the pools: the engine's geometry is theirs. */
static mn_err tp_check_params(const mn_tp *tp, const mn_engine_params *p, mn_errbuf *eb) {
    const mn_kv_pool *kv = mn_tp_kv((mn_tp *)tp);
    if (!p) return MN_OK;
    if (p->block_size > 0 && p->block_size != kv->block_size)
        return mn_errf(eb, MN_EINVALID, "tensor parallel: block_size %d differs from the group's KV pool (%d tokens per block)",
                       p->block_size, kv->block_size);
    if (p->n_blocks > 0 && p->n_blocks != kv->n_blocks)
        return mn_errf(eb, MN_EINVALID, "tensor parallel: n_blocks %d differs from the group's KV pool (%d blocks)",
                       p->n_blocks, kv->n_blocks);
    return MN_OK;
}

static mn_err engine_new(mn_model *m, mn_tp *tp, const mn_engine_params *p, mn_engine **out, mn_errbuf *eb) {
    if (tp) {
        mn_err err = tp_check_params(tp, p, eb);
        if (err != MN_OK) return err;
    }
    mn_engine *e = mn_calloc(1, sizeof *e);
    if (!e) return mn_errf(eb, MN_ENOMEM, "engine: out of memory");
    const mn_model_config *c = &m->cfg;
    e->m = m;
    e->tp = tp;
    e->bs = tp ? mn_tp_kv(tp)->block_size : p && p->block_size > 0 ? p->block_size : 16;
    e->max_batch = p && p->max_batch_tokens > 0 ? p->max_batch_tokens : 512;
    int32_t ctx = c->n_ctx < 4096 ? c->n_ctx : 4096;
    int32_t n_blocks = tp ? mn_tp_kv(tp)->n_blocks : p && p->n_blocks > 0 ? p->n_blocks : 4 * ((ctx + e->bs - 1) / e->bs);
    int32_t mb = e->max_batch;
    if (p) {
        e->tier_budget[1] = p->t1_budget;
        e->tier_budget[2] = p->t2_budget;
        e->adapters = p->adapters;
        e->t1_pinned = p->t1_memory == MN_T1_PINNED ||
                       (p->t1_memory == MN_T1_AUTO && strcmp(mn_backend_name(m->backend), "cpu") != 0);
        if (p->persist_dir && access(p->persist_dir, W_OK | X_OK) != 0) {
            mn_free(e);
            return mn_errf(eb, MN_EINVALID, "persist directory '%s' is not a writable directory", p->persist_dir);
        }
        if (p->persist_dir && !(e->persist_dir = mn_strdup(p->persist_dir))) {
            mn_free(e);
            return mn_errf(eb, MN_ENOMEM, "engine: out of memory");
        }
    }
    e->sample_backend = !p || p->sample_on != MN_SAMPLE_ON_HOST;
    /* the reserve: 1/8 of the pool, but at least room for one full step (its new blocks
     * plus a copy-on-write); never more than half the pool */
    int32_t step_blocks = (mb + e->bs - 1) / e->bs + 1;
    int32_t reserve = n_blocks / 8 > step_blocks ? n_blocks / 8 : step_blocks;
    if (p && p->kv_reserve) reserve = p->kv_reserve < 0 ? 0 : p->kv_reserve;
    e->reserve = reserve < n_blocks / 2 ? reserve : n_blocks / 2;
    e->short_step = -(int64_t)MN_KV_RESERVE_WINDOW - 1; /* never short yet: the reserve waits for pressure */
    mn_err err = MN_OK;
    if (tp) {
        e->kv = mn_tp_kv(tp); /* the group's: not freed here */
    } else {
        err = mn_kv_pool_new(m->backend, c->n_layer, c->n_kv_head, c->head_dim, e->bs, n_blocks, &e->kv, eb);
        if (err == MN_OK) err = mn_forward_new(m, e->kv, &e->f, eb);
    }
    if (err == MN_OK) {
        e->b_tok = mn_malloc((size_t)mb * 4);
        e->b_seq = mn_malloc((size_t)mb * 4);
        e->b_pos = mn_malloc((size_t)mb * 4);
        e->b_rows = mn_malloc((size_t)mb * 4);
        e->b_sess = mn_malloc((size_t)mb * sizeof(mn_session *));
        e->b_seqs = mn_malloc((size_t)mb * sizeof(mn_kv_seq *));
        e->b_logits = mn_malloc((size_t)mb * c->n_vocab * sizeof(float));
        e->sample_scratch = mn_malloc((size_t)c->n_vocab * sizeof(float));
        e->b_adapter = mn_malloc((size_t)mb * 4);
        e->b_sparams = mn_malloc((size_t)mb * sizeof *e->b_sparams);
        e->b_stok = mn_malloc((size_t)mb * 4);
        e->b_lrows = mn_malloc((size_t)mb * 4);
        e->b_slp = mn_malloc((size_t)mb * 4);
        e->b_stop = mn_malloc((size_t)mb * MN_SAMPLE_MAX_TOP * 4);
        e->b_stoplp = mn_malloc((size_t)mb * MN_SAMPLE_MAX_TOP * 4);
        e->held = mn_malloc((size_t)n_blocks * sizeof(int32_t));
        if (!e->b_sparams || !e->b_stok || !e->b_lrows || !e->b_slp || !e->b_stop || !e->b_stoplp ||
            !e->held || !e->b_adapter || !e->b_tok || !e->b_seq || !e->b_pos || !e->b_rows || !e->b_sess || !e->b_seqs || !e->b_logits || !e->sample_scratch)
            err = mn_errf(eb, MN_ENOMEM, "engine: out of memory");
    }
    if (err != MN_OK) {
        mn_engine_free(e);
        return err;
    }
    *out = e;
    return MN_OK;
}

mn_err mn_engine_new(mn_model *m, const mn_engine_params *p, mn_engine **out, mn_errbuf *eb) {
    return engine_new(m, NULL, p, out, eb);
}

mn_err mn_engine_new_tp(mn_tp *tp, const mn_engine_params *p, mn_engine **out, mn_errbuf *eb) {
    /* rank 0's model: config, tokenizer, chat template; the engine only reads it */
    return engine_new((mn_model *)mn_tp_model(tp), tp, p, out, eb);
}

int32_t mn__engine_kv_heads(const mn_engine *e) { return e->kv->n_kv_head * (e->tp ? mn_tp_size(e->tp) : 1); }

int64_t mn__image_block_elems(const mn_engine *e) {
    return (int64_t)e->kv->n_layer * 2 * e->kv->block_size * mn__engine_kv_heads(e) * e->kv->head_dim;
}

int64_t mn__engine_bytes_per_token(const mn_engine *e) {
    return mn_kv_bytes_per_token(e->kv) * (e->tp ? mn_tp_size(e->tp) : 1);
}

static void session_free(mn_engine *e, mn_session *s);

void mn_engine_free(mn_engine *e) {
    if (!e) return;
    for (int32_t i = 0; i < e->n_sessions; i++) { /* T3 files outlive the engine (adopt_persisted) */
        mn_session *s = e->sessions[i];
        if (s->tier == 3 && s->file) {
            mn_free(s->file);
            s->file = NULL;
        }
    }
    while (e->n_sessions) mn_session_delete(e, e->sessions[e->n_sessions - 1]);
    mn__tier_worker_free(e); /* after the sessions: their jobs are orphaned by then */
    mn__tier_restore_finish(e);
    mn__tier_drain(e, true);
    mn_free(e->draining);
    mn_free(e->retired);
    mn_free(e->restore_ready);
    mn_free(e->sessions);
    for (int32_t i = 0; i < e->prefix_cap; i++)
        if (e->prefix[i].block != PREFIX_EMPTY) {
            mn_kv_block_release(e->kv, e->prefix[i].block);
            mn_free(e->prefix[i].tokens);
        }
    mn_free(e->prefix);
    mn_forward_free(e->f);
    if (!e->tp) mn_kv_pool_free(e->kv);
    mn_free(e->b_tok); mn_free(e->b_seq); mn_free(e->b_pos); mn_free(e->b_rows);
    mn_free(e->b_sess); mn_free(e->b_seqs); mn_free(e->b_logits); mn_free(e->sample_scratch);
    mn_free(e->b_notify);
    mn_free(e->b_adapter);
    mn_free(e->b_sparams); mn_free(e->b_stok); mn_free(e->b_lrows);
    mn_free(e->b_slp); mn_free(e->b_stop); mn_free(e->b_stoplp);
    mn_free(e->held);
    mn_free(e->persist_dir);
    mn_free(e);
}

const mn_model *mn_engine_model(const mn_engine *e) { return e->m; }

void mn_engine_stats_get(const mn_engine *e, mn_engine_stats *st) {
    st->n_sessions = e->n_sessions;
    st->blocks_total = e->kv->n_blocks;
    st->blocks_free = e->kv->n_free;
    st->block_size = e->bs;
    st->prefix_entries = e->prefix_count;
    st->prefix_hit_tokens = e->hit_tokens;
    st->computed_tokens = e->computed_tokens;
    st->bytes_per_token = mn__engine_bytes_per_token(e);
    st->sampled_backend = e->sampled_backend;
    st->sampled_host = e->sampled_host;
    st->logits_bytes = e->logits_bytes;
    for (int t = 0; t < 4; t++) {
        st->tier_bytes[t] = e->tier_used[t];
        st->tier_sessions[t] = 0;
        st->swapped_out[t] = e->swapped_out[t];
        st->swapped_in[t] = e->swapped_in[t];
    }
    for (int32_t i = 0; i < e->n_sessions; i++) st->tier_sessions[e->sessions[i]->tier]++;
    st->adapter_budget = st->adapter_resident_bytes = st->adapter_page_ins = 0;
    if (e->adapters) {
        mn_lora_stats ls;
        mn_lora_registry_stats(e->adapters, &ls);
        st->adapter_budget = (int64_t)ls.budget;
        st->adapter_resident_bytes = (int64_t)ls.resident_bytes;
        st->adapter_page_ins = (int64_t)ls.page_ins;
    }
    st->blocks_reserve = e->reserve;
    st->blocks_draining = 0;
    for (int32_t i = 0; i < e->n_draining; i++) st->blocks_draining += e->draining[i].n;
    st->demotions_waited = e->demoted_waited;
    st->demotions_background = e->demoted_background;
    st->reserve_demotions = e->reserve_demoted;
    st->drain_waits = e->drain_waits;
}

/* ---- sessions ------------------------------------------------------------------------------ */

mn_err mn__session_add_tokens(mn_session *s, const int32_t *toks, int32_t n, mn_role role, mn_errbuf *eb) {
    if (s->n_tokens + n > s->cap) {
        int32_t cap = s->cap ? s->cap : 64;
        while (cap < s->n_tokens + n) cap *= 2;
        int32_t *nt = mn_realloc(s->tokens, (size_t)cap * sizeof(int32_t));
        if (!nt) return mn_errf(eb, MN_ENOMEM, "session: out of memory");
        s->tokens = nt;
        uint8_t *nr = mn_realloc(s->roles, (size_t)cap);
        if (!nr) return mn_errf(eb, MN_ENOMEM, "session: out of memory");
        s->roles = nr;
        s->cap = cap;
    }
    memcpy(s->tokens + s->n_tokens, toks, (size_t)n * sizeof(int32_t));
    memset(s->roles + s->n_tokens, (int)role, (size_t)n);
    s->n_tokens += n;
    if (n) s->logits_valid = false;
    return MN_OK;
}

mn_err mn__session_new(mn_engine *e, mn_session **out, mn_errbuf *eb) {
    if (e->n_sessions == e->cap_sessions) {
        int32_t cap = e->cap_sessions ? e->cap_sessions * 2 : 16;
        mn_session **ns = mn_realloc(e->sessions, (size_t)cap * sizeof *ns);
        if (!ns) return mn_errf(eb, MN_ENOMEM, "engine: out of memory");
        e->sessions = ns;
        e->cap_sessions = cap;
    }
    mn_session *s = mn_calloc(1, sizeof *s);
    if (!s || !(s->logits = mn_malloc((size_t)e->m->cfg.n_vocab * sizeof(float)))) {
        mn_free(s);
        return mn_errf(eb, MN_ENOMEM, "session: out of memory");
    }
    uint8_t rnd[16];
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
        mn_free(s->logits);
        mn_free(s);
        return mn_errf(eb, MN_EIO, "session: getrandom failed");
    }
    for (int i = 0; i < 16; i++) snprintf(s->id + 2 * i, 3, "%02x", rnd[i]);
    s->last_use = now_s();
    s->last_step = e->n_steps;
    e->sessions[e->n_sessions++] = s;
    *out = s;
    return MN_OK;
}

static void gen_end(mn_session *s) {
    if (!s->gen) return;
    mn_sampler_free(s->gen->sampler);
    mn_stop_free(s->gen->stop);
    mn_free(s->gen);
    s->gen = NULL;
}

static void session_free(mn_engine *e, mn_session *s) {
    gen_end(s);
    mn__tier_drop(e, s);
    mn_kv_seq_release(e->kv, &s->seq);
    mn_free(s->tokens);
    mn_free(s->roles);
    mn_free(s->block_hash);
    mn_free(s->logits);
    mn_free(s);
}

/* Detach and fire s's end-of-work callbacks (computed first: it gets s, which the done
 * callback may delete). failed: err/msg describe why. */
static void fire_callbacks(mn_session *s, bool computed, bool gen_done, mn_err err, const char *msg) {
    mn_computed_cb ccb = NULL;
    void *cud = NULL;
    gen_state *g = NULL;
    if (computed && s->computed_cb) {
        ccb = s->computed_cb;
        cud = s->computed_ud;
        s->computed_cb = NULL;
        s->computed_ud = NULL;
    }
    if (gen_done && s->gen && s->gen->done) {
        g = s->gen;
        s->gen = NULL;
    }
    if (ccb) ccb(cud, s, err, msg);
    if (g) {
        mn_gen_result res = {g->n_generated, err == MN_OK || err == MN_ECANCELLED ? g->finish : MN_FINISH_NONE};
        if (err == MN_ECANCELLED && res.finish == MN_FINISH_NONE) res.finish = MN_FINISH_CANCELLED;
        g->done(g->ud, &res, err == MN_ECANCELLED ? MN_OK : err, msg);
        mn_sampler_free(g->sampler);
        mn_stop_free(g->stop);
        mn_free(g);
    }
}

void mn_session_delete(mn_engine *e, mn_session *s) {
    fire_callbacks(s, true, true, MN_ECANCELLED, "session deleted");
    for (int32_t i = 0; i < e->n_sessions; i++)
        if (e->sessions[i] == s) {
            e->sessions[i] = e->sessions[--e->n_sessions];
            break;
        }
    session_free(e, s);
}

mn_session *mn_session_find(mn_engine *e, const char *id_hex) {
    for (int32_t i = 0; i < e->n_sessions; i++)
        if (strcmp(e->sessions[i]->id, id_hex) == 0) return e->sessions[i];
    return NULL;
}

const char *mn_session_id(const mn_session *s) { return s->id; }

/* ---- adapters ---------------------------------------------------------------------------- */

void mn__session_bind_adapter(mn_session *s, const mn_lora *lora) {
    s->lora = lora;
    if (!lora) {
        memset(s->adapter_fp, 0, 16);
        s->lora_name[0] = 0;
        s->hash_seed = 0;
        return;
    }
    memcpy(s->adapter_fp, lora->fingerprint, 16);
    snprintf(s->lora_name, sizeof s->lora_name, "%s", lora->name);
    uint64_t a, b;
    memcpy(&a, lora->fingerprint, 8);
    memcpy(&b, lora->fingerprint + 8, 8);
    s->hash_seed = mix64(a ^ mix64(b)) | 1; /* never 0: 0 is "no adapter" */
}

const mn_lora *mn__engine_find_adapter(const mn_engine *e, const uint8_t fp[16]) {
    if (!e->adapters) return NULL;
    for (int32_t i = 0, n = mn_lora_registry_n_slots(e->adapters); i < n; i++) {
        const mn_lora *l = mn_lora_registry_adapter(e->adapters, i);
        if (l && memcmp(l->fingerprint, fp, 16) == 0) return l;
    }
    return NULL;
}

mn_err mn_session_set_adapter(mn_engine *e, mn_session *s, const char *name, mn_errbuf *eb) {
    if (s->n_tokens || s->gen) return mn_errf(eb, MN_EBUSY, "session %s already has tokens: an adapter is chosen when it is empty", s->id);
    if (!name) {
        mn__session_bind_adapter(s, NULL);
        return MN_OK;
    }
    int32_t i = e->adapters ? mn_lora_registry_find(e->adapters, name) : -1;
    if (i < 0) return mn_errf(eb, MN_ENOT_FOUND, "adapter '%s' is not loaded", name);
    const mn_lora *l = mn_lora_registry_adapter(e->adapters, i);
    mn_err err = mn_lora_check_model(l, e->m, eb);
    if (err != MN_OK) return err;
    mn__session_bind_adapter(s, l);
    return MN_OK;
}

const char *mn_session_adapter(const mn_session *s) { return s->lora ? s->lora_name : NULL; }

int32_t mn_engine_adapter_users(const mn_engine *e, const char *name) {
    int32_t n = 0;
    for (int32_t i = 0; i < e->n_sessions; i++)
        if (e->sessions[i]->lora && strcmp(e->sessions[i]->lora_name, name) == 0) n++;
    return n;
}

/* Index of s's adapter in the registry table, -1 for none; MN_EMISMATCH when it was
 * unloaded (or replaced by other weights) since s was bound. Found by pointer and
 * fingerprint, never by dereferencing s->lora (it may be gone). */
static mn_err adapter_index(const mn_engine *e, const mn_session *s, int32_t *out, mn_errbuf *eb) {
    *out = -1;
    if (!s->lora) return MN_OK;
    int32_t n = e->adapters ? mn_lora_registry_n_slots(e->adapters) : 0;
    for (int32_t i = 0; i < n; i++) {
        const mn_lora *l = mn_lora_registry_adapter(e->adapters, i);
        if (l == s->lora && memcmp(l->fingerprint, s->adapter_fp, 16) == 0) {
            *out = i;
            return MN_OK;
        }
    }
    return mn_errf(eb, MN_EMISMATCH, "session %s: its adapter '%s' is no longer loaded", s->id, s->lora_name);
}

const int32_t *mn_session_tokens(const mn_session *s, const uint8_t **roles, int32_t *n) {
    if (roles) *roles = s->roles;
    *n = s->n_tokens;
    return s->tokens;
}

const float *mn_session_logits(const mn_session *s) { return s->logits_valid ? s->logits : NULL; }

void mn_session_info_get(const mn_engine *e, const mn_session *s, mn_session_info *info) {
    int32_t shared = 0;
    for (int32_t i = 0; i < s->seq.n_blocks; i++) shared += e->kv->refs[s->seq.blocks[i]] > 1;
    info->n_tokens = s->n_tokens;
    info->n_computed = s->n_computed;
    info->n_blocks = s->seq.n_blocks;
    info->n_shared_blocks = shared;
    info->kv_bytes = s->tier ? s->host_bytes : (int64_t)s->seq.n_blocks * e->bs * mn__engine_bytes_per_token(e);
    info->tier = mn__tier_name(s->tier);
    info->last_use = s->last_use;
}

/* ---- the engine step ------------------------------------------------------------------------ */

static bool wants_compute(const mn_session *s) { return s->n_computed < s->n_tokens; }
/* pending tokens and its KV in the pool: a step can take it */
static bool ready(const mn_session *s) { return wants_compute(s) && s->tier == 0; }

/* Sample the next token for a generating session whose pending tokens are all computed. */
static mn_err gen_advance(mn_engine *e, mn_session *s, mn_errbuf *eb) {
    gen_state *g = s->gen;
    const mn_tokenizer *tok = e->m->tok;
    mn_sample_info info;
    int32_t t;
    if (g->has_token) { /* chosen on the backend in the last step */
        t = g->token;
        info = g->info;
        g->has_token = false;
    } else {
        memcpy(e->sample_scratch, s->logits, (size_t)e->m->cfg.n_vocab * sizeof(float));
        t = mn_sampler_sample(g->sampler, e->sample_scratch, g->p.sampling.n_logprobs > 0 ? &info : NULL);
        e->sampled_host++;
    }
    mn_sampler_accept(g->sampler, t);
    g->n_generated++;
    mn_err err = mn__session_add_tokens(s, &t, 1, MN_ROLE_ASSISTANT, eb);
    if (err != MN_OK) return err;
    char piece[1024], out[2048];
    size_t on = 0;
    bool stopped = false, eog = mn_tokenizer_is_eog(tok, t);
    if (!eog || g->p.render_special) {
        size_t pn = mn_detok_push(tok, &g->detok, t, g->p.render_special, piece, sizeof piece);
        on = mn_stop_feed(g->stop, piece, pn, out, sizeof out, &stopped);
    }
    if (!stopped && (eog || g->n_generated >= g->p.max_tokens)) { /* end of stream: release what is held */
        size_t pn = mn_detok_flush(&g->detok, piece, sizeof piece);
        on += mn_stop_feed(g->stop, piece, pn, out + on, sizeof out - on, &stopped);
        if (!stopped) on += mn_stop_flush(g->stop, out + on, sizeof out - on);
    }
    bool go_on = g->cb ? g->cb(g->ud, t, out, on, g->p.sampling.n_logprobs > 0 ? &info : NULL) : true;
    if (stopped) g->finish = MN_FINISH_STOP;
    else if (eog) g->finish = MN_FINISH_EOG;
    else if (!go_on) g->finish = MN_FINISH_CANCELLED;
    else if (g->n_generated >= g->p.max_tokens) g->finish = MN_FINISH_LENGTH;
    return MN_OK;
}

/* mn_kv_seq_make_writable, and under TP the same block copy on the other ranks' pools */
static mn_err make_writable(mn_engine *e, mn_kv_seq *seq, int32_t pos, mn_errbuf *eb) {
    int32_t bi = pos / e->bs, old = bi < seq->n_blocks ? seq->blocks[bi] : -1;
    mn_err err = mn_kv_seq_make_writable(e->kv, seq, pos, eb);
    if (err == MN_OK && e->tp && old >= 0 && seq->blocks[bi] != old) err = mn_tp_copy_block(e->tp, seq->blocks[bi], old, eb);
    return err;
}

/* The step's forward: the engine's own, or every rank of its TP group. */
static mn_err run_forward(mn_engine *e, int32_t ns, const mn_batch *b, const mn_batch_lora *lp, const mn_batch_sample *samp,
                          mn_errbuf *eb) {
    if (e->tp) return mn_tp_run_seqs(e->tp, e->b_seqs, ns, b, lp, samp, e->b_logits, eb);
    return mn_forward_run_sample(e->f, e->b_seqs, ns, b, lp, samp, e->b_logits, eb);
}

/* Plan one batch and run it. ns counts the sessions taken so far, also on failure, so the
 * caller knows which sessions the failure hit (e->b_sess[0..*ns)). */
static mn_err step_compute(mn_engine *e, int32_t *ns_out, bool *did_work, mn_errbuf *eb) {
    mn_err err = MN_OK;
    /* plan: one token for each session with exactly one pending (decode), then chunks */
    int32_t n = 0, ns = 0;
    bool any_adapter = false;
    *ns_out = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int32_t i = 0; i < e->n_sessions && n < e->max_batch; i++) {
            mn_session *s = e->sessions[i];
            int32_t pending = s->n_tokens - s->n_computed;
            if (pending <= 0 || s->tier != 0 || (pass == 0) != (pending == 1)) continue;
            int32_t take = pending < e->max_batch - n ? pending : e->max_batch - n;
            e->b_sess[ns] = s;
            *ns_out = ns + 1;
            int32_t ai;
            if ((err = adapter_index(e, s, &ai, eb)) != MN_OK) return err;
            if (ai >= 0) any_adapter = true;
            for (int32_t k = 0; k < take; k++) e->b_adapter[n + k] = ai;
            if ((err = make_writable(e, &s->seq, s->n_computed, eb)) != MN_OK) {
                mn__prefix_evict_unused(e);
                if ((err = make_writable(e, &s->seq, s->n_computed, eb)) != MN_OK) return err;
            }
            s->seq.n_tokens = s->n_computed;
            e->b_seqs[ns] = &s->seq;
            for (int32_t k = 0; k < take; k++) {
                e->b_tok[n + k] = s->tokens[s->n_computed + k];
                e->b_seq[n + k] = ns;
                e->b_pos[n + k] = s->n_computed + k;
            }
            n += take;
            ns++;
        }
    }
    if (n == 0) return MN_OK;
    *did_work = true;
    /* output rows: the last row of each session whose pending tokens all fit this step.
     * A generating session that will sample from them (at the start of the next step) and
     * whose sampling the op can do is sampled by the forward on the backend: its row goes
     * to the front (the forward samples out rows [0, n_samp)), with u drawn from its
     * sampler now, as mn_sampler_sample would draw it then. The other rows return logits. */
    int32_t n_out = 0, n_samp = 0, n_lrows = 0;
    bool any_lp = false;
    for (int32_t r = 0; r < n; r++) {
        mn_session *s = e->b_sess[e->b_seq[r]];
        bool last_of_session = r + 1 == n || e->b_seq[r + 1] != e->b_seq[r];
        if (!last_of_session || e->b_pos[r] + 1 != s->n_tokens) continue;
        n_out++;
        gen_state *g = s->gen;
        bool lp = g && g->p.sampling.n_logprobs > 0;
        if (e->sample_backend && g && g->finish == MN_FINISH_NONE &&
            mn_sampler_op_params(g->sampler, lp, &e->b_sparams[n_samp])) {
            e->b_rows[n_samp++] = r;
            any_lp |= lp;
        } else {
            e->b_lrows[n_lrows++] = r;
        }
    }
    memcpy(e->b_rows + n_samp, e->b_lrows, (size_t)n_lrows * sizeof *e->b_rows);
    mn_batch b = {.n_tokens = n, .tokens = e->b_tok, .seq = e->b_seq, .pos = e->b_pos, .n_out = n_out, .out_rows = e->b_rows};
    mn_batch_sample samp = {.n_sample = n_samp, .params = e->b_sparams, .token = e->b_stok,
                            .logprob = any_lp ? e->b_slp : NULL, .top_id = any_lp ? e->b_stop : NULL,
                            .top_logprob = any_lp ? e->b_stoplp : NULL};
    mn_batch_lora lora = {0}, *lp = NULL;
    if (any_adapter) { /* page in and pin the batch's adapters (device budget, LRU) */
        err = mn_lora_registry_acquire_batch(e->adapters, e->b_adapter, n, &lora.adapters, &lora.n_adapters, eb);
        if (err != MN_OK) return err;
        lora.adapter = e->b_adapter;
        lp = &lora;
    }
    err = run_forward(e, ns, &b, lp, &samp, eb);
    if (err == MN_ELIMIT) { /* pool full: give back cached blocks nobody uses, then retry */
        mn__prefix_evict_unused(e);
        err = run_forward(e, ns, &b, lp, &samp, eb);
    }
    /* the logits are on the host now (the forward synchronised): the copies may go */
    if (lp) mn_lora_registry_release_batch(e->adapters, e->b_adapter, n);
    if (err != MN_OK) return err;
    e->computed_tokens += n;
    const size_t V = (size_t)e->m->cfg.n_vocab;
    for (int32_t o = 0; o < n_out; o++) {
        mn_session *s = e->b_sess[e->b_seq[e->b_rows[o]]];
        if (o < n_samp) {
            gen_state *g = s->gen;
            g->has_token = true;
            g->token = e->b_stok[o];
            if (g->p.sampling.n_logprobs > 0)
                mn_sampler_fill_info(g->sampler, e->b_slp[o], e->b_stop + (size_t)o * MN_SAMPLE_MAX_TOP,
                                     e->b_stoplp + (size_t)o * MN_SAMPLE_MAX_TOP, &g->info);
            e->sampled_backend++;
        } else {
            memcpy(s->logits, e->b_logits + (size_t)(o - n_samp) * V, V * sizeof(float));
            e->logits_bytes += (int64_t)(V * sizeof(float));
        }
    }
    double t = now_s();
    for (int32_t k = 0; k < ns; k++) {
        mn_session *s = e->b_sess[k];
        s->n_computed = s->seq.n_tokens;
        /* a backend-sampled session's logits stayed on the backend */
        s->logits_valid = s->n_computed == s->n_tokens && !(s->gen && s->gen->has_token);
        s->last_use = t;
        s->last_step = e->n_steps;
        /* The cache only saves later work: a session whose KV and logits are computed does
         * not fail for want of an entry (out of memory here used to fail every session of
         * the step, dropping logits already computed). A block whose insert failed stays
         * unshared; one whose hash could not be stored is hashed again next step. */
        mn_errbuf ignore;
        (void)register_blocks(e, s, &ignore);
    }
    return MN_OK;
}

/* A step failed for s: drop its pending tokens (and any KV written for them). */
void mn__session_fail(mn_engine *e, mn_session *s, mn_err err, const char *msg) {
    s->fail_err = err;
    snprintf(s->fail_msg, sizeof s->fail_msg, "%s", msg ? msg : mn_err_name(err));
    mn_kv_seq_truncate(e->kv, &s->seq, s->n_computed);
    s->n_tokens = s->n_computed;
    if (s->n_hashed * e->bs > s->n_computed) s->n_hashed = s->n_computed / e->bs;
    s->logits_valid = false;
    if (s->gen) s->gen->has_token = false; /* nor a token sampled from them on the backend */
    s->failed = true;
}

/* End of a step: fire the callbacks of sessions whose work completed or failed. Collected
 * first, since a callback may delete its session (and so reorder e->sessions). */
static void step_notify(mn_engine *e) {
    int32_t n = 0;
    for (int32_t i = 0; i < e->n_sessions; i++) {
        mn_session *s = e->sessions[i];
        bool gen_over = s->gen && s->gen->done && s->gen->finish != MN_FINISH_NONE && !wants_compute(s);
        if (s->failed || gen_over || (s->computed_cb && !wants_compute(s))) e->b_notify[n++] = s;
    }
    for (int32_t i = 0; i < n; i++) {
        mn_session *s = e->b_notify[i];
        bool failed = s->failed;
        bool gen_over = failed || (s->gen && s->gen->finish != MN_FINISH_NONE && !wants_compute(s));
        s->failed = false;
        fire_callbacks(s, failed || !wants_compute(s), gen_over, failed ? s->fail_err : MN_OK, failed ? s->fail_msg : NULL);
    }
}

mn_err mn_engine_step(mn_engine *e, bool *did_work, mn_errbuf *eb) {
    *did_work = false;
    mn_err err = MN_OK;
    e->n_steps++;
    mn__tier_collect(e);
    if (e->n_sessions > e->cap_notify) { /* room to collect every session's callbacks */
        mn_session **nb = mn_realloc(e->b_notify, (size_t)e->cap_sessions * sizeof *nb);
        if (!nb) return mn_errf(eb, MN_ENOMEM, "out of memory");
        e->b_notify = nb;
        e->cap_notify = e->cap_sessions;
    }
    /* generating sessions with nothing pending sample first (their logits are ready) */
    for (int32_t i = 0; i < e->n_sessions && err == MN_OK; i++) {
        mn_session *s = e->sessions[i];
        if (s->gen && s->gen->finish == MN_FINISH_NONE && !wants_compute(s) && (s->logits_valid || s->gen->has_token)) {
            *did_work = true;
            if ((err = gen_advance(e, s, eb)) != MN_OK) mn__session_fail(e, s, err, eb ? eb->msg : NULL);
        }
    }
    /* sessions whose lift finished (now T1), or that were left in T1: into the pool */
    bool lifting = false;
    for (int32_t i = 0; i < e->n_sessions && err == MN_OK; i++) {
        mn_session *s = e->sessions[i];
        if (!wants_compute(s) || s->tier == 0) continue;
        if (mn__tier_lifting(s)) {
            lifting = true;
            continue;
        }
        mn_errbuf peb;
        mn_err perr = mn__tier_restore_pipelined(e, s, &peb);
        if (perr != MN_OK) mn__session_fail(e, s, perr, peb.msg);
    }
    for (int32_t i = 0; i < e->n_sessions && err == MN_OK; i++)
        if (ready(e->sessions[i]) && (err = attach_cached(e, e->sessions[i], eb)) != MN_OK)
            mn__session_fail(e, e->sessions[i], err, eb ? eb->msg : NULL);
    /* a session whose adapter was unloaded fails alone, before it can fail a batch */
    for (int32_t i = 0; i < e->n_sessions && err == MN_OK; i++) {
        mn_session *s = e->sessions[i];
        int32_t ai;
        mn_errbuf aeb;
        mn_err aerr;
        if (ready(s) && (aerr = adapter_index(e, s, &ai, &aeb)) != MN_OK) mn__session_fail(e, s, aerr, aeb.msg);
    }
    if (err == MN_OK) {
        /* blocks this step may need (new positions, plus one copy-on-write each): swap idle
         * sessions out now rather than fail in the middle of the batch */
        int32_t need = 0;
        for (int32_t i = 0; i < e->n_sessions; i++) {
            mn_session *s = e->sessions[i];
            if (ready(s)) need += (s->n_tokens + e->bs - 1) / e->bs - s->seq.n_blocks + 1;
        }
        if (need > e->kv->n_free) {
            mn_errbuf ignore;
            mn__tier_make_room(e, need, NULL, &ignore); /* best effort: the forward reports a real shortage */
        }
        int32_t ns = 0;
        err = step_compute(e, &ns, did_work, eb);
        if (err != MN_OK)
            for (int32_t k = 0; k < ns; k++) mn__session_fail(e, e->b_sess[k], err, eb ? eb->msg : NULL);
    }
    /* nothing to run but a lift on the way: wait for it a little rather than spin */
    /* a lift installed meanwhile is progress: the next step can take its session */
    if (err == MN_OK && !*did_work && lifting && mn__tier_wait_any(e, 0.002)) *did_work = true;
    mn__tier_restore_finish(e);
    mn__tier_refill(e); /* before the callbacks: they may submit, and a session with work is not idle */
    step_notify(e);
    return err;
}

bool mn_session_busy(const mn_session *s) { return wants_compute(s) || s->gen != NULL; }

bool mn_engine_has_work(const mn_engine *e) {
    for (int32_t i = 0; i < e->n_sessions; i++)
        if (mn_session_busy(e->sessions[i])) return true;
    return false;
}

void mn_session_on_computed(mn_engine *e, mn_session *s, mn_computed_cb cb, void *ud) {
    (void)e;
    s->computed_cb = cb;
    s->computed_ud = ud;
    if (cb && !wants_compute(s)) fire_callbacks(s, true, false, MN_OK, NULL);
}

/* Run steps until s has nothing pending (and, if generating, until it finished). */
mn_err mn__session_run_until_done(mn_engine *e, mn_session *s, mn_errbuf *eb) {
    s->fail_err = MN_OK;
    for (;;) {
        bool busy = wants_compute(s) || (s->gen && s->gen->finish == MN_FINISH_NONE);
        if (!busy) return MN_OK;
        bool did;
        mn_err err = mn_engine_step(e, &did, eb);
        if (err != MN_OK) return err;
        if (s->fail_err != MN_OK) return mn_errf(eb, s->fail_err, "%s", s->fail_msg); /* e.g. its lift failed */
        if (!did && s->tier == 0) return mn_errf(eb, MN_EINVALID, "session %s: no progress possible", s->id);
    }
}

/* ---- the session API ------------------------------------------------------------------------ */

mn_err mn_session_submit_tokens(mn_engine *e, mn_session *s, const int32_t *tokens, int32_t n, mn_role role,
                                mn_errbuf *eb) {
    if (s->gen) return mn_errf(eb, MN_EBUSY, "session %s is generating", s->id);
    if ((unsigned)role > MN_ROLE_THOUGHT) return mn_errf(eb, MN_EINVALID, "role %d unknown", (int)role);
    if (n < 0) return mn_errf(eb, MN_EINVALID, "token count %d is negative", n);
    for (int32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= e->m->cfg.n_vocab)
            return mn_errf(eb, MN_ERANGE, "tokens[%d] = %d is not in [0, %d)", i, tokens[i], e->m->cfg.n_vocab);
    if ((int64_t)s->n_tokens + n > e->m->cfg.n_ctx)
        return mn_errf(eb, MN_ELIMIT, "session %s: %d + %d tokens exceed the context length %d", s->id, s->n_tokens, n,
                       e->m->cfg.n_ctx);
    /* below T1 the worker brings it up while the engine steps the others; from T1 the step
     * restores it layer by layer, overlapping its forward */
    mn_err err = s->tier >= 2 ? mn__tier_lift_start(e, s, eb) : s->tier == 1 && n > 0 ? MN_OK : mn__tier_ensure_resident(e, s, eb);
    if (err != MN_OK) return err;
    return mn__session_add_tokens(s, tokens, n, role, eb);
}

mn_err mn_session_append_tokens(mn_engine *e, mn_session *s, const int32_t *tokens, int32_t n, mn_role role,
                                mn_errbuf *eb) {
    int32_t before = s->n_tokens;
    mn_err err = mn_session_submit_tokens(e, s, tokens, n, role, eb);
    if (err != MN_OK) return err;
    err = mn__session_run_until_done(e, s, eb);
    if (err != MN_OK) { /* nothing half-appended: drop the new tokens and any KV made for them */
        mn_kv_seq_truncate(e->kv, &s->seq, before < s->n_computed ? before : s->n_computed);
        if (s->n_tokens > before) s->n_tokens = before;
        if (s->n_computed > before) s->n_computed = before;
        if (s->n_hashed * e->bs > s->n_computed) s->n_hashed = s->n_computed / e->bs;
        s->logits_valid = false;
    }
    return err;
}

/* Frame one message with the chat template, tokenizing the template's own text with
 * special tokens recognised and the content without (so "<|im_end|>" typed by a user
 * stays text). The content is located by rendering a sentinel in its place. */
static mn_err frame_message(mn_engine *e, mn_session *s, mn_role role, const char *text, size_t len, int32_t **out,
                            int64_t *n_out, mn_errbuf *eb) {
    const mn_model *m = e->m;
    if (!m->has_chat_template) return mn_errf(eb, MN_EUNSUPPORTED, "role %s: the model has no recognised chat template", mn_role_name(role));
    if (m->chat.kind != MN_CHAT_CHATML && m->chat.kind != MN_CHAT_LLAMA3)
        return mn_errf(eb, MN_EUNSUPPORTED, "role %s: per-message framing needs a ChatML or Llama 3 template, the model has %s",
                       mn_role_name(role), mn_chat_kind_name(m->chat.kind));
    static const char sentinel[] = "\x01mneme-content\x01";
    mn_chat_template t = m->chat;
    if (s->n_tokens > 0 || role == MN_ROLE_SYSTEM) t.default_system = NULL; /* only a first message gets it */
    /* A later message is framed as what the template adds after an earlier one: render
     * [earlier, this] and [earlier] and keep the difference. So text a template emits once
     * per conversation (Llama 3's <|begin_of_text|>) is not repeated, while text that
     * merely looks like BOS (SmolLM2's BOS is ChatML's <|im_start|>) is kept. */
    mn_chat_msg msgs[2] = {{"user", "x"}, {mn_role_name(role), sentinel}};
    bool later = s->n_tokens > 0;
    char *r = NULL, *r0 = NULL;
    size_t rl = 0, rl0 = 0;
    mn_err err = mn_chat_render(&t, later ? msgs : msgs + 1, later ? 2 : 1, false, &r, &rl, eb);
    if (err == MN_OK && later) err = mn_chat_render(&t, msgs, 1, false, &r0, &rl0, eb);
    if (err == MN_OK && later && (rl0 > rl || memcmp(r, r0, rl0) != 0))
        err = mn_errf(eb, MN_EUNSUPPORTED, "chat template %s renders a conversation that does not extend its first "
                      "message: cannot frame messages one at a time", mn_chat_kind_name(t.kind));
    mn_free(r0);
    if (err != MN_OK) { mn_free(r); return err; }
    if (later) { /* keep only the part after the earlier message */
        memmove(r, r + rl0, rl - rl0 + 1);
        rl -= rl0;
    }
    char *at = strstr(r, sentinel);
    if (!at) { mn_free(r); return mn_errf(eb, MN_EUNSUPPORTED, "chat template dropped the message content"); }
    const char *parts[3] = {r, text, at + sizeof sentinel - 1};
    size_t lens[3] = {(size_t)(at - r), len, strlen(at + sizeof sentinel - 1)};
    int32_t *all = NULL;
    int64_t n_all = 0;
    for (int k = 0; k < 3 && err == MN_OK; k++) {
        int32_t *t_ids = NULL;
        int64_t nt = 0;
        err = mn_tokenize(m->tok, parts[k], lens[k], k == 1 ? 0 : MN_TOK_PARSE_SPECIAL, &t_ids, &nt, eb);
        if (err != MN_OK) break;
        int32_t *na = mn_realloc(all, (size_t)(n_all + nt + 1) * sizeof(int32_t));
        if (!na) { mn_free(t_ids); err = mn_errf(eb, MN_ENOMEM, "out of memory"); break; }
        all = na;
        memcpy(all + n_all, t_ids, (size_t)nt * sizeof(int32_t));
        n_all += nt;
        mn_free(t_ids);
    }
    mn_free(r);
    if (err != MN_OK) { mn_free(all); return err; }
    *out = all;
    *n_out = n_all;
    return MN_OK;
}

/* Text as the tokens a message of this role appends. */
static mn_err text_tokens(mn_engine *e, mn_session *s, mn_role role, const char *text, size_t len, int32_t **toks,
                          int32_t *n_out, mn_errbuf *eb) {
    int64_t n = 0;
    mn_err err;
    *toks = NULL;
    if (!e->m->tok) return mn_errf(eb, MN_EUNSUPPORTED, "model %s has no tokenizer: append token ids", e->m->name);
    if (role == MN_ROLE_NONE || role == MN_ROLE_THOUGHT)
        err = mn_tokenize(e->m->tok, text, len, s->n_tokens == 0 ? MN_TOK_ADD_BOS : 0, toks, &n, eb);
    else if ((unsigned)role > MN_ROLE_THOUGHT)
        return mn_errf(eb, MN_EINVALID, "role %d unknown", (int)role);
    else
        err = frame_message(e, s, role, text, len, toks, &n, eb);
    if (err == MN_OK && n > INT32_MAX) err = mn_errf(eb, MN_ELIMIT, "text of %zu bytes is too long", len);
    if (err != MN_OK) {
        mn_free(*toks);
        *toks = NULL;
    }
    *n_out = (int32_t)n;
    return err;
}

mn_err mn_session_append_text(mn_engine *e, mn_session *s, mn_role role, const char *text, size_t len, mn_errbuf *eb) {
    int32_t *toks, n;
    mn_err err = text_tokens(e, s, role, text, len, &toks, &n, eb);
    if (err == MN_OK) err = mn_session_append_tokens(e, s, toks, n, role, eb);
    mn_free(toks);
    return err;
}

mn_err mn_session_submit_text(mn_engine *e, mn_session *s, mn_role role, const char *text, size_t len,
                              mn_errbuf *eb) {
    int32_t *toks, n;
    mn_err err = text_tokens(e, s, role, text, len, &toks, &n, eb);
    if (err == MN_OK) err = mn_session_submit_tokens(e, s, toks, n, role, eb);
    mn_free(toks);
    return err;
}

mn_err mn_session_create(mn_engine *e, const char *system_prompt, mn_session **out, mn_errbuf *eb) {
    mn_session *s;
    mn_err err = mn__session_new(e, &s, eb);
    if (err != MN_OK) return err;
    if (system_prompt) {
        err = mn_session_append_text(e, s, MN_ROLE_SYSTEM, system_prompt, strlen(system_prompt), eb);
        if (err != MN_OK) {
            mn_session_delete(e, s);
            return err;
        }
    }
    *out = s;
    return MN_OK;
}

/* The text a template puts before an assistant reply ("<|im_start|>assistant\n"). */
static mn_err assistant_header(mn_engine *e, int32_t **out, int64_t *n, mn_errbuf *eb) {
    const mn_model *m = e->m;
    if (!m->has_chat_template) return mn_errf(eb, MN_EUNSUPPORTED, "assistant_prefix: the model has no recognised chat template");
    mn_chat_template t = m->chat;
    t.default_system = NULL;
    mn_chat_msg msg = {"user", "x"};
    char *a = NULL, *b = NULL;
    size_t al = 0, bl = 0;
    mn_err err = mn_chat_render(&t, &msg, 1, false, &a, &al, eb);
    if (err == MN_OK) err = mn_chat_render(&t, &msg, 1, true, &b, &bl, eb);
    if (err == MN_OK && (bl < al || memcmp(a, b, al) != 0))
        err = mn_errf(eb, MN_EUNSUPPORTED, "chat template %s has no separable assistant header", mn_chat_kind_name(t.kind));
    if (err == MN_OK) err = mn_tokenize(m->tok, b + al, bl - al, MN_TOK_PARSE_SPECIAL, out, n, eb);
    mn_free(a);
    mn_free(b);
    return err;
}

/* Validate, open the assistant turn if asked, and attach a generation state to s. */
static mn_err gen_begin(mn_engine *e, mn_session *s, const mn_gen_params *p, mn_token_cb cb, mn_gen_done_cb done,
                        void *ud, mn_errbuf *eb) {
    if (s->gen) return mn_errf(eb, MN_EBUSY, "session %s is already generating", s->id);
    if (!e->m->tok) return mn_errf(eb, MN_EUNSUPPORTED, "model %s has no tokenizer: generation streams text", e->m->name);
    if (p->max_tokens < 1) return mn_errf(eb, MN_ERANGE, "max_tokens must be >= 1, got %d", p->max_tokens);
    mn_err err = mn_sampling_validate(&p->sampling, e->m->cfg.n_vocab, eb);
    if (err == MN_OK && wants_compute(s) && s->tier >= 1) /* with tokens pending the step brings it up */
        err = s->tier >= 2 ? mn__tier_lift_start(e, s, eb) : MN_OK;
    else if (err == MN_OK)
        err = mn__tier_ensure_resident(e, s, eb);
    if (err != MN_OK) return err;
    int32_t *h = NULL;
    int64_t nh = 0;
    if (p->assistant_prefix && (err = assistant_header(e, &h, &nh, eb)) != MN_OK) return err;
    if (s->n_tokens + nh + p->max_tokens > e->m->cfg.n_ctx) {
        mn_free(h);
        return mn_errf(eb, MN_ELIMIT, "session %s: %d tokens + max_tokens %d exceed the context length %d", s->id,
                       (int32_t)(s->n_tokens + nh), p->max_tokens, e->m->cfg.n_ctx);
    }
    if (s->n_tokens + nh == 0) return mn_errf(eb, MN_EINVALID, "session %s is empty: append a prompt first", s->id);
    gen_state *g = mn_calloc(1, sizeof *g);
    if (!g) {
        mn_free(h);
        return mn_errf(eb, MN_ENOMEM, "out of memory");
    }
    g->p = *p;
    g->p.stops = NULL; /* copied into g->stop; the caller's array may go away */
    g->p.n_stops = 0;
    g->p.sampling.bias = NULL; /* copied by the sampler */
    g->p.sampling.n_bias = 0;
    g->cb = cb;
    g->done = done;
    g->ud = ud;
    err = mn_sampler_new(&p->sampling, e->m->cfg.n_vocab, &g->sampler, eb);
    if (err == MN_OK) err = mn_stop_new((const char *const *)p->stops, p->n_stops, &g->stop, eb);
    if (err == MN_OK && nh) err = mn_session_submit_tokens(e, s, h, (int32_t)nh, MN_ROLE_ASSISTANT, eb);
    mn_free(h);
    if (err != MN_OK) {
        mn_sampler_free(g->sampler);
        mn_stop_free(g->stop);
        mn_free(g);
        return err;
    }
    for (int32_t i = 0; i < s->n_tokens; i++) mn_sampler_accept(g->sampler, s->tokens[i]);
    mn_detok_reset(&g->detok);
    /* history computed but logits lost (e.g. after a rewind): recompute the last token */
    if (!wants_compute(s) && !s->logits_valid) {
        mn_kv_seq_truncate(e->kv, &s->seq, s->n_tokens - 1);
        s->n_computed = s->n_tokens - 1;
        if (s->n_hashed * e->bs > s->n_computed) s->n_hashed = s->n_computed / e->bs;
    }
    s->gen = g;
    return MN_OK;
}

mn_err mn_session_generate(mn_engine *e, mn_session *s, const mn_gen_params *p, mn_token_cb cb, void *ud,
                           mn_gen_result *res, mn_errbuf *eb) {
    mn_err err = gen_begin(e, s, p, cb, NULL, ud, eb);
    if (err != MN_OK) return err;
    err = mn__session_run_until_done(e, s, eb);
    if (res) {
        res->n_generated = s->gen->n_generated;
        res->finish = err == MN_OK ? s->gen->finish : MN_FINISH_NONE;
    }
    gen_end(s);
    return err;
}

mn_err mn_session_generate_start(mn_engine *e, mn_session *s, const mn_gen_params *p, mn_token_cb cb,
                                 mn_gen_done_cb done, void *ud, mn_errbuf *eb) {
    if (!done) return mn_errf(eb, MN_EINVALID, "generate_start needs a done callback");
    return gen_begin(e, s, p, cb, done, ud, eb);
}

void mn_session_generate_cancel(mn_engine *e, mn_session *s) {
    (void)e;
    if (!s->gen) return;
    if (s->gen->finish == MN_FINISH_NONE) s->gen->finish = MN_FINISH_CANCELLED;
    fire_callbacks(s, false, true, MN_OK, NULL);
}

mn_err mn_session_fork(mn_engine *e, mn_session *s, mn_session **out, mn_errbuf *eb) {
    if (s->gen) return mn_errf(eb, MN_EBUSY, "session %s is generating", s->id);
    mn_err err = mn__tier_ensure_resident(e, s, eb);
    if (err != MN_OK) return err;
    mn_session *c;
    err = mn__session_new(e, &c, eb);
    if (err != MN_OK) return err;
    c->lora = s->lora;
    memcpy(c->lora_name, s->lora_name, sizeof c->lora_name);
    memcpy(c->adapter_fp, s->adapter_fp, 16);
    c->hash_seed = s->hash_seed;
    err = mn__session_add_tokens(c, s->tokens, s->n_tokens, MN_ROLE_NONE, eb);
    if (err == MN_OK) memcpy(c->roles, s->roles, (size_t)s->n_tokens);
    if (err == MN_OK) err = mn_kv_seq_clone(e->kv, &s->seq, &c->seq, eb);
    if (err == MN_OK && s->n_hashed) {
        c->block_hash = mn_malloc((size_t)s->n_hashed * sizeof(uint64_t));
        if (!c->block_hash) err = mn_errf(eb, MN_ENOMEM, "out of memory");
        else {
            memcpy(c->block_hash, s->block_hash, (size_t)s->n_hashed * sizeof(uint64_t));
            c->n_hashed = c->cap_hashed = s->n_hashed;
        }
    }
    if (err != MN_OK) {
        mn_session_delete(e, c);
        return err;
    }
    c->n_computed = s->n_computed;
    memcpy(c->logits, s->logits, (size_t)e->m->cfg.n_vocab * sizeof(float));
    c->logits_valid = s->logits_valid;
    *out = c;
    return MN_OK;
}

mn_err mn_session_rewind(mn_engine *e, mn_session *s, int32_t n, mn_errbuf *eb) {
    if (s->gen) return mn_errf(eb, MN_EBUSY, "session %s is generating", s->id);
    if (n < 0 || n > s->n_tokens)
        return mn_errf(eb, MN_ERANGE, "rewind position %d is not in [0, %d] (session length)", n, s->n_tokens);
    if (n == s->n_tokens) return MN_OK;
    mn_err err = mn__tier_ensure_resident(e, s, eb);
    if (err != MN_OK) return err;
    s->n_tokens = n;
    if (s->n_computed > n) s->n_computed = n;
    mn_kv_seq_truncate(e->kv, &s->seq, s->n_computed);
    if (s->n_hashed * e->bs > s->n_computed) s->n_hashed = s->n_computed / e->bs;
    s->logits_valid = false;
    s->last_use = now_s();
    return MN_OK;
}
