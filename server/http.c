/* server/http.c — the HTTP/1.1 transport (contract in server/http.h): server, connections,
 * socket I/O and timers. Parsing is in http_req.c, responses in http_res.c, WebSocket in
 * http_ws.c; what they share is in http_impl.h.
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
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>

#include "server/http_impl.h"

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
void mn_http__conn_sendv(mn_http__conn *c, uv_buf_t *bufs, int n) {
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
/* ---- connection state ---- */

static void on_close_handle(uv_handle_t *h) {
    mn_http__conn *c = h->data;
    mn_http_server *s = c->s;
    s->n_handles--;
    if (--c->handles_open > 0) return;
    /* abort callbacks run here, not inside mn_http__conn_close: that can happen in the
     * middle of an owner's call on its res (a write failing), which must not see res freed */
    mn_http_res *r = c->aborted;
    c->aborted = NULL;
    while (r) {
        mn_http_res *next = r->next;
        r->next = NULL;
        r->abort_pending = false;
        if (r->done) mn_http__res_free(r);
        else if (r->abort_cb) r->abort_cb(r->abort_ud); /* may end (and free) r */
        r = next;
    }
    mn_http__buf_release(&c->in);
    mn_http__buf_release(&c->arena);
    mn_http__buf_release(&c->body);
    mn_free(c->hdr_off);
    mn_free(c);
    if (s->closing && s->n_handles == 0 && s->on_closed) s->on_closed(s->on_closed_ud);
}

/* Detach every response: finished ones are freed, unfinished ones wait in c->aborted for
 * their abort callbacks (run once the handles are closed) and are freed when their owner
 * ends them. */
static void conn_abort_queue(mn_http__conn *c) {
    mn_http_res *r = c->qhead;
    c->qhead = c->qtail = NULL;
    c->n_res = 0;
    while (r) {
        mn_http_res *next = r->next;
        r->next = NULL;
        r->c = NULL;
        if (r->done) {
            mn_http__res_free(r);
        } else {
            r->aborted = true;
            r->abort_pending = true;
            r->next = c->aborted;
            c->aborted = r;
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
    if (mode == T_WSIDLE && c->ws && !c->ws->ping_sent) {
        /* a quiet WebSocket: ping; if nothing arrives for another idle_timeout, it is gone */
        mn_http__ws_ping(c->ws);
        if (c->closing) return;
        c->tmode = T_WSIDLE;
        uv_timer_start(&c->timer, on_timer, (uint64_t)c->s->lim.idle_timeout_ms, 0);
        return;
    }
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
    if (c->lingering || mode == T_STALL || mode == T_WSCLOSE || mode == T_WSIDLE || (!c->in_msg && c->n_res == 0)) {
        mn_http__conn_close(c); /* idle keep-alive connection, a client that stopped reading, or linger over */
        return;
    }
    if (c->in_msg && !c->no_more) {
        char msg[160];
        snprintf(msg, sizeof msg, "request not received completely within %d ms (request_timeout)",
                 c->s->lim.request_timeout_ms);
        mn_http__conn_fail(c, 408, msg);
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
    mn_http__process_read(c, buf->base, (size_t)nread);
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
    } else if (c->ws) {
        if (c->tmode != T_WSIDLE) {
            c->tmode = T_WSIDLE;
            uv_timer_start(&c->timer, on_timer, (uint64_t)s->lim.idle_timeout_ms, 0);
        }
    } else if (c->tmode != T_NONE) {
        c->tmode = T_NONE;
        uv_timer_stop(&c->timer);
    }
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
        mn_http__conn_fail(c, 503, msg);
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
    mn_http__parser_settings(&s->settings);
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
