/* server/http.c — the HTTP/1.1 transport (contract in server/http.h).
 *
 * One mn_http__conn per accepted socket. Its input goes through llhttp; every complete
 * request becomes an mn_http_res appended to the connection's queue and is handed to the
 * application. Only the queue's head writes to the socket; later responses buffer their
 * bytes in their own res until everything before them ended, which keeps pipelined answers
 * in request order.
 *
 * The parser is paused at the end of every message (on_message_complete returns
 * HPE_PAUSED), so the transport always knows where one request ends and the next begins:
 * error offsets are relative to the request's first byte, and bytes beyond the pipelining
 * limit stay in conn->in until the queue shrinks (meanwhile the socket is not read).
 *
 * Backpressure: the socket is not read while more than max_pending_write bytes wait in
 * libuv's write queue, or while MN_HTTP__MAX_INFLIGHT requests are outstanding, so a
 * client that does not read cannot make the server buffer more than about
 * max_pending_write plus what the application chooses to queue (mn_http_res_pending).
 *
 * Closing: after a final answer that ends the connection (Connection: close, HTTP/1.0,
 * transport error) the write side is shut down and input is read and discarded for up to
 * MN_HTTP__LINGER_MS, so unread request bytes do not turn the close into an RST that
 * could destroy the answer before the client read it.
 */
#include "server/http.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>

#include <jansson.h>

#include "engine/alloc.h"
#include "server/http_impl.h"

static void process_input(mn_http__conn *c);
static void process_read(mn_http__conn *c, const char *data, size_t len);
static void res_free(mn_http_res *r);
static void conn_fail(mn_http__conn *c, int status, const char *msg);

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

mn_http_limits mn_http_limits_default(void) {
    mn_http_limits l = {
        .max_header_bytes = 16 * 1024,
        .max_body_bytes = 8u << 20,
        .idle_timeout_ms = 60 * 1000,
        .request_timeout_ms = 30 * 1000,
        .max_pending_write = 1u << 20,
        .max_connections = 4096,
    };
    return l;
}

const char *mn_http_req_header(const mn_http_req *r, const char *lower_name) {
    for (int i = 0; i < r->n_headers; i++)
        if (strcmp(r->headers[i].name, lower_name) == 0) return r->headers[i].value;
    return NULL;
}

static char *error_json(const char *message, const char *type) {
    json_t *o = json_pack("{s:{s:s, s:s, s:n, s:n}}", "error", "message", message, "type",
                          type ? type : "invalid_request_error", "param", "code");
    if (!o) return NULL;
    char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    return s;
}

/* ---- socket writes ---- */

typedef struct mn_http__wreq {
    uv_write_t req;
    mn_http__conn *c;
    size_t len;
    char data[];
} mn_http__wreq;

static void on_write(uv_write_t *req, int status) {
    mn_http__wreq *w = (mn_http__wreq *)req;
    mn_http__conn *c = w->c;
    c->pending -= w->len;
    mn_free(w);
    if (status < 0) {
        mn_http__conn_close(c);
        return;
    }
    if (c->tmode == T_STALL) c->tmode = T_NONE; /* progress: restart the stall clock */
    mn_http__conn_update(c);
}

/* Write bufs in order after everything queued before. Tries the socket directly when
 * nothing is queued; copies what it could not write. */
static void conn_sendv(mn_http__conn *c, uv_buf_t *bufs, int n) {
    if (c->closing || c->shutdown_sent) return;
    size_t total = 0;
    for (int i = 0; i < n; i++) total += bufs[i].len;
    if (total == 0) return;
    size_t skip = 0;
    if (c->pending == 0) {
        int w = uv_try_write((uv_stream_t *)&c->tcp, bufs, (unsigned)n);
        if (w < 0 && w != UV_EAGAIN) {
            mn_http__conn_close(c);
            return;
        }
        if (w > 0) skip = (size_t)w;
        if (skip == total) return;
    }
    size_t rem = total - skip;
    mn_http__wreq *wr = mn_malloc(sizeof *wr + rem);
    if (!wr) {
        mn_http__conn_close(c);
        return;
    }
    wr->c = c;
    wr->len = rem;
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        size_t l = bufs[i].len;
        const char *p = bufs[i].base;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        p += skip;
        l -= skip;
        skip = 0;
        memcpy(wr->data + o, p, l);
        o += l;
    }
    uv_buf_t b = uv_buf_init(wr->data, (unsigned)rem);
    int rc = uv_write(&wr->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (rc < 0) {
        mn_free(wr);
        mn_http__conn_close(c);
        return;
    }
    c->pending += rem;
    mn_http__conn_update(c); /* maybe stop reading; start the stall clock */
}

/* Bytes of one response: straight to the socket at the queue's head, else kept in res. */
bool mn_http__res_emitv(mn_http_res *r, uv_buf_t *bufs, int n) {
    mn_http__conn *c = r->c;
    if (!c || c->closing) return false;
    if (c->qhead == r) {
        conn_sendv(c, bufs, n);
        return !c->closing;
    }
    for (int i = 0; i < n; i++)
        if (!mn_http__buf_append(&r->out, bufs[i].base, bufs[i].len)) {
            mn_http__conn_close(c);
            return false;
        }
    return true;
}

/* ---- connection state ---- */

static void on_close_handle(uv_handle_t *h) {
    mn_http__conn *c = h->data;
    mn_http_server *s = c->s;
    s->n_handles--;
    if (--c->handles_open > 0) return;
    mn_http__buf_release(&c->in);
    mn_http__buf_release(&c->arena);
    mn_http__buf_release(&c->body);
    mn_free(c->hdr_off);
    mn_free(c);
    if (s->closing && s->n_handles == 0 && s->on_closed) s->on_closed(s->on_closed_ud);
}

/* Detach every response: finished ones are freed, unfinished ones learn of the abort
 * and are freed when their owner ends them. */
static void conn_abort_queue(mn_http__conn *c) {
    mn_http_res *r = c->qhead;
    c->qhead = c->qtail = NULL;
    c->n_res = 0;
    while (r) {
        mn_http_res *next = r->next;
        r->next = NULL;
        r->c = NULL;
        if (r->done) {
            res_free(r);
        } else {
            r->aborted = true;
            if (r->abort_cb) r->abort_cb(r->abort_ud); /* may end (and free) r */
        }
        r = next;
    }
}

void mn_http__conn_close(mn_http__conn *c) {
    if (c->closing) return;
    c->closing = true;
    mn_http_server *s = c->s;
    if (c->counted) s->n_conns--;
    if (c->prev) c->prev->next = c->next;
    else s->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    c->prev = c->next = NULL;
    uv_timer_stop(&c->timer);
    if (c->reading) uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
    uv_close((uv_handle_t *)&c->tcp, on_close_handle);
    uv_close((uv_handle_t *)&c->timer, on_close_handle);
    conn_abort_queue(c);
}

static void on_timer(uv_timer_t *t) {
    mn_http__conn *c = t->data;
    int mode = c->tmode;
    c->tmode = T_NONE;
    if (c->closing) return;
    if (mode == T_STALL) {
        /* libuv's queue shrinks with partial writes too: any progress re-arms the clock */
        size_t q = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
        if (q < c->stall_mark) {
            c->stall_mark = q;
            c->tmode = T_STALL;
            uv_timer_start(&c->timer, on_timer, (uint64_t)c->s->lim.idle_timeout_ms, 0);
            return;
        }
    }
    if (c->lingering || mode == T_STALL || mode == T_WSCLOSE || (!c->in_msg && c->n_res == 0)) {
        mn_http__conn_close(c); /* idle keep-alive connection, a client that stopped reading, or linger over */
        return;
    }
    if (c->in_msg && !c->no_more) {
        char msg[160];
        snprintf(msg, sizeof msg, "request not received completely within %d ms (request_timeout)",
                 c->s->lim.request_timeout_ms);
        conn_fail(c, 408, msg);
    }
}

static void on_shutdown(uv_shutdown_t *req, int status) {
    mn_http__conn *c = req->data;
    mn_free(req);
    if (c->closing) return;
    if (status < 0) {
        mn_http__conn_close(c);
        return;
    }
    /* answer delivered to the kernel: discard what the client still sends for a while */
    c->lingering = true;
    c->tmode = T_LINGER;
    uv_timer_start(&c->timer, on_timer, MN_HTTP__LINGER_MS, 0);
    mn_http__conn_update(c);
}

static void conn_begin_shutdown(mn_http__conn *c) {
    if (c->shutdown_sent || c->closing) return;
    uv_shutdown_t *req = mn_malloc(sizeof *req);
    if (!req) {
        mn_http__conn_close(c);
        return;
    }
    req->data = c;
    c->shutdown_sent = true;
    if (uv_shutdown(req, (uv_stream_t *)&c->tcp, on_shutdown) < 0) {
        mn_free(req);
        mn_http__conn_close(c);
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    mn_http__conn *c = h->data;
    mn_http_server *s = c->s;
    if (s->readbuf_busy) { /* cannot happen with libuv's read loop; be safe */
        *buf = uv_buf_init(NULL, 0);
        return;
    }
    s->readbuf_busy = true;
    *buf = uv_buf_init(s->readbuf, sizeof s->readbuf);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
    mn_http__conn *c = st->data;
    mn_http_server *s = c->s;
    if (buf->base == s->readbuf) s->readbuf_busy = false;
    if (nread == 0 || c->closing) return;
    if (nread < 0) {
        mn_http__conn_close(c); /* EOF or error: the client is gone; unfinished answers are aborted */
        return;
    }
    if (c->lingering) return; /* discard */
    if (c->ws) {
        if (!mn_http__buf_append(&c->in, buf->base, (size_t)nread)) mn_http__conn_close(c);
        else mn_http__ws_feed(c);
        return;
    }
    if (c->no_more) return; /* after the last request: discard */
    process_read(c, buf->base, (size_t)nread);
}

/* Read when we can take input: not while a final answer is pending, not beyond the
 * pipelining limit, not while the client lets written bytes pile up. Then set the timer:
 * request deadline while a request is arriving, idle timeout while nothing is going on. */
void mn_http__conn_update(mn_http__conn *c) {
    if (c->closing) return;
    mn_http_server *s = c->s;
    if (c->no_more && !c->shutdown_sent && c->n_res == 0 && c->pending == 0) conn_begin_shutdown(c);
    if (c->closing) return;
    bool want;
    if (c->ws) want = c->pending <= s->lim.max_pending_write && !c->ws->finished;
    else if (c->lingering) want = true;
    else if (c->no_more || c->shutdown_sent) want = false;
    else want = c->n_res < MN_HTTP__MAX_INFLIGHT && c->pending <= s->lim.max_pending_write && c->in.len == 0;
    if (want && !c->reading) {
        if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0) {
            mn_http__conn_close(c);
            return;
        }
        c->reading = true;
    } else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
    if (c->lingering) return; /* linger timer already runs */
    if (c->ws && c->ws->close_sent) {
        if (c->tmode != T_WSCLOSE) { /* the client has this long to answer our close frame */
            c->tmode = T_WSCLOSE;
            uv_timer_start(&c->timer, on_timer, MN_HTTP__LINGER_MS, 0);
        }
    } else if (c->in_msg && !c->no_more) {
        if (c->tmode != T_REQUEST) { /* the deadline counts from the request's first byte */
            uint64_t now = uv_now(s->loop);
            c->tmode = T_REQUEST;
            uv_timer_start(&c->timer, on_timer, c->req_deadline > now ? c->req_deadline - now : 0, 0);
        }
    } else if (c->n_res == 0 && c->in.len == 0 && !c->no_more && c->pending == 0) {
        if (c->tmode != T_IDLE) {
            c->tmode = T_IDLE;
            uv_timer_start(&c->timer, on_timer, (uint64_t)s->lim.idle_timeout_ms, 0);
        }
    } else if (c->pending > 0) {
        /* answers queued and none of them written for idle_timeout: the client stopped reading
         * (on_write restarts this clock whenever bytes go out) */
        if (c->tmode != T_STALL) {
            c->tmode = T_STALL;
            c->stall_mark = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
            uv_timer_start(&c->timer, on_timer, (uint64_t)s->lim.idle_timeout_ms, 0);
        }
    } else if (c->tmode != T_NONE) {
        c->tmode = T_NONE;
        uv_timer_stop(&c->timer);
    }
}

/* ---- responses ---- */

static void res_free(mn_http_res *r) {
    mn_http__buf_release(&r->out);
    mn_free(r);
}

static mn_http_res *res_new(mn_http__conn *c) {
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
static void conn_advance(mn_http__conn *c) {
    while (c->qhead && c->qhead->done && !c->closing) {
        mn_http_res *r = c->qhead;
        bool ka = r->keep_alive;
        c->qhead = r->next;
        if (!c->qhead) c->qtail = NULL;
        c->n_res--;
        res_free(r);
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
                    res_free(n);
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
            conn_sendv(c, &b, 1);
            mn_http__buf_release(&h->out);
        }
    }
    if (c->closing) return;
    if (!c->in_parse && c->in.len && !c->no_more) process_input(c);
    else mn_http__conn_update(c);
}

void mn_http__res_finish(mn_http_res *r) {
    r->done = true;
    mn_http__conn *c = r->c;
    if (!c) {
        res_free(r);
        return;
    }
    if (c->qhead == r) conn_advance(c);
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
        char cl[64];
        snprintf(cl, sizeof cl, "Content-Length: %zu\r\n", len);
        res_write_head(res, status, content_type, extra, n_extra, cl);
        if (len && !res->head && res->c) {
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
    return res->out.len + res->c->pending;
}

void mn_http_res_on_abort(mn_http_res *res, void (*cb)(void *ud), void *ud) {
    res->abort_cb = cb;
    res->abort_ud = ud;
}

/* A transport error: answer it in order after earlier responses, then close. */
static void conn_fail(mn_http__conn *c, int status, const char *msg) {
    if (c->closing || c->no_more) return;
    c->no_more = true;
    c->in_msg = false;
    mn_http_res *r = res_new(c);
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

/* ---- parsing ---- */

static mn_http__conn *pconn(llhttp_t *p) { return p->data; }

/* An allocation failed inside a parser callback: answer 500 and close. */
static int cb_oom(mn_http__conn *c) {
    c->err_status = 500;
    snprintf(c->err_msg, sizeof c->err_msg, "out of memory while reading the request");
    return -1;
}

static int limit_headers(mn_http__conn *c, size_t n) {
    c->header_bytes += n;
    if (c->header_bytes > c->s->lim.max_header_bytes) {
        c->err_status = 431;
        snprintf(c->err_msg, sizeof c->err_msg, "request line and headers exceed the limit of %zu bytes",
                 c->s->lim.max_header_bytes);
        return -1;
    }
    return 0;
}

static int on_message_begin(llhttp_t *p) {
    mn_http__conn *c = pconn(p);
    c->in_msg = true;
    c->req_deadline = uv_now(c->s->loop) + (uint64_t)c->s->lim.request_timeout_ms;
    mn_http__buf_reset(&c->arena);
    mn_http__buf_reset(&c->body);
    c->n_hdr = 0;
    c->in_value = false;
    c->header_bytes = 0;
    c->url_off = 0;
    if (!mn_http__buf_reserve(&c->arena, 0)) return cb_oom(c);
    c->arena.p[0] = '\0';
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n) {
    mn_http__conn *c = pconn(p);
    if (limit_headers(c, n)) return -1;
    return mn_http__buf_append(&c->arena, at, n) ? 0 : cb_oom(c);
}

static int on_url_complete(llhttp_t *p) {
    mn_http__conn *c = pconn(p);
    return mn_http__buf_append(&c->arena, "", 1) ? 0 : cb_oom(c); /* keep the NUL inside len */
}

static int on_header_field(llhttp_t *p, const char *at, size_t n) {
    mn_http__conn *c = pconn(p);
    if (limit_headers(c, n + 4)) return -1; /* ": " and CRLF */
    if (c->in_value || c->n_hdr == 0 || c->hdr_off[2 * (c->n_hdr - 1) + 1] != (size_t)-1) {
        /* first span of a new header name */
        if (c->n_hdr == c->cap_hdr) {
            int cap = c->cap_hdr ? c->cap_hdr * 2 : 16;
            size_t *h = mn_realloc(c->hdr_off, sizeof *h * 2 * (size_t)cap);
            if (!h) return cb_oom(c);
            c->hdr_off = h;
            c->cap_hdr = cap;
        }
        c->hdr_off[2 * c->n_hdr] = c->arena.len;
        c->hdr_off[2 * c->n_hdr + 1] = (size_t)-1;
        c->n_hdr++;
        c->in_value = false;
    }
    return mn_http__buf_append(&c->arena, at, n) ? 0 : cb_oom(c);
}

static int on_header_field_complete(llhttp_t *p) {
    mn_http__conn *c = pconn(p);
    if (c->n_hdr == 0) return 0;
    for (size_t i = c->hdr_off[2 * (c->n_hdr - 1)]; i < c->arena.len; i++)
        if (c->arena.p[i] >= 'A' && c->arena.p[i] <= 'Z') c->arena.p[i] = (char)(c->arena.p[i] - 'A' + 'a');
    if (!mn_http__buf_append(&c->arena, "", 1)) return cb_oom(c);
    c->hdr_off[2 * (c->n_hdr - 1) + 1] = c->arena.len; /* value starts here (maybe empty) */
    c->in_value = true;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
    mn_http__conn *c = pconn(p);
    if (limit_headers(c, n)) return -1;
    return mn_http__buf_append(&c->arena, at, n) ? 0 : cb_oom(c);
}

static int on_header_value_complete(llhttp_t *p) {
    mn_http__conn *c = pconn(p);
    return mn_http__buf_append(&c->arena, "", 1) ? 0 : cb_oom(c);
}

static const char *find_header(mn_http__conn *c, const char *lower) {
    for (int i = 0; i < c->n_hdr; i++)
        if (c->hdr_off[2 * i + 1] != (size_t)-1 && strcmp(c->arena.p + c->hdr_off[2 * i], lower) == 0)
            return c->arena.p + c->hdr_off[2 * i + 1];
    return NULL;
}

static int on_headers_complete(llhttp_t *p) {
    mn_http__conn *c = pconn(p);
    mn_http_server *s = c->s;
    /* a header line without a value never got its terminator: give it an empty one */
    if (c->n_hdr && c->hdr_off[2 * (c->n_hdr - 1) + 1] == (size_t)-1 && on_header_field_complete(p)) return -1;
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > s->lim.max_body_bytes) {
        c->err_status = 413;
        snprintf(c->err_msg, sizeof c->err_msg, "request body of %llu bytes exceeds the limit of %zu bytes",
                 (unsigned long long)p->content_length, s->lim.max_body_bytes);
        return -1;
    }
    const char *expect = find_header(c, "expect");
    if (expect) {
        if (strcasecmp(expect, "100-continue") != 0) {
            c->err_status = 417;
            snprintf(c->err_msg, sizeof c->err_msg, "unsupported Expect header value '%.64s'", expect);
            return -1;
        }
        /* only when no earlier answer is still being written: never inside another response */
        if (c->n_res == 0 && p->http_major == 1 && p->http_minor >= 1) {
            uv_buf_t b = uv_buf_init("HTTP/1.1 100 Continue\r\n\r\n", 25);
            conn_sendv(c, &b, 1);
        }
    }
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
    mn_http__conn *c = pconn(p);
    if (c->body.len + n > c->s->lim.max_body_bytes) {
        c->err_status = 413;
        snprintf(c->err_msg, sizeof c->err_msg, "request body exceeds the limit of %zu bytes",
                 c->s->lim.max_body_bytes);
        return -1;
    }
    return mn_http__buf_append(&c->body, at, n) ? 0 : cb_oom(c);
}

static int on_message_complete(llhttp_t *p) {
    mn_http__conn *c = pconn(p);
    mn_http_server *s = c->s;
    c->in_msg = false;
    mn_http_header hstack[32];
    mn_http_header *hdrs = c->n_hdr <= 32 ? hstack : mn_malloc(sizeof *hdrs * (size_t)c->n_hdr);
    if (!hdrs) return cb_oom(c);
    mn_http_res *r = res_new(c);
    if (!r) {
        if (hdrs != hstack) mn_free(hdrs);
        return cb_oom(c);
    }
    r->head = p->method == HTTP_HEAD;
    r->http10 = p->http_major == 1 && p->http_minor == 0;

    /* split target into path and query inside the arena (the URL is its first string) */
    char *url = c->arena.p + c->url_off;
    const char *query = "";
    char *q = strchr(url, '?');
    if (q) {
        *q = '\0';
        query = q + 1;
    }
    char *hash = strchr(query, '#');
    if (hash) *hash = '\0';
    for (int i = 0; i < c->n_hdr; i++) {
        hdrs[i].name = c->arena.p + c->hdr_off[2 * i];
        hdrs[i].value = c->arena.p + c->hdr_off[2 * i + 1];
    }
    mn_http_req req = {
        .method = llhttp_method_name((llhttp_method_t)p->method),
        .path = url,
        .query = query,
        .headers = hdrs,
        .n_headers = c->n_hdr,
        .body = c->body.p ? c->body.p : "",
        .body_len = c->body.len,
    };
    bool ws = mn_http_ws_is_upgrade(&req);
    if (ws) /* remembered for mn_http_ws_accept */
        snprintf(r->ws_key, sizeof r->ws_key, "%s", mn_http_req_header(&req, "sec-websocket-key"));
    /* A WebSocket upgrade or CONNECT is the connection's last HTTP request. Any other
     * Upgrade (h2c, ...) is ignored, as RFC 9110 allows: the connection stays HTTP/1.1. */
    c->skip_upgrade = p->upgrade && !ws && p->method != HTTP_CONNECT;
    r->keep_alive = llhttp_should_keep_alive(p) && (!p->upgrade || c->skip_upgrade);
    if (!r->keep_alive) c->no_more = true;
    s->handler(s->ud, &req, r);
    if (hdrs != hstack) mn_free(hdrs);
    return HPE_PAUSED; /* always stop here: process_input learns where the next request starts */
}

/* Feed data to llhttp until it is used up, parsing must wait (pipelining limit), or the
 * connection stops taking requests. Returns how many bytes were consumed; bytes after a
 * final request or an error count as consumed (they are discarded). */
static size_t parse_run(mn_http__conn *c, const char *data, size_t len) {
    size_t off = 0;
    while (off < len && !c->closing && !c->no_more && c->n_res < MN_HTTP__MAX_INFLIGHT) {
        const char *p = data + off;
        size_t n = len - off;
        llhttp_errno_t e = llhttp_execute(&c->parser, p, n);
        if (c->closing) break;
        if (e == HPE_OK) {
            c->fed += n;
            off += n;
            break;
        }
        if (e == HPE_PAUSED) { /* one request complete; the next starts at the pause position */
            size_t used = (size_t)(llhttp_get_error_pos(&c->parser) - p);
            c->fed += used;
            off += used;
            c->msg_start = c->fed;
            llhttp_resume(&c->parser);
            continue;
        }
        if (e == HPE_PAUSED_UPGRADE) {
            if (!c->skip_upgrade) { /* the request was the last one in HTTP */
                c->no_more = true;
                break;
            }
            size_t used = (size_t)(llhttp_get_error_pos(&c->parser) - p);
            c->fed += used;
            off += used;
            c->msg_start = c->fed;
            llhttp_resume_after_upgrade(&c->parser);
            continue;
        }
        /* a malformed request, or a limit one of our callbacks enforced */
        if (c->err_status) {
            char msg[sizeof c->err_msg];
            memcpy(msg, c->err_msg, sizeof msg);
            conn_fail(c, c->err_status, msg);
        } else {
            char msg[320];
            size_t at = c->fed + (size_t)(llhttp_get_error_pos(&c->parser) - p) - c->msg_start;
            snprintf(msg, sizeof msg, "malformed HTTP request: %s (%s) at byte %zu of the request",
                     llhttp_get_error_reason(&c->parser), llhttp_errno_name(e), at);
            conn_fail(c, 400, msg);
        }
        break;
    }
    return c->no_more || c->closing ? len : off;
}

/* After parsing: handlers may have finished responses meanwhile; then reading/timers. */
static void parse_after(mn_http__conn *c) {
    c->in_parse = false;
    if (c->closing) return;
    if (c->qhead && c->qhead->done) conn_advance(c);
    else mn_http__conn_update(c);
}

/* Parse what parsing left in c->in earlier (the socket is not read while it is there). */
static void process_input(mn_http__conn *c) {
    if (c->in_parse || c->closing) return;
    c->in_parse = true;
    size_t used = parse_run(c, c->in.p, c->in.len);
    if (!c->closing) {
        if (used >= c->in.len) {
            mn_http__buf_release(&c->in);
        } else if (used > 0) {
            memmove(c->in.p, c->in.p + used, c->in.len - used);
            c->in.len -= used;
        }
    }
    parse_after(c);
}

/* Parse straight from the read buffer; keep only what could not be parsed yet. */
static void process_read(mn_http__conn *c, const char *data, size_t len) {
    if (c->in.len || c->in_parse) {
        if (!mn_http__buf_append(&c->in, data, len)) mn_http__conn_close(c);
        else process_input(c);
        return;
    }
    c->in_parse = true;
    size_t used = parse_run(c, data, len);
    if (!c->closing && used < len && !mn_http__buf_append(&c->in, data + used, len - used)) mn_http__conn_close(c);
    parse_after(c);
}

/* ---- server ---- */

static void on_connection(uv_stream_t *ls, int status);

static void on_spare_closed(uv_handle_t *h) {
    mn_http_server *s = h->data;
    s->n_handles--;
    s->spare_busy = false;
    if (s->closing) {
        if (s->n_handles == 0 && s->on_closed) s->on_closed(s->on_closed_ud);
    } else if (s->accept_stalled) { /* a connection still waits in the listener: try again */
        s->accept_stalled = false;
        on_connection((uv_stream_t *)&s->listener, 0);
    }
}

/* No memory for a connection: accept it into the server's spare handle and close it at
 * once. libuv stops polling the listener until a pending connection is accepted, so
 * leaving it there would stall every later client too. */
static void reject_without_memory(mn_http_server *s) {
    if (s->spare_busy) {
        s->accept_stalled = true;
        return;
    }
    s->spare_busy = true;
    s->n_handles++;
    uv_tcp_init(s->loop, &s->spare);
    s->spare.data = s;
    uv_accept((uv_stream_t *)&s->listener, (uv_stream_t *)&s->spare);
    uv_close((uv_handle_t *)&s->spare, on_spare_closed);
}

static void on_connection(uv_stream_t *ls, int status) {
    mn_http_server *s = ls->data;
    if (status < 0 || s->closing) return;
    mn_http__conn *c = mn_calloc(1, sizeof *c);
    if (!c) {
        reject_without_memory(s);
        return;
    }
    c->s = s;
    uv_tcp_init(s->loop, &c->tcp);
    uv_timer_init(s->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->handles_open = 2;
    s->n_handles += 2;
    c->next = s->conns;
    if (s->conns) s->conns->prev = c;
    s->conns = c;
    if (uv_accept(ls, (uv_stream_t *)&c->tcp) < 0) {
        mn_http__conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    llhttp_init(&c->parser, HTTP_REQUEST, &s->settings);
    c->parser.data = c;
    if (!s->accepting || s->n_conns >= s->lim.max_connections) {
        char msg[128];
        snprintf(msg, sizeof msg, "too many connections (limit %d); retry later", s->lim.max_connections);
        conn_fail(c, 503, msg);
        return;
    }
    c->counted = true;
    s->n_conns++;
    mn_http__conn_update(c);
}

static void on_listener_closed(uv_handle_t *h) {
    mn_http_server *s = h->data;
    s->n_handles--;
    if (s->closing && s->n_handles == 0 && s->on_closed) s->on_closed(s->on_closed_ud);
}

/* Many keep-alive clients need many descriptors: use everything the hard limit allows. */
static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

mn_err mn_http_server_new(uv_loop_t *loop, const char *host, int port, const mn_http_limits *lim,
                          mn_http_handler handler, void *ud, mn_http_server **out, mn_errbuf *eb) {
    *out = NULL;
    if (port < 0 || port > 65535) return mn_errf(eb, MN_ERANGE, "port %d is not in 0..65535", port);
    struct sockaddr_storage addr;
    int rc = strchr(host, ':') ? uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr)
                               : uv_ip4_addr(host, port, (struct sockaddr_in *)&addr);
    if (rc < 0) return mn_errf(eb, MN_EINVALID, "host '%s' is not an IPv4 or IPv6 address: %s", host, uv_strerror(rc));
    mn_http_server *s = mn_calloc(1, sizeof *s);
    if (!s) return mn_errf(eb, MN_ENOMEM, "out of memory allocating the HTTP server");
    s->loop = loop;
    s->lim = lim ? *lim : mn_http_limits_default();
    s->handler = handler;
    s->ud = ud;
    llhttp_settings_init(&s->settings);
    s->settings.on_message_begin = on_message_begin;
    s->settings.on_url = on_url;
    s->settings.on_url_complete = on_url_complete;
    s->settings.on_header_field = on_header_field;
    s->settings.on_header_field_complete = on_header_field_complete;
    s->settings.on_header_value = on_header_value;
    s->settings.on_header_value_complete = on_header_value_complete;
    s->settings.on_headers_complete = on_headers_complete;
    s->settings.on_body = on_body;
    s->settings.on_message_complete = on_message_complete;
    raise_nofile();
    uv_tcp_init(loop, &s->listener);
    s->listener.data = s;
    s->n_handles = 1;
    s->listener_open = true;
    rc = uv_tcp_bind(&s->listener, (const struct sockaddr *)&addr, 0);
    if (rc == 0) rc = uv_listen((uv_stream_t *)&s->listener, 4096, on_connection);
    if (rc < 0) {
        mn_errf(eb, MN_EIO, "cannot listen on %s:%d: %s", host, port, uv_strerror(rc));
        /* the listener handle must be closed before s can go; run the loop briefly for it */
        s->closing = true;
        uv_close((uv_handle_t *)&s->listener, NULL);
        uv_run(loop, UV_RUN_NOWAIT);
        mn_free(s);
        return MN_EIO;
    }
    struct sockaddr_storage bound;
    int blen = sizeof bound;
    uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &blen);
    s->port = bound.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&bound)->sin6_port)
                                          : ntohs(((struct sockaddr_in *)&bound)->sin_port);
    s->accepting = true;
    *out = s;
    return MN_OK;
}

int mn_http_server_port(const mn_http_server *s) { return s->port; }

int mn_http_server_n_connections(const mn_http_server *s) { return s->n_conns; }

void mn_http_server_stop_accepting(mn_http_server *s) {
    if (!s->accepting) return;
    s->accepting = false;
    if (s->listener_open) {
        s->listener_open = false;
        uv_close((uv_handle_t *)&s->listener, on_listener_closed);
    }
}

void mn_http_server_close(mn_http_server *s, void (*on_closed)(void *ud), void *ud) {
    s->closing = true;
    s->on_closed = on_closed;
    s->on_closed_ud = ud;
    s->accepting = false;
    if (s->listener_open) {
        s->listener_open = false;
        uv_close((uv_handle_t *)&s->listener, on_listener_closed);
    }
    while (s->conns) mn_http__conn_close(s->conns);
    if (s->n_handles == 0 && on_closed) on_closed(ud);
}

void mn_http_server_free(mn_http_server *s) { mn_free(s); }
