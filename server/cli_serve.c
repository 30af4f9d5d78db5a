/* server/cli_serve.c — `mneme serve`: load the model, start the engine thread and the HTTP
 * transport, route requests, answer /health and /metrics, and shut down cleanly.
 *
 * Threads: main runs the libuv loop (sockets, parsing, JSON, routing); the engine thread
 * (server/engine_thread.c) runs jobs and engine steps. Shutdown on SIGINT/SIGTERM: stop
 * accepting, let streams finish until --drain-timeout, then close every connection (their
 * generations are cancelled), save every session to --persist-dir, and exit 0.
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/tp.h"
#include "server/api.h"
#include "server/cli.h"

typedef struct serve_state {
    mn_serve srv;
    uv_signal_t sigint, sigterm;
    uv_timer_t timer;
    uv_timer_t idle_timer;          /* posts idle_job: demote sessions idle for idle_seconds */
    mn_et_item idle_item;
    atomic_bool idle_queued;
    double idle_seconds;
    double drain_deadline, cancel_deadline;
    double drain_timeout;
    bool shutting_down, http_closed, saved;
    int exit_code;
} serve_state;

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- metrics and ids ------------------------------------------------------------------------------ */

static const double hist_bounds[API_HIST_N] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};

void api_hist_add(api_hist *h, double v) {
    int b = 0;
    while (b < API_HIST_N && v > hist_bounds[b]) b++;
    h->count[b]++;
    h->sum += v;
    h->n++;
}

void api_metrics_request(mn_serve *srv, const char *route, int status) {
    api_metrics *m = &srv->metrics;
    for (int i = 0; i < m->n_req; i++)
        if (m->req[i].status == status && !strcmp(m->req[i].route, route)) {
            m->req[i].n++;
            return;
        }
    if (m->n_req == (int)(sizeof m->req / sizeof m->req[0])) return;
    snprintf(m->req[m->n_req].route, sizeof m->req[0].route, "%s", route);
    m->req[m->n_req].status = status;
    m->req[m->n_req++].n = 1;
}

void api_new_id(mn_serve *srv, const char *prefix, char *out, size_t cap) {
    uint64_t x = ++srv->next_id * 0x9E3779B97F4A7C15ull ^ (uint64_t)uv_hrtime();
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    snprintf(out, cap, "%s%016llx", prefix, (unsigned long long)x);
}

typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int k = vsnprintf(b->p ? b->p + b->n : NULL, b->p ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (k < 0) return;
        if (b->p && b->n + (size_t)k < b->cap) {
            b->n += (size_t)k;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 8192;
        while (cap < b->n + (size_t)k + 1) cap *= 2;
        char *p = mn_realloc(b->p, cap);
        if (!p) return;
        b->p = p;
        b->cap = cap;
    }
}

static void hist_print(sbuf *b, const char *name, const char *help, const api_hist *h) {
    sb_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    int64_t cum = 0;
    for (int i = 0; i < API_HIST_N; i++) {
        cum += h->count[i];
        sb_printf(b, "%s_bucket{le=\"%g\"} %lld\n", name, hist_bounds[i], (long long)cum);
    }
    cum += h->count[API_HIST_N];
    sb_printf(b, "%s_bucket{le=\"+Inf\"} %lld\n%s_sum %.6f\n%s_count %lld\n", name, (long long)cum, name, h->sum, name,
              (long long)h->n);
}

static void metric_head(sbuf *b, const char *name, const char *type, const char *help) {
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* One unlabelled sample with its HELP and TYPE lines. */
static void metric_i(sbuf *b, const char *name, const char *type, const char *help, long long v) {
    metric_head(b, name, type, help);
    sb_printf(b, "%s %lld\n", name, v);
}

/* One sample per tier: name{tier="T0"} v[0] ... */
static void metric_tiers(sbuf *b, const char *name, const char *type, const char *help, const int64_t *v64,
                         const int32_t *v32) {
    metric_head(b, name, type, help);
    for (int t = 0; t < 4; t++)
        sb_printf(b, "%s{tier=\"T%d\"} %lld\n", name, t, v32 ? (long long)v32[t] : (long long)v64[t]);
}

static void respond_metrics(mn_serve *srv, mn_http_res *res) {
    api_metrics *m = &srv->metrics;
    mn_et_stats st;
    mn_et_stats_get(srv->et, &st);
    const mn_engine_stats *es = &st.engine;
    sbuf b = {0};
    metric_head(&b, "mneme_requests_total", "counter", "HTTP requests answered, by route and status.");
    for (int i = 0; i < m->n_req; i++)
        sb_printf(&b, "mneme_requests_total{route=\"%s\",status=\"%d\"} %lld\n", m->req[i].route, m->req[i].status,
                  (long long)m->req[i].n);
    metric_i(&b, "mneme_prompt_tokens_total", "counter", "Prompt tokens of finished generations.", m->prompt_tokens);
    metric_i(&b, "mneme_generated_tokens_total", "counter", "Tokens generated and delivered.", m->generated_tokens);
    metric_i(&b, "mneme_streams_active", "gauge", "Generations in progress.", srv->streams_active);
    metric_i(&b, "mneme_streams_cancelled_total", "counter", "Generations ended by a client disconnect.",
             m->streams_cancelled);
    metric_i(&b, "mneme_streams_stalled_total", "counter", "Streams ended because the client stopped reading.",
             m->streams_stalled);
    hist_print(&b, "mneme_time_to_first_token_seconds", "Time from request to the first generated token.", &m->ttft);
    hist_print(&b, "mneme_inter_token_latency_seconds", "Time between consecutive tokens of a stream.", &m->itl);
    hist_print(&b, "mneme_request_duration_seconds", "Time from request to the end of a generation.", &m->e2e);
    metric_head(&b, "mneme_batch_tokens", "histogram", "Tokens per engine step.");
    int64_t cum = 0;
    for (int i = 0; i < 11; i++) {
        cum += st.batch_hist[i];
        sb_printf(&b, "mneme_batch_tokens_bucket{le=\"%d\"} %lld\n", 1 << i, (long long)cum);
    }
    cum += st.batch_hist[11];
    sb_printf(&b, "mneme_batch_tokens_bucket{le=\"+Inf\"} %lld\n", (long long)cum);
    sb_printf(&b, "mneme_batch_tokens_sum %lld\nmneme_batch_tokens_count %lld\n", (long long)st.batch_tokens_sum,
              (long long)st.steps);
    metric_i(&b, "mneme_queue_depth", "gauge", "Jobs waiting for the engine thread.", st.jobs_queued);
    metric_head(&b, "mneme_engine_busy_seconds_total", "counter", "Time spent in engine steps.");
    sb_printf(&b, "mneme_engine_busy_seconds_total %.6f\n", st.busy_seconds);
    metric_i(&b, "mneme_sessions", "gauge", "Sessions held by the engine (with the temporary ones of requests).",
             es->n_sessions);
    metric_tiers(&b, "mneme_tier_sessions", "gauge", "Sessions whose KV is in each tier.", NULL, es->tier_sessions);
    metric_tiers(&b, "mneme_tier_bytes", "gauge", "Bytes of KV held in each tier (T1, T2 host; T0: see blocks).",
                 es->tier_bytes, NULL);
    metric_tiers(&b, "mneme_swap_out_bytes_total", "counter", "Bytes moved down to each tier.", es->swapped_out, NULL);
    metric_tiers(&b, "mneme_swap_in_bytes_total", "counter", "Bytes moved up from each tier.", es->swapped_in, NULL);
    metric_head(&b, "mneme_kv_blocks", "gauge", "KV blocks of the pool.");
    sb_printf(&b, "mneme_kv_blocks{state=\"total\"} %d\nmneme_kv_blocks{state=\"free\"} %d\n", es->blocks_total,
              es->blocks_free);
    metric_head(&b, "mneme_kv_reserve_blocks", "gauge",
                "KV blocks kept reclaimable by background demotion (0: off), and blocks held until a copy out is done.");
    sb_printf(&b, "mneme_kv_reserve_blocks{state=\"target\"} %d\nmneme_kv_reserve_blocks{state=\"draining\"} %d\n",
              es->blocks_reserve, es->blocks_draining);
    metric_head(&b, "mneme_kv_demotions_total", "counter",
                "Sessions moved out of the KV pool to T1: the engine thread waited for the copy, or only enqueued it.");
    sb_printf(&b, "mneme_kv_demotions_total{mode=\"waited\"} %lld\nmneme_kv_demotions_total{mode=\"background\"} %lld\n",
              (long long)es->demotions_waited, (long long)es->demotions_background);
    metric_i(&b, "mneme_kv_reserve_demotions_total", "counter", "Background demotions made to refill the KV reserve.",
             es->reserve_demotions);
    metric_i(&b, "mneme_kv_drain_waits_total", "counter",
             "Times blocks were needed and a copy out already in flight was waited for.", es->drain_waits);
    metric_i(&b, "mneme_kv_block_tokens", "gauge", "Tokens per KV block.", es->block_size);
    metric_i(&b, "mneme_kv_bytes_per_token", "gauge", "KV bytes per token (all layers, K and V).", es->bytes_per_token);
    metric_i(&b, "mneme_prefix_hit_tokens_total", "counter", "Tokens attached from the prefix cache.",
             es->prefix_hit_tokens);
    metric_i(&b, "mneme_computed_tokens_total", "counter", "Tokens run through the model.", es->computed_tokens);
    metric_i(&b, "mneme_sampled_backend_total", "counter", "Tokens sampled on the backend (only the id copied back).",
             es->sampled_backend);
    metric_i(&b, "mneme_sampled_host_total", "counter", "Tokens sampled on the host (bias or penalties, or sample_on host).",
             es->sampled_host);
    metric_i(&b, "mneme_logits_bytes_total", "counter", "Bytes of logits the engine steps copied to the host.",
             es->logits_bytes);
    metric_i(&b, "mneme_http_connections", "gauge", "Open client connections.",
             mn_http_server_n_connections(srv->http));
    metric_i(&b, "mneme_adapters_loaded", "gauge", "LoRA adapters loaded.", srv->n_adapters);
    metric_head(&b, "mneme_adapter_device_bytes", "gauge", "Adapter copies in device memory, and their budget (0: none).");
    sb_printf(&b, "mneme_adapter_device_bytes{state=\"resident\"} %lld\nmneme_adapter_device_bytes{state=\"budget\"} %lld\n",
              (long long)es->adapter_resident_bytes, (long long)es->adapter_budget);
    metric_i(&b, "mneme_adapter_page_ins_total", "counter", "Adapter copies made host to device.", es->adapter_page_ins);
    api_metrics_request(srv, "/metrics", 200);
    mn_http_respond(res, 200, "text/plain; version=0.0.4", b.p ? b.p : "", b.n, NULL, 0);
    mn_free(b.p);
}

/* ---- routing --------------------------------------------------------------------------------------- */

static void route_error(mn_serve *srv, mn_http_res *res, const char *route, int status, const char *type,
                        const char *fmt, const char *a, const char *b) {
    api_err e;
    api_errf(&e, status, type, NULL, fmt, a, b);
    api_err_respond(res, &e);
    api_metrics_request(srv, route, status);
}

void api_respond_405(mn_serve *srv, mn_http_res *res, const char *route, const char *allow) {
    api_err e;
    api_errf(&e, 405, "invalid_request_error", NULL, "method not allowed on %s (allowed: %s)", route, allow);
    size_t len = 0;
    char *body = api_err_body(&e, &len);
    mn_http_header h[] = {{"Allow", allow}};
    mn_http_respond(res, 405, "application/json", body ? body : "{}", body ? len : 2, h, 1);
    mn_free(body);
    api_metrics_request(srv, route, 405);
}

static void handle(void *ud, const mn_http_req *req, mn_http_res *res) {
    mn_serve *srv = ud;
    const char *p = req->path, *m = req->method;
    bool get = !strcmp(m, "GET"), post = !strcmp(m, "POST");
    if (!strcmp(p, "/health")) {
        if (!get) { api_respond_405(srv, res, "/health", "GET"); return; }
        mn_et_stats st;
        mn_et_stats_get(srv->et, &st);
        api_metrics_request(srv, "/health", 200);
        api_respond_json(res, 200,
                         json_pack("{s:s, s:s, s:i, s:I}", "status", srv->draining ? "draining" : "ok", "model",
                                   srv->model_name, "sessions", st.engine.n_sessions, "streams",
                                   (json_int_t)srv->streams_active));
        return;
    }
    if (!strcmp(p, "/metrics")) {
        if (!get) { api_respond_405(srv, res, "/metrics", "GET"); return; }
        respond_metrics(srv, res);
        return;
    }
    if (strncmp(p, "/v1/", 4) != 0) {
        route_error(srv, res, "other", 404, "not_found_error", "unknown route %s %s", m, p);
        return;
    }
    /* everything under /v1 needs a key when keys are configured */
    char owner[API_OWNER_LEN];
    bool admin = false;
    api_err ae = {0};
    if (!api_authenticate(srv, req, owner, &admin, &ae)) {
        api_err_respond(res, &ae);
        api_metrics_request(srv, "unauthorized", 401);
        return;
    }
    if (!strcmp(p, "/v1/models") || !strncmp(p, "/v1/models/", 11)) {
        if (!get) { api_respond_405(srv, res, "/v1/models", "GET"); return; }
        api_models(srv, req, res);
        return;
    }
    if (!strcmp(p, "/v1/completions") || !strcmp(p, "/v1/chat/completions")) {
        bool chat = p[4] == 'c' && p[5] == 'h';
        if (!post) { api_respond_405(srv, res, p, "POST"); return; }
        api_completions(srv, req, res, owner, chat);
        return;
    }
    if (!strncmp(p, "/v1/adapters", 12) && (p[12] == 0 || p[12] == '/')) {
        api_adapters(srv, req, res, p + 12, admin);
        return;
    }
    if (!strncmp(p, "/v1/sessions", 12) && (p[12] == 0 || p[12] == '/')) {
        api_sessions(srv, req, res, owner, p + 12);
        return;
    }
    route_error(srv, res, "other", 404, "not_found_error", "unknown route %s %s", m, p);
}

/* ---- startup and shutdown -------------------------------------------------------------------------- */

typedef struct sync_call {
    void (*fn)(void *ud);
    void *ud;
    uv_sem_t done;
    mn_et_item job;
} sync_call;

static void sync_job(void *ud) {
    sync_call *c = ud;
    c->fn(c->ud);
    uv_sem_post(&c->done);
}

void api_run_sync(mn_serve *srv, void (*fn)(void *ud), void *ud) {
    sync_call c = {.fn = fn, .ud = ud};
    uv_sem_init(&c.done, 0);
    c.job = (mn_et_item){NULL, sync_job, &c};
    mn_et_post_job(srv->et, &c.job);
    uv_sem_wait(&c.done);
    uv_sem_destroy(&c.done);
}

static void load_job(void *ud) {
    mn_serve *srv = ud;
    int n = api_sessions_load_all(srv);
    if (n > 0) fprintf(stderr, "mneme serve: %d sessions loaded from %s\n", n, srv->persist_dir);
}

static void save_job(void *ud) {
    serve_state *ss = ud;
    int n = api_sessions_save_all(&ss->srv);
    if (n < 0) ss->exit_code = 1;
    else if (ss->srv.persist_dir) fprintf(stderr, "mneme serve: %d sessions saved to %s\n", n, ss->srv.persist_dir);
}

static void free_registry_job(void *ud) { api_registry_free(ud); }

static void idle_job(void *ud) {
    serve_state *ss = ud;
    mn_errbuf eb = {{0}};
    mn_engine *e = mn_et_engine(ss->srv.et);
    /* also installs the background demotions that finished since the last call */
    if (mn_engine_demote_idle(e, ss->idle_seconds, mono(), &eb) != MN_OK)
        fprintf(stderr, "mneme serve: idle demotion: %s\n", eb.msg);
    atomic_store(&ss->idle_queued, false);
}

static void on_idle_tick(uv_timer_t *t) {
    serve_state *ss = t->data;
    if (ss->shutting_down || atomic_exchange(&ss->idle_queued, true)) return;
    mn_et_post_job(ss->srv.et, &ss->idle_item);
}

static void on_http_closed(void *ud) {
    serve_state *ss = ud;
    ss->http_closed = true;
}

static void close_handles(serve_state *ss) {
    uv_close((uv_handle_t *)&ss->sigint, NULL);
    uv_close((uv_handle_t *)&ss->sigterm, NULL);
    uv_close((uv_handle_t *)&ss->timer, NULL);
    uv_close((uv_handle_t *)&ss->idle_timer, NULL);
}

/* Shutdown steps, polled: drain -> (deadline) close connections -> save -> stop. */
static void on_shutdown_tick(uv_timer_t *t) {
    serve_state *ss = t->data;
    mn_serve *srv = &ss->srv;
    double now = mono();
    if (srv->streams_active > 0 && now < ss->drain_deadline) return;
    if (srv->streams_active > 0 && !ss->http_closed && ss->cancel_deadline == 0) {
        fprintf(stderr, "mneme serve: drain deadline passed, closing %lld streams\n", (long long)srv->streams_active);
        ss->cancel_deadline = now + 5;
        mn_http_server_close(srv->http, on_http_closed, ss);
        return;
    }
    if (srv->streams_active > 0 && now < ss->cancel_deadline) return;
    if (!ss->saved) {
        ss->saved = true;
        api_run_sync(srv, save_job, ss);
        if (!ss->http_closed && ss->cancel_deadline == 0) {
            ss->cancel_deadline = now + 5;
            mn_http_server_close(srv->http, on_http_closed, ss);
        }
    }
    if (!ss->http_closed) return;
    uv_timer_stop(t);
    api_run_sync(srv, free_registry_job, srv);
    mn_et_stop(srv->et);
    close_handles(ss);
}

static void on_signal(uv_signal_t *h, int signum) {
    serve_state *ss = h->data;
    if (ss->shutting_down) return;
    ss->shutting_down = true;
    uv_timer_stop(&ss->idle_timer);
    fprintf(stderr, "mneme serve: %s: shutting down (draining %lld streams, up to %.0f s)\n",
            signum == SIGINT ? "SIGINT" : "SIGTERM", (long long)ss->srv.streams_active, ss->drain_timeout);
    ss->srv.draining = true;
    mn_http_server_stop_accepting(ss->srv.http);
    ss->drain_deadline = mono() + ss->drain_timeout;
    uv_timer_start(&ss->timer, on_shutdown_tick, 0, 20);
}

static void serve_usage(void) {
    fprintf(stderr,
            "usage: mneme serve [-m FILE] [options]\n"
            "  --host ADDR              bind address (default 127.0.0.1)\n"
            "  --port N                 port (default 8080; 0 picks a free one)\n"
            "  --api-key-file F         one API key per line; requests need 'Authorization: Bearer KEY'\n"
            "  --admin-key-file F       keys (one per line) that may also load and unload adapters over HTTP\n"
            "  --lora-dir D             POST /v1/adapters loads only paths that resolve to inside D (without it:\n"
            "                           refused); with no keys at all, any client may load and unload adapters\n"
            "  --persist-dir D          sessions are saved here on shutdown and listed on start, each restored\n"
            "                           on first use (also tier T3)\n"
            "  --max-batch-tokens N     tokens per engine step (default 512)\n"
            "  --kv-blocks N            KV pool size in blocks of 16 tokens (default: 4 full contexts)\n"
            "  --mem-budget BYTES       device memory for the KV pool and adapter copies together (instead of\n"
            "                           --kv-blocks); --adapter-share F of it (default 0.1) holds adapters\n"
            "  --t1-budget BYTES --t2-budget BYTES   host tier budgets (0: unlimited)\n"
            "  --kv-reserve N           KV blocks kept reclaimable by demoting idle sessions in the background\n"
            "                           once the pool runs short (default: 1/8 of the pool, at least one full\n"
            "                           step; at most half; 0: off)\n"
            "  --max-body BYTES         request body limit (default 8 MiB)\n"
            "  --max-connections N      (default 4096)\n"
            "  --max-streams N          generations in progress at once; beyond: 429 (default 256, 0: no limit)\n"
            "  --max-sessions-per-key N sessions one API key may hold (all clients together without keys);\n"
            "                           creating, forking or importing beyond: 429 (default 256, 0: no limit)\n"
            "  --max-pending-write B    bytes queued to a client before its stream counts as stalled (default 1 MiB)\n"
            "  --drain-timeout S        seconds streams may run on after SIGTERM (default 10)\n"
            "  --idle-demote S          move a session's KV down a tier after S idle seconds (T1), 2S (T2),\n"
            "                           4S (T3 with --persist-dir); 0: only under memory pressure (default 60)\n"
            "  --sample-on WHERE        auto|host|backend: where generating sessions sample (default auto:\n"
            "                           the backend; bias and penalties always sample on the host)\n"
            "  --lora NAME=PATH         load a LoRA adapter (PEFT directory or GGUF LoRA file) at start-up;\n"
            "                           requests select it with model=NAME (repeatable)\n"
            "  --tp N                   tensor parallelism over N ranks (N divides the model's query and kv\n"
            "                           heads): CPU ranks of -t/N threads each (at least 1), or with --device\n"
            "                           cuda GPU r for rank r over NCCL. Sessions, tiers and saved files are as\n"
            "                           without it (a saved session holds every head: any --tp restores it);\n"
            "                           --mem-budget is then each device's, all of it for the rank's KV pool\n"
            "  -t THREADS  -c CTX  --device cpu|cuda|auto\n");
}

static bool is_serve_value_flag(const char *a) {
    static const char *const flags[] = {"--host", "--port", "--api-key-file", "--persist-dir", "--max-batch-tokens",
                                        "--kv-blocks", "--t1-budget", "--t2-budget", "--max-body", "--max-connections",
                                        "--drain-timeout", "--idle-demote", "--max-streams", "--max-pending-write",
                                        "--lora", "--max-sessions-per-key", "--admin-key-file", "--lora-dir",
                                        "--mem-budget", "--adapter-share", "--sample-on", "--kv-reserve", "--tp"};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        if (!strcmp(a, flags[i])) return true;
    return false;
}

/* Tokens per KV block of the server's engine (the pool and --mem-budget both count in these). */
enum { SERVE_BLOCK_TOKENS = 16 };

/* One device memory budget for the KV pool and the adapters' device copies. With
 * --mem-budget B: adapters get share*B (paged LRU within it, see mn_lora_registry_set_budget)
 * and the pool the blocks that fit in the rest. Without it, a GPU backend still holds the
 * adapters it runs in its own memory (no budget) and the CPU reads the host copies.
 * -1 with a message. */
static int serve_memory_split(mn_serve *srv, mn_backend *be, const mn_model *m, long budget, double share,
                              long *kv_blocks) {
    mn_errbuf eb = {{0}};
    bool cpu = !strcmp(mn_backend_name(be), "cpu");
    if (!budget) {
        if (!cpu && mn_lora_registry_set_budget(srv->adapters, be, 0, &eb) != MN_OK) {
            fprintf(stderr, "mneme serve: adapters on %s: %s\n", mn_backend_name(be), eb.msg);
            return -1;
        }
        return 0;
    }
    if (share < 0) share = 0.1;
    const mn_model_config *c = &m->cfg;
    int64_t block_bytes = (int64_t)SERVE_BLOCK_TOKENS * c->n_layer * c->n_kv_head * c->head_dim * 2 * (int64_t)sizeof(uint16_t);
    int64_t adapter_bytes = (int64_t)((double)budget * share);
    int64_t blocks = (budget - adapter_bytes) / block_bytes;
    if (blocks < 1) {
        fprintf(stderr,
                "mneme serve: --mem-budget %ld leaves %lld bytes for the KV pool after the adapters' share, "
                "less than one block (%lld bytes)\n",
                budget, (long long)(budget - adapter_bytes), (long long)block_bytes);
        return -1;
    }
    if (blocks > (1 << 24)) blocks = 1 << 24;
    *kv_blocks = (long)blocks;
    if (adapter_bytes > 0 && mn_lora_registry_set_budget(srv->adapters, be, (size_t)adapter_bytes, &eb) != MN_OK) {
        fprintf(stderr, "mneme serve: --mem-budget %ld, adapter share %lld bytes: %s\n", budget,
                (long long)adapter_bytes, eb.msg);
        return -1;
    }
    fprintf(stderr, "mneme serve: memory budget %ld bytes: KV pool %lld blocks (%lld bytes), adapters %lld bytes\n",
            budget, (long long)blocks, (long long)(blocks * block_bytes), (long long)adapter_bytes);
    return 0;
}

/* Keys, admin keys (also valid API keys) and the adapter directory; -1 with a message. */
static int serve_access(mn_serve *srv, const char *key_file, const char *admin_file, const char *lora_dir) {
    if (key_file && api_keys_load("--api-key-file", key_file, &srv->keys, &srv->n_keys)) return -1;
    if (admin_file) {
        if (api_keys_load("--admin-key-file", admin_file, &srv->admin_keys, &srv->n_admin_keys)) return -1;
        char (*k)[API_OWNER_LEN] = mn_realloc(srv->keys, (size_t)(srv->n_keys + srv->n_admin_keys) * API_OWNER_LEN);
        if (!k) return -1;
        memcpy(k + srv->n_keys, srv->admin_keys, (size_t)srv->n_admin_keys * API_OWNER_LEN);
        srv->keys = k;
        srv->n_keys += srv->n_admin_keys;
    }
    if (lora_dir) {
        char real[PATH_MAX];
        struct stat st;
        errno = 0;
        if (!realpath(lora_dir, real) || stat(real, &st) != 0 || !S_ISDIR(st.st_mode)) {
            fprintf(stderr, "mneme serve: --lora-dir %s: %s\n", lora_dir, errno ? strerror(errno) : "not a directory");
            return -1;
        }
        if (!(srv->lora_dir = mn_malloc(strlen(real) + 1))) return -1;
        memcpy(srv->lora_dir, real, strlen(real) + 1);
    }
    return 0;
}

static void serve_access_free(mn_serve *srv) {
    mn_free(srv->keys);
    mn_free(srv->admin_keys);
    mn_free(srv->lora_dir);
    srv->keys = srv->admin_keys = NULL;
    srv->lora_dir = NULL;
}

static void model_stem(const char *path, char *out, size_t cap) {
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    size_t n = strlen(b);
    if (n > 5 && !strcmp(b + n - 5, ".gguf")) n -= 5;
    if (n >= cap) n = cap - 1;
    memcpy(out, b, n);
    out[n] = 0;
}

/* --tp N > 1: what the server cannot do over a group yet. -1 with a message. */
/* --tp N > 1 with --mem-budget B: B is each device's, and each rank's pool holds n_kv_head / N
 * heads, so it gets the blocks of that size that fit in B. Before the ranks exist (their
 * pools are made with them), from the file's metadata. Adapters stay host copies under TP
 * (CPU ranks read them; CUDA ranks refuse them), so no share of B is set aside for them and
 * --adapter-share is refused. -1 with a message. */
static int serve_tp_memory(const cli_model_opts *mo, int tp, long budget, double share, long *kv_blocks) {
    if (share >= 0) {
        fprintf(stderr, "mneme serve: --adapter-share with --tp %d: adapters under tensor parallelism are host copies, "
                "so all of --mem-budget goes to each rank's KV pool\n", tp);
        return -1;
    }
    const char *path = mo->model ? mo->model : cli_default_model();
    mn_model_config c;
    mn_errbuf eb = {{0}};
    if (mn_model_read_config(path, &c, &eb) != MN_OK) {
        fprintf(stderr, "mneme serve: %s: %s\n", path, eb.msg);
        return -1;
    }
    if (c.n_kv_head % tp != 0) return 0; /* loading the group names the mismatch */
    int64_t block_bytes = (int64_t)SERVE_BLOCK_TOKENS * c.n_layer * (c.n_kv_head / tp) * c.head_dim * 2 * (int64_t)sizeof(uint16_t);
    int64_t blocks = budget / block_bytes;
    if (blocks < 1) {
        fprintf(stderr, "mneme serve: --mem-budget %ld is less than one KV block of a rank at --tp %d (%lld bytes)\n",
                budget, tp, (long long)block_bytes);
        return -1;
    }
    if (blocks > (1 << 24)) blocks = 1 << 24;
    *kv_blocks = (long)blocks;
    fprintf(stderr, "mneme serve: memory budget %ld bytes per device: each of %d ranks' KV pools %lld blocks (%lld bytes)\n",
            budget, tp, (long long)blocks, (long long)(blocks * block_bytes));
    return 0;
}

int cmd_serve(int argc, char **argv) {
    cli_model_opts mo = {0};
    const char *host = "127.0.0.1", *key_file = NULL, *persist = NULL, *admin_file = NULL, *lora_dir = NULL;
    long max_streams = 256, max_pending = 0, max_sessions = 256;
    long port = 8080, max_batch = 0, kv_blocks = 0, max_conn = 0, t1 = 0, t2 = 0, max_body = 0;
    long mem_budget = 0, kv_reserve = -1; /* -1: the engine's default */
    long tp = 1;
    double drain = 10, idle = 60, adapter_share = -1;
    mn_sample_on sample_on = MN_SAMPLE_ON_AUTO;
    const char *loras[64];
    int n_loras = 0;
    for (int i = 1; i < argc; i++) {
        int r = cli_model_opt(argc, argv, &i, &mo);
        if (r < 0) return 2;
        if (r) continue;
        const char *a = argv[i], *v;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { serve_usage(); return 0; }
        if (!is_serve_value_flag(a)) {
            fprintf(stderr, "mneme serve: unknown option '%s'\n", a);
            serve_usage();
            return 2;
        }
        if (cli_value(argc, argv, &i, &v)) return 2;
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) { if (cli_int(a, v, 0, 65535, &port)) return 2; }
        else if (!strcmp(a, "--api-key-file")) key_file = v;
        else if (!strcmp(a, "--admin-key-file")) admin_file = v;
        else if (!strcmp(a, "--lora-dir")) lora_dir = v;
        else if (!strcmp(a, "--sample-on")) {
            if (!strcmp(v, "auto")) sample_on = MN_SAMPLE_ON_AUTO;
            else if (!strcmp(v, "host")) sample_on = MN_SAMPLE_ON_HOST;
            else if (!strcmp(v, "backend")) sample_on = MN_SAMPLE_ON_BACKEND;
            else { fprintf(stderr, "mneme serve: --sample-on must be auto, host or backend, got '%s'\n", v); return 2; }
        }
        else if (!strcmp(a, "--persist-dir")) persist = v;
        else if (!strcmp(a, "--tp")) { if (cli_int(a, v, 1, 64, &tp)) return 2; }
        else if (!strcmp(a, "--max-batch-tokens")) { if (cli_int(a, v, 1, 1 << 16, &max_batch)) return 2; }
        else if (!strcmp(a, "--kv-blocks")) { if (cli_int(a, v, 1, 1 << 24, &kv_blocks)) return 2; }
        else if (!strcmp(a, "--mem-budget")) { if (cli_int(a, v, 1, 0x7fffffffffffffffL, &mem_budget)) return 2; }
        else if (!strcmp(a, "--adapter-share")) { if (cli_float(a, v, 0, 0.9, &adapter_share)) return 2; }
        else if (!strcmp(a, "--kv-reserve")) { if (cli_int(a, v, 0, 1 << 24, &kv_reserve)) return 2; }
        else if (!strcmp(a, "--t1-budget")) { if (cli_int(a, v, 0, 0x7fffffffffffffffL, &t1)) return 2; }
        else if (!strcmp(a, "--t2-budget")) { if (cli_int(a, v, 0, 0x7fffffffffffffffL, &t2)) return 2; }
        else if (!strcmp(a, "--max-body")) { if (cli_int(a, v, 1024, 1L << 32, &max_body)) return 2; }
        else if (!strcmp(a, "--max-connections")) { if (cli_int(a, v, 1, 1 << 20, &max_conn)) return 2; }
        else if (!strcmp(a, "--drain-timeout")) { if (cli_float(a, v, 0, 3600, &drain)) return 2; }
        else if (!strcmp(a, "--idle-demote")) { if (cli_float(a, v, 0, 1e6, &idle)) return 2; }
        else if (!strcmp(a, "--max-streams")) { if (cli_int(a, v, 0, 1 << 20, &max_streams)) return 2; }
        else if (!strcmp(a, "--max-sessions-per-key")) { if (cli_int(a, v, 0, 1 << 24, &max_sessions)) return 2; }
        else if (!strcmp(a, "--max-pending-write")) { if (cli_int(a, v, 1, 1L << 32, &max_pending)) return 2; }
        else if (!strcmp(a, "--lora")) {
            if (!strchr(v, '=') || v[0] == '=' || !strchr(v, '=')[1]) {
                fprintf(stderr, "mneme serve: --lora %s: expected NAME=PATH\n", v);
                return 2;
            }
            if (n_loras == (int)(sizeof loras / sizeof loras[0])) {
                fprintf(stderr, "mneme serve: at most %d --lora at start-up (POST /v1/adapters loads more)\n", n_loras);
                return 2;
            }
            loras[n_loras++] = v;
        }
    }
    json_set_alloc_funcs(mn_malloc, mn_free);

    static serve_state ss;   /* signal and timer handles point into it until the loop ends */
    memset(&ss, 0, sizeof ss);
    mn_serve *srv = &ss.srv;
    ss.drain_timeout = drain;
    ss.idle_seconds = idle;
    srv->max_streams = (int)max_streams;
    srv->max_sessions_per_key = (int)max_sessions;
    srv->created = (int64_t)time(NULL);
    if (mem_budget && kv_blocks) {
        fprintf(stderr, "mneme serve: --mem-budget and --kv-blocks both size the KV pool: give one\n");
        return 2;
    }
    if (adapter_share >= 0 && !mem_budget) {
        fprintf(stderr, "mneme serve: --adapter-share is a share of --mem-budget, which is not given\n");
        return 2;
    }
    if (tp > 1 && mem_budget && serve_tp_memory(&mo, (int)tp, mem_budget, adapter_share, &kv_blocks)) return 2;
    srv->persist_dir = persist;
    if (serve_access(srv, key_file, admin_file, lora_dir)) {
        serve_access_free(srv);
        return 2;
    }

    mn_backend *be;
    mn_model *m;
    mn_tp *group = NULL;
    if (tp > 1 ? cli_load_tp(&mo, (int)tp, SERVE_BLOCK_TOKENS, (int32_t)kv_blocks, 1, &group, &be, &m) : cli_load(&mo, &be, &m)) {
        serve_access_free(srv);
        return 1;
    }
    if (group) kv_blocks = 0; /* the group's pool has them */
    srv->model = m;
    srv->n_ctx = m->cfg.n_ctx;
    model_stem(mo.model ? mo.model : cli_default_model(), srv->model_name, sizeof srv->model_name);

    mn_errbuf eb = {{0}};
    /* adapters first: sessions saved under one are restored (load_job) only when it is loaded */
    if (mn_lora_registry_new(m, &srv->adapters, &eb) != MN_OK) {
        fprintf(stderr, "mneme serve: %s\n", eb.msg);
        cli_release(group, be, m);
        serve_access_free(srv);
        return 1;
    }
    for (int i = 0; i < n_loras; i++) {
        char name[API_ADAPTER_NAME_LEN];
        const char *eq = strchr(loras[i], '=');
        size_t nn = (size_t)(eq - loras[i]);
        api_err ae = {0};
        if (api_adapter_name_check(loras[i], nn, "name", &ae)) {
            memcpy(name, loras[i], nn);
            name[nn] = 0;
            if (api_adapter_load(srv, name, eq + 1, &ae)) continue;
        }
        fprintf(stderr, "mneme serve: --lora %s: %s\n", loras[i], ae.message);
        api_adapters_free(srv);
        mn_lora_registry_free(srv->adapters);
        cli_release(group, be, m);
        serve_access_free(srv);
        return 1;
    }
    srv->n_adapters = n_loras;
    if (n_loras) fprintf(stderr, "mneme serve: %d adapter%s loaded\n", n_loras, n_loras == 1 ? "" : "s");
    /* under --tp the adapters stay host copies, which every CPU rank reads (mn_tp_run_lora) */
    if (!group && serve_memory_split(srv, be, m, mem_budget, adapter_share, &kv_blocks)) {
        api_adapters_free(srv);
        mn_lora_registry_free(srv->adapters);
        cli_release(group, be, m);
        serve_access_free(srv);
        return 1;
    }
    mn_engine_params ep = {.block_size = SERVE_BLOCK_TOKENS, .max_batch_tokens = (int32_t)max_batch, .n_blocks = (int32_t)kv_blocks, .t1_budget = t1,
                           .t2_budget = t2, .persist_dir = persist, .adapters = srv->adapters, .sample_on = sample_on,
                           .kv_reserve = kv_reserve < 0 ? 0 : kv_reserve == 0 ? MN_KV_RESERVE_OFF : (int32_t)kv_reserve};
    mn_engine *e = NULL;
    if ((group ? mn_engine_new_tp(group, &ep, &e, &eb) : mn_engine_new(m, &ep, &e, &eb)) != MN_OK) {
        fprintf(stderr, "mneme serve: %s\n", eb.msg);
        api_adapters_free(srv);
        mn_lora_registry_free(srv->adapters);
        cli_release(group, be, m);
        serve_access_free(srv);
        return 1;
    }
    uv_loop_t *loop = uv_default_loop();
    srv->loop = loop;
    int rc = 0;
    if (mn_et_start(loop, e, &srv->et, &eb) != MN_OK) {
        fprintf(stderr, "mneme serve: %s\n", eb.msg);
        rc = 1;
    }
    if (!rc) api_run_sync(srv, load_job, srv);
    mn_http_limits lim = mn_http_limits_default();
    if (max_body) lim.max_body_bytes = (size_t)max_body;
    if (max_conn) lim.max_connections = (int)max_conn;
    if (max_pending) lim.max_pending_write = (size_t)max_pending;
    srv->max_pending_write = lim.max_pending_write;
    if (!rc && mn_http_server_new(loop, host, (int)port, &lim, handle, srv, &srv->http, &eb) != MN_OK) {
        fprintf(stderr, "mneme serve: %s\n", eb.msg);
        rc = 1;
        api_run_sync(srv, free_registry_job, srv);
        mn_et_stop(srv->et);
    }
    if (!rc) {
        uv_signal_init(loop, &ss.sigint);
        uv_signal_init(loop, &ss.sigterm);
        uv_timer_init(loop, &ss.timer);
        uv_timer_init(loop, &ss.idle_timer);
        ss.sigint.data = ss.sigterm.data = ss.timer.data = ss.idle_timer.data = &ss;
        ss.idle_item = (mn_et_item){NULL, idle_job, &ss};
        if (idle > 0) {
            uint64_t every = (uint64_t)(idle * 1000 / 4);
            uv_timer_start(&ss.idle_timer, on_idle_tick, every ? every : 1, every ? every : 1);
        }
        uv_signal_start(&ss.sigint, on_signal, SIGINT);
        uv_signal_start(&ss.sigterm, on_signal, SIGTERM);
        fprintf(stderr, "mneme serve: listening on http://%s:%d (model %s, %s backend, %d threads%s, context %d", host,
                mn_http_server_port(srv->http), srv->model_name, mn_backend_name(be), be->n_threads,
                group ? " per rank" : "", srv->n_ctx);
        if (group) fprintf(stderr, ", %d tensor-parallel ranks", mn_tp_size(group));
        fprintf(stderr, ")\n");
        fflush(stderr);
        uv_run(loop, UV_RUN_DEFAULT);
        rc = ss.exit_code;
    }
    uv_run(loop, UV_RUN_DEFAULT);   /* close callbacks */
    if (srv->http) mn_http_server_free(srv->http);
    mn_engine_free(e);   /* a generation still alive ends here: its callbacks post to the stopped et (no-ops) */
    mn_et_free(srv->et);
    uv_loop_close(loop);
    api_adapters_free(srv);
    mn_lora_registry_free(srv->adapters);   /* after the engine that borrowed it */
    for (int i = 0; persist && i < srv->n_saved_engine_ids; i++) { /* saved: their T3 copies are redundant */
        char path[4200];
        snprintf(path, sizeof path, "%s/%s.mns", persist, srv->saved_engine_ids[i]);
        unlink(path);
    }
    mn_free(srv->saved_engine_ids);
    cli_release(group, be, m);
    serve_access_free(srv);
    if (!rc) fprintf(stderr, "mneme serve: stopped\n");
    return rc;
}
