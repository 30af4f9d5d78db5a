/* server/http.h — the HTTP/1.1 transport of `mneme serve`: libuv sockets, llhttp parsing.
 *
 * Everything here runs on the libuv loop thread. The transport owns connections, parsing,
 * keep-alive, pipelining (responses go out in request order: a later request's response
 * is buffered until the earlier one ended), request bodies (Content-Length or chunked),
 * limits and timeouts. The application sees one callback per complete request and
 * answers it through an mn_http_res, at once or later (streaming), always on the loop
 * thread. Transport-level errors (malformed request, header or body too large, too many
 * connections) are answered by the transport itself in the OpenAI error shape and the
 * connection is closed after the answer.
 */
#ifndef MN_HTTP_H
#define MN_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

#include "engine/err.h"

typedef struct mn_http_server mn_http_server;
typedef struct mn_http_res mn_http_res; /* one request's response; owned by the transport */

typedef struct mn_http_header {
    const char *name, *value;
} mn_http_header;

typedef struct mn_http_req {
    const char *method;             /* "GET", "POST", ... */
    const char *path;               /* target before '?', as sent (no percent-decoding) */
    const char *query;              /* after '?', or "" */
    const mn_http_header *headers;  /* names lower-cased */
    int n_headers;
    const char *body;               /* whole body, de-chunked, NUL-terminated ("" if none) */
    size_t body_len;
} mn_http_req;

/** Value of a header (name lower-case), NULL when absent. */
const char *mn_http_req_header(const mn_http_req *r, const char *lower_name);

/** Called once per complete request; req is valid only during the call. The handler must
 *  complete res exactly once: mn_http_respond, or mn_http_stream_begin ... stream_end. */
typedef void (*mn_http_handler)(void *ud, const mn_http_req *req, mn_http_res *res);

typedef struct mn_http_limits {
    size_t max_header_bytes;   /* request line + headers; 431 beyond (default 16 KiB) */
    size_t max_body_bytes;     /* 413 beyond (default 8 MiB) */
    int idle_timeout_ms;       /* keep-alive connection with no request in progress (default 60 s) */
    int request_timeout_ms;    /* a started request must arrive whole within this (default 30 s) */
    size_t max_pending_write;  /* bytes queued to one client before it counts as stalled (default 1 MiB) */
    int max_connections;       /* beyond: 503 with Retry-After, then close (default 4096) */
} mn_http_limits;

/** Defaults as documented above. */
mn_http_limits mn_http_limits_default(void);

/** Bind host:port (port 0 picks a free one) and start accepting on loop. */
mn_err mn_http_server_new(uv_loop_t *loop, const char *host, int port, const mn_http_limits *lim,
                          mn_http_handler handler, void *ud, mn_http_server **out, mn_errbuf *eb);
/** The bound port. */
int mn_http_server_port(const mn_http_server *s);
int mn_http_server_n_connections(const mn_http_server *s);
/** Stop accepting new connections (existing ones go on). */
void mn_http_server_stop_accepting(mn_http_server *s);
/** Close every connection (aborting unfinished responses: their abort callbacks run) and
 *  the listener; on_closed(ud) runs when all handles are closed; then free with _free. */
void mn_http_server_close(mn_http_server *s, void (*on_closed)(void *ud), void *ud);
void mn_http_server_free(mn_http_server *s);

/* ---- responses ---- */
/** A whole response. extra: additional headers (may be NULL). */
void mn_http_respond(mn_http_res *res, int status, const char *content_type, const char *body, size_t len,
                     const mn_http_header *extra, int n_extra);
/** Start a streamed response (Transfer-Encoding: chunked), e.g. text/event-stream. */
void mn_http_stream_begin(mn_http_res *res, int status, const char *content_type, const mn_http_header *extra,
                          int n_extra);
/** Queue body bytes. Returns false when the client is gone (the caller should stop
 *  producing and still call mn_http_stream_end). */
bool mn_http_stream_write(mn_http_res *res, const char *data, size_t len);
/** End the streamed body; res must not be used afterwards. */
void mn_http_stream_end(mn_http_res *res);
/** Bytes queued to this client and not yet written to the socket. A producer that sees
 *  more than limits.max_pending_write treats the client as stalled (backpressure). A
 *  response pipelined behind an unfinished one does not count what it buffered meanwhile
 *  (that waits for the earlier answer, not for the reader; it is bounded by the answer's
 *  own size and by the requests in flight per connection), only the socket's backlog. */
size_t mn_http_res_pending(const mn_http_res *res);
/** cb(ud) once if the client disconnects (or the server closes) before res ended. After
 *  it, stream writes return false; the owner must still end res. */
void mn_http_res_on_abort(mn_http_res *res, void (*cb)(void *ud), void *ud);

/* ---- WebSocket (RFC 6455) ---- */
typedef struct mn_http_ws mn_http_ws;

/** Events of one WebSocket. data is valid only during the call (text is UTF-8, checked).
 *  on_close runs exactly once, when the socket ends for any reason (close handshake,
 *  protocol error, client gone, server closing); ws must not be used after it returns.
 *  code: the peer's close code, 1005 when it sent none, 1006 when the connection was
 *  lost without a close frame, or the code we closed with after a protocol error. */
typedef struct mn_http_ws_callbacks {
    void (*on_text)(void *ud, mn_http_ws *ws, const char *data, size_t len);
    void (*on_binary)(void *ud, mn_http_ws *ws, const char *data, size_t len);
    void (*on_close)(void *ud, mn_http_ws *ws, int code, const char *reason);
} mn_http_ws_callbacks;

/** Whether req asks for a WebSocket (GET, Upgrade: websocket, Sec-WebSocket-Key, version 13). */
bool mn_http_ws_is_upgrade(const mn_http_req *req);
/** Complete res with 101 Switching Protocols and turn the connection into a WebSocket.
 *  Returns NULL, having answered 400 (or nothing, when the client is gone), when the
 *  request was not a valid upgrade. cb is copied. The transport owns the ws; it is freed
 *  after on_close. Incoming messages larger than limits.max_body_bytes close it with 1009.
 *  A socket that sends nothing for limits.idle_timeout_ms is pinged, and closed (on_close
 *  1006) when nothing arrives for another idle_timeout_ms. May be called later than the
 *  handler (after an engine round trip); the client waits for the 101 before sending. */
mn_http_ws *mn_http_ws_accept(mn_http_res *res, const mn_http_ws_callbacks *cb, void *ud);
/** Queue one text / binary message (one frame). false when the socket is closing or gone. */
bool mn_http_ws_send_text(mn_http_ws *ws, const char *data, size_t len);
bool mn_http_ws_send_binary(mn_http_ws *ws, const char *data, size_t len);
/** Bytes queued to this client (as mn_http_res_pending). */
size_t mn_http_ws_pending(const mn_http_ws *ws);
/** Start the close handshake (code e.g. 1000, reason may be NULL); on_close follows when
 *  the client answers or after a short grace period. */
void mn_http_ws_close(mn_http_ws *ws, int code, const char *reason);

#endif
