/* tests/unit/test_http.c — the HTTP transport in-process: server and a libuv client on one
 * loop. Checks a pipelined exchange and a WebSocket exchange byte for byte, then repeats
 * each with the N-th mneme allocation failing for every N until it succeeds: no crash, no
 * hang, no leak (mn_alloc_live back to where it was), every libuv handle closed. The
 * raw-socket behaviour tests live in tests/python/test_http_transport.py.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "server/http.h"

/* three pipelined requests: plain, chunked body, and one that ends the connection */
static const char REQS[] = "GET /a?x=1 HTTP/1.1\r\nHost: t\r\nX-Key: V\r\n\r\n"
                           "POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                           "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                           "GET /c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

/* the WebSocket exchange: upgrade, wait for 101, one masked text frame "hi!", then close 1000 */
static const char WS_REQ[] = "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
/* masked with key 01 02 03 04: text "hi!" and close 1000 */
static const unsigned char WS_FRAMES[] = {0x81, 0x83, 1, 2, 3, 4, 'h' ^ 1, 'i' ^ 2, '!' ^ 3,
                                          0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xE8 ^ 2};

typedef struct run {
    bool ws;                   /* run the WebSocket exchange instead of REQS */
    bool ws_sent_frames;
    uv_write_t wr2;
    int ws_closes, ws_code;
    uv_loop_t loop;
    mn_http_server *srv;
    uv_tcp_t cli;
    uv_connect_t conn;
    uv_write_t wr;
    uv_timer_t guard;
    char *got; /* what the client received (plain malloc: not counted) */
    size_t got_len;
    bool server_closed, timed_out;
} run;

/* answers "<method> <path> <query> <x-key> <body>" */
static void handler(void *ud, const mn_http_req *req, mn_http_res *res) {
    char b[256];
    const char *k = mn_http_req_header(req, "x-key");
    int n = snprintf(b, sizeof b, "%s %s %s %s %s", req->method, req->path, req->query, k ? k : "-", req->body);
    mn_http_respond(res, 200, "text/plain", b, (size_t)n, NULL, 0);
}

static void ws_text(void *ud, mn_http_ws *ws, const char *data, size_t len) { mn_http_ws_send_text(ws, data, len); }

static void ws_closed(void *ud, mn_http_ws *ws, int code, const char *reason) {
    run *r = ud;
    r->ws_closes++;
    r->ws_code = code;
}

static void ws_handler(void *ud, const mn_http_req *req, mn_http_res *res) {
    static const mn_http_ws_callbacks cb = {ws_text, NULL, ws_closed};
    mn_http_ws_accept(res, &cb, ud);
}

static void on_server_closed(void *ud) {
    run *r = ud;
    r->server_closed = true;
    uv_close((uv_handle_t *)&r->guard, NULL);
}

static void cli_closed(uv_handle_t *h) {
    run *r = h->data;
    mn_http_server_close(r->srv, on_server_closed, r);
}

static void cli_alloc(uv_handle_t *h, size_t sug, uv_buf_t *b) {
    b->base = malloc(4096);
    b->len = 4096;
}

static void cli_frames_written(uv_write_t *w, int status) {}

static void cli_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
    run *r = s->data;
    if (n > 0) {
        r->got = realloc(r->got, r->got_len + (size_t)n + 1);
        memcpy(r->got + r->got_len, b->base, (size_t)n);
        r->got_len += (size_t)n;
        r->got[r->got_len] = '\0';
    }
    free(b->base);
    if (r->ws && !r->ws_sent_frames && r->got && strstr(r->got, "\r\n\r\n")) {
        r->ws_sent_frames = true; /* the 101 is here: now frames may follow */
        uv_buf_t f = uv_buf_init((char *)WS_FRAMES, sizeof WS_FRAMES);
        r->wr2.data = r;
        uv_write(&r->wr2, s, &f, 1, cli_frames_written);
    }
    if (n < 0) uv_close((uv_handle_t *)s, cli_closed);
}

static void cli_written(uv_write_t *w, int status) {
    run *r = w->data;
    if (status == 0) uv_read_start((uv_stream_t *)&r->cli, cli_alloc, cli_read);
    else uv_close((uv_handle_t *)&r->cli, cli_closed);
}

static void cli_connected(uv_connect_t *c, int status) {
    run *r = c->data;
    if (status < 0) {
        uv_close((uv_handle_t *)&r->cli, cli_closed);
        return;
    }
    uv_buf_t b = r->ws ? uv_buf_init((char *)WS_REQ, sizeof WS_REQ - 1) : uv_buf_init((char *)REQS, sizeof REQS - 1);
    r->wr.data = r;
    uv_write(&r->wr, (uv_stream_t *)&r->cli, &b, 1, cli_written);
}

static void on_guard(uv_timer_t *t) {
    run *r = t->data;
    r->timed_out = true;
    if (!uv_is_closing((uv_handle_t *)&r->cli)) uv_close((uv_handle_t *)&r->cli, cli_closed);
}

/* One exchange. Returns false when the server could not even start (allocation failure). */
static bool run_once(run *r, bool ws) {
    memset(r, 0, sizeof *r);
    r->ws = ws;
    assert_int_equal(uv_loop_init(&r->loop), 0);
    mn_errbuf eb;
    mn_http_limits lim = mn_http_limits_default();
    if (mn_http_server_new(&r->loop, "127.0.0.1", 0, &lim, ws ? ws_handler : handler, r, &r->srv, &eb) != MN_OK) {
        assert_int_equal(uv_run(&r->loop, UV_RUN_DEFAULT), 0);
        assert_int_equal(uv_loop_close(&r->loop), 0);
        return false;
    }
    uv_timer_init(&r->loop, &r->guard);
    r->guard.data = r;
    uv_timer_start(&r->guard, on_guard, 5000, 0);
    uv_tcp_init(&r->loop, &r->cli);
    r->cli.data = r;
    r->conn.data = r;
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", mn_http_server_port(r->srv), &a);
    uv_tcp_connect(&r->conn, &r->cli, (const struct sockaddr *)&a, cli_connected);
    uv_run(&r->loop, UV_RUN_DEFAULT);
    assert_true(r->server_closed);
    mn_http_server_free(r->srv);
    assert_int_equal(uv_loop_close(&r->loop), 0);
    return true;
}

static void test_pipelined_exchange(void **state) {
    long base = mn_alloc_live();
    run r;
    assert_true(run_once(&r, false));
    assert_false(r.timed_out);
    const char *want[] = {"GET /a x=1 V ", "POST /b  - abcde", "GET /c  - "};
    const char *p = r.got;
    for (int i = 0; i < 3; i++) {
        p = strstr(p, "HTTP/1.1 200 OK\r\n");
        assert_non_null(p);
        const char *body = strstr(p, "\r\n\r\n");
        assert_non_null(body);
        body += 4;
        assert_memory_equal(body, want[i], strlen(want[i]));
        /* only the last answer closes the connection */
        const char *ka = strstr(p, i < 2 ? "Connection: keep-alive\r\n" : "Connection: close\r\n");
        assert_true(ka && ka < body);
        p = body;
    }
    free(r.got);
    assert_int_equal(mn_alloc_live(), base);
}

static void test_allocation_failures(void **state) {
    long base = mn_alloc_live();
    int n;
    for (n = 0; n < 400; n++) {
        run r;
        mn_alloc_fail_after(n);
        bool started = run_once(&r, false);
        mn_alloc_fail_after(-1);
        assert_false(r.timed_out);
        bool complete = started && r.got && strstr(r.got, "GET /c  - ");
        free(r.got);
        assert_int_equal(mn_alloc_live(), base);
        if (complete) break;
    }
    assert_true(n > 3 && n < 400); /* some failures were injected, and the run eventually succeeded */
}

static const char WS_ANSWER[] = "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                                "\x81\x03hi!\x88\x02\x03\xe8"; /* RFC 6455's sample key */

static void test_ws_exchange(void **state) {
    long base = mn_alloc_live();
    run r;
    assert_true(run_once(&r, true));
    assert_false(r.timed_out);
    assert_non_null(r.got);
    assert_non_null(strstr(r.got, "HTTP/1.1 101 Switching Protocols\r\n"));
    const char *acc = strstr(r.got, "Sec-WebSocket-Accept: ");
    assert_non_null(acc);
    assert_int_equal(r.got_len - (size_t)(acc - r.got), sizeof WS_ANSWER - 1);
    assert_memory_equal(acc, WS_ANSWER, sizeof WS_ANSWER - 1);
    assert_int_equal(r.ws_closes, 1);
    assert_int_equal(r.ws_code, 1000);
    free(r.got);
    assert_int_equal(mn_alloc_live(), base);
}

static void test_ws_allocation_failures(void **state) {
    long base = mn_alloc_live();
    int n;
    for (n = 0; n < 400; n++) {
        run r;
        mn_alloc_fail_after(n);
        bool started = run_once(&r, true);
        mn_alloc_fail_after(-1);
        assert_false(r.timed_out);
        assert_true(r.ws_closes <= 1); /* on_close at most once, whatever failed */
        bool complete = started && r.got_len > 4 && memcmp(r.got + r.got_len - 4, "\x88\x02\x03\xe8", 4) == 0;
        free(r.got);
        assert_int_equal(mn_alloc_live(), base);
        if (complete) break;
    }
    assert_true(n > 3 && n < 400);
}

static void test_server_new_errors(void **state) {
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    mn_http_server *s = (mn_http_server *)&loop;
    mn_errbuf eb;
    assert_int_equal(mn_http_server_new(&loop, "not-an-ip", 0, NULL, handler, NULL, &s, &eb), MN_EINVALID);
    assert_null(s);
    assert_non_null(strstr(eb.msg, "not-an-ip"));
    assert_int_equal(mn_http_server_new(&loop, "127.0.0.1", 70000, NULL, handler, NULL, &s, &eb), MN_ERANGE);
    assert_non_null(strstr(eb.msg, "70000"));
    /* a port already in use */
    mn_http_server *a = NULL;
    assert_int_equal(mn_http_server_new(&loop, "127.0.0.1", 0, NULL, handler, NULL, &a, &eb), MN_OK);
    int port = mn_http_server_port(a);
    assert_true(port > 0);
    assert_int_equal(mn_http_server_new(&loop, "127.0.0.1", port, NULL, handler, NULL, &s, &eb), MN_EIO);
    assert_non_null(strstr(eb.msg, "cannot listen"));
    mn_http_server_close(a, NULL, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    mn_http_server_free(a);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void refused_cb(uv_connect_t *c, int status) {
    *(int *)c->data = status;
    uv_close((uv_handle_t *)c->handle, NULL);
}

static void test_stop_accepting(void **state) {
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    mn_http_server *s = NULL;
    mn_errbuf eb;
    assert_int_equal(mn_http_server_new(&loop, "127.0.0.1", 0, NULL, handler, NULL, &s, &eb), MN_OK);
    assert_int_equal(mn_http_server_n_connections(s), 0);
    int port = mn_http_server_port(s);
    mn_http_server_stop_accepting(s);
    uv_run(&loop, UV_RUN_NOWAIT); /* the listener closes */
    uv_tcp_t cli;
    uv_connect_t req;
    int status = 1;
    req.data = &status;
    uv_tcp_init(&loop, &cli);
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", port, &a);
    assert_int_equal(uv_tcp_connect(&req, &cli, (const struct sockaddr *)&a, refused_cb), 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(status, UV_ECONNREFUSED);
    mn_http_server_close(s, NULL, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    mn_http_server_free(s);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_limits_default(void **state) {
    mn_http_limits l = mn_http_limits_default();
    assert_int_equal(l.max_header_bytes, 16 * 1024);
    assert_int_equal(l.max_body_bytes, 8 * 1024 * 1024);
    assert_int_equal(l.idle_timeout_ms, 60000);
    assert_int_equal(l.request_timeout_ms, 30000);
    assert_int_equal(l.max_pending_write, 1024 * 1024);
    assert_int_equal(l.max_connections, 4096);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pipelined_exchange),
        cmocka_unit_test(test_allocation_failures),
        cmocka_unit_test(test_ws_exchange),
        cmocka_unit_test(test_ws_allocation_failures),
        cmocka_unit_test(test_server_new_errors),
        cmocka_unit_test(test_stop_accepting),
        cmocka_unit_test(test_limits_default),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
