/* server/api_openai.c — /v1/models, /v1/completions, /v1/chat/completions, and the
 * generation stream they share with POST /v1/sessions/{id}/generate.
 *
 * One generation is an api_gen, shared by the two threads:
 *
 *   loop thread                         engine thread
 *   parse + validate ── start job ──►   find or build the session, generate_start
 *                                       on_token: append an event (json) to g->events
 *   on_event: SSE chunks / JSON   ◄──   post g->ev (once until the loop drained it)
 *   abort / stall ── cancel job ──►     generate_cancel, rewind to what was delivered
 *                                 ◄──   on_done: finished; deferred: delete a temporary session
 *
 * g->mu guards the fields marked shared; the rest belongs to one side. g is freed by
 * whichever side drops the last reference (the loop's, the engine's, a queued cancel job's).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "engine/alloc.h"
#include "engine/tokenizer.h"
#include "server/api.h"

#define DEFAULT_MAX_TOKENS_COMPLETION 16
#define DEFAULT_MAX_TOKENS_CHAT 512

typedef struct api_gen {
    mn_serve *srv;
    api_gen_kind kind;
    api_gen_opts o;
    json_t *body;            /* the request (keeps o.stops_buf alive) */
    json_t *prompt;          /* completion: string or token array; chat: [[role, text], ...] */
    char sid[40], owner[API_OWNER_LEN];
    char model[API_ADAPTER_NAME_LEN];    /* echoed in responses: the request's model (an adapter) or the base's */
    char adapter[API_ADAPTER_NAME_LEN];  /* "": none; session kind: the one the request names, if any */
    bool adapter_given;                  /* session kind: the request named a model or adapter */
    mn_et_item job, cancel_job, ev, fin;
    uv_mutex_t mu;
    int refs;                /* shared */
    /* shared */
    json_t *events;
    bool ev_queued, cancel, finished;
    int32_t cancel_at;       /* tokens delivered when the client went away */
    api_err err;
    mn_finish finish;
    int32_t n_generated, n_prompt;
    /* engine thread */
    mn_session *s;
    bool temp, s_done;
    int32_t start_len, end_len;   /* session length after generate_start / when it ended */
    /* loop thread */
    mn_http_res *res;
    char id[48];
    bool begun, res_done, aborted, cancel_posted, loop_released;
    int32_t delivered, text_off;
    double t0, t_last;
    char *text;
    size_t text_len, text_cap;
    json_t *lp;              /* non-stream logprobs */
    api_gen_sink sink;       /* output to a sink (WebSocket) instead of res */
    bool has_sink;
} api_gen;

static const char *gen_route(api_gen_kind kind) {
    return kind == API_GEN_SESSION ? "/v1/sessions/{id}/generate"
           : kind == API_GEN_CHAT  ? "/v1/chat/completions"
                                   : "/v1/completions";
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void gen_unref(api_gen *g) {
    uv_mutex_lock(&g->mu);
    int left = --g->refs;
    uv_mutex_unlock(&g->mu);
    if (left > 0) return;
    uv_mutex_destroy(&g->mu);
    json_decref(g->body);
    json_decref(g->prompt);
    json_decref(g->events);
    json_decref(g->lp);
    mn_free(g->text);
    mn_free(g);
}

/* ---- request parsing (loop thread) ------------------------------------------------------------- */

bool api_gen_parse(mn_serve *srv, json_t *body, api_gen_kind kind, api_gen_opts *o, api_err *err) {
    memset(o, 0, sizeof *o);
    mn_sampling_params *sp = &o->gp.sampling;
    *sp = mn_sampling_defaults();
    /* OpenAI semantics: temperature 1, nucleus off, no top-k / min-p unless asked */
    sp->temperature = 1.0f;
    sp->top_k = 0;
    sp->top_p = 1.0f;
    sp->min_p = 0.0f;
    sp->repeat_last_n = -1;
    sp->seed = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^ ++srv->next_id;
    o->stream = kind == API_GEN_SESSION;
    o->gp.assistant_prefix = kind != API_GEN_COMPLETION && srv->model->has_chat_template;

    int64_t max_tokens = 0, seed = -1, top_k = 0, n = 1, top_logprobs = 0;
    double temperature = sp->temperature, top_p = 1, min_p = 0, fp = 0, pp = 0, rp = 1;
    if (!ju_opt_int(body, "max_tokens", 1, srv->n_ctx, &max_tokens, err) ||
        !ju_opt_int(body, "max_completion_tokens", 1, srv->n_ctx, &max_tokens, err) ||
        !ju_opt_number(body, "temperature", 0, 2, &temperature, err) ||
        !ju_opt_number(body, "top_p", 0, 1, &top_p, err) ||
        !ju_opt_int(body, "top_k", 0, 1 << 20, &top_k, err) ||
        !ju_opt_number(body, "min_p", 0, 1, &min_p, err) ||
        !ju_opt_number(body, "frequency_penalty", -2, 2, &fp, err) ||
        !ju_opt_number(body, "presence_penalty", -2, 2, &pp, err) ||
        !ju_opt_number(body, "repetition_penalty", 0.01, 10, &rp, err) ||
        !ju_opt_int(body, "seed", INT64_MIN, INT64_MAX, &seed, err) ||
        !ju_opt_int(body, "n", 1, 1, &n, err) ||
        !ju_opt_bool(body, "stream", &o->stream, err))
        return false;
    if (top_p <= 0) return api_errf(err, 400, NULL, "top_p", "'top_p' must be in (0, 1], got %g", top_p);
    sp->temperature = (float)temperature;
    sp->top_p = (float)top_p;
    sp->top_k = (int32_t)top_k;
    sp->min_p = (float)min_p;
    sp->frequency_penalty = (float)fp;
    sp->presence_penalty = (float)pp;
    sp->repeat_penalty = (float)rp;
    json_t *seed_v = json_object_get(body, "seed");
    if (seed_v && !json_is_null(seed_v)) sp->seed = (uint64_t)seed;
    o->gp.max_tokens = (int32_t)max_tokens;   /* 0: the default, settled once the prompt length is known */

    json_t *so = json_object_get(body, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so))
            return api_errf(err, 400, NULL, "stream_options", "'stream_options' must be an object");
        if (!ju_opt_bool(so, "include_usage", &o->include_usage, err)) {
            snprintf(err->param, sizeof err->param, "stream_options.include_usage");
            return false;
        }
    }

    json_t *lp = json_object_get(body, "logprobs");
    if (lp && !json_is_null(lp)) {
        if (kind == API_GEN_COMPLETION) {  /* completions: logprobs is the number of alternatives */
            if (!ju_opt_int(body, "logprobs", 0, 20, &top_logprobs, err)) return false;
            o->logprobs = true;
        } else {
            if (!ju_opt_bool(body, "logprobs", &o->logprobs, err)) return false;
            if (!ju_opt_int(body, "top_logprobs", 0, 20, &top_logprobs, err)) return false;
        }
    } else if (kind != API_GEN_COMPLETION && !ju_opt_int(body, "top_logprobs", 0, 20, &top_logprobs, err)) {
        return false;
    }
    if (top_logprobs > 0 && !o->logprobs)
        return api_errf(err, 400, NULL, "top_logprobs", "'top_logprobs' needs 'logprobs' set to true");
    o->top_logprobs = (int32_t)top_logprobs;
    if (o->logprobs) sp->n_logprobs = o->top_logprobs > 0 ? o->top_logprobs : 1;

    json_t *stop = json_object_get(body, "stop");
    if (stop && !json_is_null(stop)) {
        if (json_is_string(stop)) {
            if (json_string_length(stop) == 0) return api_errf(err, 400, NULL, "stop", "'stop' must not be empty");
            o->stops_buf[o->gp.n_stops++] = json_string_value(stop);
        } else if (json_is_array(stop)) {
            if (json_array_size(stop) > 16)
                return api_errf(err, 400, NULL, "stop", "'stop' has %zu strings, at most 16 are allowed",
                                json_array_size(stop));
            size_t i;
            json_t *v;
            json_array_foreach(stop, i, v) {
                if (!json_is_string(v) || json_string_length(v) == 0)
                    return api_errf(err, 400, NULL, "stop", "'stop[%zu]' must be a non-empty string", i);
                o->stops_buf[o->gp.n_stops++] = json_string_value(v);
            }
        } else {
            return api_errf(err, 400, NULL, "stop", "'stop' must be a string or an array of strings");
        }
    }
    o->gp.stops = o->stops_buf;
    if (kind == API_GEN_SESSION && !ju_opt_bool(body, "assistant_prefix", &o->gp.assistant_prefix, err)) return false;
    if (kind == API_GEN_SESSION) { /* may name the session's own adapter; any other is refused on the engine thread */
        static const char *const fields[] = {"model", "adapter"};
        for (int i = 0; i < 2; i++) {
            const char *v = NULL;
            size_t n = 0;
            if (!ju_opt_string(body, fields[i], &v, &n, err)) return false;
            if (v && (n == 0 || n >= API_ADAPTER_NAME_LEN))
                return api_errf(err, 400, NULL, fields[i], "'%s' must be 1..%d bytes", fields[i],
                                API_ADAPTER_NAME_LEN - 1);
        }
    }
    if (kind == API_GEN_SESSION && !ju_opt_bool(body, "render_special", &o->gp.render_special, err)) return false;
    return true;
}

/* Completion prompt: a string, token ids, or a one-element array of either. */
static bool parse_prompt(mn_serve *srv, json_t *body, json_t **out, api_err *err) {
    json_t *p = json_object_get(body, "prompt");
    if (!p || json_is_null(p)) return api_errf(err, 400, NULL, "prompt", "'prompt' is required");
    if (json_is_array(p) && json_array_size(p) == 1 && !json_is_integer(json_array_get(p, 0))) p = json_array_get(p, 0);
    if (json_is_string(p)) {
        *out = json_incref(p);
        return true;
    }
    if (!json_is_array(p))
        return api_errf(err, 400, NULL, "prompt", "'prompt' must be a string or an array of token ids");
    if (json_array_size(p) == 0) return api_errf(err, 400, NULL, "prompt", "'prompt' must not be empty");
    if (json_array_size(p) > (size_t)srv->n_ctx) /* before any copy: the engine would refuse it anyway */
        return api_errf(err, 400, NULL, "prompt", "'prompt' has %zu tokens, more than the context length %d",
                        json_array_size(p), srv->n_ctx);
    size_t i;
    json_t *v;
    json_array_foreach(p, i, v) {
        if (json_is_string(v) || json_is_array(v))
            return api_errf(err, 400, NULL, "prompt", "only one prompt per request is supported");
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= srv->model->cfg.n_vocab)
            return api_errf(err, 400, NULL, "prompt", "'prompt[%zu]' must be a token id in [0, %d)", i,
                            srv->model->cfg.n_vocab);
    }
    *out = json_incref(p);
    return true;
}

/* Chat messages -> [[role, text], ...]; content may be a string or text parts. */
static bool parse_messages(json_t *body, json_t **out, api_err *err) {
    json_t *ms = json_object_get(body, "messages");
    if (!ms || json_is_null(ms)) return api_errf(err, 400, NULL, "messages", "'messages' is required");
    if (!json_is_array(ms)) return api_errf(err, 400, NULL, "messages", "'messages' must be an array");
    if (json_array_size(ms) == 0) return api_errf(err, 400, NULL, "messages", "'messages' must not be empty");
    json_t *norm = json_array();
    size_t i;
    json_t *m;
    char param[64];
    json_array_foreach(ms, i, m) {
        if (!json_is_object(m)) {
            json_decref(norm);
            snprintf(param, sizeof param, "messages[%zu]", i);
            return api_errf(err, 400, NULL, param, "'messages[%zu]' must be an object", i);
        }
        const char *role = NULL;
        json_t *c = json_object_get(m, "content");
        snprintf(param, sizeof param, "messages[%zu].role", i);
        json_t *r = json_object_get(m, "role");
        if (!r || !json_is_string(r)) {
            json_decref(norm);
            return api_errf(err, 400, NULL, param, "'messages[%zu].role' must be a string", i);
        }
        role = json_string_value(r);
        int ri;
        if (!strcmp(role, "system") || !strcmp(role, "developer")) ri = MN_ROLE_SYSTEM;
        else if (!strcmp(role, "user")) ri = MN_ROLE_USER;
        else if (!strcmp(role, "assistant")) ri = MN_ROLE_ASSISTANT;
        else {
            json_decref(norm);
            return api_errf(err, 400, NULL, param,
                            "'messages[%zu].role' must be one of system, developer, user, assistant; got '%s'", i,
                            role);
        }
        snprintf(param, sizeof param, "messages[%zu].content", i);
        json_t *text = NULL;
        if (c && json_is_string(c)) {
            text = json_incref(c);
        } else if (c && json_is_array(c)) { /* [{"type":"text","text":"..."}, ...] joined */
            size_t k;
            json_t *part;
            size_t total = 0;
            json_array_foreach(c, k, part) {
                json_t *t = json_is_object(part) ? json_object_get(part, "text") : NULL;
                json_t *ty = json_is_object(part) ? json_object_get(part, "type") : NULL;
                if (!t || !json_is_string(t) || !ty || !json_is_string(ty) || strcmp(json_string_value(ty), "text")) {
                    json_decref(norm);
                    return api_errf(err, 400, NULL, param, "'messages[%zu].content[%zu]' must be a text part", i, k);
                }
                total += json_string_length(t);
            }
            char *buf = mn_malloc(total + 1);
            if (!buf) {
                json_decref(norm);
                return api_errf(err, 503, "server_error", NULL, "out of memory");
            }
            size_t o = 0;
            json_array_foreach(c, k, part) {
                json_t *t = json_object_get(part, "text");
                memcpy(buf + o, json_string_value(t), json_string_length(t));
                o += json_string_length(t);
            }
            text = json_stringn(buf, o);
            mn_free(buf);
        } else {
            json_decref(norm);
            return api_errf(err, 400, NULL, param, "'messages[%zu].content' must be a string or an array of text parts",
                            i);
        }
        json_array_append_new(norm, json_pack("[i,o]", ri, text));
    }
    *out = norm;
    return true;
}

/* ---- engine thread ------------------------------------------------------------------------ */

static json_t *token_json(const mn_tokenizer *tok, int32_t id, bool with_bytes) {
    size_t n = 0;
    const char *b = mn_token_bytes(tok, id, &n);
    if (!b) b = "", n = 0;
    json_t *s = ju_string_lossy(b, n);
    if (!with_bytes) return s;
    json_t *bytes = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(bytes, json_integer((unsigned char)b[i]));
    return json_pack("[o,o]", s, bytes);
}

static bool on_token(void *ud, int32_t token, const char *text, size_t len, const mn_sample_info *info) {
    api_gen *g = ud;
    uv_mutex_lock(&g->mu);
    bool cancel = g->cancel;
    uv_mutex_unlock(&g->mu);
    if (cancel) return false;
    const mn_tokenizer *tok = g->srv->model->tok;
    json_t *ev = json_object();
    json_object_set_new(ev, "t", json_integer(token));
    json_object_set_new(ev, "x", ju_string_lossy(text, len));
    json_object_set_new(ev, "ts", json_real(mono()));
    if (info && g->o.logprobs) {
        bool chat = g->kind != API_GEN_COMPLETION;
        json_object_set_new(ev, "lp", json_real(info->logprob));
        json_object_set_new(ev, "s", token_json(tok, token, chat));
        json_t *top = json_array();
        for (int32_t i = 0; i < info->n_top && i < g->o.top_logprobs; i++)
            json_array_append_new(
                top, json_pack("[o,f]", token_json(tok, info->top[i].token, chat), (double)info->top[i].logprob));
        json_object_set_new(ev, "top", top);
    }
    uv_mutex_lock(&g->mu);
    json_array_append_new(g->events, ev);
    bool post = !g->ev_queued;
    g->ev_queued = true;
    uv_mutex_unlock(&g->mu);
    if (post) mn_et_post_event(g->srv->et, &g->ev);
    return true;
}

static void gen_fin(void *ud) {   /* engine thread, after the step or job that ended g */
    api_gen *g = ud;
    if (g->temp && g->s) mn_session_delete(mn_et_engine(g->srv->et), g->s);
    g->s = NULL;
    gen_unref(g);
}

static void finish_locked_post(api_gen *g) {
    g->finished = true;
    bool post = !g->ev_queued;
    g->ev_queued = true;
    uv_mutex_unlock(&g->mu);
    if (post) mn_et_post_event(g->srv->et, &g->ev);
}

static void on_done(void *ud, const mn_gen_result *res, mn_err err, const char *msg) {
    api_gen *g = ud;
    uv_mutex_lock(&g->mu);
    g->finish = res ? res->finish : MN_FINISH_NONE;
    g->n_generated = res ? res->n_generated : 0;
    if (err != MN_OK) {
        api_err_from_mn(&g->err, err, msg, NULL);
        if (err == MN_EMISMATCH && msg && strstr(msg, "no longer loaded")) { /* DELETE /v1/adapters/{name}?force */
            g->err.status = 409;
            g->err.type = "conflict_error";
            snprintf(g->err.code, sizeof g->err.code, "adapter_unloaded");
            if (g->temp) /* the temporary session's id means nothing to the client */
                snprintf(g->err.message, sizeof g->err.message, "the adapter '%s' was unloaded during this request",
                         g->adapter);
        }
        if (err == MN_ELIMIT ||
            err == MN_ENOMEM) { /* a step could not get KV memory: over capacity, not the client's fault */
            g->err.status = 503;
            g->err.type = "server_error";
            g->err.retry_after = 1;
            snprintf(g->err.code, sizeof g->err.code, "over_capacity");
        }
    }
    finish_locked_post(g);
    g->s_done = true;
    if (g->s) mn_session_tokens(g->s, NULL, &g->end_len);
    mn_et_defer(g->srv->et, &g->fin);
}

static void start_failed(api_gen *g, const api_err *e) {
    uv_mutex_lock(&g->mu);
    g->err = *e;
    finish_locked_post(g);
    mn_et_defer(g->srv->et, &g->fin);
}

static void gen_start_job(void *ud) {
    api_gen *g = ud;
    mn_serve *srv = g->srv;
    mn_engine *e = mn_et_engine(srv->et);
    mn_errbuf eb = {{0}};
    api_err ae = {0};
    mn_err err = MN_OK;
    if (g->kind == API_GEN_SESSION) {
        g->s = api_registry_find(srv, g->sid, g->owner);
        if (!g->s) {
            api_errf(&ae, 404, "not_found_error", NULL, "session '%s' not found", g->sid);
            start_failed(g, &ae);
            return;
        }
        const char *cur = mn_session_adapter(g->s);
        if (g->adapter_given && strcmp(g->adapter, cur ? cur : "") != 0) { /* its KV was made under cur */
            api_errf(&ae, 400, "invalid_request_error", "model",
                     "session '%s' uses %s%s%s: a request on a session cannot change its adapter (create another "
                     "session)", g->sid, cur ? "adapter '" : "the base model", cur ? cur : "", cur ? "'" : "");
            start_failed(g, &ae);
            return;
        }
    } else {
        if ((err = mn_session_create(e, NULL, &g->s, &eb)) != MN_OK) goto fail;
        g->temp = true;
        if (g->adapter[0] && (err = mn_session_set_adapter(e, g->s, g->adapter, &eb)) != MN_OK) {
            if (err == MN_ENOT_FOUND) {
                api_errf(&ae, 404, "invalid_request_error", "model",
                         "The model '%s' does not exist (this server serves '%s' and its loaded adapters: "
                         "GET /v1/models)", g->adapter, srv->model_name);
                snprintf(ae.code, sizeof ae.code, "model_not_found");
                start_failed(g, &ae);
                return;
            }
            goto fail;
        }
        if (g->kind == API_GEN_COMPLETION && json_is_string(g->prompt)) {
            err = mn_session_submit_text(e, g->s, MN_ROLE_NONE, json_string_value(g->prompt),
                                         json_string_length(g->prompt), &eb);
        } else if (g->kind == API_GEN_COMPLETION) {
            size_t n = json_array_size(g->prompt);
            int32_t *t = mn_malloc(n * sizeof(int32_t));
            if (!t) { err = mn_errf(&eb, MN_ENOMEM, "out of memory"); goto fail; }
            for (size_t i = 0; i < n; i++) t[i] = (int32_t)json_integer_value(json_array_get(g->prompt, i));
            err = mn_session_submit_tokens(e, g->s, t, (int32_t)n, MN_ROLE_NONE, &eb);
            mn_free(t);
        } else {
            size_t i;
            json_t *m;
            json_array_foreach(g->prompt, i, m) {
                json_t *c = json_array_get(m, 1);
                err = mn_session_submit_text(e, g->s, (mn_role)json_integer_value(json_array_get(m, 0)),
                                             json_string_value(c), json_string_length(c), &eb);
                if (err != MN_OK) break;
            }
        }
        if (err != MN_OK) goto fail;
    }
    int32_t n_tok = 0;
    mn_session_tokens(g->s, NULL, &n_tok);
    mn_engine_stats es;
    mn_engine_stats_get(e, &es);
    int64_t pool = (int64_t)es.blocks_total * es.block_size;
    if (n_tok > pool) { /* would fail at every retry (503 is for a pool that is full now) */
        api_errf(&ae, 400, "invalid_request_error",
                 g->kind == API_GEN_CHAT ? "messages" : g->kind == API_GEN_COMPLETION ? "prompt" : NULL,
                 "the %s (%d tokens) is larger than the whole KV pool of this server (%lld tokens: %d blocks of %d); "
                 "it can never be computed", g->kind == API_GEN_SESSION ? "session" : "prompt", n_tok,
                 (long long)pool, es.blocks_total, es.block_size);
        snprintf(ae.code, sizeof ae.code, "kv_pool_exceeded");
        start_failed(g, &ae);
        return;
    }
    if (g->o.gp.max_tokens == 0) { /* default: what fits, capped */
        int32_t cap = g->kind == API_GEN_COMPLETION ? DEFAULT_MAX_TOKENS_COMPLETION : DEFAULT_MAX_TOKENS_CHAT;
        int32_t room = srv->n_ctx - n_tok - 8;   /* 8: the assistant header */
        g->o.gp.max_tokens = room < cap ? (room > 1 ? room : 1) : cap;
    }
    err = mn_session_generate_start(e, g->s, &g->o.gp, on_token, on_done, g, &eb);
    if (err != MN_OK) goto fail;
    mn_session_tokens(g->s, NULL, &g->start_len);
    uv_mutex_lock(&g->mu);
    g->n_prompt = g->start_len;
    uv_mutex_unlock(&g->mu);
    return;
fail:
    api_err_from_mn(&ae, err, eb.msg,
                    g->kind == API_GEN_CHAT         ? "messages"
                    : g->kind == API_GEN_COMPLETION ? "prompt"
                                                    : NULL);
    if ((err == MN_ELIMIT || err == MN_ERANGE) && strstr(ae.message, "max_tokens")) {
        snprintf(ae.param, sizeof ae.param, "max_tokens");
        if (g->temp && g->s &&
            strstr(ae.message, "context length")) { /* the temporary session's id means nothing to the client */
            int32_t n_prompt = 0;
            mn_session_tokens(g->s, NULL, &n_prompt);
            snprintf(ae.message, sizeof ae.message,
                     "the prompt (%d tokens) + max_tokens %d exceed the context length %d", n_prompt,
                     g->o.gp.max_tokens, srv->n_ctx);
        }
    }
    start_failed(g, &ae);
}

/* Stop g and keep only what the client received. The generation may have ended already
 * (its token callback saw the cancel flag, or it finished while the cancel was queued): the
 * undelivered tail is still rewound, unless something was appended since it ended. */
static void gen_cancel_job(void *ud) {
    api_gen *g = ud;
    mn_engine *e = mn_et_engine(g->srv->et);
    if (g->temp) {
        if (g->s && !g->s_done) mn_session_generate_cancel(e, g->s);
        gen_unref(g);
        return;
    }
    /* through the registry: the session may have been deleted meanwhile */
    mn_session *s = g->start_len > 0 ? api_registry_find(g->srv, g->sid, g->owner) : NULL;
    if (s && !g->s_done) mn_session_generate_cancel(e, s);
    if (s && g->s_done) {
        uv_mutex_lock(&g->mu);
        int32_t keep = g->start_len + g->cancel_at;
        uv_mutex_unlock(&g->mu);
        int32_t n = 0;
        mn_session_tokens(s, NULL, &n);
        mn_errbuf eb;
        if (n == g->end_len && keep < n) mn_session_rewind(e, s, keep, &eb);
    }
    gen_unref(g);
}

/* ---- loop thread: formatting ---------------------------------------------------------------- */

static const char *finish_name(mn_finish f) {
    switch (f) {
    case MN_FINISH_LENGTH: return "length";
    case MN_FINISH_EOG: case MN_FINISH_STOP: return "stop";
    case MN_FINISH_CANCELLED: return "cancelled";
    default: return "stop";
    }
}

static json_t *usage_json(int32_t prompt, int32_t gen) {
    return json_pack("{s:i, s:i, s:i}", "prompt_tokens", prompt, "completion_tokens", gen, "total_tokens",
                     prompt + gen);
}

/* Logprobs of one token event in the API's shape. Chat: a content entry; completion:
 * appended to the four parallel arrays of acc (created on first use). */
static json_t *chat_lp_entry(json_t *ev) {
    json_t *s = json_object_get(ev, "s");
    json_t *top = json_array();
    size_t i;
    json_t *t;
    json_array_foreach(json_object_get(ev, "top"), i, t) {
        json_t *ts = json_array_get(t, 0);
        json_array_append_new(top, json_pack("{s:O, s:O, s:O}", "token", json_array_get(ts, 0), "logprob",
                                             json_array_get(t, 1), "bytes", json_array_get(ts, 1)));
    }
    return json_pack("{s:O, s:O, s:O, s:o}", "token", json_array_get(s, 0), "logprob", json_object_get(ev, "lp"),
                     "bytes", json_array_get(s, 1), "top_logprobs", top);
}

static void completion_lp_add(json_t *acc, json_t *ev, int32_t text_off) {
    json_t *top = json_object();
    size_t i;
    json_t *t;
    json_array_foreach(json_object_get(ev, "top"), i, t)
        json_object_set(top, json_string_value(json_array_get(t, 0)), json_array_get(t, 1));
    json_array_append(json_object_get(acc, "tokens"), json_object_get(ev, "s"));
    json_array_append(json_object_get(acc, "token_logprobs"), json_object_get(ev, "lp"));
    json_array_append_new(json_object_get(acc, "top_logprobs"), top);
    json_array_append_new(json_object_get(acc, "text_offset"), json_integer(text_off));
}

static json_t *new_lp_acc(api_gen *g) {
    if (g->kind == API_GEN_COMPLETION)
        return json_pack("{s:[], s:[], s:[], s:[]}", "tokens", "token_logprobs", "top_logprobs", "text_offset");
    return json_pack("{s:[]}", "content");
}

static json_t *chunk_base(api_gen *g) {
    const char *object = g->kind == API_GEN_CHAT ? "chat.completion.chunk" : "text_completion";
    return json_pack("{s:s, s:s, s:I, s:s}", "id", g->id, "object", object, "created", (json_int_t)g->srv->created,
                     "model", g->model);
}

static bool sse_send(api_gen *g, json_t *j) {
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!s) return false;
    size_t n = strlen(s);
    char *buf = mn_malloc(n + 9);
    if (!buf) { mn_free(s); return false; }
    memcpy(buf, "data: ", 6);
    memcpy(buf + 6, s, n);
    memcpy(buf + 6 + n, "\n\n", 2);
    bool ok = mn_http_stream_write(g->res, buf, n + 8);
    mn_free(buf);
    mn_free(s);
    return ok;
}

/* One streamed chunk for token event ev (text may be empty). */
static bool stream_token(api_gen *g, json_t *ev) {
    json_t *x = json_object_get(ev, "x");
    bool has_lp = g->o.logprobs && json_object_get(ev, "lp");
    if (json_string_length(x) == 0 && !has_lp && g->kind != API_GEN_SESSION) return true;
    if (g->kind == API_GEN_SESSION) {
        json_t *j = json_pack("{s:O, s:O}", "token", json_object_get(ev, "t"), "text", x);
        if (has_lp) json_object_set(j, "logprob", json_object_get(ev, "lp"));
        return sse_send(g, j);
    }
    json_t *c = chunk_base(g), *choice;
    if (g->kind == API_GEN_CHAT) {
        choice = json_pack("{s:i, s:{s:O}, s:n, s:n}", "index", 0, "delta", "content", x, "logprobs", "finish_reason");
        if (has_lp) json_object_set_new(choice, "logprobs", json_pack("{s:[o]}", "content", chat_lp_entry(ev)));
    } else {
        choice = json_pack("{s:i, s:O, s:n, s:n}", "index", 0, "text", x, "logprobs", "finish_reason");
        if (has_lp) {
            json_t *acc = new_lp_acc(g);
            completion_lp_add(acc, ev, g->text_off);
            json_object_set_new(choice, "logprobs", acc);
        }
    }
    json_object_set_new(c, "choices", json_pack("[o]", choice));
    return sse_send(g, c);
}

static void stream_finish(api_gen *g, mn_finish fin, int32_t n_prompt, int32_t n_gen) {
    if (g->kind == API_GEN_SESSION) {
        sse_send(g, json_pack("{s:s, s:s, s:o}", "id", g->sid, "finish_reason", finish_name(fin), "usage",
                              usage_json(n_prompt, n_gen)));
    } else {
        json_t *c = chunk_base(g);
        json_t *choice = g->kind == API_GEN_CHAT ? json_pack("{s:i, s:{}, s:n, s:s}", "index", 0, "delta", "logprobs",
                                                             "finish_reason", finish_name(fin))
                                                 : json_pack("{s:i, s:s, s:n, s:s}", "index", 0, "text", "", "logprobs",
                                                             "finish_reason", finish_name(fin));
        json_object_set_new(c, "choices", json_pack("[o]", choice));
        if (g->o.include_usage) json_object_set_new(c, "usage", json_null());
        sse_send(g, c);
        if (g->o.include_usage) {
            c = chunk_base(g);
            json_object_set_new(c, "choices", json_array());
            json_object_set_new(c, "usage", usage_json(n_prompt, n_gen));
            sse_send(g, c);
        }
    }
    static const char done[] = "data: [DONE]\n\n";
    mn_http_stream_write(g->res, done, sizeof done - 1);
    mn_http_stream_end(g->res);
}

static void respond_whole(api_gen *g, mn_finish fin, int32_t n_prompt, int32_t n_gen) {
    json_t *text = ju_string_lossy(g->text ? g->text : "", g->text_len);
    json_t *lp = g->lp ? json_incref(g->lp) : json_null();
    json_t *j;
    if (g->kind == API_GEN_SESSION) {
        j = json_pack("{s:s, s:o, s:s, s:o}", "id", g->sid, "text", text, "finish_reason", finish_name(fin), "usage",
                      usage_json(n_prompt, n_gen));
        if (g->lp) json_object_set(j, "logprobs", lp);
        json_decref(lp);
    } else {
        j = chunk_base(g);
        json_t *choice;
        if (g->kind == API_GEN_CHAT) {
            json_object_set_new(j, "object", json_string("chat.completion"));
            choice = json_pack("{s:i, s:{s:s, s:o}, s:o, s:s}", "index", 0, "message", "role", "assistant", "content",
                               text, "logprobs", lp, "finish_reason", finish_name(fin));
        } else {
            choice = json_pack("{s:i, s:o, s:o, s:s}", "index", 0, "text", text, "logprobs", lp, "finish_reason",
                               finish_name(fin));
        }
        json_object_set_new(j, "choices", json_pack("[o]", choice));
        json_object_set_new(j, "usage", usage_json(n_prompt, n_gen));
    }
    api_respond_json(g->res, 200, j);
}

static void append_text(api_gen *g, const char *s, size_t n) {
    if (g->text_len + n + 1 > g->text_cap) {
        size_t cap = (g->text_cap ? g->text_cap * 2 : 256);
        while (cap < g->text_len + n + 1) cap *= 2;
        char *t = mn_realloc(g->text, cap);
        if (!t) return;   /* out of memory: the text is cut, the response still ends */
        g->text = t;
        g->text_cap = cap;
    }
    memcpy(g->text + g->text_len, s, n);
    g->text_len += n;
    g->text[g->text_len] = 0;
}

static void post_cancel(api_gen *g) {
    if (g->cancel_posted) return;
    g->cancel_posted = true;
    uv_mutex_lock(&g->mu);
    g->cancel = true;
    g->cancel_at =
        g->o.stream || g->has_sink ? g->delivered : 0; /* a whole answer that never went out: none delivered */
    g->refs++;
    uv_mutex_unlock(&g->mu);
    mn_et_post_job(g->srv->et, &g->cancel_job);
}

static void on_abort(void *ud) {
    api_gen *g = ud;
    if (g->res_done) return;
    g->aborted = true;
    g->srv->metrics.streams_cancelled++;
    post_cancel(g);
}

static void end_aborted(api_gen *g) {
    if (g->begun) mn_http_stream_end(g->res);
    else {
        api_err e;
        api_errf(&e, 499, "server_error", NULL, "client closed the request");
        api_err_respond(g->res, &e);
    }
    g->res_done = true;
}

static void count_token(api_gen *g, json_t *ev) {
    double ts = json_real_value(json_object_get(ev, "ts"));
    if (g->delivered == 0) api_hist_add(&g->srv->metrics.ttft, ts - g->t0);
    else api_hist_add(&g->srv->metrics.itl, ts - g->t_last);
    g->t_last = ts;
    g->delivered++;
    g->srv->metrics.generated_tokens++;
}

static void gen_release_loop(api_gen *g) {
    g->loop_released = true;
    g->srv->streams_active--;
    g->srv->metrics.streams_active = g->srv->streams_active;
    gen_unref(g);
}

/* Sink output: tokens until an interrupt, then the end (takes evs). */
static void gen_to_sink(api_gen *g, json_t *evs, bool finished, const api_err *err, mn_finish fin, int32_t n_prompt,
                        int32_t n_gen) {
    size_t i;
    json_t *ev;
    json_array_foreach(evs, i, ev) {
        if (g->aborted) break;   /* interrupted: what was not delivered is rewound */
        count_token(g, ev);
        if (!g->sink.on_token(g->sink.ud, ev)) api_gen_interrupt(g);
    }
    json_decref(evs);
    if (!finished || g->loop_released) return;
    if (!err->status) {
        g->srv->metrics.prompt_tokens += n_prompt;
        api_hist_add(&g->srv->metrics.e2e, mono() - g->t0);
    }
    g->sink.on_end(g->sink.ud, err->status ? err : NULL, g->aborted ? MN_FINISH_CANCELLED : fin, n_prompt,
                   g->aborted ? g->delivered : n_gen);
    gen_release_loop(g);
}

static void gen_on_event(void *ud) {
    api_gen *g = ud;
    mn_serve *srv = g->srv;
    uv_mutex_lock(&g->mu);
    json_t *evs = g->events;
    g->events = json_array();
    g->ev_queued = false;
    bool finished = g->finished;
    api_err err = g->err;
    mn_finish fin = g->finish;
    int32_t n_prompt = g->n_prompt, n_gen = g->n_generated;
    uv_mutex_unlock(&g->mu);
    if (g->has_sink) {
        gen_to_sink(g, evs, finished, &err, fin, n_prompt, n_gen);
        return;
    }

    /* failed before anything was streamed (a whole answer, even with some tokens): an error answer */
    if (!g->res_done && !g->aborted && err.status && finished && !g->begun &&
        (!g->o.stream || json_array_size(evs) == 0)) {
        api_err_respond(g->res, &err);
        api_metrics_request(srv, gen_route(g->kind), err.status);
        g->res_done = true;
    }
    if (!g->res_done && !g->aborted) {
        if (g->o.stream && !g->begun) {
            static const mn_http_header h[] = {{"Cache-Control", "no-cache"}};
            mn_http_stream_begin(g->res, 200, "text/event-stream", h, 1);
            g->begun = true;
            if (g->kind == API_GEN_CHAT) {
                json_t *c = chunk_base(g);
                json_object_set_new(c, "choices",
                                    json_pack("[{s:i, s:{s:s, s:s}, s:n, s:n}]", "index", 0, "delta", "role",
                                              "assistant", "content", "", "logprobs", "finish_reason"));
                sse_send(g, c);
            }
        }
        size_t i;
        json_t *ev;
        json_array_foreach(evs, i, ev) {
            count_token(g, ev);
            json_t *x = json_object_get(ev, "x");
            if (g->o.stream) {
                if (!stream_token(g, ev)) { /* never reached the client: not delivered */
                    g->delivered--;
                    g->aborted = true;
                    post_cancel(g);
                    break;
                }
            } else {
                if (g->o.logprobs && json_object_get(ev, "lp")) {
                    if (!g->lp) g->lp = new_lp_acc(g);
                    if (g->kind == API_GEN_COMPLETION) completion_lp_add(g->lp, ev, g->text_off);
                    else json_array_append_new(json_object_get(g->lp, "content"), chat_lp_entry(ev));
                }
                append_text(g, json_string_value(x), json_string_length(x));
            }
            g->text_off += (int32_t)json_string_length(x);
        }
        if (g->o.stream && !g->aborted && mn_http_res_pending(g->res) > srv->max_pending_write) {
            srv->metrics.streams_stalled++;  /* a client that stopped reading is treated as gone */
            g->aborted = true;
            post_cancel(g);
        }
        if (!g->aborted && finished && err.status && g->o.stream) { /* failed mid-stream: say so before [DONE] */
            size_t len = 0;
            char *body = api_err_body(&err, &len);
            if (body) {
                json_t *j = json_loadb(body, len, 0, NULL);
                if (j) sse_send(g, j);
                mn_free(body);
            }
        }
        if (!g->aborted && finished) {
            srv->metrics.prompt_tokens += n_prompt;
            api_hist_add(&srv->metrics.e2e, mono() - g->t0);
            if (g->o.stream) stream_finish(g, fin, n_prompt, n_gen);
            else respond_whole(g, fin, n_prompt, n_gen);
            api_metrics_request(srv, gen_route(g->kind), 200);
            g->res_done = true;
        }
    }
    json_decref(evs);
    if (!g->res_done && g->aborted && finished) end_aborted(g);
    if (g->res_done && finished && !g->loop_released) gen_release_loop(g);
}

/* ---- entry points ------------------------------------------------------------------------------ */

/* A new generation, validated and counted as active; NULL with err filled otherwise. */
static api_gen *gen_create(mn_serve *srv, api_gen_kind kind, json_t *body, const api_gen_opts *o,
                           const char *session_id, const char *owner, api_err *err) {
    api_gen *g = mn_calloc(1, sizeof *g);
    if (!g || uv_mutex_init(&g->mu) != 0 || !(g->events = json_array())) {
        if (g) { json_decref(g->events); mn_free(g); }
        api_errf(err, 503, "server_error", NULL, "out of memory");
        return NULL;
    }
    g->srv = srv;
    g->kind = kind;
    g->o = *o;
    g->o.gp.stops = g->o.stops_buf;
    g->body = json_incref(body);
    g->t0 = mono();
    g->refs = 2;   /* loop + engine */
    snprintf(g->sid, sizeof g->sid, "%s", session_id ? session_id : "");
    snprintf(g->owner, sizeof g->owner, "%s", owner ? owner : "");
    /* the model names the adapter: the base model's name (or none) means no adapter; the
     * name is resolved on the engine thread, where the registry lives */
    snprintf(g->model, sizeof g->model, "%s", srv->model_name);
    const char *want = json_string_value(json_object_get(body, "model"));
    if (kind == API_GEN_SESSION && json_is_string(json_object_get(body, "adapter")))
        want = json_string_value(json_object_get(body, "adapter"));
    if (want && strlen(want) < sizeof g->adapter) {
        g->adapter_given = true;
        if (strcmp(want, srv->model_name) != 0) {
            snprintf(g->adapter, sizeof g->adapter, "%s", want);
            snprintf(g->model, sizeof g->model, "%s", want);
        }
    }
    api_new_id(srv,
               kind == API_GEN_CHAT         ? "chatcmpl-"
               : kind == API_GEN_COMPLETION ? "cmpl-"
                                            : "gen-",
               g->id, sizeof g->id);
    g->job = (mn_et_item){NULL, gen_start_job, g};
    g->cancel_job = (mn_et_item){NULL, gen_cancel_job, g};
    g->ev = (mn_et_item){NULL, gen_on_event, g};
    g->fin = (mn_et_item){NULL, gen_fin, g};
    bool ok = true;
    if (kind == API_GEN_COMPLETION) ok = parse_prompt(srv, body, &g->prompt, err);
    else if (kind == API_GEN_CHAT) {
        ok = parse_messages(body, &g->prompt, err);
        if (ok && !srv->model->has_chat_template)
            ok = api_errf(err, 400, NULL, "messages",
                          "the model has no chat template mneme recognises: use /v1/completions");
    }
    if (ok && srv->max_streams > 0 && srv->streams_active >= srv->max_streams) {
        api_errf(err, 429, "rate_limit_error", NULL, "too many generations in progress (limit %d); retry later",
                 srv->max_streams);
        err->retry_after = 1;
        ok = false;
    }
    if (!ok) {
        g->refs = 1;
        gen_unref(g);
        return NULL;
    }
    srv->streams_active++;
    srv->metrics.streams_active = srv->streams_active;
    return g;
}

void api_gen_run(mn_serve *srv, api_gen_kind kind, json_t *body, const api_gen_opts *o, const char *session_id,
                 const char *owner, mn_http_res *res) {
    api_err err = {0};
    api_gen *g = gen_create(srv, kind, body, o, session_id, owner, &err);
    if (!g) {
        api_err_respond(res, &err);
        api_metrics_request(srv, gen_route(kind), err.status);
        return;
    }
    g->res = res;
    mn_http_res_on_abort(res, on_abort, g);
    mn_et_post_job(srv->et, &g->job);
}

api_gen *api_gen_run_sink(mn_serve *srv, json_t *body, const api_gen_opts *o, const char *session_id, const char *owner,
                          const api_gen_sink *sink, api_err *err) {
    api_gen *g = gen_create(srv, API_GEN_SESSION, body, o, session_id, owner, err);
    if (!g) return NULL;
    g->sink = *sink;
    g->has_sink = true;
    mn_et_post_job(srv->et, &g->job);
    return g;
}

void api_gen_interrupt(api_gen *g) {
    if (g->aborted || g->loop_released) return;
    g->aborted = true;
    post_cancel(g);
}

void api_completions(mn_serve *srv, const mn_http_req *req, mn_http_res *res, const char *owner, bool chat) {
    const char *route = chat ? "/v1/chat/completions" : "/v1/completions";
    api_err err = {0};
    json_t *body = NULL;
    api_gen_opts o;
    const char *model = NULL;
    if (!ju_parse_object(req->body, req->body_len, &body, &err) ||
        !ju_opt_string(body, "model", &model, NULL, &err) ||
        !api_gen_parse(srv, body, chat ? API_GEN_CHAT : API_GEN_COMPLETION, &o, &err)) {
        api_err_respond(res, &err);
        api_metrics_request(srv, route, err.status);
        json_decref(body);
        return;
    }
    if (model && (strlen(model) >= API_ADAPTER_NAME_LEN || !*model)) { /* others: resolved on the engine thread */
        api_errf(&err, 404, "invalid_request_error", "model",
                 "The model '%.64s' does not exist (this server serves '%s')", model, srv->model_name);
        snprintf(err.code, sizeof err.code, "model_not_found");
        api_err_respond(res, &err);
        api_metrics_request(srv, route, err.status);
        json_decref(body);
        return;
    }
    if (srv->draining) {
        api_errf(&err, 503, "server_error", NULL, "the server is shutting down");
        api_err_respond(res, &err);
        api_metrics_request(srv, route, 503);
        json_decref(body);
        return;
    }
    bool echo = false;
    if (!chat && (!ju_opt_bool(body, "echo", &echo, &err) ||
                  (echo && !api_errf(&err, 400, NULL, "echo", "'echo' is not supported")))) {
        api_err_respond(res, &err);
        api_metrics_request(srv, route, err.status);
        json_decref(body);
        return;
    }
    api_gen_run(srv, chat ? API_GEN_CHAT : API_GEN_COMPLETION, body, &o, NULL, owner, res);
    json_decref(body);
}
