/* server/api_sessions.c — the session API: /v1/sessions..., and persistence of the
 * registered sessions across restarts.
 *
 * The registry maps a public session id to the engine session and the owner (hash of the
 * API key that created it). It lives on the engine thread: every operation here is an
 * rpc job that runs there and answers through an event. A public id is the engine's id
 * when the session is created; a session loaded after a restart gets a new engine id but
 * keeps its public one (the map file in the persist directory carries id and owner).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/tokenizer.h"
#include "server/api.h"

#define MAP_FILE "serve-sessions.json"

typedef struct reg_entry {
    char id[33];
    char owner[API_OWNER_LEN];
    mn_session *s;
    int64_t created;
} reg_entry;

struct api_registry {
    reg_entry *v;
    int32_t n, cap;
    json_t *unloaded;   /* map entries whose file did not load this run: kept, never swept */
};

static api_registry *reg_get(mn_serve *srv) {
    if (!srv->reg) srv->reg = mn_calloc(1, sizeof *srv->reg);
    return srv->reg;
}

static reg_entry *reg_find(mn_serve *srv, const char *id) {
    api_registry *r = reg_get(srv);
    for (int32_t i = 0; r && i < r->n; i++)
        if (!strcmp(r->v[i].id, id)) return &r->v[i];
    return NULL;
}

static bool reg_add(mn_serve *srv, const char *id, const char *owner, mn_session *s, int64_t created) {
    api_registry *r = reg_get(srv);
    if (!r) return false;
    if (r->n == r->cap) {
        int32_t cap = r->cap ? r->cap * 2 : 16;
        reg_entry *v = mn_realloc(r->v, (size_t)cap * sizeof *v);
        if (!v) return false;
        r->v = v;
        r->cap = cap;
    }
    reg_entry *e = &r->v[r->n++];
    snprintf(e->id, sizeof e->id, "%s", id);
    snprintf(e->owner, sizeof e->owner, "%s", owner);
    e->s = s;
    e->created = created;
    return true;
}

static void reg_remove(mn_serve *srv, reg_entry *e) {
    api_registry *r = srv->reg;
    *e = r->v[--r->n];
}

mn_session *api_registry_find(mn_serve *srv, const char *id, const char *owner) {
    reg_entry *e = reg_find(srv, id);
    return e && !strcmp(e->owner, owner) ? e->s : NULL;
}

void api_registry_free(mn_serve *srv) {
    if (!srv->reg) return;
    json_decref(srv->reg->unloaded);
    mn_free(srv->reg->v);
    mn_free(srv->reg);
    srv->reg = NULL;
}

/* ---- rpc: one request run on the engine thread ----------------------------------------------- */

typedef enum op {
    OP_CREATE, OP_LIST, OP_GET, OP_DELETE, OP_MESSAGES, OP_FORK, OP_REWIND, OP_SAVE, OP_EXPORT, OP_IMPORT, OP_WS_OPEN
} op;

typedef struct ws_conn ws_conn;

typedef struct rpc {
    mn_serve *srv;
    mn_et_item job, ev;
    op op;
    const char *route;
    char id[40], owner[API_OWNER_LEN];
    json_t *in;
    mn_http_res *res;
    int status;
    json_t *out;
    api_err err;
    uint8_t *blob;           /* import: the body; export: the bytes (mn_malloc) */
    size_t blob_len;
    ws_conn *wc;             /* answer on this WebSocket instead of res */
} rpc;

static json_t *session_json(mn_serve *srv, reg_entry *re, bool full) {
    mn_engine *e = mn_et_engine(srv->et);
    mn_session_info info;
    mn_session_info_get(e, re->s, &info);
    json_t *j =
        json_pack("{s:s, s:s, s:I, s:i, s:i, s:I, s:s, s:b}", "id", re->id, "object", "session", "created",
                  (json_int_t)re->created, "n_tokens", info.n_tokens, "n_computed", info.n_computed, "kv_bytes",
                  (json_int_t)info.kv_bytes, "tier", info.tier ? info.tier : "T0", "busy", mn_session_busy(re->s));
    const char *adapter = mn_session_adapter(re->s);
    if (j) json_object_set_new(j, "adapter", adapter ? json_string(adapter) : json_null());
    if (!full || !j) return j;
    const uint8_t *roles = NULL;
    int32_t n = 0;
    const int32_t *toks = mn_session_tokens(re->s, &roles, &n);
    json_t *ta = json_array();
    for (int32_t i = 0; i < n; i++) json_array_append_new(ta, json_integer(toks[i]));
    json_object_set_new(j, "tokens", ta);
    /* transcript without hidden thoughts */
    int32_t *vis = mn_malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    int32_t nv = 0;
    for (int32_t i = 0; vis && i < n; i++)
        if (roles[i] != MN_ROLE_THOUGHT) vis[nv++] = toks[i];
    char *text = NULL;
    size_t len = 0;
    mn_errbuf eb;
    if (vis && mn_detokenize(srv->model->tok, vis, nv, true, &text, &len, &eb) == MN_OK) {
        json_object_set_new(j, "text", ju_string_lossy(text, len));
        mn_free(text);
    }
    mn_free(vis);
    return j;
}

static void rpc_fail_mn(rpc *r, mn_err err, const char *msg, const char *param) {
    api_err_from_mn(&r->err, err, msg, param);
}

static bool rpc_lookup(rpc *r, reg_entry **out) {
    reg_entry *e = reg_find(r->srv, r->id);
    if (!e || strcmp(e->owner, r->owner) != 0) { /* another key's session looks exactly like a missing one */
        api_errf(&r->err, 404, "not_found_error", NULL, "session '%s' not found", r->id);
        return false;
    }
    *out = e;
    return true;
}

static void saved_path(mn_serve *srv, const char *id, char *out, size_t cap) {
    snprintf(out, cap, "%s/saved-%s.mns", srv->persist_dir, id);
}

static void register_new(rpc *r, mn_session *s) {
    mn_serve *srv = r->srv;
    if (!reg_add(srv, mn_session_id(s), r->owner, s, (int64_t)time(NULL))) {
        mn_session_delete(mn_et_engine(srv->et), s);
        api_errf(&r->err, 503, "server_error", NULL, "out of memory");
        return;
    }
    r->status = 200;
    r->out = session_json(srv, reg_find(srv, mn_session_id(s)), false);
}

/* false with 429 when owner already holds --max-sessions-per-key sessions (0: no limit).
 * Counted here, on the engine thread, where the registry changes: no race with a create in flight. */
static bool under_session_limit(rpc *r) {
    mn_serve *srv = r->srv;
    if (srv->max_sessions_per_key <= 0 || !srv->reg) return true;
    int32_t n = 0;
    for (int32_t i = 0; i < srv->reg->n; i++) n += !strcmp(srv->reg->v[i].owner, r->owner);
    if (n < srv->max_sessions_per_key) return true;
    api_errf(&r->err, 429, "rate_limit_error", NULL,
             "%s already holds %d sessions, the limit of this server (--max-sessions-per-key %d): delete one "
             "(DELETE /v1/sessions/{id}) before creating, forking or importing another",
             srv->keys ? "this API key" : "this server", n, srv->max_sessions_per_key);
    snprintf(r->err.code, sizeof r->err.code, "session_limit_reached");
    return false;
}

static void rpc_job(void *ud) {
    rpc *r = ud;
    mn_serve *srv = r->srv;
    mn_engine *e = mn_et_engine(srv->et);
    mn_errbuf eb = {{0}};
    mn_err err = MN_OK;
    reg_entry *re = NULL;
    mn_session *s = NULL;
    switch (r->op) {
    case OP_CREATE: {
        if (!under_session_limit(r)) break;
        const char *system = NULL;
        json_t *sv = json_object_get(r->in, "system");
        if (sv && json_is_string(sv)) system = json_string_value(sv);
        if ((err = mn_session_create(e, NULL, &s, &eb)) != MN_OK) { rpc_fail_mn(r, err, eb.msg, NULL); break; }
        const char *adapter = json_string_value(json_object_get(r->in, "adapter"));
        if (adapter && strcmp(adapter, srv->model_name) != 0 && /* the base model's name: no adapter */
            (err = mn_session_set_adapter(e, s, adapter, &eb)) != MN_OK) {
            mn_session_delete(e, s);
            rpc_fail_mn(r, err, eb.msg, "adapter");
            break;
        }
        if (system && (err = mn_session_submit_text(e, s, MN_ROLE_SYSTEM, system, strlen(system), &eb)) != MN_OK) {
            mn_session_delete(e, s);
            rpc_fail_mn(r, err, eb.msg, "system");
            break;
        }
        register_new(r, s);
        break;
    }
    case OP_LIST: {
        json_t *data = json_array();
        for (int32_t i = 0; srv->reg && i < srv->reg->n; i++)
            if (!strcmp(srv->reg->v[i].owner, r->owner))
                json_array_append_new(data, session_json(srv, &srv->reg->v[i], false));
        r->out = json_pack("{s:s, s:o}", "object", "list", "data", data);
        r->status = 200;
        break;
    }
    case OP_WS_OPEN:
        if (!rpc_lookup(r, &re)) break;
        r->out = session_json(srv, re, false);
        r->status = 200;
        break;
    case OP_GET:
        if (!rpc_lookup(r, &re)) break;
        r->out = session_json(srv, re, true);
        r->status = 200;
        break;
    case OP_DELETE:
        if (!rpc_lookup(r, &re)) break;
        mn_session_delete(e, re->s);   /* a generation on it ends (CANCELLED) */
        if (srv->persist_dir) { /* deleted by request: a saved copy must not come back */
            char path[4200];
            saved_path(srv, re->id, path, sizeof path);
            unlink(path);
        }
        r->out = json_pack("{s:s, s:s, s:b}", "id", re->id, "object", "session.deleted", "deleted", 1);
        reg_remove(srv, re);
        r->status = 200;
        break;
    case OP_MESSAGES: {
        if (!rpc_lookup(r, &re)) break;
        mn_role role = (mn_role)json_integer_value(json_object_get(r->in, "_role"));
        json_t *c = json_object_get(r->in, "content"), *t = json_object_get(r->in, "tokens");
        int32_t before = 0;
        mn_session_tokens(re->s, NULL, &before);
        if (c && json_is_string(c)) {
            err = mn_session_submit_text(e, re->s, role, json_string_value(c), json_string_length(c), &eb);
            if (err != MN_OK) { rpc_fail_mn(r, err, eb.msg, "content"); break; }
        } else {
            size_t n = json_array_size(t);
            int32_t *ids = mn_malloc((n ? n : 1) * sizeof(int32_t));
            if (!ids) { api_errf(&r->err, 503, "server_error", NULL, "out of memory"); break; }
            for (size_t i = 0; i < n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(t, i));
            err = mn_session_submit_tokens(e, re->s, ids, (int32_t)n, role, &eb);
            mn_free(ids);
            if (err != MN_OK) { rpc_fail_mn(r, err, eb.msg, "tokens"); break; }
        }
        int32_t after = 0;
        mn_session_tokens(re->s, NULL, &after);
        mn_engine_stats es;
        mn_engine_stats_get(e, &es);
        int64_t pool = (int64_t)es.blocks_total * es.block_size;
        if (after > pool) { /* could never be computed: refuse now rather than fail in the background */
            mn_errbuf rb;
            mn_session_rewind(e, re->s, before, &rb);
            api_errf(&r->err, 400, "invalid_request_error", c && json_is_string(c) ? "content" : "tokens",
                     "the session would hold %d tokens, more than the whole KV pool of this server (%lld tokens: "
                     "%d blocks of %d); nothing was appended", after, (long long)pool, es.blocks_total, es.block_size);
            snprintf(r->err.code, sizeof r->err.code, "kv_pool_exceeded");
            break;
        }
        r->out = session_json(srv, re, false);
        json_object_set_new(r->out, "appended", json_integer(after - before));
        r->status = 200;
        break;
    }
    case OP_FORK:
        if (!rpc_lookup(r, &re) || !under_session_limit(r)) break;
        if ((err = mn_session_fork(e, re->s, &s, &eb)) != MN_OK) { rpc_fail_mn(r, err, eb.msg, NULL); break; }
        register_new(r, s);
        break;
    case OP_REWIND: {
        if (!rpc_lookup(r, &re)) break;
        int32_t n = (int32_t)json_integer_value(json_object_get(r->in, "n_tokens"));
        if ((err = mn_session_rewind(e, re->s, n, &eb)) != MN_OK) { rpc_fail_mn(r, err, eb.msg, "n_tokens"); break; }
        r->out = session_json(srv, re, false);
        r->status = 200;
        break;
    }
    case OP_SAVE: {
        if (!rpc_lookup(r, &re)) break;
        if (!srv->persist_dir) {
            api_errf(&r->err, 400, "invalid_request_error", NULL, "the server has no --persist-dir: nowhere to save");
            break;
        }
        char path[4200];
        saved_path(srv, re->id, path, sizeof path);
        if ((err = mn_session_save(e, re->s, path, &eb)) != MN_OK) { rpc_fail_mn(r, err, eb.msg, NULL); break; }
        r->out = json_pack("{s:s, s:s}", "id", re->id, "path", path);
        r->status = 200;
        break;
    }
    case OP_EXPORT:
        if (!rpc_lookup(r, &re)) break;
        if ((err = mn_session_export(e, re->s, &r->blob, &r->blob_len, &eb)) != MN_OK)
            rpc_fail_mn(r, err, eb.msg, NULL);
        else r->status = 200;
        break;
    case OP_IMPORT:
        if (!under_session_limit(r)) break;
        if ((err = mn_session_import(e, r->blob, r->blob_len, &s, &eb)) != MN_OK) {
            rpc_fail_mn(r, err, eb.msg, "body");
            break;
        }
        register_new(r, s);
        break;
    }
    mn_et_post_event(srv->et, &r->ev);
}

static void ws_rpc_done(rpc *r);
static void ws_open(rpc *r);

static void rpc_done(void *ud) {   /* loop thread */
    rpc *r = ud;
    if (r->wc) ws_rpc_done(r);
    else if (r->op == OP_WS_OPEN && !r->err.status) ws_open(r);
    else if (r->err.status) {
        api_err_respond(r->res, &r->err);
        api_metrics_request(r->srv, r->route, r->err.status);
    } else if (r->op == OP_EXPORT) {
        static const mn_http_header h[] = {{"Content-Disposition", "attachment"}};
        mn_http_respond(r->res, 200, "application/octet-stream", (const char *)r->blob, r->blob_len, h, 1);
        api_metrics_request(r->srv, r->route, 200);
    } else {
        api_respond_json(r->res, r->status, r->out);
        r->out = NULL;
        api_metrics_request(r->srv, r->route, r->status);
    }
    json_decref(r->out);
    json_decref(r->in);
    mn_free(r->blob);
    mn_free(r);
}

static void rpc_post_blob(mn_serve *srv, op o, const char *route, const char *id, const char *owner, json_t *in,
                          uint8_t *blob, size_t blob_len, mn_http_res *res) {
    rpc *r = mn_calloc(1, sizeof *r);
    if (!r) {
        json_decref(in);
        mn_free(blob);
        api_err e;
        api_errf(&e, 503, "server_error", NULL, "out of memory");
        api_err_respond(res, &e);
        return;
    }
    r->srv = srv;
    r->op = o;
    r->route = route;
    snprintf(r->id, sizeof r->id, "%s", id ? id : "");
    snprintf(r->owner, sizeof r->owner, "%s", owner);
    r->in = in;
    r->blob = blob;
    r->blob_len = blob_len;
    r->res = res;
    r->job = (mn_et_item){NULL, rpc_job, r};
    r->ev = (mn_et_item){NULL, rpc_done, r};
    mn_et_post_job(srv->et, &r->job);
}

static void rpc_post(mn_serve *srv, op o, const char *route, const char *id, const char *owner, json_t *in,
                     mn_http_res *res) {
    rpc_post_blob(srv, o, route, id, owner, in, NULL, 0, res);
}

/* ---- WebSocket /v1/sessions/{id}/stream (loop thread) ---------------------------------------------
 * Client frames (JSON text): {"type":"append", "role", "content" | "tokens"}, {"type":"generate",
 * sampling fields...}, {"type":"interrupt"}. Server frames: {"type":"ready", session},
 * {"type":"appended", session, "appended"}, {"type":"token", "token", "text"}, {"type":"done",
 * "finish_reason", "usage"}, {"type":"error", "error": {...}}. An interrupt ends the generation
 * within one step and rewinds the tokens that were not yet sent; closing the socket does the same. */

struct ws_conn {
    mn_serve *srv;
    mn_http_ws *ws;          /* NULL once closed */
    char sid[40], owner[API_OWNER_LEN];
    int refs;                /* the socket, each pending rpc, the running generation */
    int appends;             /* append frames posted and not yet answered */
    api_gen *gen;
};

/* Append frames a connection may have in flight: each one is an engine job, and the
 * transport does not stop reading a WebSocket that gets no answers, so without a cap one
 * client could queue jobs without bound and stall every stream. */
#define WS_MAX_APPENDS_IN_FLIGHT 8

static void wc_unref(ws_conn *c) {
    if (--c->refs == 0) mn_free(c);
}

static void ws_send(ws_conn *c, json_t *j) {   /* steals j */
    char *s = c->ws && j ? json_dumps(j, JSON_COMPACT) : NULL;
    if (s) mn_http_ws_send_text(c->ws, s, strlen(s));
    mn_free(s);
    json_decref(j);
}

static void ws_send_error(ws_conn *c, const api_err *e) {
    size_t len = 0;
    char *body = api_err_body(e, &len);
    json_t *j = body ? json_loadb(body, len, 0, NULL) : NULL;
    mn_free(body);
    if (j) json_object_set_new(j, "type", json_string("error"));
    ws_send(c, j);
}

static void ws_rpc_done(rpc *r) {
    if (r->op == OP_MESSAGES) r->wc->appends--;
    if (r->err.status) ws_send_error(r->wc, &r->err);
    else {
        json_object_set_new(r->out, "type", json_string("appended"));
        ws_send(r->wc, r->out);
        r->out = NULL;
    }
    api_metrics_request(r->srv, "/v1/sessions/{id}/stream", r->err.status ? r->err.status : 200);
    wc_unref(r->wc);
}

static bool ws_on_token(void *ud, json_t *ev) {
    ws_conn *c = ud;
    if (!c->ws) return false;
    json_t *j = json_pack("{s:s, s:O, s:O}", "type", "token", "token", json_object_get(ev, "t"), "text",
                          json_object_get(ev, "x"));
    if (j && json_object_get(ev, "lp")) json_object_set(j, "logprob", json_object_get(ev, "lp"));
    ws_send(c, j);
    return c->ws && mn_http_ws_pending(c->ws) <= c->srv->max_pending_write;   /* a stalled reader is interrupted */
}

static void ws_on_end(void *ud, const api_err *err, mn_finish fin, int32_t n_prompt, int32_t n_gen) {
    ws_conn *c = ud;
    c->gen = NULL;
    if (err) ws_send_error(c, err);
    else {
        const char *fr = fin == MN_FINISH_LENGTH ? "length" : fin == MN_FINISH_CANCELLED ? "cancelled" : "stop";
        ws_send(c, json_pack("{s:s, s:s, s:{s:i, s:i, s:i}}", "type", "done", "finish_reason", fr, "usage",
                             "prompt_tokens", n_prompt, "completion_tokens", n_gen, "total_tokens", n_prompt + n_gen));
    }
    wc_unref(c);
}

static bool check_message(mn_serve *srv, json_t *in, api_err *err);

static void ws_on_text(void *ud, mn_http_ws *ws, const char *data, size_t len) {
    ws_conn *c = ud;
    mn_serve *srv = c->srv;
    api_err err = {0};
    json_t *in = NULL;
    const char *type = NULL;
    if (!ju_parse_object(data, len, &in, &err) || !ju_req_string(in, "type", &type, NULL, &err)) {
        ws_send_error(c, &err);
        json_decref(in);
        return;
    }
    if (!strcmp(type, "append")) {
        if (c->appends >= WS_MAX_APPENDS_IN_FLIGHT) {
            api_errf(&err, 429, "rate_limit_error", NULL, "%d append frames are already in flight on this stream: "
                     "wait for their 'appended' answers", WS_MAX_APPENDS_IN_FLIGHT);
            ws_send_error(c, &err);
        } else if (!check_message(srv, in, &err)) ws_send_error(c, &err);
        else {
            rpc *r = mn_calloc(1, sizeof *r);
            if (!r) {
                api_errf(&err, 503, "server_error", NULL, "out of memory");
                ws_send_error(c, &err);
            } else {
                *r = (rpc){
                    .srv = srv, .op = OP_MESSAGES, .route = "/v1/sessions/{id}/stream", .in = json_incref(in), .wc = c};
                snprintf(r->id, sizeof r->id, "%s", c->sid);
                snprintf(r->owner, sizeof r->owner, "%s", c->owner);
                r->job = (mn_et_item){NULL, rpc_job, r};
                r->ev = (mn_et_item){NULL, rpc_done, r};
                c->refs++;
                c->appends++;
                mn_et_post_job(srv->et, &r->job);
            }
        }
    } else if (!strcmp(type, "generate")) {
        api_gen_opts o;
        if (c->gen)
            api_errf(&err, 409, "conflict_error", NULL, "session %s is already generating: interrupt first", c->sid);
        else if (srv->draining) api_errf(&err, 503, "server_error", NULL, "the server is shutting down");
        else if (api_gen_parse(srv, in, API_GEN_SESSION, &o, &err)) {
            api_gen_sink sink = {ws_on_token, ws_on_end, c};
            c->gen = api_gen_run_sink(srv, in, &o, c->sid, c->owner, &sink, &err);
            if (c->gen) c->refs++;
        }
        if (err.status) ws_send_error(c, &err);
    } else if (!strcmp(type, "interrupt")) {
        if (c->gen) api_gen_interrupt(c->gen);   /* the done frame (finish_reason "cancelled") answers it */
        else {
            api_errf(&err, 409, "conflict_error", NULL, "nothing to interrupt: no generation is running");
            ws_send_error(c, &err);
        }
    } else {
        api_errf(&err, 400, NULL, "type", "'type' must be append, generate or interrupt; got '%s'", type);
        ws_send_error(c, &err);
    }
    json_decref(in);
}

static void ws_on_binary(void *ud, mn_http_ws *ws, const char *data, size_t len) {
    api_err err;
    api_errf(&err, 400, NULL, NULL, "binary frames are not supported: send JSON text frames");
    ws_send_error(ud, &err);
}

static void ws_on_close(void *ud, mn_http_ws *ws, int code, const char *reason) {
    ws_conn *c = ud;
    c->ws = NULL;
    if (c->gen) api_gen_interrupt(c->gen);
    wc_unref(c);
}

static void ws_open(rpc *r) {
    ws_conn *c = mn_calloc(1, sizeof *c);
    if (!c) {
        api_errf(&r->err, 503, "server_error", NULL, "out of memory");
        api_err_respond(r->res, &r->err);
        return;
    }
    c->srv = r->srv;
    c->refs = 1;
    snprintf(c->sid, sizeof c->sid, "%s", r->id);
    snprintf(c->owner, sizeof c->owner, "%s", r->owner);
    static const mn_http_ws_callbacks cb = {ws_on_text, ws_on_binary, ws_on_close};
    c->ws = mn_http_ws_accept(r->res, &cb, c);
    api_metrics_request(r->srv, r->route, c->ws ? 101 : 400);
    if (!c->ws) {
        mn_free(c);
        return;
    }
    json_object_set_new(r->out, "type", json_string("ready"));
    ws_send(c, r->out);
    r->out = NULL;
}

/* ---- routing (loop thread) ----------------------------------------------------------------------- */

static bool is_session_id(const char *s, size_t n) {
    if (n != 32) return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
    return true;
}

static void fail(mn_serve *srv, mn_http_res *res, const char *route, api_err *e, json_t *body) {
    api_err_respond(res, e);
    api_metrics_request(srv, route, e->status);
    json_decref(body);
}

/* The body of a POST that may be empty ({}). */
static bool body_object(const mn_http_req *req, json_t **out, api_err *err) {
    if (req->body_len == 0) {
        *out = json_object();
        return true;
    }
    return ju_parse_object(req->body, req->body_len, out, err);
}

static bool parse_role(json_t *in, api_err *err) {
    const char *r = "user";
    if (!ju_opt_string(in, "role", &r, NULL, err)) return false;
    static const struct { const char *name; mn_role role; } roles[] = {
        {"system", MN_ROLE_SYSTEM}, {"developer", MN_ROLE_SYSTEM}, {"user", MN_ROLE_USER},
        {"assistant", MN_ROLE_ASSISTANT}, {"thought", MN_ROLE_THOUGHT}, {"none", MN_ROLE_NONE}};
    for (size_t i = 0; i < sizeof roles / sizeof roles[0]; i++)
        if (!strcmp(r, roles[i].name)) {
            json_object_set_new(in, "_role", json_integer(roles[i].role));
            return true;
        }
    return api_errf(err, 400, NULL, "role", "'role' must be one of system, user, assistant, thought, none; got '%s'",
                    r);
}

static bool check_message(mn_serve *srv, json_t *in, api_err *err) {
    if (!parse_role(in, err)) return false;
    json_t *c = json_object_get(in, "content"), *t = json_object_get(in, "tokens");
    if (c && json_is_null(c)) c = NULL;
    if (t && json_is_null(t)) t = NULL;
    if (!c == !t)
        return api_errf(err, 400, NULL, "content", "give exactly one of 'content' (text) or 'tokens' (token ids)");
    if (c && !json_is_string(c)) return api_errf(err, 400, NULL, "content", "'content' must be a string");
    if (t) {
        if (!json_is_array(t)) return api_errf(err, 400, NULL, "tokens", "'tokens' must be an array of token ids");
        if (json_array_size(t) == 0) return api_errf(err, 400, NULL, "tokens", "'tokens' must not be empty");
        if (json_array_size(t) > (size_t)srv->n_ctx)
            return api_errf(err, 400, NULL, "tokens", "'tokens' has %zu ids, more than the context length %d",
                            json_array_size(t), srv->n_ctx);
        size_t i;
        json_t *v;
        json_array_foreach(t, i, v) {
            if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= srv->model->cfg.n_vocab)
                return api_errf(err, 400, NULL, "tokens", "'tokens[%zu]' must be a token id in [0, %d)", i,
                                srv->model->cfg.n_vocab);
        }
    }
    return true;
}

void api_sessions(mn_serve *srv, const mn_http_req *req, mn_http_res *res, const char *owner, const char *rest) {
    const char *m = req->method;
    bool get = !strcmp(m, "GET"), post = !strcmp(m, "POST"), del = !strcmp(m, "DELETE");
    api_err err = {0};
    json_t *in = NULL;
    if (*rest == 0 || !strcmp(rest, "/")) {
        const char *route = "/v1/sessions";
        if (get) { rpc_post(srv, OP_LIST, route, NULL, owner, NULL, res); return; }
        if (!post) { api_respond_405(srv, res, route, "GET, POST"); return; }
        if (!body_object(req, &in, &err)) { fail(srv, res, route, &err, in); return; }
        const char *sys = NULL, *adapter = NULL;
        size_t adapter_len = 0;
        if (!ju_opt_string(in, "system", &sys, NULL, &err) ||
            !ju_opt_string(in, "adapter", &adapter, &adapter_len, &err) ||
            (adapter && strcmp(adapter, srv->model_name) != 0 &&
             !api_adapter_name_check(adapter, adapter_len, "adapter", &err))) {
            fail(srv, res, route, &err, in);
            return;
        }
        if (srv->draining) {
            api_errf(&err, 503, "server_error", NULL, "the server is shutting down");
            fail(srv, res, route, &err, in);
            return;
        }
        rpc_post(srv, OP_CREATE, route, NULL, owner, in, res);
        return;
    }
    if (!strcmp(rest, "/import")) {
        const char *route = "/v1/sessions/import";
        if (!post) { api_respond_405(srv, res, route, "POST"); return; }
        uint8_t *blob = mn_malloc(req->body_len ? req->body_len : 1);
        if (!blob) {
            api_errf(&err, 503, "server_error", NULL, "out of memory");
            fail(srv, res, route, &err, NULL);
            return;
        }
        memcpy(blob, req->body, req->body_len);
        rpc_post_blob(srv, OP_IMPORT, route, NULL, owner, NULL, blob, req->body_len, res);
        return;
    }
    /* /{id}[/action] */
    const char *id = rest + 1, *slash = strchr(id, '/');
    size_t idn = slash ? (size_t)(slash - id) : strlen(id);
    const char *action = slash ? slash + 1 : "";
    char sid[40] = {0};
    if (!is_session_id(id, idn)) {
        api_errf(&err, 404, "not_found_error", NULL, "session '%.*s' not found", (int)(idn > 64 ? 64 : idn), id);
        fail(srv, res, "/v1/sessions/{id}", &err, NULL);
        return;
    }
    memcpy(sid, id, idn);
    if (!*action) {
        const char *route = "/v1/sessions/{id}";
        if (get) rpc_post(srv, OP_GET, route, sid, owner, NULL, res);
        else if (del) rpc_post(srv, OP_DELETE, route, sid, owner, NULL, res);
        else api_respond_405(srv, res, route, "GET, DELETE");
        return;
    }
    static const struct { const char *name; op o; bool is_get; const char *route;
    } acts[] = {{"messages", OP_MESSAGES, false, "/v1/sessions/{id}/messages"},
                {"fork", OP_FORK, false, "/v1/sessions/{id}/fork"},
                {"rewind", OP_REWIND, false, "/v1/sessions/{id}/rewind"},
                {"save", OP_SAVE, false, "/v1/sessions/{id}/save"},
                {"export", OP_EXPORT, true, "/v1/sessions/{id}/export"},
                {"generate", OP_GET, false, "/v1/sessions/{id}/generate"},
                {"stream", OP_WS_OPEN, true, "/v1/sessions/{id}/stream"}};
    for (size_t i = 0; i < sizeof acts / sizeof acts[0]; i++) {
        if (strcmp(action, acts[i].name) != 0) continue;
        const char *rroute = acts[i].route;   /* a static string for metrics */
        if (acts[i].is_get ? !get : !post) { api_respond_405(srv, res, rroute, acts[i].is_get ? "GET" : "POST"); return; }
        if (acts[i].o == OP_WS_OPEN && !mn_http_ws_is_upgrade(req)) {
            api_errf(&err, 400, NULL, NULL, "%s is a WebSocket: send a valid Upgrade: websocket request", rroute);
            fail(srv, res, rroute, &err, NULL);
            return;
        }
        if (acts[i].is_get) { rpc_post(srv, acts[i].o, rroute, sid, owner, NULL, res); return; }
        if (!body_object(req, &in, &err)) { fail(srv, res, rroute, &err, in); return; }
        if (!strcmp(action, "generate")) {
            api_gen_opts o;
            if (!api_gen_parse(srv, in, API_GEN_SESSION, &o, &err)) { fail(srv, res, rroute, &err, in); return; }
            if (srv->draining) {
                api_errf(&err, 503, "server_error", NULL, "the server is shutting down");
                fail(srv, res, rroute, &err, in);
                return;
            }
            api_gen_run(srv, API_GEN_SESSION, in, &o, sid, owner, res);
            json_decref(in);
            return;
        }
        if (acts[i].o == OP_MESSAGES && !check_message(srv, in, &err)) { fail(srv, res, rroute, &err, in); return; }
        if (acts[i].o == OP_REWIND) {
            int64_t n = -1;
            if (!ju_opt_int(in, "n_tokens", 0, INT32_MAX, &n, &err)) { fail(srv, res, rroute, &err, in); return; }
            if (n < 0) {
                api_errf(&err, 400, NULL, "n_tokens", "'n_tokens' is required");
                fail(srv, res, rroute, &err, in);
                return;
            }
            json_object_set_new(in, "n_tokens", json_integer(n));
        }
        rpc_post(srv, acts[i].o, rroute, sid, owner, in, res);
        return;
    }
    api_errf(&err, 404, "not_found_error", NULL, "unknown route %s %s", req->method, req->path);
    fail(srv, res, "other", &err, NULL);
}

/* ---- persistence (engine thread) ------------------------------------------------------------------ */

int api_sessions_save_all(mn_serve *srv) {
    if (!srv->persist_dir) return 0;
    mn_engine *e = mn_et_engine(srv->et);
    json_t *list = json_array();
    int saved = 0, failed = 0;
    mn_free(srv->saved_engine_ids);
    srv->n_saved_engine_ids = 0;
    srv->saved_engine_ids =
        srv->reg && srv->reg->n ? mn_malloc((size_t)srv->reg->n * sizeof *srv->saved_engine_ids) : NULL;
    for (int32_t i = 0; srv->reg && i < srv->reg->n; i++) {
        reg_entry *re = &srv->reg->v[i];
        char path[4200];
        saved_path(srv, re->id, path, sizeof path);
        mn_errbuf eb = {{0}};
        if (mn_session_busy(re->s)) mn_session_generate_cancel(e, re->s);
        const char *src = mn_session_source_file(re->s);
        /* untouched since it was listed from this very file: the file is already its state */
        mn_err err = src && !mn_session_busy(re->s) && !strcmp(src, path) ? MN_OK : mn_session_save(e, re->s, path, &eb);
        if (err != MN_OK) {
            fprintf(stderr, "mneme serve: cannot save session %s: %s\n", re->id, eb.msg);
            failed++;
            continue;
        }
        if (srv->saved_engine_ids)
            snprintf(srv->saved_engine_ids[srv->n_saved_engine_ids++], 33, "%s", mn_session_id(re->s));
        json_t *ent = json_pack("{s:s, s:s, s:I, s:s}", "id", re->id, "owner", re->owner, "created",
                                (json_int_t)re->created, "file", strrchr(path, '/') + 1);
        const char *adapter = mn_session_adapter(re->s);
        if (ent && adapter) { /* for the report when a later start lacks it (the file keys it by content) */
            json_object_set_new(ent, "adapter", json_string(adapter));
            json_t *from = json_object_get(json_object_get(srv->adapter_info, adapter), "path");
            if (from) json_object_set(ent, "adapter_path", from);
        }
        json_array_append_new(list, ent);
        saved++;
    }
    if (srv->reg && srv->reg->unloaded) json_array_extend(list, srv->reg->unloaded);
    json_t *map = json_pack("{s:i, s:s, s:o}", "version", 1, "model", srv->model_name, "sessions", list);
    char tmp[4200], final[4200];
    snprintf(tmp, sizeof tmp, "%s/%s.tmp", srv->persist_dir, MAP_FILE);
    snprintf(final, sizeof final, "%s/%s", srv->persist_dir, MAP_FILE);
    int rc = json_dump_file(map, tmp, JSON_INDENT(1));
    json_decref(map);
    if (rc != 0 || rename(tmp, final) != 0) {
        fprintf(stderr, "mneme serve: cannot write %s: %s\n", final, strerror(errno));
        return -1;
    }
    return failed ? -1 : saved;
}

int api_sessions_load_all(mn_serve *srv) {
    if (!srv->persist_dir) return 0;
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", srv->persist_dir, MAP_FILE);
    struct stat st;
    if (stat(path, &st) != 0) return 0;
    json_error_t je;
    json_t *map = json_load_file(path, 0, &je);
    if (!map) {
        fprintf(stderr, "mneme serve: %s: line %d: %s (no sessions loaded)\n", path, je.line, je.text);
        return -1;
    }
    mn_engine *e = mn_et_engine(srv->et);
    int loaded = 0;
    size_t i;
    json_t *v;
    json_array_foreach(json_object_get(map, "sessions"), i, v) {
        const char *id = json_string_value(json_object_get(v, "id"));
        const char *owner = json_string_value(json_object_get(v, "owner"));
        const char *file = json_string_value(json_object_get(v, "file"));
        if (!id || !owner || !file || strlen(id) != 32 || strchr(file, '/')) continue;
        char fp[4200];
        snprintf(fp, sizeof fp, "%s/%s", srv->persist_dir, file);
        mn_session *s = NULL;
        mn_errbuf eb = {{0}};
        /* listed, not loaded: its KV is read on first use (T3), so a restart costs no pool
         * memory and no time per session beyond validating its file */
        if (mn_session_adopt_file(e, fp, true, &s, &eb) != MN_OK) { /* kept in the map and on disk for a later run */
            fprintf(stderr, "mneme serve: session %s not loaded (kept in %s): %s\n", id, srv->persist_dir, eb.msg);
            const char *adapter = json_string_value(json_object_get(v, "adapter"));
            const char *from = json_string_value(json_object_get(v, "adapter_path"));
            if (adapter)
                fprintf(stderr, "mneme serve: session %s was made under adapter '%s'%s%s: start with --lora %s=%s\n",
                        id, adapter, from ? " from " : "", from ? from : "", adapter, from ? from : "PATH");
            api_registry *r = reg_get(srv);
            if (r && !r->unloaded) r->unloaded = json_array();
            if (r && r->unloaded) json_array_append(r->unloaded, v);
            continue;
        }
        if (!reg_add(srv, id, owner, s, (int64_t)json_integer_value(json_object_get(v, "created")))) {
            mn_session_delete(e, s);
            continue;
        }
        loaded++;
    }
    json_decref(map);
    return loaded;
}
