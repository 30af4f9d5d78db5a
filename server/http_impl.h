/* server/http_impl.h — internals shared by the HTTP transport's files (http.c: server,
 * connections, socket I/O, timers; http_req.c: parsing; http_res.c: responses; http_ws.c:
 * WebSocket). Not for applications: they use server/http.h. Everything runs on the loop
 * thread.
 */
#ifndef MN_HTTP_IMPL_H
#define MN_HTTP_IMPL_H

#include <stdint.h>
#include <string.h>

#include <llhttp.h>

#include "engine/alloc.h"
#include "server/http.h"

#define MN_HTTP__MAX_INFLIGHT 4     /* outstanding requests per connection before reading stops */
#define MN_HTTP__LINGER_MS 2000     /* discard input this long after the final answer */
#define MN_HTTP__READ_BUF (64 * 1024)

typedef struct mn_http__conn mn_http__conn;

/* a growable byte buffer */
typedef struct mn_http__buf {
    char *p;
    size_t len, cap;
} mn_http__buf;

struct mn_http_res {
    mn_http__conn *c;        /* NULL once the connection is gone */
    mn_http_res *next;       /* queue order = request order */
    mn_http__buf out;        /* bytes waiting until this res reaches the queue's head */
    bool done;               /* respond / stream_end called */
    bool started;            /* status line queued */
    bool chunked;            /* streamed with chunked framing (HTTP/1.1) */
    bool keep_alive;         /* request allows another request after this one */
    bool head;               /* HEAD request: no body bytes */
    bool http10;             /* request was HTTP/1.0: no chunked framing */
    bool aborted;
    bool abort_pending;      /* on its closed connection's aborted list, callback not run yet */
    char ws_key[32];         /* Sec-WebSocket-Key of a valid upgrade request, else "" */
    void (*abort_cb)(void *);
    void *abort_ud;
};

struct mn_http__conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    mn_http_server *s;
    mn_http__conn *prev, *next;
    llhttp_t parser;
    int handles_open;
    bool counted;            /* counts toward n_connections (not a 503 reject) */
    bool closing;            /* uv_close issued */
    bool reading;
    bool in_parse;           /* inside process_input: do not re-enter llhttp */
    bool no_more;            /* stop parsing: the last request ended the connection or failed */
    bool lingering;          /* write side shut down, discarding input */
    bool shutdown_sent;
    bool in_msg;             /* a request started and is not complete yet */
    bool skip_upgrade;       /* the last request asked for an Upgrade we ignore (h2c, ...) */
    enum { T_NONE, T_IDLE, T_REQUEST, T_STALL, T_WSIDLE, T_WSCLOSE, T_LINGER } tmode;
    mn_http_ws *ws;          /* set once the connection is a WebSocket */
    size_t stall_mark;       /* libuv write queue size when the stall clock started */
    uint64_t req_deadline;   /* loop time by which the started request must be whole */
    int err_status;          /* status for a limit our callbacks detected (413 / 431), 0 = none */
    char err_msg[256];
    size_t pending;          /* bytes handed to uv_write and not yet written */
    mn_http__buf in;         /* unparsed input kept while parsing is paused */
    size_t fed;              /* bytes of this connection's input given to llhttp so far */
    size_t msg_start;        /* value of fed at the first byte of the current request */
    /* the request being parsed: strings NUL-terminated in arena, headers as offsets */
    mn_http__buf arena;
    size_t url_off;
    size_t *hdr_off;         /* 2 per header: name, value */
    int n_hdr, cap_hdr;
    bool in_value;           /* the last header span was a value */
    size_t header_bytes;
    mn_http__buf body;
    mn_http_res *qhead, *qtail;
    mn_http_res *aborted;    /* detached unfinished responses whose abort callbacks are due */
    int n_res;
};

struct mn_http_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    mn_http_limits lim;
    mn_http_handler handler;
    void *ud;
    int port;
    int n_conns;             /* counted connections */
    int n_handles;           /* listener + every conn handle not yet closed */
    bool accepting, closing, listener_open;
    uv_tcp_t spare;          /* accepts and drops a connection when there is no memory for it */
    bool spare_busy, accept_stalled;
    mn_http__conn *conns;
    void (*on_closed)(void *);
    void *on_closed_ud;
    llhttp_settings_t settings;
    char readbuf[MN_HTTP__READ_BUF]; /* one read buffer: each read is consumed before the next */
    bool readbuf_busy;
};

/* ---- growable byte buffer ---- */

static inline bool mn_http__buf_reserve(mn_http__buf *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    char *p = mn_realloc(b->p, cap);
    if (!p) return false;
    b->p = p;
    b->cap = cap;
    return true;
}

static inline bool mn_http__buf_append(mn_http__buf *b, const char *data, size_t n) {
    if (!mn_http__buf_reserve(b, n)) return false;
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
    return true;
}

static inline void mn_http__buf_release(mn_http__buf *b) {
    mn_free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* Keep a small buffer between requests; give back a large one. */
static inline void mn_http__buf_reset(mn_http__buf *b) {
    if (b->cap > 64 * 1024) mn_http__buf_release(b);
    b->len = 0;
    if (b->p) b->p[0] = '\0';
}

/* A WebSocket lives on top of the upgrade request's res: the 101 and every frame go out
 * through it (so they follow earlier pipelined answers), and it stays unfinished until
 * the socket closes. */
struct mn_http_ws {
    mn_http_res *res;        /* NULL once finished */
    mn_http__conn *c;        /* NULL once the connection is gone */
    mn_http_ws_callbacks cb;
    void *ud;
    mn_http__buf msg;        /* the message being reassembled from fragments */
    int msg_op;              /* its opcode (1 text, 2 binary), 0 between messages */
    size_t max_msg;
    bool close_sent;         /* our close frame is queued: send nothing more */
    bool ping_sent;          /* idle: we pinged and wait for any frame */
    bool finished;           /* on_close ran */
    int busy;                /* holds (feed loop, close paths): freed when the last one ends */
};

/* ---- shared between the transport's files ---- */

/* http.c */

/** Close the connection now: every unfinished response gets its abort callback. */
void mn_http__conn_close(mn_http__conn *c);
/** Re-derive reading on/off, shutdown and the timer from the connection's state. */
void mn_http__conn_update(mn_http__conn *c);
/** Queue bytes of r (to the socket when r is the queue's head). false when the client is gone. */
bool mn_http__res_emitv(mn_http_res *r, uv_buf_t *bufs, int n);
/** r ended: frees it (now or when it leaves the queue) and lets later responses go out. */
void mn_http__res_finish(mn_http_res *r);
/** Write bufs to the socket after everything queued before (copies what it cannot write now). */
void mn_http__conn_sendv(mn_http__conn *c, uv_buf_t *bufs, int n);

/* http_res.c */
/** A new response at the end of c's queue. NULL when out of memory. */
mn_http_res *mn_http__res_new(mn_http__conn *c);
void mn_http__res_free(mn_http_res *r);
/** Pop finished responses from the head, flush the next one's buffered bytes, parse more. */
void mn_http__conn_advance(mn_http__conn *c);
/** A transport error: answer status with msg (OpenAI error JSON) in order, then close. */
void mn_http__conn_fail(mn_http__conn *c, int status, const char *msg);

/* http_req.c */
void mn_http__parser_settings(llhttp_settings_t *st);
/** Parse what is waiting in c->in (kept there while parsing was paused). */
void mn_http__process_input(mn_http__conn *c);
/** Parse freshly read bytes; keep in c->in only what cannot be parsed yet. */
void mn_http__process_read(mn_http__conn *c, const char *data, size_t len);

/* http_ws.c */
/** Consume WebSocket frames from c->in (c->ws set). */
void mn_http__ws_feed(mn_http__conn *c);
/** Send a keep-alive ping (the socket was quiet for idle_timeout). */
void mn_http__ws_ping(mn_http_ws *ws);

#endif
