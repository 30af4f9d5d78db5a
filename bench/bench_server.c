/* bench/bench_server.c — load generator for `mneme serve`, measured at the client.
 *
 *   load       N concurrent clients (default 1, 8, 64), each one streamed greedy chat completion of
 *              -n tokens: time to first token and inter-token latency (p50, p99; one sample per SSE
 *              token event as it arrives), and total generated tokens/s over the wall time
 *   turns      a --turns conversation (growing history, ~40-60 new tokens per user turn, short replies)
 *              once on a session (POST messages + generate: only the new turn is sent) and once
 *              stateless (/v1/chat/completions with the whole history; the prefix cache reuses it) and
 *              once stateless "cold" (the system prompt changes every turn, so nothing is reused), on the
 *              same server: per-turn time to first token and total time, the ratios, and the tokens the
 *              model ran in each mode (from /metrics)
 *   overhead   --reps pairs, alternating: `mneme bench -n 128 -p 16 -t T -r 1` (the engine alone, same binary,
 *              same threads), then one 128-token stream through the server; server ms/token / engine's - 1
 *
 * usage: bench_server (--url http://127.0.0.1:PORT [--mneme PATH -m MODEL] | --spawn PATH -m MODEL [-t T])
 *                     [-c 1,8,64] [-n 64] [--turns 10] [--reply 24] [--reps 5] [--json] [--verbose]
 *                     [--no-load] [--no-turns] [--no-overhead]
 * --spawn starts `PATH serve -m MODEL -t T --port 0` on loopback, reads the port it prints, waits for
 * /health and stops it with SIGTERM at the end. Only loopback addresses are accepted.
 *
 * Plain blocking sockets, one thread per client, `Connection: close` per request; every socket read
 * has a timeout, so every loop is bounded. A server error is reported and counted, never fatal.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 256
#define IO_TIMEOUT_S 300   /* one socket read; a stuck server fails the request, not the run */
#define MAX_BODY (1 << 20) /* non-SSE answer bytes kept */
#define OVERHEAD_N 128     /* matches `mneme bench -n 128` */

typedef struct opts {
    char host[64];
    int port;
    const char *mneme;     /* binary: for --spawn and for the engine-alone bench */
    const char *model;
    int threads;
    int clients[16], n_clients;
    int n_tokens, turns, reply, reps;
    bool json, verbose, load, multiturn, overhead;
} opts;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- one streamed request's record -------------------------------------------------------------- */

typedef enum { SSE_CHAT, SSE_SESSION } sse_kind;

typedef struct stream_rec {
    sse_kind kind;
    double t0, t_first, t_end;   /* t_first: first token event; 0 if none */
    double *tt;                  /* arrival time of each token event */
    int n_tt, cap_tt;
    int prompt_tokens, completion_tokens; /* from usage; -1 if not given */
    char finish[16];
    char err[512];               /* non-empty: the request failed */
    char *text;                  /* reply text, concatenated */
    size_t text_len, text_cap;
    bool done;                   /* saw data: [DONE] */
} stream_rec;

static void rec_init(stream_rec *r, sse_kind kind) {
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->prompt_tokens = r->completion_tokens = -1;
}

static void rec_free(stream_rec *r) {
    free(r->tt);
    free(r->text);
    r->tt = NULL;
    r->text = NULL;
}

static void rec_token(stream_rec *r, double t, const char *txt) {
    if (r->n_tt == r->cap_tt) {
        int cap = r->cap_tt ? 2 * r->cap_tt : 256;
        double *p = realloc(r->tt, (size_t)cap * sizeof *p);
        if (!p) { snprintf(r->err, sizeof r->err, "out of memory for token times"); return; }
        r->tt = p;
        r->cap_tt = cap;
    }
    r->tt[r->n_tt++] = t;
    if (!r->t_first) r->t_first = t;
    size_t n = txt ? strlen(txt) : 0;
    if (r->text_len + n + 1 > r->text_cap) {
        size_t cap = (r->text_len + n + 1) * 2;
        char *p = realloc(r->text, cap);
        if (!p) { snprintf(r->err, sizeof r->err, "out of memory for reply text"); return; }
        r->text = p;
        r->text_cap = cap;
    }
    memcpy(r->text + r->text_len, txt ? txt : "", n + 1);
    r->text_len += n;
}

/* One SSE event's data, arrived at time t. */
static void rec_event(stream_rec *r, const char *data, double t) {
    if (!strcmp(data, "[DONE]")) { r->done = true; return; }
    json_error_t je;
    json_t *ev = json_loads(data, 0, &je);
    if (!ev) {
        if (!r->err[0]) snprintf(r->err, sizeof r->err, "SSE event is not JSON (%s): %.60s", je.text, data);
        return;
    }
    json_t *e = json_object_get(ev, "error");
    if (e && !r->err[0]) {
        const char *m = json_string_value(json_object_get(e, "message"));
        snprintf(r->err, sizeof r->err, "error event in stream: %s", m ? m : "(no message)");
    }
    json_t *fin = NULL, *usage = json_object_get(ev, "usage");
    if (r->kind == SSE_CHAT) {
        json_t *c0 = json_array_get(json_object_get(ev, "choices"), 0);
        json_t *delta = json_object_get(c0, "delta");
        json_t *content = json_object_get(delta, "content");
        /* the opening chunk carries the role and an empty content: not a token */
        if (json_is_string(content) && !json_object_get(delta, "role")) rec_token(r, t, json_string_value(content));
        fin = json_object_get(c0, "finish_reason");
    } else {
        json_t *tok = json_object_get(ev, "token");
        if (tok) rec_token(r, t, json_string_value(json_object_get(ev, "text")));
        fin = json_object_get(ev, "finish_reason");
    }
    if (json_is_string(fin)) snprintf(r->finish, sizeof r->finish, "%s", json_string_value(fin));
    if (json_is_object(usage)) {
        json_t *p = json_object_get(usage, "prompt_tokens"), *c = json_object_get(usage, "completion_tokens");
        if (json_is_integer(p)) r->prompt_tokens = (int)json_integer_value(p);
        if (json_is_integer(c)) r->completion_tokens = (int)json_integer_value(c);
    }
    json_decref(ev);
}

/* ---- HTTP/1.1 client: one request per connection ------------------------------------------------ */

typedef struct reader {
    int fd;
    char buf[16384];
    size_t b, e;     /* unread bytes are buf[b..e) */
    double t;        /* time of the last recv: every buffered byte had arrived by then */
} reader;

/* Reads more bytes; 1 on data, 0 on EOF, -1 on error (err filled). */
static int rd_fill(reader *r, char *err, size_t errn) {
    if (r->b == r->e) r->b = r->e = 0;
    else if (r->e == sizeof r->buf) {
        memmove(r->buf, r->buf + r->b, r->e - r->b);
        r->e -= r->b;
        r->b = 0;
    }
    if (r->e == sizeof r->buf) { snprintf(err, errn, "response line longer than %zu bytes", sizeof r->buf); return -1; }
    for (;;) {
        ssize_t n = recv(r->fd, r->buf + r->e, sizeof r->buf - r->e, 0);
        if (n > 0) { r->e += (size_t)n; r->t = now_s(); return 1; }
        if (n == 0) return 0;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) snprintf(err, errn, "no answer within %d s", IO_TIMEOUT_S);
        else snprintf(err, errn, "recv: %s", strerror(errno));
        return -1;
    }
}

/* A CRLF-terminated line into out (without the CRLF). 0 ok, -1 error or EOF. */
static int rd_line(reader *r, char *out, size_t outn, char *err, size_t errn) {
    for (;;) {
        char *nl = memmem(r->buf + r->b, r->e - r->b, "\r\n", 2);
        if (nl) {
            size_t n = (size_t)(nl - (r->buf + r->b));
            if (n >= outn) {
                snprintf(err, errn, "response line of %zu bytes, at most %zu expected", n, outn - 1);
                return -1;
            }
            memcpy(out, r->buf + r->b, n);
            out[n] = 0;
            r->b += n + 2;
            return 0;
        }
        int f = rd_fill(r, err, errn);
        if (f <= 0) {
            if (f == 0) snprintf(err, errn, "connection closed in the middle of the response");
            return -1;
        }
    }
}

/* Where body bytes go: the SSE splitter (into rec) or a plain buffer. */
typedef struct sink {
    stream_rec *rec;           /* SSE mode when non-NULL and the answer is an event stream */
    bool sse;
    char *buf;
    size_t len, cap;
} sink;

static int sink_put(sink *s, const char *p, size_t n, double t) {
    if (!s->sse && s->len + n > MAX_BODY) n = s->len < MAX_BODY ? MAX_BODY - s->len : 0;
    if (s->len + n + 1 > s->cap) {
        size_t cap = (s->len + n + 1) * 2;
        char *q = realloc(s->buf, cap);
        if (!q) return -1;
        s->buf = q;
        s->cap = cap;
    }
    memcpy(s->buf + s->len, p, n);
    s->len += n;
    s->buf[s->len] = 0;
    if (!s->sse) return 0;
    /* events end with a blank line; one `data:` line each is what the server sends */
    char *start = s->buf, *end;
    while ((end = strstr(start, "\n\n"))) {
        *end = 0;
        for (char *line = start; line && *line;) {
            char *nl = strchr(line, '\n');
            if (nl) *nl = 0;
            if (!strncmp(line, "data:", 5)) {
                char *d = line + 5;
                if (*d == ' ') d++;
                size_t dl = strlen(d);
                if (dl && d[dl - 1] == '\r') d[dl - 1] = 0;
                rec_event(s->rec, d, t);
            }
            line = nl ? nl + 1 : NULL;
        }
        start = end + 2;
    }
    size_t rest = s->len - (size_t)(start - s->buf);
    memmove(s->buf, start, rest + 1);
    s->len = rest;
    return 0;
}

static int connect_to(const opts *o, char *err, size_t errn) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) { snprintf(err, errn, "socket: %s", strerror(errno)); return -1; }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)o->port)};
    inet_pton(AF_INET, o->host, &sa.sin_addr);
    struct timeval tv = {.tv_sec = IO_TIMEOUT_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        snprintf(err, errn, "connect to %s:%d: %s", o->host, o->port, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* Sends one request and reads the whole answer. With rec, an event-stream answer is fed to rec as it
 * arrives; any other answer (and every error answer) is kept in *body (caller frees). Returns the HTTP
 * status, or -1 on a transport error (err filled). */
static int http_do(const opts *o, const char *method, const char *path, const char *json_body, stream_rec *rec,
                   char **body, char *err, size_t errn) {
    if (body) *body = NULL;
    reader *r = calloc(1, sizeof *r);
    if (!r) { snprintf(err, errn, "out of memory"); return -1; }
    size_t bl = json_body ? strlen(json_body) : 0;
    size_t hn = 512 + strlen(path);
    char *req = malloc(hn + bl);
    sink s = {.rec = rec};
    int status = -1, fd = -1;
    if (!req) { snprintf(err, errn, "out of memory"); goto out; }
    int k = snprintf(req, hn, "%s %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: */*\r\nConnection: close\r\n", method, path,
                     o->host, o->port);
    if (json_body)
        k += snprintf(req + k, hn - (size_t)k, "Content-Type: application/json\r\nContent-Length: %zu\r\n", bl);
    k += snprintf(req + k, hn - (size_t)k, "\r\n");
    memcpy(req + k, json_body ? json_body : "", bl);
    size_t total = (size_t)k + bl;
    if (rec) rec->t0 = now_s();
    if ((fd = connect_to(o, err, errn)) < 0) goto out;
    r->fd = fd;
    for (size_t sent = 0; sent < total;) {
        ssize_t n = send(fd, req + sent, total - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) { snprintf(err, errn, "send %s %s: %s", method, path, strerror(errno)); goto out; }
        sent += (size_t)n;
    }
    /* status line and headers */
    char line[8192];
    int code = 0;
    long long clen = -1;
    bool chunked = false, evstream = false;
    if (rd_line(r, line, sizeof line, err, errn)) goto out;
    if (sscanf(line, "HTTP/1.%*d %d", &code) != 1) { snprintf(err, errn, "bad status line '%.80s'", line); goto out; }
    for (;;) {
        if (rd_line(r, line, sizeof line, err, errn)) goto out;
        if (!line[0]) break;
        if (!strncasecmp(line, "content-length:", 15)) clen = atoll(line + 15);
        else if (!strncasecmp(line, "transfer-encoding:", 18) && strcasestr(line + 18, "chunked")) chunked = true;
        else if (!strncasecmp(line, "content-type:", 13) && strcasestr(line + 13, "text/event-stream")) evstream = true;
    }
    s.sse = rec && evstream && code == 200;
    /* body: chunked, by length, or to EOF */
    if (chunked) {
        for (;;) {
            if (rd_line(r, line, sizeof line, err, errn)) goto out;
            char *endp;
            unsigned long long size = strtoull(line, &endp, 16);
            if (endp == line) { snprintf(err, errn, "bad chunk size line '%.40s'", line); goto out; }
            if (size == 0) {
                while (!rd_line(r, line, sizeof line, err, errn) && line[0]) {}   /* trailers */
                break;
            }
            while (size > 0) {
                if (r->b == r->e) {
                    int f = rd_fill(r, err, errn);
                    if (f <= 0) { if (!f) snprintf(err, errn, "connection closed inside a chunk"); goto out; }
                }
                size_t take = r->e - r->b < size ? r->e - r->b : (size_t)size;
                if (sink_put(&s, r->buf + r->b, take, r->t)) { snprintf(err, errn, "out of memory"); goto out; }
                r->b += take;
                size -= take;
            }
            if (rd_line(r, line, sizeof line, err, errn)) goto out;
        }
    } else {
        for (long long left = clen;;) {
            if (left == 0) break;
            if (r->b == r->e) {
                int f = rd_fill(r, err, errn);
                if (f < 0) goto out;
                if (f == 0) {
                    if (left > 0) {
                        snprintf(err, errn, "connection closed %lld bytes before the body's end", left);
                        goto out;
                    }
                    break;
                }
            }
            size_t take = r->e - r->b;
            if (left >= 0 && (long long)take > left) take = (size_t)left;
            if (sink_put(&s, r->buf + r->b, take, r->t)) { snprintf(err, errn, "out of memory"); goto out; }
            r->b += take;
            if (left > 0) left -= (long long)take;
        }
    }
    status = code;
    if (rec) rec->t_end = now_s();
    if (body && !s.sse) { *body = s.buf; s.buf = NULL; }
out:
    if (fd >= 0) close(fd);
    free(s.buf);
    free(req);
    free(r);
    return status;
}

/* "HTTP 429: message" from an error answer. */
static void http_error(const char *what, int status, const char *body, char *err, size_t errn) {
    json_t *j = body ? json_loads(body, 0, NULL) : NULL;
    const char *m = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    snprintf(err, errn, "%s: HTTP %d: %.160s", what, status, m ? m : body ? body : "(no body)");
    json_decref(j);
}

/* A streamed POST; on failure rec->err says why. */
static void stream_post(const opts *o, const char *path, json_t *req, stream_rec *rec) {
    char *js = json_dumps(req, JSON_COMPACT), *body = NULL, err[256] = "";
    if (!js) { snprintf(rec->err, sizeof rec->err, "out of memory"); return; }
    int st = http_do(o, "POST", path, js, rec, &body, err, sizeof err);
    if (st < 0) snprintf(rec->err, sizeof rec->err, "POST %s: %s", path, err);
    else if (st != 200) http_error(path, st, body, rec->err, sizeof rec->err);
    else if (!rec->err[0] && !rec->done)
        snprintf(rec->err, sizeof rec->err, "POST %s: stream ended without [DONE]", path);
    free(body);
    free(js);
}

/* A JSON POST/GET/DELETE; returns the parsed answer of a 200 (caller decrefs), else NULL with err filled. */
static json_t *json_call(const opts *o, const char *method, const char *path, json_t *req, char *err, size_t errn) {
    char *js = req ? json_dumps(req, JSON_COMPACT) : NULL, *body = NULL, e2[256] = "";
    json_t *ans = NULL;
    int st = http_do(o, method, path, js, NULL, &body, e2, sizeof e2);
    if (st < 0) snprintf(err, errn, "%s %s: %s", method, path, e2);
    else if (st != 200) http_error(path, st, body, err, errn);
    else if (!(ans = json_loads(body ? body : "", 0, NULL)))
        snprintf(err, errn, "%s %s: answer is not JSON", method, path);
    free(body);
    free(js);
    return ans;
}

/* ---- statistics --------------------------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of sorted v; NAN when empty. */
static double pct(const double *v, size_t n, double q) {
    if (!n) return NAN;
    size_t k = (size_t)ceil(q * (double)n);
    return v[k ? k - 1 : 0];
}

/* ---- 1. concurrent streams ---------------------------------------------------------------------- */

/* All clients wait for `go`, so that they start together. */
typedef struct start_gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool go;
} start_gate;

typedef struct client {
    const opts *o;
    int idx;
    start_gate *gate;
    stream_rec rec;
} client;

static const char *const WHO[8] = {"lighthouse keeper", "young dragon", "clockmaker", "ship's cook",
                                   "retired astronaut", "street musician", "beekeeper", "lost robot"};
static const char *const WHERE[8] = {"a frozen harbour town", "the desert", "an old library", "a floating city",
                                     "the deep forest", "a busy train station", "a mountain village", "the moon"};

static json_t *chat_request(const char *user, int max_tokens) {
    return json_pack("{s:[{s:s,s:s}],s:i,s:f,s:b,s:{s:b}}", "messages", "role", "user", "content", user,
                     "max_tokens", max_tokens, "temperature", 0.0, "stream", 1, "stream_options", "include_usage", 1);
}

static void *client_main(void *arg) {
    client *c = arg;
    char prompt[256];
    snprintf(prompt, sizeof prompt, "Write a long, detailed story about a %s who lives in %s.", WHO[c->idx % 8],
             WHERE[(c->idx / 8) % 8]);
    json_t *req = chat_request(prompt, c->o->n_tokens);
    pthread_mutex_lock(&c->gate->mu);
    while (!c->gate->go) pthread_cond_wait(&c->gate->cv, &c->gate->mu);
    pthread_mutex_unlock(&c->gate->mu);
    if (req) stream_post(c->o, "/v1/chat/completions", req, &c->rec);
    else snprintf(c->rec.err, sizeof c->rec.err, "out of memory");
    json_decref(req);
    return NULL;
}

/* Returns the number of failed requests. */
static int run_load(const opts *o, int n) {
    client *cl = calloc((size_t)n, sizeof *cl);
    pthread_t *th = calloc((size_t)n, sizeof *th);
    start_gate gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false};
    int started = 0, errors = 0;
    if (!cl || !th) {
        fprintf(stderr, "bench_server: load c=%d: out of memory\n", n);
        free(cl);
        free(th);
        return n;
    }
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setstacksize(&at, 256 << 10);
    for (int i = 0; i < n; i++) {
        cl[i] = (client){.o = o, .idx = i, .gate = &gate};
        rec_init(&cl[i].rec, SSE_CHAT);
    }
    for (; started < n; started++)
        if (pthread_create(&th[started], &at, client_main, &cl[started])) break;
    for (int i = started; i < n; i++) snprintf(cl[i].rec.err, sizeof cl[i].rec.err, "could not start its thread");
    pthread_mutex_lock(&gate.mu);
    gate.go = true;
    pthread_cond_broadcast(&gate.cv);
    pthread_mutex_unlock(&gate.mu);
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    pthread_attr_destroy(&at);

    size_t n_itl = 0, n_ttft = 0;
    long long tokens = 0;
    for (int i = 0; i < n; i++) n_itl += cl[i].rec.n_tt > 1 ? (size_t)cl[i].rec.n_tt - 1 : 0;
    double *itl = malloc((n_itl + 1) * sizeof *itl), *ttft = malloc((size_t)n * sizeof *ttft);
    double t_begin = INFINITY, t_last = 0;
    n_itl = 0;
    for (int i = 0; i < n; i++) {
        stream_rec *r = &cl[i].rec;
        if (r->err[0]) {
            errors++;
            fprintf(stderr, "bench_server: load c=%d client %d: %s\n", n, i, r->err);
        }
        if (r->t0 && r->t0 < t_begin) t_begin = r->t0;
        if (r->t_end > t_last) t_last = r->t_end;
        tokens += r->completion_tokens >= 0 ? r->completion_tokens : r->n_tt;
        if (r->t_first && itl && ttft) ttft[n_ttft++] = r->t_first - r->t0;
        for (int k = 1; k < r->n_tt && itl; k++) itl[n_itl++] = r->tt[k] - r->tt[k - 1];
    }
    if (itl) qsort(itl, n_itl, sizeof *itl, cmp_double);
    if (ttft) qsort(ttft, n_ttft, sizeof *ttft, cmp_double);
    double wall = t_last > t_begin ? t_last - t_begin : NAN, tps = tokens / wall;
    double t50 = pct(ttft, n_ttft, 0.5) * 1e3, t99 = pct(ttft, n_ttft, 0.99) * 1e3;
    double i50 = pct(itl, n_itl, 0.5) * 1e3, i99 = pct(itl, n_itl, 0.99) * 1e3;
    if (o->json)
        printf("{\"bench\": \"load\", \"clients\": %d, \"max_tokens\": %d, \"errors\": %d, \"tokens\": %lld, "
               "\"wall_s\": %.3f, \"tokens_per_s\": %.2f, \"ttft_p50_ms\": %.2f, \"ttft_p99_ms\": %.2f, "
               "\"itl_p50_ms\": %.3f, \"itl_p99_ms\": %.3f, \"itl_samples\": %zu}\n",
               n, o->n_tokens, errors, tokens, wall, tps, t50, t99, i50, i99, n_itl);
    else
        printf("| %7d | %6d | %6lld | %7.2f | %8.1f | %8.1f | %8.1f | %8.2f | %8.2f |\n", n, errors, tokens, wall, tps,
               t50, t99, i50, i99);
    fflush(stdout);
    for (int i = 0; i < n; i++) rec_free(&cl[i].rec);
    free(itl);
    free(ttft);
    free(cl);
    free(th);
    return errors;
}

/* ---- 2. multi-turn: session vs stateless -------------------------------------------------------- */

typedef struct turn_res {
    double ttft, total;  /* seconds from the turn's first request */
    double append;       /* session: seconds until POST messages answered */
    int new_tokens;      /* tokens the server computed for the user turn (session: appended) */
    int prompt_tokens;   /* stateless: the whole history sent */
    int reply_tokens;
    double decode;       /* seconds per token after the first one; 0 with fewer than 2 tokens */
    bool ok;
} turn_res;

static const char *const WORDS[32] = {
    "the", "river", "market", "slowly", "bright", "engine", "window", "garden", "because", "under",
    "morning", "quiet", "station", "letter", "silver", "forest", "remember", "careful", "winter", "paper",
    "bridge", "answer", "travel", "yellow", "lamp", "between", "story", "harbor", "little", "music",
    "voice", "evening"};

/* ~40-60 tokens of user text for turn k, the same in both modes. */
static void user_turn(int k, char *out, size_t outn) {
    unsigned x = 2654435761u * (unsigned)(k + 1);
    int n = snprintf(out, outn, "Turn %d. Please answer briefly. I was thinking about", k + 1);
    for (int w = 0; w < 36 && n < (int)outn - 16; w++) {
        x = x * 1103515245u + 12345u;
        n += snprintf(out + n, outn - (size_t)n, " %s", WORDS[(x >> 16) % 32]);
    }
    snprintf(out + n, outn - (size_t)n, ". What do you think?");
}

/* The system prompt differs in one letter between the modes so that they share no prefix blocks. */
static void system_prompt(char tag, char *out, size_t outn) {
    snprintf(out, outn, "You are a friendly assistant in conversation %c. Keep your answers short.", tag);
}

static int multiturn_session(const opts *o, turn_res *res) {
    char err[512] = "", sys[128], path[160], text[1024];
    system_prompt('A', sys, sizeof sys);
    json_t *req = json_pack("{s:s}", "system", sys);
    json_t *s = json_call(o, "POST", "/v1/sessions", req, err, sizeof err);
    json_decref(req);
    const char *id0 = json_string_value(json_object_get(s, "id"));
    if (!id0) {
        fprintf(stderr, "bench_server: turns (session): %s\n", err[0] ? err : "POST /v1/sessions: answer has no id");
        json_decref(s);
        return 1;
    }
    char id[64];
    snprintf(id, sizeof id, "%s", id0);
    json_decref(s);
    int errors = 0;
    for (int k = 0; k < o->turns; k++) {
        turn_res *t = &res[k];
        user_turn(k, text, sizeof text);
        stream_rec rec;
        rec_init(&rec, SSE_SESSION);
        double t0 = now_s();
        snprintf(path, sizeof path, "/v1/sessions/%s/messages", id);
        req = json_pack("{s:s,s:s}", "role", "user", "content", text);
        json_t *a = json_call(o, "POST", path, req, err, sizeof err);
        json_decref(req);
        if (!a) {
            fprintf(stderr, "bench_server: turns (session) turn %d: %s\n", k + 1, err);
            errors++;
            continue;
        }
        t->append = now_s() - t0;
        t->new_tokens = (int)json_integer_value(json_object_get(a, "appended"));
        json_decref(a);
        snprintf(path, sizeof path, "/v1/sessions/%s/generate", id);
        req = json_pack("{s:i,s:f,s:b}", "max_tokens", o->reply, "temperature", 0.0, "stream", 1);
        stream_post(o, path, req, &rec);
        json_decref(req);
        if (rec.err[0]) {
            fprintf(stderr, "bench_server: turns (session) turn %d: %s\n", k + 1, rec.err);
            errors++;
        } else {
            t->ok = rec.t_first > 0;
            t->ttft = rec.t_first - t0;
            t->total = rec.t_end - t0;
            t->prompt_tokens = rec.prompt_tokens;
            t->reply_tokens = rec.completion_tokens >= 0 ? rec.completion_tokens : rec.n_tt;
            t->decode = rec.n_tt > 1 ? (rec.tt[rec.n_tt - 1] - rec.tt[0]) / (rec.n_tt - 1) : 0;
        }
        rec_free(&rec);
    }
    snprintf(path, sizeof path, "/v1/sessions/%s", id);
    json_t *d = json_call(o, "DELETE", path, NULL, err, sizeof err);
    if (!d) fprintf(stderr, "bench_server: turns (session): %s\n", err);
    json_decref(d);
    return errors;
}

/* Stateless chat: every turn resends the whole history. cold: the system prompt changes every turn, so
 * no prefix of the history is in the server's prefix cache (what a server without one pays). */
static int multiturn_stateless(const opts *o, bool cold, turn_res *res) {
    char sys[128], text[1024];
    int errors = 0, prev_prompt = 0;
    json_t *msgs = json_array();
    if (!msgs) return o->turns;
    for (int k = 0; k < o->turns; k++) {
        turn_res *t = &res[k];
        system_prompt(cold ? (char)('a' + k % 26) : 'B', sys, sizeof sys);
        if (k == 0) json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "system", "content", sys));
        else json_object_set_new(json_array_get(msgs, 0), "content", json_string(sys));
        user_turn(k, text, sizeof text);
        json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "user", "content", text));
        json_t *req = json_pack("{s:O,s:i,s:f,s:b,s:{s:b}}", "messages", msgs, "max_tokens", o->reply, "temperature",
                                0.0, "stream", 1, "stream_options", "include_usage", 1);
        stream_rec rec;
        rec_init(&rec, SSE_CHAT);
        stream_post(o, "/v1/chat/completions", req, &rec);
        json_decref(req);
        if (rec.err[0]) {
            fprintf(stderr, "bench_server: turns (%s) turn %d: %s\n", cold ? "cold" : "stateless", k + 1, rec.err);
            errors++;
        } else {
            t->ok = rec.t_first > 0;
            t->ttft = rec.t_first - rec.t0;
            t->total = rec.t_end - rec.t0;
            t->prompt_tokens = rec.prompt_tokens;
            t->new_tokens = rec.prompt_tokens - prev_prompt;
            t->reply_tokens = rec.completion_tokens >= 0 ? rec.completion_tokens : rec.n_tt;
            t->decode = rec.n_tt > 1 ? (rec.tt[rec.n_tt - 1] - rec.tt[0]) / (rec.n_tt - 1) : 0;
            prev_prompt = rec.prompt_tokens + t->reply_tokens;
        }
        /* the reply goes into the history the next request resends */
        json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "assistant", "content", rec.text ? rec.text : ""));
        rec_free(&rec);
    }
    json_decref(msgs);
    return errors;
}

/* One counter from GET /metrics (the sum over its label sets); -1 if the server does not answer it. */
static long long metric(const opts *o, const char *name) {
    char *body = NULL, err[256];
    int st = http_do(o, "GET", "/metrics", NULL, NULL, &body, err, sizeof err);
    long long v = -1;
    size_t nl = strlen(name);
    for (char *l = st == 200 ? body : NULL; l && *l;) {
        if (!strncmp(l, name, nl) && (l[nl] == ' ' || l[nl] == '{')) {
            char *sp = strchr(l, ' ');
            if (sp) v = (v < 0 ? 0 : v) + (long long)strtod(sp + 1, NULL);
        }
        l = strchr(l, '\n');
        if (l) l++;
    }
    free(body);
    return v;
}

typedef struct counters { long long computed, prefix_hit; } counters;

static counters counters_now(const opts *o) {
    return (counters){metric(o, "mneme_computed_tokens_total"), metric(o, "mneme_prefix_hit_tokens_total")};
}

enum { MODE_SESSION, MODE_STATELESS, MODE_COLD, N_MODES };
static const char *const MODE_NAME[N_MODES] = {"session", "stateless", "stateless_cold"};

static int run_turns(const opts *o) {
    turn_res *res[N_MODES];
    int errors = 0;
    counters c[N_MODES + 1];
    double sum_ttft[N_MODES] = {0}, sum_total[N_MODES] = {0}, sum_dec[N_MODES] = {0};
    int n_dec[N_MODES] = {0};
    for (int m = 0; m < N_MODES; m++) res[m] = calloc((size_t)o->turns, sizeof *res[m]);
    if (!res[0] || !res[1] || !res[2]) {
        for (int m = 0; m < N_MODES; m++) free(res[m]);
        fprintf(stderr, "bench_server: turns: out of memory\n");
        return 1;
    }
    /* one mode after the other on the same server; the counters are server-wide, nothing else runs meanwhile */
    c[0] = counters_now(o);
    for (int m = 0; m < N_MODES; m++) {
        errors += m == MODE_SESSION ? multiturn_session(o, res[m]) : multiturn_stateless(o, m == MODE_COLD, res[m]);
        c[m + 1] = counters_now(o);
    }
    if (!o->json) {
        printf("\nmulti-turn: %d turns, replies of up to %d tokens, times in ms from the turn's first request.\n"
               "session: POST messages + generate on one session; stateless: /v1/chat/completions with the whole\n"
               "history (the server's prefix cache reuses it); cold: the same but the system prompt changes every\n"
               "turn, so nothing is reused (a server without a prefix cache)\n",
               o->turns, o->reply);
        printf("| turn | new tok | session TTFT |  total | history | stateless TTFT |  total | cold TTFT |  total "
               "| stateless/session | cold/session |\n");
    }
    for (int k = 0; k < o->turns; k++) {
        turn_res *a = &res[MODE_SESSION][k], *b = &res[MODE_STATELESS][k], *d = &res[MODE_COLD][k];
        bool ok = a->ok && b->ok && d->ok;
        for (int m = 0; m < N_MODES && ok; m++) {
            sum_ttft[m] += res[m][k].ttft;
            sum_total[m] += res[m][k].total;
            if (res[m][k].decode > 0) { sum_dec[m] += res[m][k].decode; n_dec[m]++; }
        }
        if (o->json) {
            for (int m = 0; m < N_MODES; m++) {
                turn_res *t = &res[m][k];
                printf("{\"bench\": \"turn\", \"mode\": \"%s\", \"turn\": %d, \"ok\": %s, \"prompt_tokens\": %d, "
                       "\"new_tokens\": %d, \"reply_tokens\": %d, \"ttft_ms\": %.2f, \"total_ms\": %.2f, "
                       "\"append_ms\": %.2f, \"decode_ms_per_token\": %.3f, \"ttft_vs_session\": %.3f}\n",
                       MODE_NAME[m], k + 1, t->ok ? "true" : "false", t->prompt_tokens, t->new_tokens, t->reply_tokens,
                       t->ttft * 1e3, t->total * 1e3, t->append * 1e3, t->decode * 1e3,
                       ok ? t->ttft / a->ttft : NAN);
            }
        } else {
            printf("| %4d | %7d | %12.1f | %6.1f | %7d | %14.1f | %6.1f | %9.1f | %6.1f | %17.2f | %12.2f |\n", k + 1,
                   a->new_tokens, a->ttft * 1e3, a->total * 1e3, b->prompt_tokens, b->ttft * 1e3, b->total * 1e3,
                   d->ttft * 1e3, d->total * 1e3, ok ? b->ttft / a->ttft : NAN, ok ? d->ttft / a->ttft : NAN);
        }
    }
    for (int m = 0; m < N_MODES; m++) {
        /* -1: /metrics did not answer */
        long long comp = c[m + 1].computed < 0 || c[m].computed < 0 ? -1 : c[m + 1].computed - c[m].computed;
        long long hit = c[m + 1].prefix_hit < 0 || c[m].prefix_hit < 0 ? -1 : c[m + 1].prefix_hit - c[m].prefix_hit;
        double dec = n_dec[m] ? 1e3 * sum_dec[m] / n_dec[m] : NAN;
        if (o->json)
            printf("{\"bench\": \"turns\", \"mode\": \"%s\", \"turns\": %d, \"ttft_ms_sum\": %.2f, "
                   "\"total_ms_sum\": %.2f, \"ttft_vs_session\": %.3f, \"total_vs_session\": %.3f, "
                   "\"decode_ms_per_token\": %.3f, \"computed_tokens\": %lld, \"prefix_hit_tokens\": %lld}\n",
                   MODE_NAME[m], o->turns, sum_ttft[m] * 1e3, sum_total[m] * 1e3, sum_ttft[m] / sum_ttft[0],
                   sum_total[m] / sum_total[0], dec, comp, hit);
        else
            printf("%-14s all turns: TTFT %8.1f ms, total %8.1f ms (x%.2f, x%.2f of session); reply decode %.2f "
                   "ms/token; model ran %lld tokens, prefix-cache hits %lld\n",
                   MODE_NAME[m], sum_ttft[m] * 1e3, sum_total[m] * 1e3, sum_ttft[m] / sum_ttft[0],
                   sum_total[m] / sum_total[0], dec, comp, hit);
    }
    if (errors && !o->json) printf("(turns with an error in any mode are left out of the sums)\n");
    fflush(stdout);
    for (int m = 0; m < N_MODES; m++) free(res[m]);
    return errors;
}

/* ---- 3. server overhead per token vs the engine alone ------------------------------------------- */

/* tokens/s of one `mneme bench -n 128 -p 16 -r 1` tg128 run (it warms up first), or -1 (reported). */
static double engine_decode_tps(const opts *o) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s' bench -m '%s' -n %d -p 16 -t %d -r 1 --json 2>&1", o->mneme, o->model, OVERHEAD_N,
             o->threads);
    FILE *p = popen(cmd, "r");
    if (!p) { fprintf(stderr, "bench_server: cannot run %s: %s\n", cmd, strerror(errno)); return -1; }
    char line[4096];
    double tps = -1;
    while (fgets(line, sizeof line, p)) {
        json_t *j = line[0] == '{' ? json_loads(line, 0, NULL) : NULL;
        const char *test = json_string_value(json_object_get(j, "test"));
        if (test && !strcmp(test, "tg128")) tps = json_number_value(json_object_get(j, "tokens_per_s"));
        else if (!j && o->verbose) fprintf(stderr, "[mneme bench] %s", line);
        json_decref(j);
    }
    int st = pclose(p);
    if (tps <= 0) fprintf(stderr, "bench_server: %s: no tg128 result (exit status %d)\n", cmd, st);
    return tps;
}

/* Engine alone and one server stream alternate --reps times, so that a change in the machine's other load
 * hits both sides alike; overhead = mean server ms/token / mean engine ms/token - 1. */
static int run_overhead(const opts *o) {
    double eng_ms = 0, srv_ms = 0, eng_best = INFINITY, srv_best = INFINITY;
    size_t n_itl = 0, cap_itl = (size_t)o->reps * OVERHEAD_N;
    double *itl = malloc(cap_itl * sizeof *itl), *pair = malloc((size_t)o->reps * sizeof *pair);
    int ok = 0, errors = 0, n_tok = 0;
    for (int r = 0; r < o->reps && itl && pair; r++) {
        double engine = engine_decode_tps(o);
        if (engine <= 0) { errors++; continue; }
        stream_rec rec;
        rec_init(&rec, SSE_CHAT);
        json_t *req = chat_request("Write a long, detailed story about a lighthouse keeper who lives in the moon.",
                                   OVERHEAD_N);
        stream_post(o, "/v1/chat/completions", req, &rec);
        json_decref(req);
        if (rec.err[0]) { fprintf(stderr, "bench_server: overhead: %s\n", rec.err); errors++; }
        else if (rec.n_tt < 2) {
            fprintf(stderr, "bench_server: overhead: only %d tokens streamed\n", rec.n_tt);
            errors++;
        }
        else {
            /* decode time per token after the first one: what tgN measures */
            double ms = 1e3 * (rec.tt[rec.n_tt - 1] - rec.tt[0]) / (rec.n_tt - 1);
            srv_ms += ms;
            eng_ms += 1e3 / engine;
            srv_best = fmin(srv_best, ms);
            eng_best = fmin(eng_best, 1e3 / engine);
            pair[ok++] = ms * engine / 1e3 - 1;
            for (int k = 1; k < rec.n_tt && n_itl < cap_itl; k++) itl[n_itl++] = rec.tt[k] - rec.tt[k - 1];
            n_tok = rec.n_tt;
        }
        rec_free(&rec);
    }
    if (itl) qsort(itl, n_itl, sizeof *itl, cmp_double);
    if (pair) qsort(pair, (size_t)ok, sizeof *pair, cmp_double);
    eng_ms = ok ? eng_ms / ok : NAN;
    srv_ms = ok ? srv_ms / ok : NAN;
    double over = srv_ms / eng_ms - 1, best = srv_best / eng_best - 1, med = pair ? pct(pair, (size_t)ok, 0.5) : NAN;
    double i50 = itl ? pct(itl, n_itl, 0.5) * 1e3 : NAN, i99 = itl ? pct(itl, n_itl, 0.99) * 1e3 : NAN;
    if (o->json)
        printf("{\"bench\": \"overhead\", \"threads\": %d, \"pairs\": %d, \"stream_tokens\": %d, "
               "\"engine_tokens_per_s\": %.2f, \"server_tokens_per_s\": %.2f, \"engine_ms_per_token\": %.3f, "
               "\"server_ms_per_token\": %.3f, \"server_itl_p50_ms\": %.3f, \"server_itl_p99_ms\": %.3f, "
               "\"engine_best_ms_per_token\": %.3f, \"server_best_ms_per_token\": %.3f, "
               "\"overhead_pct\": %.2f, \"overhead_pct_median_pair\": %.2f, \"overhead_pct_best\": %.2f}\n",
               o->threads, ok, n_tok, 1e3 / eng_ms, 1e3 / srv_ms, eng_ms, srv_ms, i50, i99, eng_best, srv_best,
               over * 100, med * 100, best * 100);
    else
        printf("\nserver overhead per token (-t %d, %d alternating pairs, %d-token stream):\n"
               "  engine alone (mneme bench tg%d): %.2f tok/s = %.3f ms/token\n"
               "  one stream through the server:   %.2f tok/s = %.3f ms/token (ITL p50 %.3f ms, p99 %.3f ms)\n"
               "  best run: engine %.3f ms/token, server %.3f ms/token\n"
               "  overhead %+.2f%% of the means, %+.2f%% median of pairs, %+.2f%% best vs best (target < 5%%)\n",
               o->threads, ok, n_tok, OVERHEAD_N, 1e3 / eng_ms, eng_ms, 1e3 / srv_ms, srv_ms, i50, i99, eng_best,
               srv_best, over * 100, med * 100, best * 100);
    fflush(stdout);
    free(itl);
    free(pair);
    return errors;
}

/* ---- the server under test ---------------------------------------------------------------------- */

typedef struct spawned {
    pid_t pid;
    int err_fd;          /* the server's stderr */
    bool verbose;
    pthread_t drain;
    bool draining;
} spawned;

/* Keeps reading the server's stderr so that it never blocks on a full pipe. */
static void *drain_main(void *arg) {
    spawned *sp = arg;
    char buf[4096];
    ssize_t n;
    while ((n = read(sp->err_fd, buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR))
        if (n > 0 && sp->verbose) fprintf(stderr, "[server] %.*s", (int)n, buf);
    return NULL;
}

static int spawn_server(opts *o, spawned *sp) {
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC)) { fprintf(stderr, "bench_server: pipe: %s\n", strerror(errno)); return -1; }
    char th[16];
    snprintf(th, sizeof th, "%d", o->threads);
    pid_t pid = fork();
    if (pid < 0) { fprintf(stderr, "bench_server: fork: %s\n", strerror(errno)); return -1; }
    if (pid == 0) {
        dup2(pfd[1], 2);
        char *argv[] = {(char *)o->mneme, "serve", "-m", (char *)o->model, "-t", th, "--host", "127.0.0.1", "--port",
                        "0", NULL};
        execv(o->mneme, argv);
        fprintf(stderr, "bench_server: exec %s: %s\n", o->mneme, strerror(errno));
        _exit(127);
    }
    close(pfd[1]);
    sp->pid = pid;
    sp->err_fd = pfd[0];
    sp->verbose = o->verbose;
    /* read stderr lines until the one with the port, for up to 120 s */
    char acc[8192];
    size_t len = 0;
    double deadline = now_s() + 120;
    while (now_s() < deadline) {
        struct pollfd pf = {.fd = sp->err_fd, .events = POLLIN};
        int pr = poll(&pf, 1, 500);
        if (pr < 0 && errno != EINTR) break;
        if (pr <= 0) continue;
        ssize_t n = read(sp->err_fd, acc + len, sizeof acc - 1 - len);
        if (n <= 0) break;
        len += (size_t)n;
        acc[len] = 0;
        if (o->verbose) fprintf(stderr, "[server] %.*s", (int)n, acc + len - (size_t)n);
        char *l = strstr(acc, "listening on http://");
        char *nl = l ? strchr(l, '\n') : NULL;
        if (nl) {
            char *colon = memrchr(l, ':', (size_t)(strchr(l + 20, ' ') ? strchr(l + 20, ' ') - l : nl - l));
            o->port = colon ? atoi(colon + 1) : 0;
            break;
        }
        if (len == sizeof acc - 1) len = 0;   /* long chatter before the line: keep looking */
    }
    if (o->port <= 0) {
        fprintf(stderr, "bench_server: %s serve did not print its port; its stderr:\n%s\n", o->mneme, acc);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return -1;
    }
    sp->draining = !pthread_create(&sp->drain, NULL, drain_main, sp);
    return 0;
}

static int stop_server(spawned *sp) {
    kill(sp->pid, SIGTERM);
    int st = 0;
    double deadline = now_s() + 30;
    pid_t w;
    while ((w = waitpid(sp->pid, &st, WNOHANG)) == 0 && now_s() < deadline) usleep(50000);
    if (w == 0) {
        fprintf(stderr, "bench_server: server %d still running 30 s after SIGTERM: killing it\n", (int)sp->pid);
        kill(sp->pid, SIGKILL);
        waitpid(sp->pid, &st, 0);
    }
    if (sp->draining) pthread_join(sp->drain, NULL);
    close(sp->err_fd);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0) return 0;
    fprintf(stderr, "bench_server: server exited with %s %d\n", WIFEXITED(st) ? "status" : "signal",
            WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
    return 1;
}

/* GET /health until 200, up to 60 s. */
static int wait_health(const opts *o) {
    char err[256] = "";
    for (double deadline = now_s() + 60; now_s() < deadline; usleep(100000)) {
        json_t *h = json_call(o, "GET", "/health", NULL, err, sizeof err);
        if (h) { json_decref(h); return 0; }
    }
    fprintf(stderr, "bench_server: http://%s:%d/health not ready after 60 s: %s\n", o->host, o->port, err);
    return -1;
}

/* ---- main --------------------------------------------------------------------------------------- */

static void usage(void) {
    fprintf(stderr,
            "usage: bench_server (--url http://127.0.0.1:PORT [--mneme PATH -m MODEL] | --spawn PATH -m MODEL) [-t 1]\n"
            "                    [-c 1,8,64] [-n 64] [--turns 10] [--reply 24] [--reps 5] [--json] [--verbose]\n"
            "                    [--no-load] [--no-turns] [--no-overhead]\n");
}

static int parse_int(const char *flag, const char *s, int lo, int hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "bench_server: %s: '%s' is not an integer in [%d, %d]\n", flag, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_url(const char *url, opts *o) {
    const char *p = url;
    if (!strncmp(p, "http://", 7)) p += 7;
    const char *colon = strrchr(p, ':');
    if (!colon || (size_t)(colon - p) >= sizeof o->host) {
        fprintf(stderr, "bench_server: --url '%s': expected http://127.0.0.1:PORT\n", url);
        return -1;
    }
    snprintf(o->host, sizeof o->host, "%.*s", (int)(colon - p), p);
    if (!strcmp(o->host, "localhost")) snprintf(o->host, sizeof o->host, "127.0.0.1");
    struct in_addr a;
    if (inet_pton(AF_INET, o->host, &a) != 1 || (ntohl(a.s_addr) >> 24) != 127) {
        fprintf(stderr, "bench_server: --url '%s': only loopback IPv4 addresses (127.x.x.x) are allowed\n", url);
        return -1;
    }
    char port[16];
    snprintf(port, sizeof port, "%.*s", (int)strcspn(colon + 1, "/"), colon + 1);
    return parse_int("--url port", port, 1, 65535, &o->port);
}

int main(int argc, char **argv) {
    opts o = {.threads = 1, .n_tokens = 64, .turns = 10, .reply = 24, .reps = 5, .load = true, .multiturn = true,
              .overhead = true, .clients = {1, 8, 64}, .n_clients = 3};
    snprintf(o.host, sizeof o.host, "127.0.0.1");
    const char *url = NULL, *spawn = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool has = v != NULL;
        if (!strcmp(a, "--json")) o.json = true;
        else if (!strcmp(a, "--verbose")) o.verbose = true;
        else if (!strcmp(a, "--no-load")) o.load = false;
        else if (!strcmp(a, "--no-turns")) o.multiturn = false;
        else if (!strcmp(a, "--no-overhead")) o.overhead = false;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(); return 0; }
        else if (!has) { fprintf(stderr, "bench_server: '%s' needs a value or is unknown\n", a); usage(); return 2; }
        else if (!strcmp(a, "--url")) url = argv[++i];
        else if (!strcmp(a, "--spawn")) spawn = o.mneme = argv[++i];
        else if (!strcmp(a, "--mneme")) o.mneme = argv[++i];
        else if (!strcmp(a, "-m")) o.model = argv[++i];
        else if (!strcmp(a, "-t")) { if (parse_int(a, argv[++i], 1, 256, &o.threads)) return 2; }
        else if (!strcmp(a, "-n")) { if (parse_int(a, argv[++i], 1, 4096, &o.n_tokens)) return 2; }
        else if (!strcmp(a, "--turns")) { if (parse_int(a, argv[++i], 1, 100, &o.turns)) return 2; }
        else if (!strcmp(a, "--reply")) { if (parse_int(a, argv[++i], 1, 1024, &o.reply)) return 2; }
        else if (!strcmp(a, "--reps")) { if (parse_int(a, argv[++i], 1, 20, &o.reps)) return 2; }
        else if (!strcmp(a, "-c")) {
            char buf[256];
            snprintf(buf, sizeof buf, "%s", argv[++i]);
            o.n_clients = 0;
            for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                if (o.n_clients == 16) { fprintf(stderr, "bench_server: -c: at most 16 values\n"); return 2; }
                if (parse_int("-c", tok, 1, MAX_CLIENTS, &o.clients[o.n_clients++])) return 2;
            }
            if (!o.n_clients) { fprintf(stderr, "bench_server: -c: empty list\n"); return 2; }
        } else { fprintf(stderr, "bench_server: unknown option '%s'\n", a); usage(); return 2; }
    }
    if (!!url == !!spawn) {
        fprintf(stderr, "bench_server: give exactly one of --url and --spawn\n");
        usage();
        return 2;
    }
    if (spawn && !o.model) { fprintf(stderr, "bench_server: --spawn needs -m MODEL\n"); return 2; }
    if (url && parse_url(url, &o)) return 2;
    if (o.overhead && (!o.mneme || !o.model)) {
        fprintf(stderr, "bench_server: the overhead test needs the mneme binary and the model (--spawn or --mneme, "
                        "and -m); skipping it\n");
        o.overhead = false;
    }
    signal(SIGPIPE, SIG_IGN);

    spawned sp = {0};
    if (spawn && spawn_server(&o, &sp)) return 1;
    int errors = 0;
    if (wait_health(&o)) errors++;
    else {
        /* warm-up: pages the model in and fills the allocator's caches */
        stream_rec w;
        rec_init(&w, SSE_CHAT);
        json_t *req = chat_request("Hello!", 8);
        stream_post(&o, "/v1/chat/completions", req, &w);
        json_decref(req);
        if (w.err[0]) fprintf(stderr, "bench_server: warm-up: %s\n", w.err);
        rec_free(&w);
        if (!o.json)
            printf("mneme serve at http://%s:%d%s (-t %d); one thread per client, times measured at the client\n",
                   o.host, o.port, spawn ? " (spawned)" : "", o.threads);
        if (o.load) {
            if (!o.json) {
                printf("\nconcurrent streams: greedy chat completions of max_tokens %d, each client one request\n",
                       o.n_tokens);
                printf("| clients | errors | tokens |  wall s | tokens/s | TTFT p50 | TTFT p99 |  ITL p50 "
                       "|  ITL p99 |\n");
                printf("|         |        |        |         |          |       ms |       ms |       ms "
                       "|       ms |\n");
            }
            for (int i = 0; i < o.n_clients; i++) errors += run_load(&o, o.clients[i]);
        }
        if (o.multiturn) errors += run_turns(&o);
        if (o.overhead) errors += run_overhead(&o);
    }
    if (spawn) errors += stop_server(&sp);
    if (errors) fprintf(stderr, "bench_server: %d errors (see above)\n", errors);
    return errors ? 1 : 0;
}
