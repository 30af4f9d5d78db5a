/* server/http_req.c — request parsing of the HTTP transport: llhttp callbacks that collect
 * the request line, headers (names lower-cased) and de-chunked body into per-connection
 * buffers under the header/body limits, and the loop that feeds input to llhttp one
 * message at a time (the parser pauses after every message).
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "server/http_impl.h"

const char *mn_http_req_header(const mn_http_req *r, const char *lower_name) {
    for (int i = 0; i < r->n_headers; i++)
        if (strcmp(r->headers[i].name, lower_name) == 0) return r->headers[i].value;
    return NULL;
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
            mn_http__conn_sendv(c, &b, 1);
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
    mn_http_res *r = mn_http__res_new(c);
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
    return HPE_PAUSED; /* always stop here: mn_http__process_input learns where the next request starts */
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
            mn_http__conn_fail(c, c->err_status, msg);
        } else {
            char msg[320];
            size_t at = c->fed + (size_t)(llhttp_get_error_pos(&c->parser) - p) - c->msg_start;
            snprintf(msg, sizeof msg, "malformed HTTP request: %s (%s) at byte %zu of the request",
                     llhttp_get_error_reason(&c->parser), llhttp_errno_name(e), at);
            mn_http__conn_fail(c, 400, msg);
        }
        break;
    }
    if (c->ws && !c->closing) return off; /* accepted at once: what follows are its frames */
    return c->no_more || c->closing ? len : off;
}

/* After parsing: handlers may have finished responses meanwhile; then reading/timers. */
static void parse_after(mn_http__conn *c) {
    c->in_parse = false;
    if (c->closing) return;
    if (c->ws) {
        if (c->in.len) mn_http__ws_feed(c);
        else mn_http__conn_update(c);
        return;
    }
    if (c->qhead && c->qhead->done) mn_http__conn_advance(c);
    else mn_http__conn_update(c);
}

/* Parse what parsing left in c->in earlier (the socket is not read while it is there). */
void mn_http__process_input(mn_http__conn *c) {
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
void mn_http__process_read(mn_http__conn *c, const char *data, size_t len) {
    if (c->in.len || c->in_parse) {
        if (!mn_http__buf_append(&c->in, data, len)) mn_http__conn_close(c);
        else mn_http__process_input(c);
        return;
    }
    c->in_parse = true;
    size_t used = parse_run(c, data, len);
    if (!c->closing && used < len && !mn_http__buf_append(&c->in, data + used, len - used)) mn_http__conn_close(c);
    parse_after(c);
}

/* The llhttp callbacks of every connection. */
void mn_http__parser_settings(llhttp_settings_t *st) {
    llhttp_settings_init(st);
    st->on_message_begin = on_message_begin;
    st->on_url = on_url;
    st->on_url_complete = on_url_complete;
    st->on_header_field = on_header_field;
    st->on_header_field_complete = on_header_field_complete;
    st->on_header_value = on_header_value;
    st->on_header_value_complete = on_header_value_complete;
    st->on_headers_complete = on_headers_complete;
    st->on_body = on_body;
    st->on_message_complete = on_message_complete;
}
