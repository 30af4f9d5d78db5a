/* server/api_adapters.c — LoRA adapters through the API: GET/POST /v1/adapters, DELETE
 * /v1/adapters/{name}, GET /v1/models (the base model and every adapter, parent = base), and
 * the loading that `--lora NAME=PATH` does at start-up.
 *
 * The registry (engine/lora.h) belongs to the engine, which reads it in every step, so it is
 * read and changed only on the engine thread: each request here is a job that runs there
 * between two steps (never while a batch is in flight) and answers through an event, like the
 * session rpcs. A load first resolves and checks the path and reads and parses the files on a
 * libuv worker thread (uv_queue_work: megabytes of reading would otherwise stall every
 * stream); only the install (mn_lora_registry_add: name checks, a slot) runs as a job.
 * Who may load and unload, and from where: server/api_auth.c.
 *
 * srv->adapter_info (engine thread) maps a loaded adapter's name to what the registry does not
 * keep: the path it came from and when it was loaded.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/alloc.h"
#include "server/api.h"

typedef enum ad_op { AD_LIST, AD_GET, AD_LOAD, AD_UNLOAD, AD_MODELS } ad_op;

typedef struct ad_rpc {
    mn_serve *srv;
    mn_et_item job, ev;
    ad_op op;
    const char *route;       /* static, for metrics */
    char name[API_ADAPTER_NAME_LEN];
    json_t *in;              /* load: the body (name, path) */
    bool force;              /* unload even while sessions use it */
    bool one;                /* models: only the model called name */
    mn_http_res *res;
    int status;
    json_t *out;
    api_err err;
    uv_work_t work;          /* load: path check and parse on a worker thread */
    mn_lora *lora;           /* load: parsed, not yet installed (owned here until then) */
    char path[PATH_MAX];     /* load: the resolved path */
} ad_rpc;

/* ---- engine thread ----------------------------------------------------------------------------- */

static const mn_lora *find_lora(mn_serve *srv, const char *name) {
    if (!srv->adapters) return NULL;
    int32_t i = mn_lora_registry_find(srv->adapters, name), n = 0;
    const mn_lora *const *t = mn_lora_registry_table(srv->adapters, &n);
    return i >= 0 && i < n ? t[i] : NULL;
}

static json_t *adapter_json(mn_serve *srv, const mn_lora *l) {
    int32_t slot = mn_lora_registry_find(srv->adapters, l->name);
    json_t *targets = json_array(), *ranks = json_object();
    for (int t = 0; t < MN_LORA_N_TARGETS; t++) {
        if (!(l->targets & (1u << t))) continue;
        int32_t r = 0;   /* rank_pattern may give layers other ranks: report the largest */
        for (int32_t i = 0; i < l->n_layer; i++)
            if (l->layers[i].t[t].r > r) r = l->layers[i].t[t].r;
        json_array_append_new(targets, json_string(mn_lora_target_name((mn_lora_target)t)));
        json_object_set_new(ranks, mn_lora_target_name((mn_lora_target)t), json_integer(r));
    }
    char fp[33];
    for (int i = 0; i < 16; i++) snprintf(fp + 2 * i, 3, "%02x", l->fingerprint[i]);
    json_t *info = json_object_get(srv->adapter_info, l->name);
    int32_t users = srv->et ? mn_engine_adapter_users(mn_et_engine(srv->et), l->name) : 0;
    return json_pack("{s:s, s:s, s:s, s:i, s:o, s:o, s:I, s:s, s:i, s:s, s:f, s:O?, s:O?}", "id", l->name, "object",
                     "adapter", "parent", srv->model_name, "rank", l->r_max, "ranks", ranks, "targets", targets,
                     "bytes", (json_int_t)l->bytes, "residency",
                     mn_lora_registry_resident(srv->adapters, slot) ? "device" : "host", "sessions", users, "fingerprint", fp,
                     "load_seconds", l->load_seconds, "path", json_object_get(info, "path"), "created",
                     json_object_get(info, "created"));
}

static json_t *model_json(mn_serve *srv, const char *id, const char *parent) {
    json_t *m = json_pack("{s:s, s:s, s:I, s:s}", "id", id, "object", "model", "created", (json_int_t)srv->created,
                          "owned_by", "mneme");
    if (m && parent) json_object_set_new(m, "parent", json_string(parent));
    return m;
}

bool api_adapter_load(mn_serve *srv, const char *name, const char *path, api_err *err) {
    bool base = !strcmp(name, srv->model_name);
    if (base || find_lora(srv, name))
        return api_errf(err, 409, "conflict_error", "name", "'%s' is already loaded%s", name,
                        base ? ": it is the base model" : " (DELETE /v1/adapters/{name} first)");
    mn_errbuf eb = {{0}};
    int32_t index = -1;
    mn_err e = mn_lora_registry_load(srv->adapters, name, path, &index, &eb);
    if (e != MN_OK) {
        api_err_from_mn(err, e, eb.msg, "path");
        if (e != MN_ENOMEM) err->status = 400, err->type = "invalid_request_error";   /* the file, not the server */
        return false;
    }
    if (!srv->adapter_info) srv->adapter_info = json_object();
    json_object_set_new(srv->adapter_info, name, json_pack("{s:s, s:I}", "path", path, "created",
                                                           (json_int_t)time(NULL)));
    return true;
}

static void ad_job(void *ud) {
    ad_rpc *r = ud;
    mn_serve *srv = r->srv;
    int32_t n = 0;
    const mn_lora *const *t = srv->adapters ? mn_lora_registry_table(srv->adapters, &n) : NULL;
    switch (r->op) {
    case AD_LIST: {
        json_t *data = json_array();
        for (int32_t i = 0; i < n; i++)
            if (t[i]) json_array_append_new(data, adapter_json(srv, t[i]));
        r->out = json_pack("{s:s, s:o}", "object", "list", "data", data);
        r->status = 200;
        break;
    }
    case AD_GET: {
        const mn_lora *l = find_lora(srv, r->name);
        if (!l) {
            api_errf(&r->err, 404, "not_found_error", NULL, "adapter '%s' is not loaded", r->name);
            break;
        }
        r->out = adapter_json(srv, l);
        r->status = 200;
        break;
    }
    case AD_MODELS: {
        if (r->one) {
            if (strcmp(r->name, srv->model_name) != 0 && !find_lora(srv, r->name)) {
                api_errf(&r->err, 404, "invalid_request_error", "model", "The model '%s' does not exist", r->name);
                snprintf(r->err.code, sizeof r->err.code, "model_not_found");
                break;
            }
            r->out = model_json(srv, r->name, strcmp(r->name, srv->model_name) ? srv->model_name : NULL);
        } else {
            json_t *data = json_array();
            json_array_append_new(data, model_json(srv, srv->model_name, NULL));
            for (int32_t i = 0; i < n; i++)
                if (t[i]) json_array_append_new(data, model_json(srv, t[i]->name, srv->model_name));
            r->out = json_pack("{s:s, s:o}", "object", "list", "data", data);
        }
        r->status = 200;
        break;
    }
    case AD_LOAD: { /* install what load_work parsed */
        if (!srv->adapters) {
            api_errf(&r->err, 503, "server_error", NULL, "this server has no adapter registry");
            break;
        }
        if (find_lora(srv, r->name)) {
            api_errf(&r->err, 409, "conflict_error", "name", "'%s' is already loaded (DELETE /v1/adapters/{name} first)",
                     r->name);
            break;
        }
        mn_errbuf eb = {{0}};
        mn_err e = mn_lora_registry_add(srv->adapters, r->lora, NULL, &eb);
        if (e != MN_OK) {
            api_err_from_mn(&r->err, e, eb.msg, "path");
            break;
        }
        r->lora = NULL;   /* the registry's now */
        if (!srv->adapter_info) srv->adapter_info = json_object();
        json_object_set_new(srv->adapter_info, r->name,
                            json_pack("{s:s, s:I}", "path", r->path, "created", (json_int_t)time(NULL)));
        r->out = adapter_json(srv, find_lora(srv, r->name));
        r->status = 200;
        break;
    }
    case AD_UNLOAD: {
        if (!find_lora(srv, r->name)) {
            api_errf(&r->err, 404, "not_found_error", NULL, "adapter '%s' is not loaded", r->name);
            break;
        }
        int32_t users = mn_engine_adapter_users(mn_et_engine(srv->et), r->name);
        if (users > 0 && !r->force) {
            api_errf(&r->err, 409, "conflict_error", NULL,
                     "adapter '%s' is used by %d session%s: delete them first, or pass ?force=true (their next "
                     "generation then fails)", r->name, users, users == 1 ? "" : "s");
            snprintf(r->err.code, sizeof r->err.code, "adapter_in_use");
            break;
        }
        mn_errbuf eb = {{0}};
        mn_err e = mn_lora_registry_unload(srv->adapters, r->name, &eb);
        if (e != MN_OK) { api_err_from_mn(&r->err, e, eb.msg, NULL); break; }
        json_object_del(srv->adapter_info, r->name);
        r->out = json_pack("{s:s, s:s, s:b, s:i}", "id", r->name, "object", "adapter.deleted", "deleted", 1,
                           "sessions_stranded", users);
        r->status = 200;
        break;
    }
    }
    mn_et_post_event(srv->et, &r->ev);
}

void api_adapters_free(mn_serve *srv) {
    json_decref(srv->adapter_info);
    srv->adapter_info = NULL;
}

/* ---- loop thread --------------------------------------------------------------------------------- */

static void ad_done(void *ud) {
    ad_rpc *r = ud;
    if (r->err.status) {
        api_err_respond(r->res, &r->err);
        api_metrics_request(r->srv, r->route, r->err.status);
    } else {
        if (r->op == AD_LOAD) r->srv->n_adapters++;
        if (r->op == AD_UNLOAD) r->srv->n_adapters--;
        api_respond_json(r->res, r->status, r->out);
        r->out = NULL;
        api_metrics_request(r->srv, r->route, r->status);
    }
    json_decref(r->out);
    json_decref(r->in);
    mn_lora_free(r->lora);
    mn_free(r);
}

static void fail(mn_serve *srv, mn_http_res *res, const char *route, const api_err *e) {
    api_err_respond(res, e);
    api_metrics_request(srv, route, e->status);
}

/* Worker thread: check the path, read and parse the files. Touches only r, srv->lora_dir and
 * srv->model (immutable while serving). */
static void load_work(uv_work_t *w) {
    ad_rpc *r = w->data;
    const char *given = json_string_value(json_object_get(r->in, "path"));
    if (!api_adapter_path_resolve(r->srv->lora_dir, given, r->path, sizeof r->path, &r->err)) return;
    mn_errbuf eb = {{0}};
    mn_err e = mn_lora_load(r->path, r->name, r->srv->model, &r->lora, &eb);
    if (e != MN_OK) {
        r->lora = NULL;
        api_err_from_mn(&r->err, e, eb.msg, "path");
        if (e != MN_ENOMEM) r->err.status = 400, r->err.type = "invalid_request_error";   /* the file, not the server */
    }
}

/* Loop thread: hand the parsed adapter to the engine thread, or answer the error. */
static void load_after(uv_work_t *w, int status) {
    ad_rpc *r = w->data;
    if (!r->err.status && (status != 0 || r->srv->draining)) /* the engine thread may be gone */
        api_errf(&r->err, 503, "server_error", NULL, "the server is shutting down");
    if (r->err.status) {
        ad_done(r);
        return;
    }
    mn_et_post_job(r->srv->et, &r->job);
}

/* Queue op for the engine thread; steals in. name NULL: none (models: the whole list). */
static void ad_post(mn_serve *srv, ad_op op, const char *route, const char *name, json_t *in, bool force,
                    mn_http_res *res) {
    ad_rpc *r = mn_calloc(1, sizeof *r);
    if (!r) {
        json_decref(in);
        api_err e;
        api_errf(&e, 503, "server_error", NULL, "out of memory");
        fail(srv, res, route, &e);
        return;
    }
    r->srv = srv;
    r->op = op;
    r->route = route;
    snprintf(r->name, sizeof r->name, "%s", name ? name : "");
    r->one = name != NULL;
    r->force = force;
    r->in = in;
    r->res = res;
    r->job = (mn_et_item){NULL, ad_job, r};
    r->ev = (mn_et_item){NULL, ad_done, r};
    if (op != AD_LOAD) {
        mn_et_post_job(srv->et, &r->job);
        return;
    }
    r->work.data = r;
    int rc = uv_queue_work(srv->loop, &r->work, load_work, load_after);
    if (rc != 0) {
        api_errf(&r->err, 503, "server_error", NULL, "cannot queue the load: %s", uv_strerror(rc));
        ad_done(r);
    }
}

bool api_adapter_name_check(const char *name, size_t len, const char *field, api_err *err) {
    if (len == 0 || len >= API_ADAPTER_NAME_LEN)
        return api_errf(err, 400, NULL, field, "'%s' must be 1..%d bytes", field, API_ADAPTER_NAME_LEN - 1);
    for (size_t i = 0; i < len; i++) /* it appears in a URL path (/v1/adapters/{name}, /v1/models/{name}) */
        if ((unsigned char)name[i] <= ' ' || name[i] == '/' || name[i] == '?' || name[i] == '%' || name[i] == '#' ||
            name[i] == 0x7f)
            return api_errf(err, 400, NULL, field, "'%s' must not contain spaces, control characters, '/', '?', "
                            "'%%' or '#'", field);
    return true;
}

void api_models(mn_serve *srv, const mn_http_req *req, mn_http_res *res) {
    const char *sub = req->path + strlen("/v1/models");
    if (*sub == '/') {
        size_t n = strlen(sub + 1);
        if (n == 0 || n >= API_ADAPTER_NAME_LEN) {
            api_err e;
            api_errf(&e, 404, "invalid_request_error", "model", "The model '%.64s' does not exist", sub + 1);
            snprintf(e.code, sizeof e.code, "model_not_found");
            fail(srv, res, "/v1/models", &e);
            return;
        }
        ad_post(srv, AD_MODELS, "/v1/models", sub + 1, NULL, false, res);
        return;
    }
    ad_post(srv, AD_MODELS, "/v1/models", NULL, NULL, false, res);
}

void api_adapters(mn_serve *srv, const mn_http_req *req, mn_http_res *res, const char *rest, bool admin) {
    const char *m = req->method;
    bool get = !strcmp(m, "GET"), post = !strcmp(m, "POST"), del = !strcmp(m, "DELETE");
    api_err err = {0};
    if (*rest == 0 || !strcmp(rest, "/")) {
        const char *route = "/v1/adapters";
        if (get) { ad_post(srv, AD_LIST, route, NULL, NULL, false, res); return; }
        if (!post) { api_respond_405(srv, res, route, "GET, POST"); return; }
        if (!api_adapter_admin_check(srv, admin, true, &err)) { fail(srv, res, route, &err); return; }
        json_t *in = NULL;
        const char *name = NULL, *path = NULL;
        size_t name_len = 0;
        if (!ju_parse_object(req->body, req->body_len, &in, &err) ||
            !ju_req_string(in, "name", &name, &name_len, &err) ||
            !api_adapter_name_check(name, name_len, "name", &err) ||
            !ju_req_string(in, "path", &path, NULL, &err) ||
            (!*path && !api_errf(&err, 400, NULL, "path", "'path' must not be empty")) ||
            (!strcmp(name, srv->model_name) &&
             !api_errf(&err, 409, "conflict_error", "name", "'%s' is already loaded: it is the base model", name)) ||
            (srv->draining && !api_errf(&err, 503, "server_error", NULL, "the server is shutting down"))) {
            json_decref(in);
            fail(srv, res, route, &err);
            return;
        }
        ad_post(srv, AD_LOAD, route, name, in, false, res);
        return;
    }
    const char *route = "/v1/adapters/{name}";
    const char *name = rest + 1;
    if (!api_adapter_name_check(name, strlen(name), "name", &err)) {
        api_errf(&err, 404, "not_found_error", NULL, "adapter '%.64s' is not loaded", name);
        fail(srv, res, route, &err);
        return;
    }
    if (get) { ad_post(srv, AD_GET, route, name, NULL, false, res); return; }
    if (!del) { api_respond_405(srv, res, route, "GET, DELETE"); return; }
    if (!api_adapter_admin_check(srv, admin, false, &err)) { fail(srv, res, route, &err); return; }
    bool force = false;
    const char *q = req->query ? req->query : "";
    for (const char *p = q; *p;) { /* force=true|false|1|0 among &-separated parameters */
        const char *end = strchr(p, '&');
        int n = end ? (int)(end - p) : (int)strlen(p);
        if (n > 6 && !strncmp(p, "force=", 6)) {
            const char *v = p + 6;
            int vn = n - 6;
            if ((vn == 4 && !strncmp(v, "true", 4)) || (vn == 1 && *v == '1')) force = true;
            else if ((vn == 5 && !strncmp(v, "false", 5)) || (vn == 1 && *v == '0')) force = false;
            else {
                api_errf(&err, 400, NULL, "force", "'force' must be true or false, got '%.*s'", vn > 64 ? 64 : vn, v);
                fail(srv, res, route, &err);
                return;
            }
        }
        p += n + (end ? 1 : 0);
    }
    ad_post(srv, AD_UNLOAD, route, name, NULL, force, res);
}
