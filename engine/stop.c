/* engine/stop.c — stop strings over streamed text.
 *
 * The matcher keeps a pending buffer of bytes fed but not yet released. After each
 * feed, with P = pending bytes:
 *   - a stop string fully inside P: release P up to the start of the match that
 *     completes first (ties: the one starting first), and stop;
 *   - otherwise hold back from h, the first position whose suffix P[h..] is a proper
 *     prefix of some stop string (nothing before h can start a stop string any more);
 *   - and never end a release inside a UTF-8 sequence: h moves back to the lead byte
 *     of an incomplete sequence, so the consumer always gets whole characters.
 * So pending never exceeds (longest stop - 1) + 3 bytes between calls.
 */
#include "engine/sampler.h"

#include <string.h>

#include "engine/alloc.h"

struct mn_stop {
    char **stops;
    size_t *lens;
    int n;
    size_t max_len;
    char *buf;          /* pending bytes */
    size_t len, cap;
    bool stopped;
};

void mn_stop_free(mn_stop *st) {
    if (!st) return;
    for (int i = 0; i < st->n; i++) mn_free(st->stops[i]);
    mn_free(st->stops);
    mn_free(st->lens);
    mn_free(st->buf);
    mn_free(st);
}

mn_err mn_stop_new(const char *const *stops, int n_stops, mn_stop **out, mn_errbuf *eb) {
    *out = NULL;
    if (n_stops < 0) return mn_errf(eb, MN_EINVALID, "n_stops must be >= 0, got %d", n_stops);
    if (n_stops > 0 && !stops) return mn_errf(eb, MN_EINVALID, "stops: NULL with n_stops %d", n_stops);
    for (int i = 0; i < n_stops; i++) {
        if (!stops[i]) return mn_errf(eb, MN_EINVALID, "stop[%d] is NULL", i);
        if (!stops[i][0]) return mn_errf(eb, MN_EINVALID, "stop[%d] is empty", i);
    }
    mn_stop *st = mn_calloc(1, sizeof *st);
    if (!st) return mn_errf(eb, MN_ENOMEM, "stop strings: out of memory");
    if (n_stops > 0) {
        st->stops = mn_calloc((size_t)n_stops, sizeof *st->stops);
        st->lens = mn_calloc((size_t)n_stops, sizeof *st->lens);
        if (!st->stops || !st->lens) goto nomem;
    }
    for (int i = 0; i < n_stops; i++) {
        st->stops[i] = mn_strdup(stops[i]);
        if (!st->stops[i]) goto nomem;
        st->n = i + 1;
        st->lens[i] = strlen(stops[i]);
        if (st->lens[i] > st->max_len) st->max_len = st->lens[i];
    }
    *out = st;
    return MN_OK;
nomem:
    mn_stop_free(st);
    return mn_errf(eb, MN_ENOMEM, "stop strings: out of memory");
}

/* Start of an incomplete UTF-8 sequence at the end of p[0..n), or n if the end is whole
 * (or is not UTF-8 at all: stray bytes are not held forever). */
static size_t utf8_whole_end(const unsigned char *p, size_t n) {
    size_t i = n, back = 0;
    while (i > 0 && back < 3 && (p[i - 1] & 0xC0) == 0x80) { i--; back++; }
    if (i == 0) return n;
    unsigned char lead = p[i - 1];
    size_t need = lead >= 0xF0 && lead <= 0xF7 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (lead < 0xC0 || lead > 0xF7) return n;   /* ASCII or invalid lead: nothing to wait for */
    return back + 1 < need ? i - 1 : n;
}

static bool is_prefix_of_a_stop(const mn_stop *st, const char *s, size_t n) {
    for (int k = 0; k < st->n; k++)
        if (st->lens[k] > n && memcmp(st->stops[k], s, n) == 0) return true;
    return false;
}

static size_t release(mn_stop *st, size_t upto, char *out, size_t cap) {
    if (upto > cap) upto = utf8_whole_end((const unsigned char *)st->buf, cap);
    if (upto > 0) {
        memcpy(out, st->buf, upto);
        memmove(st->buf, st->buf + upto, st->len - upto);
        st->len -= upto;
    }
    return upto;
}

size_t mn_stop_feed(mn_stop *st, const char *text, size_t n, char *out, size_t cap, bool *stopped) {
    if (st->stopped) { *stopped = true; return 0; }
    *stopped = false;
    if (st->len + n > st->cap) {
        size_t nc = (st->len + n) * 2 + 16;
        char *b = mn_realloc(st->buf, nc);
        if (!b) {
            /* no room to hold anything back: pass what we have through unchecked
             * rather than lose text */
            size_t w = release(st, st->len, out, cap);
            size_t m = n < cap - w ? n : cap - w;
            memcpy(out + w, text, m);
            return w + m;
        }
        st->buf = b;
        st->cap = nc;
    }
    if (n > 0) memcpy(st->buf + st->len, text, n);
    st->len += n;

    /* The match that completes first (smallest end), as if the text came a byte at a
     * time; among those ending there, the one starting first. So the result does not
     * depend on how the text was cut into pieces. */
    size_t best = (size_t)-1, best_end = (size_t)-1;
    for (int k = 0; k < st->n; k++) {
        size_t L = st->lens[k];
        for (size_t i = 0; i + L <= st->len && i + L <= best_end; i++) {
            if (memcmp(st->buf + i, st->stops[k], L) == 0) {
                if (i + L < best_end || i < best) { best = i; best_end = i + L; }
                break;
            }
        }
    }
    if (best != (size_t)-1) {
        st->len = best;                   /* the stop string and what follows are dropped */
        size_t w = release(st, best, out, cap);
        st->stopped = true;
        *stopped = true;
        return w;
    }

    size_t h = st->len;
    size_t from = st->max_len > 0 && st->len >= st->max_len ? st->len - st->max_len + 1 : 0;
    for (size_t i = from; i < st->len; i++) {
        if (is_prefix_of_a_stop(st, st->buf + i, st->len - i)) { h = i; break; }
    }
    h = utf8_whole_end((const unsigned char *)st->buf, h);
    return release(st, h, out, cap);
}

size_t mn_stop_flush(mn_stop *st, char *out, size_t cap) {
    if (st->stopped) return 0;
    size_t n = st->len < cap ? st->len : cap;
    if (n == 0) return 0;
    memcpy(out, st->buf, n);
    memmove(st->buf, st->buf + n, st->len - n);
    st->len -= n;
    return n;
}
