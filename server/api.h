/* server/api.h — what the HTTP handlers of `mneme serve` share: the server context, the
 * generation stream used by the OpenAI routes and the session generate route, the
 * session registry (engine thread), and metrics.
 *
 * Threads: handlers (api_*_handle) run on the loop thread; they parse and validate the
 * request there, then hand the engine work as jobs (server/engine_thread.h). Functions
 * marked "engine thread" run only inside jobs or engine callbacks.
 */
#ifndef MN_API_H
#define MN_API_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "engine/model.h"
#include "engine/session.h"
#include "server/engine_thread.h"
#include "server/http.h"
#include "server/json_util.h"

#define API_OWNER_LEN 33   /* 32 hex digits of XXH3-128 of the API key ("" without keys) */
#define API_HIST_N 14
#define API_ADAPTER_NAME_LEN 128   /* with the NUL, as mn_lora.name */

/* Latency histogram (seconds), Prometheus style (cumulative when printed). */
typedef struct api_hist {
    int64_t count[API_HIST_N + 1];   /* last: +Inf */
    double sum;
    int64_t n;
} api_hist;

typedef struct api_metrics {            /* loop thread only */
    int64_t prompt_tokens, generated_tokens;
    int64_t streams_active, streams_cancelled, streams_stalled;
    api_hist ttft, itl, e2e;
    struct { char route[40]; int status; int64_t n; } req[128];
    int n_req;
} api_metrics;

typedef struct api_registry api_registry;   /* engine thread only */

typedef struct mn_serve {
    uv_loop_t *loop;
    mn_http_server *http;
    mn_et *et;
    const mn_model *model;       /* immutable after load: the loop thread may read names only */
    char model_name[128];
    int64_t created;             /* unix seconds at start */
    char (*keys)[API_OWNER_LEN]; /* hashes of the API keys, admin keys included; NULL: no auth */
    int n_keys;
    char (*admin_keys)[API_OWNER_LEN]; /* hashes of the admin keys (--admin-key-file) */
    int n_admin_keys;
    char *lora_dir;              /* realpath of --lora-dir (mn_malloc); NULL: POST /v1/adapters refused */
    const char *persist_dir;
    size_t max_pending_write;    /* a stream with more unsent bytes is stalled */
    int32_t n_ctx;
    bool draining;               /* shutting down: new generations get 503 */
    int64_t streams_active;      /* loop thread */
    int max_streams;             /* generations in progress beyond which requests get 429 (0: no limit) */
    int max_sessions_per_key;    /* registered sessions one key may hold; beyond: 429 (0: no limit) */
    api_metrics metrics;
    api_registry *reg;           /* engine thread */
    char (*saved_engine_ids)[33];  /* engine ids of the sessions saved at shutdown: their T3 files
                                    * (kept by mn_engine_free) are removed afterwards */
    int n_saved_engine_ids;
    uint64_t next_id;
    mn_lora_registry *adapters;  /* owned by cmd_serve, borrowed by the engine: engine thread once it runs */
    json_t *adapter_info;        /* engine thread: adapter name -> {path, created} */
    int n_adapters;              /* loop thread: adapters loaded, for /metrics */
} mn_serve;

/** Observe one value into a histogram (loop thread). */
void api_hist_add(api_hist *h, double v);
/** Record one answered request for /metrics. */
void api_metrics_request(mn_serve *srv, const char *route, int status);
/** 405 with an Allow header, counted in the metrics. */
void api_respond_405(mn_serve *srv, mn_http_res *res, const char *route, const char *allow);
/** A fresh "prefix-<hex>" id for responses. */
void api_new_id(mn_serve *srv, const char *prefix, char *out, size_t cap);

/* ---- keys and permissions (server/api_auth.c) ---- */
/** The owner id (hex XXH3-128) of an API key of n bytes. */
void api_owner_of_key(const char *key, size_t n, char out[API_OWNER_LEN]);
/** Append the hashes of the keys in file path (one per line, blank lines and '#' comments
 *  skipped) to *keys / *n_keys (mn_realloc; the caller frees *keys). -1 with a message on
 *  stderr naming flag: unreadable file, an over-long key, no key at all. */
int api_keys_load(const char *flag, const char *path, char (**keys)[API_OWNER_LEN], int *n_keys);
/** The caller's owner id ("" without keys) and whether its key is an admin key; false with
 *  401 (code invalid_api_key) for a missing or unknown key. */
bool api_authenticate(mn_serve *srv, const mn_http_req *req, char owner[API_OWNER_LEN], bool *admin, api_err *err);
/** May this caller load (load true) or unload adapters over HTTP? false with 403 (code
 *  admin_required, or path_not_allowed naming path for a load without --lora-dir); the
 *  policy is in api_auth.c's header comment and docs/api.md. */
bool api_adapter_admin_check(const mn_serve *srv, bool admin, bool load, api_err *err);
/** Resolve the path a client gave for an adapter (relative: against dir) with realpath into
 *  out; false with 403 naming path unless it, and for a directory its adapter_config.json and
 *  adapter_model.safetensors, resolve to inside dir (dir: a realpath). Missing is the same
 *  403 as outside. Touches the file system: call it off the loop thread. */
bool api_adapter_path_resolve(const char *dir, const char *given, char *out, size_t cap, api_err *err);

/* ---- adapters and models (server/api_adapters.c) ---- */
/** GET /v1/models and /v1/models/{id}: the base model and every loaded adapter. */
void api_models(mn_serve *srv, const mn_http_req *req, mn_http_res *res);
/** Route /v1/adapters...; rest is the path after "/v1/adapters"; admin: the caller's key is
 *  an admin key. A load reads and parses the files on a libuv worker thread and only
 *  installs the adapter on the engine thread. */
void api_adapters(mn_serve *srv, const mn_http_req *req, mn_http_res *res, const char *rest, bool admin);
/** Before the engine thread starts: load path under name into srv->adapters. 409 for a
 *  name already loaded or the base model's, 400 with the loader's message for a bad file. */
bool api_adapter_load(mn_serve *srv, const char *name, const char *path, api_err *err);
/** A name usable for an adapter (1..127 bytes, no spaces, control characters, '/', '?', '%',
 *  '#': it appears in URL paths); false with err naming field otherwise. */
bool api_adapter_name_check(const char *name, size_t len, const char *field, api_err *err);
/** Free srv->adapter_info (after the engine thread stopped). */
void api_adapters_free(mn_serve *srv);

/* ---- OpenAI routes (server/api_openai.c) ---- */
void api_completions(mn_serve *srv, const mn_http_req *req, mn_http_res *res, const char *owner, bool chat);

/* ---- generation streams, shared with the session API ---- */
typedef enum api_gen_kind { API_GEN_COMPLETION, API_GEN_CHAT, API_GEN_SESSION } api_gen_kind;

typedef struct api_gen_opts {
    mn_gen_params gp;        /* gp.stops point into stops_json */
    const char *stops_buf[16];
    bool stream, include_usage;
    bool logprobs;           /* report logprobs */
    int32_t top_logprobs;    /* alternatives per token */
} api_gen_opts;

/** Parse the sampling and length fields shared by all generate requests
 *  (max_tokens / max_completion_tokens, temperature, top_p, top_k, min_p, seed, stop,
 *  penalties, logprobs, stream, stream_options). stops point into body. */
bool api_gen_parse(mn_serve *srv, json_t *body, api_gen_kind kind, api_gen_opts *o, api_err *err);
/** Start a generation on session_id (API_GEN_SESSION: a registered session owned by owner)
 *  or on a temporary session built from body (prompt or messages). Takes a reference to
 *  body. Answers res when done (or streams into it). */
void api_gen_run(mn_serve *srv, api_gen_kind kind, json_t *body, const api_gen_opts *o, const char *session_id,
                 const char *owner, mn_http_res *res);

/** Where a generation's output goes when it is not an HTTP response (a WebSocket). Both
 *  run on the loop thread. on_token gets each token event ({"t": id, "x": text, ...});
 *  false stops the generation as api_gen_interrupt does. on_end runs once, last: err is
 *  NULL on success; after an interrupt fin is CANCELLED and n_gen the delivered count. */
typedef struct api_gen api_gen;
typedef struct api_gen_sink {
    bool (*on_token)(void *ud, json_t *ev);
    void (*on_end)(void *ud, const api_err *err, mn_finish fin, int32_t n_prompt, int32_t n_gen);
    void *ud;
} api_gen_sink;
/** api_gen_run for a registered session, with output to sink. NULL with err filled when it
 *  cannot start (then no callback runs); the handle is valid until on_end returns. */
api_gen *api_gen_run_sink(mn_serve *srv, json_t *body, const api_gen_opts *o, const char *session_id, const char *owner,
                          const api_gen_sink *sink, api_err *err);
/** Stop g within one step; its session keeps only the tokens already delivered. */
void api_gen_interrupt(api_gen *g);

/* ---- session API (server/api_sessions.c) ---- */
/** Route /v1/sessions...; path is after "/v1/sessions". */
void api_sessions(mn_serve *srv, const mn_http_req *req, mn_http_res *res, const char *owner, const char *rest);
/** Engine thread: the session registered under id for owner, or NULL (unknown or not the
 *  owner's: both are 404 to the caller). */
mn_session *api_registry_find(mn_serve *srv, const char *id, const char *owner);
/** Engine thread: persist every registered session to srv->persist_dir with a map of ids
 *  and owners; returns the number saved, -1 on a failure (printed). */
int api_sessions_save_all(mn_serve *srv);
/** Engine thread: load the sessions a previous run saved (before serving). */
int api_sessions_load_all(mn_serve *srv);
/** Engine thread: free the registry (sessions stay with the engine). */
void api_registry_free(mn_serve *srv);
/** Run fn on the engine thread and wait for it (startup/shutdown only: blocks the caller). */
void api_run_sync(mn_serve *srv, void (*fn)(void *ud), void *ud);

#endif
