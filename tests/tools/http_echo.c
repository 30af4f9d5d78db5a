/* tests/tools/http_echo.c — the HTTP transport (server/http.h) with a trivial application,
 * driven by tests/python/test_http_transport.py.
 *
 *   http_echo [--host H] [--port P] [--max-header N] [--max-body N] [--idle-ms N]
 *             [--request-ms N] [--max-pending N] [--max-conns N]
 *
 * Prints "port N" on stdout once listening; exits 0 on SIGTERM or SIGINT after closing
 * every connection. Routes:
 *   /stream?n=N&ms=M&size=S  N chunks of S bytes ('a'..., or "chunk\n" without size), one per
 *                            tick every M ms (16 per tick when M <= 1); nothing is written
 *                            while mn_http_res_pending exceeds --max-pending
 *   /slow?ms=M               answers {"slow":M} after M ms (uv timer)
 *   /ws                      WebSocket: echoes text and binary; "close" makes the server close
 *                            (1000 "bye"); "big:N" answers N bytes of text
 *   /nocontent               204 (the body handed to mn_http_respond must not be sent)
 *   /stats                   {"connections", "aborts", "ws_closes", "ws_last_code"}
 *   anything else            echoes {"method","path","query","headers":[[n,v]...],"body"}
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "engine/alloc.h"
#include "server/http.h"

typedef struct echo_app {
    uv_loop_t *loop;
    mn_http_server *srv;
    mn_http_limits lim;
    uv_signal_t sigterm, sigint;
    long n_aborts;           /* responses cut short: abort callbacks and failed stream writes (/stats) */
    long ws_closes;          /* WebSocket on_close calls, and the last code */
    int ws_last_code;
} echo_app;

/* value of key in a query string ("a=1&b=2"), or def */
static long query_num(const char *q, const char *key, long def) {
    size_t kl = strlen(key);
    while (q && *q) {
        if (strncmp(q, key, kl) == 0 && q[kl] == '=') return strtol(q + kl + 1, NULL, 10);
        q = strchr(q, '&');
        if (q) q++;
    }
    return def;
}

/* ---- /stream ---- */

typedef struct stream_job {
    echo_app *app;
    mn_http_res *res;
    uv_timer_t timer;
    long left, size;
    int burst;               /* chunks per tick: 1, or 16 with ms <= 1 (bulk streams) */
    char *chunk;
} stream_job;

static void stream_job_closed(uv_handle_t *h) {
    stream_job *j = h->data;
    mn_free(j->chunk);
    mn_free(j);
}

static void stream_job_end(stream_job *j) {
    mn_http_stream_end(j->res);
    j->res = NULL;
    uv_timer_stop(&j->timer);
    uv_close((uv_handle_t *)&j->timer, stream_job_closed);
}

static void stream_abort(void *ud) {
    stream_job *j = ud;
    j->app->n_aborts++;
    stream_job_end(j);
}

static void stream_tick(uv_timer_t *t) {
    stream_job *j = t->data;
    /* a producer that respects backpressure: nothing more while the client lags behind */
    for (int i = 0; i < j->burst && j->left > 0; i++) {
        if (mn_http_res_pending(j->res) > j->app->lim.max_pending_write) return;
        if (!mn_http_stream_write(j->res, j->chunk, (size_t)j->size)) {
            j->app->n_aborts++; /* the client is gone and we noticed first */
            stream_job_end(j);
            return;
        }
        j->left--;
    }
    if (j->left == 0) stream_job_end(j);
}

static void route_stream(echo_app *app, const mn_http_req *req, mn_http_res *res) {
    stream_job *j = mn_calloc(1, sizeof *j);
    long ms = query_num(req->query, "ms", 10);
    j->app = app;
    j->res = res;
    j->left = query_num(req->query, "n", 3);
    j->burst = ms > 1 ? 1 : 16;
    j->size = query_num(req->query, "size", 0);
    if (j->size <= 0) j->size = 0;
    j->chunk = mn_malloc((size_t)j->size + 32);
    memset(j->chunk, 'a', (size_t)j->size);
    if (j->size == 0) j->size = snprintf(j->chunk, 32, "chunk\n");
    uv_timer_init(app->loop, &j->timer);
    j->timer.data = j;
    mn_http_res_on_abort(res, stream_abort, j);
    mn_http_stream_begin(res, 200, "text/plain", NULL, 0);
    uv_timer_start(&j->timer, stream_tick, (uint64_t)(ms > 0 ? ms : 0), (uint64_t)(ms > 0 ? ms : 1));
}

/* ---- /slow ---- */

typedef struct slow_job {
    echo_app *app;
    mn_http_res *res;
    uv_timer_t timer;
    long ms;
} slow_job;

static void slow_closed(uv_handle_t *h) { mn_free(h->data); }

static void slow_finish(slow_job *j, bool aborted) {
    char body[64];
    int n = snprintf(body, sizeof body, "{\"slow\":%ld}", j->ms);
    mn_http_respond(j->res, aborted ? 500 : 200, "application/json", body, (size_t)n, NULL, 0);
    uv_timer_stop(&j->timer);
    uv_close((uv_handle_t *)&j->timer, slow_closed);
}

static void slow_tick(uv_timer_t *t) { slow_finish(t->data, false); }
static void slow_abort(void *ud) {
    slow_job *j = ud;
    j->app->n_aborts++;
    slow_finish(j, true);
}

static void route_slow(echo_app *app, const mn_http_req *req, mn_http_res *res) {
    slow_job *j = mn_calloc(1, sizeof *j);
    j->app = app;
    j->res = res;
    j->ms = query_num(req->query, "ms", 100);
    uv_timer_init(app->loop, &j->timer);
    j->timer.data = j;
    mn_http_res_on_abort(res, slow_abort, j);
    uv_timer_start(&j->timer, slow_tick, (uint64_t)j->ms, 0);
}

/* ---- /ws ---- */

static void ws_text(void *ud, mn_http_ws *ws, const char *data, size_t len) {
    if (len == 5 && memcmp(data, "close", 5) == 0) {
        mn_http_ws_close(ws, 1000, "bye");
    } else if (len > 4 && memcmp(data, "big:", 4) == 0) {
        size_t n = strtoul(data + 4, NULL, 10);
        char *b = mn_malloc(n + 1);
        memset(b, 'w', n);
        mn_http_ws_send_text(ws, b, n);
        mn_free(b);
    } else {
        mn_http_ws_send_text(ws, data, len);
    }
}

static void ws_binary(void *ud, mn_http_ws *ws, const char *data, size_t len) { mn_http_ws_send_binary(ws, data, len); }

static void ws_closed(void *ud, mn_http_ws *ws, int code, const char *reason) {
    echo_app *app = ud;
    app->ws_closes++;
    app->ws_last_code = code;
}

static void route_ws(echo_app *app, const mn_http_req *req, mn_http_res *res) {
    static const mn_http_ws_callbacks cb = {ws_text, ws_binary, ws_closed};
    mn_http_ws_accept(res, &cb, app); /* answers 400 itself when req is no upgrade */
}

/* ---- echo ---- */

static void route_echo(const mn_http_req *req, mn_http_res *res) {
    json_t *hs = json_array();
    for (int i = 0; i < req->n_headers; i++)
        json_array_append_new(hs, json_pack("[s,s]", req->headers[i].name, req->headers[i].value));
    json_t *o = json_pack("{s:s, s:s, s:s, s:o, s:s%, s:i}", "method", req->method, "path", req->path, "query",
                          req->query, "headers", hs, "body", req->body, req->body_len, "body_len",
                          (json_int_t)req->body_len);
    char *s = o ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    if (s) mn_http_respond(res, 200, "application/json", s, strlen(s), NULL, 0);
    else mn_http_respond(res, 500, "text/plain", "json\n", 5, NULL, 0); /* body not UTF-8 */
    free(s);
    json_decref(o);
}

static void handler(void *ud, const mn_http_req *req, mn_http_res *res) {
    echo_app *app = ud;
    if (strcmp(req->path, "/stream") == 0) route_stream(app, req, res);
    else if (strcmp(req->path, "/slow") == 0) route_slow(app, req, res);
    else if (strcmp(req->path, "/ws") == 0) route_ws(app, req, res);
    else if (strcmp(req->path, "/nocontent") == 0) mn_http_respond(res, 204, NULL, "ignored", 7, NULL, 0);
    else if (strcmp(req->path, "/stats") == 0) {
        char b[160];
        int n = snprintf(b, sizeof b, "{\"connections\":%d,\"aborts\":%ld,\"ws_closes\":%ld,\"ws_last_code\":%d}",
                         mn_http_server_n_connections(app->srv), app->n_aborts, app->ws_closes, app->ws_last_code);
        mn_http_respond(res, 200, "application/json", b, (size_t)n, NULL, 0);
    }
    else route_echo(req, res);
}

/* ---- main ---- */

static void on_closed(void *ud) {
    echo_app *app = ud;
    uv_close((uv_handle_t *)&app->sigterm, NULL);
    uv_close((uv_handle_t *)&app->sigint, NULL);
}

static void on_signal(uv_signal_t *h, int signum) {
    echo_app *app = h->data;
    uv_signal_stop(&app->sigterm);
    uv_signal_stop(&app->sigint);
    mn_http_server_close(app->srv, on_closed, app);
}

int main(int argc, char **argv) {
    echo_app app = {0};
    app.lim = mn_http_limits_default();
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "http_echo: %s needs a value\n", a);
            return 2;
        }
        i++;
        if (strcmp(a, "--host") == 0) host = v;
        else if (strcmp(a, "--port") == 0) port = atoi(v);
        else if (strcmp(a, "--max-header") == 0) app.lim.max_header_bytes = strtoull(v, NULL, 10);
        else if (strcmp(a, "--max-body") == 0) app.lim.max_body_bytes = strtoull(v, NULL, 10);
        else if (strcmp(a, "--idle-ms") == 0) app.lim.idle_timeout_ms = atoi(v);
        else if (strcmp(a, "--request-ms") == 0) app.lim.request_timeout_ms = atoi(v);
        else if (strcmp(a, "--max-pending") == 0) app.lim.max_pending_write = strtoull(v, NULL, 10);
        else if (strcmp(a, "--max-conns") == 0) app.lim.max_connections = atoi(v);
        else {
            fprintf(stderr, "http_echo: unknown option %s\n", a);
            return 2;
        }
    }
    app.loop = uv_default_loop();
    mn_errbuf eb;
    if (mn_http_server_new(app.loop, host, port, &app.lim, handler, &app, &app.srv, &eb) != MN_OK) {
        fprintf(stderr, "http_echo: %s\n", eb.msg);
        return 1;
    }
    uv_signal_init(app.loop, &app.sigterm);
    uv_signal_init(app.loop, &app.sigint);
    app.sigterm.data = app.sigint.data = &app;
    uv_signal_start(&app.sigterm, on_signal, SIGTERM);
    uv_signal_start(&app.sigint, on_signal, SIGINT);
    printf("port %d\n", mn_http_server_port(app.srv));
    fflush(stdout);
    uv_run(app.loop, UV_RUN_DEFAULT);
    mn_http_server_free(app.srv);
    int rc = uv_loop_close(app.loop);
    if (rc != 0) fprintf(stderr, "http_echo: loop still has handles at exit: %s\n", uv_strerror(rc));
    return rc == 0 ? 0 : 1;
}
