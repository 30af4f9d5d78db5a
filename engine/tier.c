/* engine/tier.c — moving idle sessions' KV down the memory tiers and back.
 *
 *   T0  the KV block pool (device memory; host memory on the CPU backend)
 *   T1  a block-major host image (pinned host memory on a GPU backend)
 *   T2  the session stream of session_file.c in host memory: byte-shuffled lz4 chunks
 *       with checksums
 *   T3  the same stream as a file in the persist directory (atomic write)
 * Demotion takes the least recently used idle sessions (no pending tokens, not
 * generating) when the pool needs blocks, and cascades down when a host tier passes its
 * budget. Once the pool has run short, each step ends by keeping a reserve of blocks
 * reclaimable (mn__tier_refill): idle sessions go to T1 in the background, their copies
 * only enqueued, so a later step finds blocks instead of waiting for a copy out.
 * Promotion happens on access (append, generate, fork, rewind, save) and brings the exact
 * KV bits back, so a promoted session continues bit-identically.
 * Tokens submitted to a session in T2 or T3 start its promotion at once: the worker
 * reads and decompresses it into a T1 image (a lift) while the engine keeps stepping the
 * other sessions; the step that finds the lift done copies the image into the pool.
 * (Lifting straight into pool blocks reserved at the start was tried on the CPU backend:
 * the lift took 13-19 ms against 11-17 through a reused image and the turn was no faster,
 * so lifts keep the image; the blocking restores of ensure_resident do go straight into
 * the pool, 1.8-2.9x faster than through an image: bench_session --sync.) */
#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/session_impl.h"

static const char *const tier_names[] = {"T0", "T1", "T2", "T3"};

/* ---- background demotion of T1 images -------------------------------------------------
 * The worker compresses (T2) or writes (T3) a copy of the session's T1 image; the session
 * stays in T1 meanwhile and the engine thread installs the result at its next step. If the
 * session is promoted, demoted otherwise or deleted first, the job is orphaned: it takes
 * ownership of the T1 image it reads, and its result is discarded. */
typedef struct mn__tier_job {
    struct mn__tier_job *next;
    mn_session *s;            /* NULL: orphaned */
    int to;                   /* 2 or 3: demotion of a T1 image; 1: a lift from T2/T3 */
    int from;                 /* lift: 2 (reads packed) or 3 (reads path) */
    const uint8_t *model_fp;  /* lift: the model fingerprint the stream must carry */
    mn_session_loaded *ld;    /* lift result */
    bool finished;            /* set by the worker (under mu) */
    char msg[512];            /* why it failed */
    mn_session_image img;     /* points at the copies below and at the T1 image */
    int32_t *tokens;
    uint8_t *roles;
    uint16_t *kv_owned;       /* the T1 image, once orphaned */
    mn_buffer *buf_owned;     /* its pinned buffer, if it has one */
    char *path;               /* T3 */
    uint8_t *packed;          /* T2 result */
    size_t packed_len;
    mn_err err;
} tier_job;

typedef struct mn__tier_worker {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    tier_job *queue, *queue_tail, *done;
    atomic_int n_done;        /* finished, not yet collected: a lock-free peek for the step */
    int n_busy;               /* queued or running */
    pthread_cond_t idle;
    bool stop;
} tier_worker;

static void *worker_main(void *arg) {
    tier_worker *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->queue && !w->stop) pthread_cond_wait(&w->cv, &w->mu);
        if (w->stop) break;
        tier_job *j = w->queue;
        w->queue = j->next;
        if (!w->queue) w->queue_tail = NULL;
        pthread_mutex_unlock(&w->mu);
        mn_errbuf eb;
        if (j->to == 1 && j->from == 2) j->err = mn_session_read_mem(j->packed, j->packed_len, j->model_fp, &j->ld, &eb);
        else if (j->to == 1) j->err = mn_session_read_file(j->path, j->model_fp, &j->ld, &eb);
        else if (j->to == 2) j->err = mn_session_write_mem(&j->img, &j->packed, &j->packed_len, &eb);
        else j->err = mn_session_write_file(j->path, &j->img, &eb);
        if (j->err != MN_OK) snprintf(j->msg, sizeof j->msg, "%s", eb.msg);
        pthread_mutex_lock(&w->mu);
        j->finished = true;
        j->next = w->done;
        w->done = j;
        w->n_busy--;
        atomic_fetch_add(&w->n_done, 1);
        pthread_cond_broadcast(&w->idle);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* Wait until s's T1 image is complete (its copy out of the pool may be in flight). */
static void wait_image(mn_engine *e, mn_session *s) {
    if (!s->host_ready.ticket) return;
    mn_errbuf ignore;
    mn_backend_event_wait(e->kv->backend, &s->host_ready, &ignore);
    s->host_ready.ticket = 0;
}

/* Free s's T1 image, wherever it lives. */
static void t1_free(mn_engine *e, mn_session *s) {
    wait_image(e, s);
    if (s->host_buf) mn_buffer_free(s->host_buf);
    else mn_free(s->host_kv);
    s->host_kv = NULL;
    s->host_buf = NULL;
}

static void job_free(tier_job *j) {
    mn_free(j->tokens);
    mn_free(j->roles);
    if (j->buf_owned) mn_buffer_free(j->buf_owned);
    else mn_free(j->kv_owned);
    mn_free(j->packed);
    mn_session_loaded_free(j->ld);
    if (j->path) {
        if (j->to >= 2 && !j->s && j->err == MN_OK) unlink(j->path); /* written for a session that moved on */
        mn_free(j->path);
    }
    mn_free(j);
}

/* The job no longer belongs to s: it keeps the T1 image it reads. */
static void job_orphan(mn_session *s) {
    tier_job *j = s->job;
    if (!j) return;
    j->s = NULL;
    j->kv_owned = s->host_kv;
    j->buf_owned = s->host_buf;
    s->host_kv = NULL;
    s->host_buf = NULL;
    s->job = NULL;
}

static mn_err worker_start(mn_engine *e, mn_errbuf *eb) {
    if (!e->worker) {
        tier_worker *w = mn_calloc(1, sizeof *w);
        if (!w) return mn_errf(eb, MN_ENOMEM, "tier worker: out of memory");
        pthread_mutex_init(&w->mu, NULL);
        pthread_cond_init(&w->cv, NULL);
        pthread_cond_init(&w->idle, NULL);
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            mn_free(w);
            return mn_errf(eb, MN_ENOMEM, "tier worker: cannot start a thread");
        }
        e->worker = w;
    }
    return MN_OK;
}

static void worker_push(tier_worker *w, tier_job *j) {
    pthread_mutex_lock(&w->mu);
    if (w->queue_tail) w->queue_tail->next = j;
    else w->queue = j;
    w->queue_tail = j;
    w->n_busy++;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static mn_err start_async(mn_engine *e, mn_session *s, int to, mn_errbuf *eb) {
    mn_err err = worker_start(e, eb);
    if (err != MN_OK) return err;
    tier_job *j = mn_calloc(1, sizeof *j);
    int32_t n = s->n_computed;
    if (j) {
        j->tokens = mn_malloc((size_t)(n ? n : 1) * sizeof(int32_t));
        j->roles = mn_malloc((size_t)(n ? n : 1));
        if (to == 3) j->path = mn_malloc(strlen(e->persist_dir) + 48);
    }
    if (!j || !j->tokens || !j->roles || (to == 3 && !j->path)) {
        if (j) job_free(j);
        return mn_errf(eb, MN_ENOMEM, "tier worker: out of memory");
    }
    memcpy(j->tokens, s->tokens, (size_t)n * sizeof(int32_t)); /* the session may grow meanwhile */
    memcpy(j->roles, s->roles, (size_t)n);
    mn__session_fill_image(e, s, s->host_kv, s->host_blocks, &j->img);
    j->img.tokens = j->tokens;
    j->img.roles = j->roles;
    if (to == 3) snprintf(j->path, strlen(e->persist_dir) + 48, "%s/%s.mns", e->persist_dir, s->id);
    j->s = s;
    j->to = to;
    s->job = j;
    worker_push(e->worker, j);
    return MN_OK;
}

bool mn__tier_lifting(const mn_session *s) { return s->job && s->job->to == 1; }

mn_err mn__tier_lift_start(mn_engine *e, mn_session *s, mn_errbuf *eb) {
    if (s->tier < 2 || mn__tier_lifting(s)) return MN_OK;
    mn_err err = worker_start(e, eb);
    if (err != MN_OK) return err;
    tier_job *j = mn_calloc(1, sizeof *j);
    if (j && s->tier == 3 && !(j->path = mn_malloc(strlen(s->file) + 1))) {
        mn_free(j);
        j = NULL;
    }
    if (!j) return mn_errf(eb, MN_ENOMEM, "tier worker: out of memory");
    j->s = s;
    j->to = 1;
    j->from = s->tier;
    j->model_fp = e->m->fingerprint;
    if (s->tier == 2) { /* the job owns the stream while it reads; accounting stays with s */
        j->packed = s->packed;
        j->packed_len = s->packed_len;
        s->packed = NULL;
    } else {
        strcpy(j->path, s->file);
    }
    s->job = j;
    worker_push(e->worker, j);
    return MN_OK;
}

/* s no longer needs its T3 file: delete it, unless it is the caller's. */
static void drop_file(mn_session *s) {
    if (!s->file) return;
    if (!s->file_kept) unlink(s->file);
    mn_free(s->file);
    s->file = NULL;
    s->file_kept = false;
}

/* Install a finished lift: s becomes a T1 session holding the loaded image. On failure s
 * keeps its tier (and gets its T2 stream back) and *err / msg say why. */
static mn_err check_loaded(const mn_engine *e, const mn_session *s, const mn_session_image *im, mn_errbuf *eb);

static void lift_install(mn_engine *e, tier_job *j) {
    mn_session *s = j->s;
    s->job = NULL;
    mn_errbuf ceb;
    if (j->err == MN_OK && check_loaded(e, s, &j->ld->img, &ceb) != MN_OK) { /* a file replaced under us */
        j->err = MN_EMISMATCH;
        snprintf(j->msg, sizeof j->msg, "%s", ceb.msg);
    }
    if (j->err != MN_OK) {
        if (j->from == 2) {
            s->packed = j->packed;
            j->packed = NULL;
        }
        mn__session_fail(e, s, j->err, j->msg);
        return;
    }
    if (j->from == 2) { /* the stream is done with: job_free frees it */
        e->tier_used[2] -= s->host_bytes;
    } else {
        drop_file(s);
    }
    int32_t n_blocks = j->ld->img.n_blocks;
    int64_t bytes = (int64_t)n_blocks * mn__image_block_elems(e) * (int64_t)sizeof(uint16_t);
    e->swapped_in[j->from] += j->from == 2 ? s->host_bytes : bytes;
    s->packed_len = 0;
    s->host_kv = j->ld->kv;
    j->ld->kv = NULL;
    s->host_blocks = n_blocks;
    s->host_bytes = bytes;
    s->tier = 1;
    e->tier_used[1] += bytes;
}

void mn__tier_collect(mn_engine *e) {
    if (e->n_draining) mn__tier_drain(e, false);
    tier_worker *w = e->worker;
    if (!w || atomic_load_explicit(&w->n_done, memory_order_acquire) == 0) return;
    pthread_mutex_lock(&w->mu);
    tier_job *list = w->done;
    w->done = NULL;
    atomic_store(&w->n_done, 0);
    pthread_mutex_unlock(&w->mu);
    while (list) {
        tier_job *j = list;
        list = j->next;
        mn_session *s = j->s;
        if (s && j->to == 1) {
            lift_install(e, j);
        } else if (s && j->err == MN_OK) { /* install: the T1 image gives way to the new copy */
            s->job = NULL;
            e->tier_used[1] -= s->host_bytes;
            t1_free(e, s);
            s->tier = j->to;
            int64_t bytes = j->to == 2 ? (int64_t)j->packed_len : 0;
            s->packed = j->packed;
            s->packed_len = j->packed_len;
            s->file = j->path;
            s->host_bytes = bytes;
            e->tier_used[j->to] += bytes;
            e->swapped_out[j->to] += j->to == 2 ? bytes : (int64_t)j->img.n_blocks * e->bs * mn__engine_bytes_per_token(e);
            j->packed = NULL;
            j->path = NULL;
        } else if (s) {
            s->job = NULL; /* failed (e.g. disk full): it simply stays in T1 */
        }
        job_free(j);
    }
}

void mn_engine_tier_wait(mn_engine *e) {
    tier_worker *w = e->worker;
    if (!w) return;
    pthread_mutex_lock(&w->mu);
    while (w->n_busy > 0) pthread_cond_wait(&w->idle, &w->mu);
    pthread_mutex_unlock(&w->mu);
    mn__tier_collect(e);
}

bool mn__tier_wait_any(mn_engine *e, double seconds) {
    tier_worker *w = e->worker;
    if (!w) return false;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long ns = ts.tv_nsec + (long)(seconds * 1e9);
    ts.tv_sec += ns / 1000000000L;
    ts.tv_nsec = ns % 1000000000L;
    pthread_mutex_lock(&w->mu);
    if (w->n_busy > 0 && atomic_load(&w->n_done) == 0) pthread_cond_timedwait(&w->idle, &w->mu, &ts);
    pthread_mutex_unlock(&w->mu);
    bool any = atomic_load(&w->n_done) > 0;
    mn__tier_collect(e);
    return any;
}

/* Wait for s's lift (if any) and install it. */
static void lift_settle(mn_engine *e, mn_session *s) {
    if (!mn__tier_lifting(s)) return;
    tier_job *j = s->job;
    tier_worker *w = e->worker;
    pthread_mutex_lock(&w->mu);
    while (!j->finished) pthread_cond_wait(&w->idle, &w->mu);
    pthread_mutex_unlock(&w->mu);
    mn__tier_collect(e);
}

void mn__tier_worker_free(mn_engine *e) {
    tier_worker *w = e->worker;
    if (!w) return;
    pthread_mutex_lock(&w->mu);
    w->stop = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    for (tier_job *j = w->queue, *n; j; j = n) { n = j->next; if (j->s) j->s->job = NULL; job_free(j); }
    for (tier_job *j = w->done, *n; j; j = n) { n = j->next; if (j->s) j->s->job = NULL; j->s = NULL; job_free(j); }
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    pthread_cond_destroy(&w->idle);
    mn_free(w);
    e->worker = NULL;
}

/* Free whatever s holds below T0 and forget the accounting. */
void mn__tier_drop(mn_engine *e, mn_session *s) {
    job_orphan(s);
    e->tier_used[s->tier] -= s->host_bytes;
    t1_free(e, s);
    mn_free(s->packed);
    drop_file(s);
    s->host_kv = NULL;
    s->packed = NULL;
    s->packed_len = 0;
    s->host_bytes = 0;
    s->host_blocks = 0;
}

/* The block-major KV image of s from whichever tier holds it. *owned is set when the
 * caller must free *kv (or *ld). */
static mn_err read_tier(mn_engine *e, mn_session *s, const uint16_t **kv, mn_session_loaded **ld, mn_errbuf *eb) {
    *ld = NULL;
    switch (s->tier) {
    case 1:
        wait_image(e, s);
        *kv = s->host_kv;
        return MN_OK;
    case 2: {
        mn_err err = mn_session_read_mem(s->packed, s->packed_len, e->m->fingerprint, ld, eb);
        if (err == MN_OK) *kv = (*ld)->kv;
        return err;
    }
    case 3: {
        mn_err err = mn_session_read_file(s->file, e->m->fingerprint, ld, eb);
        if (err == MN_OK) *kv = (*ld)->kv;
        return err;
    }
    default: return mn_errf(eb, MN_EINVALID, "session %s is resident", s->id);
    }
}

/* Hold seq's blocks (and their references) until `done`, then give them back: a block
 * must not be reused while its copy out may still read it. Without room to remember
 * them, wait here instead. */
static void drain_push(mn_engine *e, mn_kv_seq *seq, mn_event done) {
    if (e->n_draining == e->cap_draining) {
        int32_t cap = e->cap_draining ? 2 * e->cap_draining : 8;
        void *d = mn_realloc(e->draining, (size_t)cap * sizeof *e->draining);
        if (!d) {
            mn_errbuf ignore;
            mn_backend_event_wait(e->kv->backend, &done, &ignore);
            mn_kv_seq_release(e->kv, seq);
            return;
        }
        e->draining = d;
        e->cap_draining = cap;
    }
    e->draining[e->n_draining].blocks = seq->blocks;
    e->draining[e->n_draining].n = seq->n_blocks;
    e->draining[e->n_draining++].done = done;
    memset(seq, 0, sizeof *seq); /* the entry owns the block list now */
}

void mn__tier_drain(mn_engine *e, bool wait) {
    int32_t k = 0;
    for (int32_t i = 0; i < e->n_draining; i++) {
        mn_event *ev = &e->draining[i].done;
        mn_errbuf ignore;
        if (wait) mn_backend_event_wait(e->kv->backend, ev, &ignore);
        if (wait || mn_backend_event_done(e->kv->backend, ev)) {
            for (int32_t b = 0; b < e->draining[i].n; b++) mn_kv_block_release(e->kv, e->draining[i].blocks[b]);
            mn_free(e->draining[i].blocks);
        } else {
            e->draining[k++] = e->draining[i];
        }
    }
    e->n_draining = k;
}

/* Demote s to tier `to`. background (T0 -> T1 only): the copy out of the pool is only
 * enqueued: s is T1 at once, its image complete when s->host_ready is, and its blocks go
 * back to the pool when the copy is done (mn__tier_drain), so the engine thread does not
 * wait for it. */
static mn_err demote(mn_engine *e, mn_session *s, int to, bool background, mn_errbuf *eb) {
    if (to <= s->tier) return MN_OK;
    if (to == 3 && !e->persist_dir) return mn_errf(eb, MN_EUNSUPPORTED, "no persist directory: tier T3 (disk) is off");
    uint16_t *gathered = NULL;
    mn_buffer *gathered_buf = NULL; /* gathered is pinned: this buffer holds it */
    const uint16_t *kv = NULL;
    mn_session_loaded *ld = NULL;
    int32_t n_blocks = (s->n_computed + e->bs - 1) / e->bs;
    mn_err err;
    mn_event copied = {0};
    background = background && s->tier == 0 && to == 1;
    if (s->tier == 0) {
        err = mn__session_gather_kv(e, s, &gathered, &n_blocks, to == 1 ? &gathered_buf : NULL, background ? &copied : NULL, eb);
        kv = gathered;
    } else {
        err = read_tier(e, s, &kv, &ld, eb);
    }
    if (err != MN_OK) return err;
    mn_session_image img;
    mn__session_fill_image(e, s, kv, n_blocks, &img);
    uint8_t *packed = NULL;
    size_t packed_len = 0;
    char *path = NULL;
    int64_t bytes = 0;
    if (to == 1) {
        if (!gathered) { /* T1 from below: keep a private copy of the image */
            size_t n = (size_t)n_blocks * (size_t)mn__image_block_elems(e) * sizeof(uint16_t);
            gathered = mn_aligned_alloc(64, n ? n : 64);
            if (!gathered) err = mn_errf(eb, MN_ENOMEM, "tier T1: out of memory");
            else memcpy(gathered, kv, n);
        }
        bytes = (int64_t)n_blocks * mn__image_block_elems(e) * (int64_t)sizeof(uint16_t);
    } else if (to == 2) {
        err = mn_session_write_mem(&img, &packed, &packed_len, eb);
        bytes = (int64_t)packed_len;
    } else {
        size_t n = strlen(e->persist_dir) + 48;
        path = mn_malloc(n);
        if (!path) err = mn_errf(eb, MN_ENOMEM, "tier T3: out of memory");
        else {
            snprintf(path, n, "%s/%s.mns", e->persist_dir, s->id);
            err = mn_session_write_file(path, &img, eb);
        }
    }
    mn_session_loaded_free(ld);
    if (err != MN_OK) {
        mn_free(packed);
        mn_free(path);
        if (gathered_buf) mn_buffer_free(gathered_buf);
        else if (gathered) mn_free(gathered);
        return err;
    }
    /* the new copy is complete: now drop the old one */
    int from = s->tier;
    if (from == 0 && background) {
        drain_push(e, &s->seq, copied);
        s->host_ready = copied;
        e->demoted_background++;
    } else if (from == 0) {
        mn_kv_seq_release(e->kv, &s->seq);
        e->demoted_waited++;
    } else {
        char *keep_file = s->file;
        s->file = NULL; /* rewriting T3 over itself is not possible (to > from) */
        mn__tier_drop(e, s);
        if (keep_file) { unlink(keep_file); mn_free(keep_file); }
    }
    /* T3: the KV written to the file, as the worker's T3 writes and the T3 restores count it */
    e->swapped_out[to] += to == 3 ? (int64_t)n_blocks * e->bs * mn__engine_bytes_per_token(e) : bytes;
    s->tier = to;
    s->host_kv = to == 1 ? gathered : NULL;
    s->host_buf = to == 1 ? gathered_buf : NULL;
    if (to != 1) mn_free(gathered); /* only a T1 image is ever pinned */
    s->host_blocks = n_blocks;
    s->packed = packed;
    s->packed_len = packed_len;
    s->file = path;
    s->host_bytes = to == 3 ? 0 : bytes; /* disk has no budget here */
    e->tier_used[to] += s->host_bytes;
    (void)from;
    return MN_OK;
}

/* Push the least recently used sessions of over-budget host tiers one tier down. */
static void rebalance(mn_engine *e, const mn_session *keep) {
    for (int t = 1; t <= 2; t++) {
        while (e->tier_budget[t] && e->tier_used[t] > e->tier_budget[t]) {
            if (t == 2 && !e->persist_dir) return; /* nowhere further down: stays over budget */
            mn_session *lru = NULL;
            for (int32_t i = 0; i < e->n_sessions; i++) {
                mn_session *s = e->sessions[i];
                if (s->tier == t && s != keep && !mn__tier_lifting(s) && (!lru || s->last_use < lru->last_use)) lru = s;
            }
            mn_errbuf eb;
            if (!lru || demote(e, lru, t + 1, false, &eb) != MN_OK) return;
        }
    }
}

mn_err mn_session_demote(mn_engine *e, mn_session *s, int tier, mn_errbuf *eb) {
    if (tier < 1 || tier > 3) return mn_errf(eb, MN_ERANGE, "tier must be 1, 2 or 3, got %d", tier);
    if (s->gen) return mn_errf(eb, MN_EBUSY, "session %s is generating", s->id);
    lift_settle(e, s);
    mn_err err = MN_OK;
    if (s->tier == 0) err = mn__session_run_until_done(e, s, eb); /* compute pending tokens first */
    if (err == MN_OK) err = demote(e, s, tier, false, eb);
    if (err == MN_OK) rebalance(e, NULL);
    return err;
}

/* Find `blocks` free blocks, cheapest first: copies out that are done; blocks only the
 * prefix cache holds (no session uses them: dropping them costs no copy); copies out still
 * in flight (the reserve started them a step or more ago: usually done by now); and only
 * then a demotion whose copy this thread waits for, least recently used idle session
 * first. */
mn_err mn__tier_make_room(mn_engine *e, int32_t blocks, const mn_session *keep, mn_errbuf *eb) {
    bool evicted_prefix = false;
    if (e->kv->n_free < blocks) {
        e->short_step = e->n_steps; /* pressure: the reserve is kept for a while from now */
        mn__tier_drain(e, false);
    }
    if (e->kv->n_free < blocks) mn__prefix_evict_unused(e);
    if (e->kv->n_free < blocks && e->n_draining) { /* copies in flight: wait for them */
        e->drain_waits++;
        mn__tier_drain(e, true);
        if (e->kv->n_free < blocks) mn__prefix_evict_unused(e); /* drained blocks the cache alone holds now */
    }
    while (e->kv->n_free < blocks) {
        mn_session *lru = NULL;
        for (int32_t i = 0; i < e->n_sessions; i++) {
            mn_session *s = e->sessions[i];
            if (s == keep || s->tier != 0 || s->seq.n_blocks == 0 || s->gen || s->n_computed != s->n_tokens) continue;
            if (!lru || s->last_use < lru->last_use) lru = s;
        }
        if (lru) {
            mn_err err = demote(e, lru, 1, false, eb);
            if (err != MN_OK) return err;
            continue;
        }
        if (evicted_prefix)
            return mn_errf(eb, MN_ELIMIT, "kv pool full: %d blocks needed, %d free of %d, and no idle session to swap out",
                           blocks, e->kv->n_free, e->kv->n_blocks);
        mn__prefix_evict_unused(e);
        evicted_prefix = true;
    }
    rebalance(e, keep);
    return MN_OK;
}

/* The KV reserve. Blocks no resident session references are reclaimable without a new
 * copy: free, held only by the prefix cache (make_room drops those entries), or draining
 * (their copy out is enqueued already). While the pool has run short lately and fewer than
 * e->reserve are reclaimable, demote idle sessions to T1 in the background, least recently
 * used first: only the copies are enqueued, make_room finds the blocks a step later. A
 * session that would free nothing (every block shared with another resident one) is left
 * alone. Best effort: an error only ends the refill. */
void mn__tier_refill(mn_engine *e) {
    int32_t want = e->reserve;
    if (want <= 0 || e->kv->n_free >= want || e->n_steps - e->short_step > MN_KV_RESERVE_WINDOW) return;
    int32_t nb = e->kv->n_blocks, avail = 0;
    memset(e->held, 0, (size_t)nb * sizeof(int32_t));
    for (int32_t i = 0; i < e->n_sessions; i++) {
        const mn_session *s = e->sessions[i];
        if (s->tier == 0)
            for (int32_t b = 0; b < s->seq.n_blocks; b++) e->held[s->seq.blocks[b]]++;
    }
    for (int32_t b = 0; b < nb; b++) avail += e->held[b] == 0;
    bool demoted = false;
    while (avail < want) {
        mn_session *lru = NULL;
        for (int32_t i = 0; i < e->n_sessions; i++) {
            mn_session *s = e->sessions[i];
            if (s->tier != 0 || s->gen || s->job || s->n_computed != s->n_tokens || s->last_step + 1 >= e->n_steps) continue;
            bool frees = false;
            for (int32_t b = 0; b < s->seq.n_blocks && !frees; b++) frees = e->held[s->seq.blocks[b]] == 1;
            if (frees && (!lru || s->last_use < lru->last_use)) lru = s;
        }
        if (!lru) break;
        for (int32_t b = 0; b < lru->seq.n_blocks; b++) avail += --e->held[lru->seq.blocks[b]] == 0;
        mn_errbuf ignore;
        if (demote(e, lru, 1, true, &ignore) != MN_OK) break; /* e->held is stale now: stop */
        e->reserve_demoted++;
        demoted = true;
    }
    if (demoted) rebalance(e, NULL);
}

/* A T2 / T3 image must be this session's: its KV geometry and length (the file could have
 * been replaced under us; copying by the session's length would then overrun it). */
static mn_err check_loaded(const mn_engine *e, const mn_session *s, const mn_session_image *im, mn_errbuf *eb) {
    if (im->n_tokens != s->n_computed)
        return mn_errf(eb, MN_EMISMATCH, "session %s: its saved KV holds %d tokens, the session %d", s->id, im->n_tokens,
                       s->n_computed);
    return mn__session_check_geometry(e, im, eb);
}

/* Straight into the pool (CPU backend: its blocks are host memory): each block of the T2
 * or T3 image is checked and copied to its pool blocks as it is read, so the whole KV never
 * sits in a fresh image buffer (at 2K tokens on SmolLM2, faulting in that buffer and the
 * second copy were ~30 of the ~80 ms of a T3 turn). */
typedef struct pool_sink {
    mn_engine *e;
    mn_session *s;
} pool_sink;

static mn_err pool_sink_block(void *ctx, const mn_session_image *im, int32_t b, const uint16_t *kv, mn_errbuf *eb) {
    pool_sink *ps = ctx;
    mn_kv_pool *p = ps->e->kv;
    if (b == 0) {
        mn_err err = check_loaded(ps->e, ps->s, im, eb);
        if (err != MN_OK) return err;
    }
    if (b >= ps->s->seq.n_blocks) return mn_errf(eb, MN_EFORMAT, "session %s: saved block %d past its %d", ps->s->id, b,
                                                 ps->s->seq.n_blocks);
    mn__session_put_block(p, ps->s->seq.blocks[b], kv);
    return MN_OK;
}

static mn_err load_into_pool(mn_engine *e, mn_session *s, mn_errbuf *eb) {
    mn_kv_pool *p = e->kv;
    mn_kv_pool_sort_free(p);
    mn_err err = mn_kv_seq_reserve(p, &s->seq, s->n_computed, eb);
    if (err != MN_OK) return err;
    pool_sink ps = {e, s};
    mn_session_loaded *ld = NULL;
    err = s->tier == 3 ? mn_session_read_file_blocks(s->file, e->m->fingerprint, pool_sink_block, &ps, &ld, eb)
                       : mn_session_read_mem_blocks(s->packed, s->packed_len, e->m->fingerprint, pool_sink_block, &ps, &ld, eb);
    if (err == MN_OK) err = check_loaded(e, s, &ld->img, eb); /* also when there were no blocks */
    mn_session_loaded_free(ld);
    if (err != MN_OK) {
        mn_kv_seq_release(p, &s->seq); /* blocks some of which hold part of the image: not the session's */
        return err;
    }
    s->seq.n_tokens = s->n_computed;
    return MN_OK;
}

mn_err mn__tier_ensure_resident(mn_engine *e, mn_session *s, mn_errbuf *eb) {
    lift_settle(e, s); /* a failed lift leaves s where it was: read again below, for the error */
    if (s->tier == 0) return MN_OK;
    const uint16_t *kv;
    mn_session_loaded *ld = NULL;
    int32_t n_blocks = (s->n_computed + e->bs - 1) / e->bs;
    mn_err err = mn__tier_make_room(e, n_blocks, s, eb);
    /* $MNEME_RESTORE_VIA_IMAGE=1: the image path on the CPU backend too (bench A/B) */
    const char *vi = getenv("MNEME_RESTORE_VIA_IMAGE");
    const bool via_image = vi && !strcmp(vi, "1");
    if (err == MN_OK && (s->tier == 2 || s->tier == 3) && !e->tp && !via_image &&
        !strcmp(mn_backend_name(e->kv->backend), "cpu")) {
        err = load_into_pool(e, s, eb);
    } else {
        if (err == MN_OK) err = read_tier(e, s, &kv, &ld, eb);
        if (err == MN_OK && ld) err = check_loaded(e, s, &ld->img, eb);
        if (err == MN_OK) err = mn__session_scatter_kv(e, s, kv, s->n_computed, NULL, eb);
    }
    mn_session_loaded_free(ld);
    if (err != MN_OK) return err;
    e->swapped_in[s->tier] += s->tier == 3 ? (int64_t)n_blocks * e->bs * mn__engine_bytes_per_token(e) : s->host_bytes;
    mn__tier_drop(e, s);
    s->tier = 0;
    s->last_step = e->n_steps; /* just brought up for use: not idle for the reserve */
    return MN_OK;
}

/* Layer-wise restore. The image's copies go on the copy queue layer by layer; the next
 * forward's layer l waits (MN_OP_WAIT_COPY) only for layer l's, so the first layers
 * compute while the rest is in flight, and the engine thread only enqueues. The image
 * leaves the session at once (it is T0 now) and is retired: freed at the end of the step,
 * once the copies are surely done. */
mn_err mn__tier_restore_pipelined(mn_engine *e, mn_session *s, mn_errbuf *eb) {
    /* a job reads the image: keep it simple. TP: each rank's heads are copied out of the
     * image in turn, and the forward waits on no copy events of its ranks */
    if (s->tier != 1 || s->job || e->tp) return mn__tier_ensure_resident(e, s, eb);
    int32_t n_blocks = (s->n_computed + e->bs - 1) / e->bs, nl = e->m->cfg.n_layer;
    if (!e->restore_ready && !(e->restore_ready = mn_calloc((size_t)nl, sizeof(mn_event))))
        return mn_errf(eb, MN_ENOMEM, "out of memory");
    if (e->n_retired == e->cap_retired) {
        int32_t cap = e->cap_retired ? 2 * e->cap_retired : 8;
        void *r = mn_realloc(e->retired, (size_t)cap * sizeof *e->retired);
        if (!r) return mn_errf(eb, MN_ENOMEM, "out of memory");
        e->retired = r;
        e->cap_retired = cap;
    }
    mn_err err = mn__tier_make_room(e, n_blocks, s, eb);
    if (err == MN_OK) err = mn__session_scatter_kv(e, s, s->host_kv, s->n_computed, e->restore_ready, eb);
    if (err != MN_OK) return err; /* nothing reserved, nothing queued */
    if (mn_forward_wait_layers(e->f, e->restore_ready, eb) != MN_OK)
        mn_backend_synchronize(e->kv->backend, eb); /* cannot arm the waits (out of memory): wait here */
    e->retired[e->n_retired].kv = s->host_kv;
    e->retired[e->n_retired++].buf = s->host_buf;
    s->host_kv = NULL; /* the retired list owns it now */
    s->host_buf = NULL;
    e->swapped_in[1] += s->host_bytes;
    mn__tier_drop(e, s);
    s->tier = 0;
    s->last_step = e->n_steps;
    return MN_OK;
}

void mn__tier_restore_finish(mn_engine *e) {
    if (!e->n_retired) return;
    mn_errbuf ignore;
    mn_backend_synchronize(e->kv->backend, &ignore); /* a no-op wait when the forward ran */
    for (int32_t i = 0; i < e->n_retired; i++) {
        if (e->retired[i].buf) mn_buffer_free(e->retired[i].buf);
        else mn_free(e->retired[i].kv);
    }
    e->n_retired = 0;
}

mn_err mn_engine_demote_idle(mn_engine *e, double idle_seconds, double now, mn_errbuf *eb) {
    mn__tier_collect(e); /* an idle server calls this without steps: install finished work here too */
    for (int32_t i = 0; i < e->n_sessions; i++) {
        mn_session *s = e->sessions[i];
        if (s->gen || s->n_computed != s->n_tokens) continue;
        double idle = now - s->last_use;
        int want = idle > 4 * idle_seconds ? (e->persist_dir ? 3 : 2) : idle > 2 * idle_seconds ? 2 : idle > idle_seconds ? 1 : 0;
        if (want <= s->tier || s->job) continue;
        mn_err err = MN_OK;
        if (s->tier == 0) err = demote(e, s, 1, true, eb); /* a copy, on the copy queue */
        if (err == MN_OK && want > 1) { /* compression or a disk write: off the engine thread */
            if (s->tier == 1) wait_image(e, s); /* the worker reads the image */
            err = s->tier == 1 ? start_async(e, s, want, eb) : demote(e, s, want, false, eb);
        }
        if (err != MN_OK) return err;
    }
    rebalance(e, NULL);
    return MN_OK;
}

const char *mn__tier_name(int t) { return (unsigned)t < 4 ? tier_names[t] : "?"; }

/* A persisted session's file name: 32 lower-case hex digits (its id) + ".mns". */
static bool persisted_name(const char *name) {
    if (strlen(name) != 36 || strcmp(name + 32, ".mns") != 0) return false;
    for (int i = 0; i < 32; i++)
        if (!((name[i] >= '0' && name[i] <= '9') || (name[i] >= 'a' && name[i] <= 'f'))) return false;
    return true;
}

/* List the session saved in path (owned by this call) as a T3 session of e, restored on
 * first use. id: its id (NULL: a fresh one). */
static mn_err adopt_file(mn_engine *e, char *path, const char *id, bool keep, mn_session **out, mn_errbuf *eb) {
    /* read whole: the file is validated now (checksums, model, geometry) so a session that
     * is listed can be restored; its KV is read again on first use */
    mn_session_loaded *ld = NULL;
    mn_err err = mn_session_read_file(path, e->m->fingerprint, &ld, eb);
    const mn_lora *lora = NULL;
    if (err == MN_OK) err = mn__session_check_image(e, ld, &lora, eb);
    mn_session *s = NULL;
    if (err == MN_OK) err = mn__session_new(e, &s, eb);
    if (err == MN_OK) {
        if (id) memcpy(s->id, id, 33);
        mn__session_bind_adapter(s, lora);
        err = mn__session_add_tokens(s, ld->img.tokens, ld->img.n_tokens, MN_ROLE_NONE, eb);
        if (err == MN_OK && ld->img.n_tokens) memcpy(s->roles, ld->img.roles, (size_t)ld->img.n_tokens);
        if (err != MN_OK) mn_session_delete(e, s); /* s->file not set yet: the file stays */
    }
    if (err == MN_OK) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        s->n_computed = ld->img.n_tokens;
        s->logits_valid = false; /* the next generate recomputes the last token */
        s->tier = 3;
        s->file = path;
        s->file_kept = keep;
        s->host_blocks = ld->img.n_blocks;
        s->last_use = (double)ts.tv_sec + ts.tv_nsec * 1e-9;
        *out = s;
    } else {
        mn_free(path);
    }
    mn_session_loaded_free(ld);
    return err;
}

mn_err mn_session_adopt_file(mn_engine *e, const char *path, bool keep_file, mn_session **out, mn_errbuf *eb) {
    size_t n = strlen(path) + 1;
    char *own = mn_malloc(n);
    if (!own) return mn_errf(eb, MN_ENOMEM, "out of memory");
    memcpy(own, path, n);
    return adopt_file(e, own, NULL, keep_file, out, eb);
}

const char *mn_session_source_file(const mn_session *s) { return s->tier == 3 && s->file_kept ? s->file : NULL; }

mn_err mn_engine_adopt_persisted(mn_engine *e, int32_t *n_adopted, int32_t *n_refused, mn_errbuf *eb) {
    *n_adopted = *n_refused = 0;
    if (!e->persist_dir) return mn_errf(eb, MN_EUNSUPPORTED, "no persist directory to adopt sessions from");
    DIR *d = opendir(e->persist_dir);
    if (!d) return mn_errf(eb, MN_EIO, "persist directory %s: cannot open", e->persist_dir);
    mn_err err = MN_OK;
    struct dirent *de;
    while (err != MN_ENOMEM && (de = readdir(d)) != NULL) {
        if (!persisted_name(de->d_name)) continue;
        char id[33];
        memcpy(id, de->d_name, 32);
        id[32] = 0;
        if (mn_session_find(e, id)) continue; /* already ours (e.g. demoted by this engine) */
        size_t n = strlen(e->persist_dir) + 48;
        char *path = mn_malloc(n);
        if (!path) { err = mn_errf(eb, MN_ENOMEM, "out of memory"); break; }
        snprintf(path, n, "%s/%s", e->persist_dir, de->d_name);
        mn_session *s;
        mn_errbuf feb;
        mn_err ferr = adopt_file(e, path, id, false, &s, &feb);
        if (ferr == MN_OK) {
            (*n_adopted)++;
        } else {
            (*n_refused)++;
            if (ferr == MN_ENOMEM) err = MN_ENOMEM;
            mn_errf(eb, ferr, "%s: %s", de->d_name, feb.msg); /* the last refusal, for the caller's log */
        }
    }
    closedir(d);
    return err;
}
