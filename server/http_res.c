/* server/http_res.c — responses of the HTTP transport: the per-connection queue that keeps
 * pipelined answers in request order, whole and streamed (chunked) bodies, and the
 * transport's own error answers in the OpenAI error shape.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "server/http_impl.h"

static const char *status_reason(int status) {
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    case 507: return "Insufficient Storage";
    default: return status < 300 ? "OK" : status < 500 ? "Client Error" : "Server Error";
    }
}

static char *error_json(const char *message, const char *type) {
    json_t *o = json_pack("{s:{s:s, s:s, s:n, s:n}}", "error", "message", message, "type",
                          type ? type : "invalid_request_error", "param", "code");
    if (!o) return NULL;
    char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    return s;
}

bool mn_http__res_emitv(mn_http_res *r, uv_buf_t *bufs, int n) {
    mn_http__conn *c = r->c;
    if (!c || c->closing) return false;
    if (c->qhead == r) {
        mn_http__conn_sendv(c, bufs, n);
        return !c->closing;
    }
    for (int i = 0; i < n; i++)
        if (!mn_http__buf_append(&r->out, bufs[i].base, bufs[i].len)) {
            mn_http__conn_close(c);
            return false;
        }
    return true;
}

/* ---- responses ---- */

void mn_http__res_free(mn_http_res *r) {
    mn_http__buf_release(&r->out);
    mn_free(r);
}

mn_http_res *mn_http__res_new(mn_http__conn *c) {
    mn_http_res *r = mn_calloc(1, sizeof *r);
    if (!r) return NULL;
    r->c = c;
    if (c->qtail) c->qtail->next = r;
    else c->qhead = r;
    c->qtail = r;
    c->n_res++;
    return r;
}

/* The head's owner ended it: pop finished responses, let the next one write what it
 * buffered, then maybe parse more input. */
void mn_http__conn_advance(mn_http__conn *c) {
    while (c->qhead && c->qhead->done && !c->closing) {
        mn_http_res *r = c->qhead;
        bool ka = r->keep_alive;
        c->qhead = r->next;
        if (!c->qhead) c->qtail = NULL;
        c->n_res--;
        mn_http__res_free(r);
        if (!ka) { /* this answer ends the connection: drop anything after it */
            c->no_more = true;
            while (c->qhead) {
                mn_http_res *n = c->qhead;
                c->qhead = n->next;
                n->next = NULL;
                if (!c->qhead) c->qtail = NULL;
                c->n_res--;
                n->c = NULL;
                if (n->done) {
                    mn_http__res_free(n);
                } else {
                    n->aborted = true;
                    if (n->abort_cb) n->abort_cb(n->abort_ud);
                }
            }
            break;
        }
        mn_http_res *h = c->qhead;
        if (h && h->out.len) {
            uv_buf_t b = uv_buf_init(h->out.p, (unsigned)h->out.len);
            mn_http__conn_sendv(c, &b, 1);
            mn_http__buf_release(&h->out);
        }
    }
    if (c->closing) return;
    if (!c->in_parse && c->in.len && !c->no_more) mn_http__process_input(c);
    else mn_http__conn_update(c);
}

void mn_http__res_finish(mn_http_res *r) {
    r->done = true;
    mn_http__conn *c = r->c;
    if (!c) {
        if (!r->abort_pending) mn_http__res_free(r); /* else freed with the connection */
        return;
    }
    if (c->qhead == r) mn_http__conn_advance(c);
}

static bool put(mn_http__buf *b, const char *str) { return mn_http__buf_append(b, str, strlen(str)); }

static void res_write_head(mn_http_res *r, int status, const char *content_type, const mn_http_header *extra,
                           int n_extra, const char *length_or_te) {
    mn_http__buf h = {0};
    char line[256];
    snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\n", status, status_reason(status));
    bool ok = put(&h, line);
    if (content_type) ok = ok && put(&h, "Content-Type: ") && put(&h, content_type) && put(&h, "\r\n");
    if (length_or_te) ok = ok && put(&h, length_or_te);
    ok = ok && put(&h, r->keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n");
    for (int i = 0; i < n_extra && ok; i++)
        ok = put(&h, extra[i].name) && put(&h, ": ") && put(&h, extra[i].value) && put(&h, "\r\n");
    ok = ok && put(&h, "\r\n");
    if (!ok) {
        mn_http__buf_release(&h);
        if (r->c) mn_http__conn_close(r->c);
        return;
    }
    uv_buf_t b = uv_buf_init(h.p, (unsigned)h.len);
    mn_http__res_emitv(r, &b, 1);
    mn_http__buf_release(&h);
}

void mn_http_respond(mn_http_res *res, int status, const char *content_type, const char *body, size_t len,
                     const mn_http_header *extra, int n_extra) {
    if (res->done || res->started) return; /* misuse: the handler answered twice */
    res->started = true;
    if (res->c) {
        /* 204 and 304 never carry a body, nor here a Content-Length (RFC 9110 6.4.1, 8.6) */
        bool no_body = status == 204 || status == 304;
        char cl[64];
        snprintf(cl, sizeof cl, "Content-Length: %zu\r\n", len);
        res_write_head(res, status, content_type, extra, n_extra, no_body ? NULL : cl);
        if (len && !no_body && !res->head && res->c) {
            uv_buf_t b = uv_buf_init((char *)body, (unsigned)len);
            mn_http__res_emitv(res, &b, 1);
        }
    }
    mn_http__res_finish(res);
}

void mn_http_stream_begin(mn_http_res *res, int status, const char *content_type, const mn_http_header *extra,
                          int n_extra) {
    if (res->done || res->started) return;
    res->started = true;
    if (!res->c) return;
    /* HTTP/1.0 has no chunked framing: the body ends when the connection closes */
    res->chunked = !res->http10;
    if (!res->chunked) res->keep_alive = false;
    res_write_head(res, status, content_type, extra, n_extra, res->chunked ? "Transfer-Encoding: chunked\r\n" : NULL);
}

bool mn_http_stream_write(mn_http_res *res, const char *data, size_t len) {
    if (!res->c || res->aborted || res->c->closing || res->done) return false;
    if (len == 0 || res->head) return true;
    if (!res->chunked) {
        uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
        return mn_http__res_emitv(res, &b, 1);
    }
    char hdr[32];
    int hl = snprintf(hdr, sizeof hdr, "%zx\r\n", len);
    uv_buf_t b[3] = {uv_buf_init(hdr, (unsigned)hl), uv_buf_init((char *)data, (unsigned)len),
                     uv_buf_init("\r\n", 2)};
    return mn_http__res_emitv(res, b, 3);
}

void mn_http_stream_end(mn_http_res *res) {
    if (res->done) return;
    if (res->c && res->started && res->chunked && !res->head) {
        uv_buf_t b = uv_buf_init("0\r\n\r\n", 5);
        mn_http__res_emitv(res, &b, 1);
    }
    mn_http__res_finish(res);
}

size_t mn_http_res_pending(const mn_http_res *res) {
    if (!res->c) return 0;
    /* Bytes a pipelined response buffers while an earlier one is still going wait for that
     * answer, not for the client: only the socket's backlog says whether it reads. */
    return (res->c->qhead == res ? res->out.len : 0) + res->c->pending;
}

void mn_http_res_on_abort(mn_http_res *res, void (*cb)(void *ud), void *ud) {
    res->abort_cb = cb;
    res->abort_ud = ud;
}

/* A transport error: answer it in order after earlier responses, then close. */
void mn_http__conn_fail(mn_http__conn *c, int status, const char *msg) {
    if (c->closing || c->no_more) return;
    c->no_more = true;
    c->in_msg = false;
    mn_http_res *r = mn_http__res_new(c);
    if (!r) {
        mn_http__conn_close(c);
        return;
    }
    r->keep_alive = false;
    char *body = error_json(msg, "invalid_request_error");
    if (!body) {
        mn_http__conn_close(c);
        return;
    }
    mn_http_header retry = {"Retry-After", "1"};
    mn_http_respond(r, status, "application/json", body, strlen(body), status == 503 ? &retry : NULL,
                    status == 503 ? 1 : 0);
    free(body); /* json_dumps uses malloc */
    if (!c->closing) mn_http__conn_update(c);
}
