/* server/http_ws.c — WebSocket (RFC 6455) on top of the HTTP transport.
 *
 * Server side only: the handshake answer (SHA-1 + base64 of the client's key), a frame
 * parser for masked client frames (fragmentation, interleaved ping/pong, close), and
 * unmasked, unfragmented frames out. A frame is parsed only when it is whole in c->in;
 * its length is checked against max_msg as soon as its header is there, so the input
 * buffer never grows past one message plus a header. Protocol errors close with 1002,
 * bad UTF-8 in text with 1007, oversize messages with 1009.
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "server/http_impl.h"

/* ---- SHA-1 (FIPS 180-4), only for Sec-WebSocket-Accept ---- */

static uint32_t rol32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *b) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)b[4 * i] << 24 | (uint32_t)b[4 * i + 1] << 16 | (uint32_t)b[4 * i + 2] << 8 | b[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], bb = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) f = (bb & c) | (~bb & d), k = 0x5A827999u;
        else if (i < 40) f = bb ^ c ^ d, k = 0x6ED9EBA1u;
        else if (i < 60) f = (bb & c) | (bb & d) | (c & d), k = 0x8F1BBCDCu;
        else f = bb ^ c ^ d, k = 0xCA62C1D6u;
        uint32_t t = rol32(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol32(bb, 30);
        bb = a;
        a = t;
    }
    h[0] += a;
    h[1] += bb;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static void sha1(const uint8_t *data, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u};
    size_t i = 0;
    for (; i + 64 <= len; i += 64) sha1_block(h, data + i);
    uint8_t tail[128] = {0};
    size_t r = len - i;
    memcpy(tail, data + i, r);
    tail[r] = 0x80;
    size_t tl = r + 9 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int k = 0; k < 8; k++) tail[tl - 1 - k] = (uint8_t)(bits >> (8 * k));
    sha1_block(h, tail);
    if (tl == 128) sha1_block(h, tail + 64);
    for (int k = 0; k < 5; k++) {
        out[4 * k] = (uint8_t)(h[k] >> 24);
        out[4 * k + 1] = (uint8_t)(h[k] >> 16);
        out[4 * k + 2] = (uint8_t)(h[k] >> 8);
        out[4 * k + 3] = (uint8_t)h[k];
    }
}

static void base64(const uint8_t *in, size_t n, char *out) {
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        out[o++] = tab[(v >> 18) & 63];
        out[o++] = tab[(v >> 12) & 63];
        out[o++] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? tab[v & 63] : '=';
    }
    out[o] = '\0';
}

/* Strict UTF-8: no overlongs, no surrogates, nothing above U+10FFFF. */
static bool utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        if (b < 0x80) {
            i++;
            continue;
        }
        int len;
        uint32_t cp, min;
        if ((b & 0xE0) == 0xC0) len = 2, cp = b & 0x1F, min = 0x80;
        else if ((b & 0xF0) == 0xE0) len = 3, cp = b & 0x0F, min = 0x800;
        else if ((b & 0xF8) == 0xF0) len = 4, cp = b & 0x07, min = 0x10000;
        else return false;
        if (i + (size_t)len > n) return false;
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return false;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += (size_t)len;
    }
    return true;
}

/* ---- handshake ---- */

static bool header_has_token(const char *v, const char *token) {
    size_t tl = strlen(token);
    while (v && *v) {
        while (*v == ' ' || *v == '\t' || *v == ',') v++;
        const char *e = v;
        while (*e && *e != ',') e++;
        const char *t = e;
        while (t > v && (t[-1] == ' ' || t[-1] == '\t')) t--;
        if ((size_t)(t - v) == tl && strncasecmp(v, token, tl) == 0) return true;
        v = e;
    }
    return false;
}

bool mn_http_ws_is_upgrade(const mn_http_req *req) {
    const char *key = mn_http_req_header(req, "sec-websocket-key");
    const char *ver = mn_http_req_header(req, "sec-websocket-version");
    return strcmp(req->method, "GET") == 0 && header_has_token(mn_http_req_header(req, "upgrade"), "websocket") &&
           header_has_token(mn_http_req_header(req, "connection"), "upgrade") && key && strlen(key) == 24 && ver &&
           strcmp(ver, "13") == 0;
}

static void ws_free(mn_http_ws *ws) {
    mn_http__buf_release(&ws->msg);
    mn_free(ws);
}

/* on_close once, then end the upgrade response: the connection shuts down after what is
 * queued. Freed here unless the frame parser is still running over it. */
static void ws_finish(mn_http_ws *ws, int code, const char *reason) {
    if (ws->finished) return;
    ws->finished = true;
    if (ws->c) ws->c->ws = NULL;
    if (ws->cb.on_close) ws->cb.on_close(ws->ud, ws, code, reason ? reason : "");
    mn_http_res *r = ws->res;
    ws->res = NULL;
    if (r) {
        r->keep_alive = false;
        mn_http__res_finish(r);
    }
    if (!ws->busy) ws_free(ws);
}

/* Keep ws alive across a call that may close the connection (a failed write closes it at
 * once, and on_close frees ws): hold before, release after. */
static void ws_hold(mn_http_ws *ws) { ws->busy++; }

static void ws_release(mn_http_ws *ws) {
    if (--ws->busy == 0 && ws->finished) ws_free(ws);
}

static void ws_on_abort(void *ud) {
    mn_http_ws *ws = ud;
    if (ws->c) ws->c->ws = NULL;
    ws->c = NULL;
    ws_finish(ws, 1006, "connection lost");
}

static bool ws_send_frame(mn_http_ws *ws, int op, const char *data, size_t len) {
    if (!ws->c || ws->finished || ws->close_sent || !ws->res) return false;
    uint8_t h[10];
    unsigned hl;
    h[0] = (uint8_t)(0x80 | op);
    if (len < 126) {
        h[1] = (uint8_t)len;
        hl = 2;
    } else if (len < 65536) {
        h[1] = 126;
        h[2] = (uint8_t)(len >> 8);
        h[3] = (uint8_t)len;
        hl = 4;
    } else {
        h[1] = 127;
        for (int k = 0; k < 8; k++) h[2 + k] = (uint8_t)((uint64_t)len >> (56 - 8 * k));
        hl = 10;
    }
    uv_buf_t b[2] = {uv_buf_init((char *)h, hl), uv_buf_init((char *)data, (unsigned)len)};
    return mn_http__res_emitv(ws->res, b, len ? 2 : 1);
}

/* Queue our close frame. ws may be finished (and, unless held, freed) when this returns. */
static void ws_send_close(mn_http_ws *ws, int code, const char *reason) {
    char p[125];
    size_t n = 0;
    if (code) {
        p[0] = (char)(code >> 8);
        p[1] = (char)code;
        n = 2;
        size_t rl = reason ? strlen(reason) : 0;
        if (rl > 123) rl = 123;
        if (rl) memcpy(p + 2, reason, rl);
        n += rl;
    }
    ws_send_frame(ws, 8, p, n);
    ws->close_sent = true; /* callers hold ws */
}

/* a protocol violation: close frame with code, then end */
static void ws_fail(mn_http_ws *ws, int code, const char *reason) {
    ws_hold(ws);
    if (!ws->close_sent) ws_send_close(ws, code, reason);
    ws_finish(ws, code, reason);
    ws_release(ws);
}

mn_http_ws *mn_http_ws_accept(mn_http_res *res, const mn_http_ws_callbacks *cb, void *ud) {
    if (res->done || res->started) return NULL;
    if (!res->ws_key[0]) {
        json_t *o = json_pack("{s:{s:s, s:s, s:n, s:n}}", "error", "message",
                              "not a WebSocket upgrade request (needs GET, Upgrade: websocket, Connection: Upgrade, "
                              "Sec-WebSocket-Key, Sec-WebSocket-Version: 13)",
                              "type", "invalid_request_error", "param", "code");
        char *s = o ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
        json_decref(o);
        mn_http_respond(res, 400, "application/json", s ? s : "", s ? strlen(s) : 0, NULL, 0);
        free(s);
        return NULL;
    }
    if (!res->c) {
        mn_http__res_finish(res);
        return NULL;
    }
    mn_http_ws *ws = mn_calloc(1, sizeof *ws);
    if (!ws) {
        mn_http_respond(res, 500, "text/plain", "out of memory\n", 14, NULL, 0);
        return NULL;
    }
    char kbuf[64];
    int kl = snprintf(kbuf, sizeof kbuf, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", res->ws_key);
    uint8_t dig[20];
    sha1((const uint8_t *)kbuf, (size_t)kl, dig);
    char acc[32];
    base64(dig, 20, acc);
    char head[256];
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Accept: %s\r\n\r\n",
                      acc);
    mn_http__conn *c = res->c;
    ws->res = res;
    ws->c = c;
    ws->cb = *cb;
    ws->ud = ud;
    ws->max_msg = c->s->lim.max_body_bytes;
    res->started = true;
    mn_http_res_on_abort(res, ws_on_abort, ws);
    c->ws = ws;
    uv_buf_t b = uv_buf_init(head, (unsigned)hl);
    mn_http__res_emitv(res, &b, 1);
    if (!c->closing) mn_http__conn_update(c);
    return ws;
}

bool mn_http_ws_send_text(mn_http_ws *ws, const char *data, size_t len) { return ws_send_frame(ws, 1, data, len); }

bool mn_http_ws_send_binary(mn_http_ws *ws, const char *data, size_t len) { return ws_send_frame(ws, 2, data, len); }

size_t mn_http_ws_pending(const mn_http_ws *ws) { return ws->res ? mn_http_res_pending(ws->res) : 0; }

void mn_http_ws_close(mn_http_ws *ws, int code, const char *reason) {
    if (ws->finished || ws->close_sent || !ws->c) return;
    ws_hold(ws);
    ws_send_close(ws, code, reason);
    if (ws->c && !ws->c->closing) mn_http__conn_update(ws->c); /* grace timer for the client's answer */
    ws_release(ws);
}

void mn_http__ws_ping(mn_http_ws *ws) {
    ws->ping_sent = true;
    ws_send_frame(ws, 9, "mneme", 5);
}

/* ---- frames in ---- */

/* A close frame from the client: answer it (unless we started), then end. */
static void ws_on_close_frame(mn_http_ws *ws, const uint8_t *p, size_t n) {
    int code = 1005;
    char reason[128] = "";
    if (n == 1) {
        ws_fail(ws, 1002, "close frame with a 1-byte payload");
        return;
    }
    if (n >= 2) {
        code = p[0] << 8 | p[1];
        bool ok = (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) || (code >= 3000 && code <= 4999);
        if (!ok) {
            ws_fail(ws, 1002, "invalid close code");
            return;
        }
        if (!utf8_valid(p + 2, n - 2)) {
            ws_fail(ws, 1007, "close reason is not UTF-8");
            return;
        }
        memcpy(reason, p + 2, n - 2);
        reason[n - 2] = '\0';
    }
    ws_hold(ws);
    if (!ws->close_sent) ws_send_close(ws, code == 1005 ? 0 : code, NULL);
    ws_finish(ws, code, reason);
    ws_release(ws);
}

void mn_http__ws_feed(mn_http__conn *c) {
    mn_http_ws *ws = c->ws;
    if (!ws || ws->busy) return; /* not re-entered from a callback */
    ws_hold(ws);
    size_t off = 0;
    char why[128];
    while (!ws->finished && !c->closing) {
        const uint8_t *p = (const uint8_t *)c->in.p + off;
        size_t n = c->in.len - off;
        if (n < 2) break;
        bool fin = p[0] & 0x80;
        int op = p[0] & 0x0F;
        size_t hl = 2;
        uint64_t plen = p[1] & 0x7F;
        if (plen == 126) {
            if (n < 4) break;
            plen = (uint64_t)p[2] << 8 | p[3];
            hl = 4;
        } else if (plen == 127) {
            if (n < 10) break;
            plen = 0;
            for (int k = 0; k < 8; k++) plen = plen << 8 | p[2 + k];
            hl = 10;
        }
        if (p[0] & 0x70) {
            ws_fail(ws, 1002, "reserved bits set (no extension was negotiated)");
            break;
        }
        if (!(p[1] & 0x80)) {
            ws_fail(ws, 1002, "client frame not masked");
            break;
        }
        if (op & 8) {
            if (op > 10) {
                snprintf(why, sizeof why, "unknown control opcode %d", op);
                ws_fail(ws, 1002, why);
                break;
            }
            if (!fin || plen > 125) {
                ws_fail(ws, 1002, !fin ? "fragmented control frame" : "control frame payload over 125 bytes");
                break;
            }
        } else {
            if (op > 2) {
                snprintf(why, sizeof why, "unknown data opcode %d", op);
                ws_fail(ws, 1002, why);
                break;
            }
            if (op == 0 && !ws->msg_op) {
                ws_fail(ws, 1002, "continuation frame without a message to continue");
                break;
            }
            if (op != 0 && ws->msg_op) {
                ws_fail(ws, 1002, "new message before the fragmented one ended");
                break;
            }
            if (plen > ws->max_msg || ws->msg.len + plen > ws->max_msg) {
                snprintf(why, sizeof why, "message exceeds the limit of %zu bytes", ws->max_msg);
                ws_fail(ws, 1009, why);
                break;
            }
        }
        if (n < hl + 4 + plen) break; /* wait for the whole frame */
        const uint8_t *mask = p + hl;
        const uint8_t *src = p + hl + 4;
        off += hl + 4 + (size_t)plen;
        if (op & 8) {
            uint8_t ctl[125];
            for (size_t i = 0; i < plen; i++) ctl[i] = src[i] ^ mask[i & 3];
            if (op == 8) ws_on_close_frame(ws, ctl, (size_t)plen);
            else if (op == 9) ws_send_frame(ws, 10, (const char *)ctl, (size_t)plen); /* pong */
            continue;                                                               /* pong in: nothing */
        }
        size_t at = ws->msg.len;
        if (!mn_http__buf_append(&ws->msg, (const char *)src, (size_t)plen)) {
            ws_fail(ws, 1011, "out of memory");
            break;
        }
        for (size_t i = 0; i < plen; i++) ws->msg.p[at + i] ^= (char)mask[i & 3];
        if (op) ws->msg_op = op;
        if (!fin) continue;
        int mop = ws->msg_op;
        ws->msg_op = 0;
        if (mop == 1 && !utf8_valid((const uint8_t *)ws->msg.p, ws->msg.len)) {
            ws_fail(ws, 1007, "text message is not valid UTF-8");
            break;
        }
        if (mop == 1 && ws->cb.on_text) ws->cb.on_text(ws->ud, ws, ws->msg.p, ws->msg.len);
        else if (mop == 2 && ws->cb.on_binary) ws->cb.on_binary(ws->ud, ws, ws->msg.p, ws->msg.len);
        mn_http__buf_reset(&ws->msg);
    }
    if (off > 0 && !ws->finished) { /* the client is alive: restart the quiet clock */
        ws->ping_sent = false;
        if (c->tmode == T_WSIDLE) c->tmode = T_NONE;
    }
    /* drop what was parsed (the connection's memory lives until its handles close) */
    if (off >= c->in.len) {
        mn_http__buf_release(&c->in);
    } else if (off > 0) {
        memmove(c->in.p, c->in.p + off, c->in.len - off);
        c->in.len -= off;
    }
    bool done = ws->finished;
    ws_release(ws);
    if (!done && !c->closing) mn_http__conn_update(c);
}
