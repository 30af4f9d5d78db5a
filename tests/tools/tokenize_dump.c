/* tests/tools/tokenize_dump.c — encode stdin with a GGUF model's tokenizer, or decode.
 *
 *   tokenize_dump MODEL.gguf [--special] [--bos] < text   prints the ids, space-separated,
 *                                                         on one line
 *   tokenize_dump MODEL.gguf --decode [--special] < ids   prints the decoded bytes
 *                                                         (--special renders special tokens)
 *   tokenize_dump MODEL.gguf --batch [--special] < texts  texts separated by NUL bytes:
 *                                                         one line of ids per text
 *   tokenize_dump MODEL.gguf --bench N < text             encodes N times, prints MB/s
 * pytest (tests/python/test_tokenizer.py) drives it to compare with HF tokenizers.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/alloc.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"

static char *read_all(FILE *f, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *buf = mn_malloc(cap);
    while (buf) {
        size_t k = fread(buf + n, 1, cap - n, f);
        n += k;
        if (n < cap) {
            if (ferror(f)) {
                mn_free(buf);
                return NULL;
            }
            break;
        }
        char *nb = mn_realloc(buf, cap * 2);
        if (!nb)
            mn_free(buf);
        buf = nb;
        cap *= 2;
    }
    *len = n;
    return buf;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [--special] [--bos] [--decode] [--bench N] < input\n",
                argv[0]);
        return 2;
    }
    int flags = 0, bench = 0;
    bool decode = false, batch = false;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--special")) {
            flags |= MN_TOK_PARSE_SPECIAL;
        } else if (!strcmp(argv[i], "--bos")) {
            flags |= MN_TOK_ADD_BOS;
        } else if (!strcmp(argv[i], "--decode")) {
            decode = true;
        } else if (!strcmp(argv[i], "--batch")) {
            batch = true;
        } else if (!strcmp(argv[i], "--bench") && i + 1 < argc) {
            bench = atoi(argv[++i]);
        } else {
            fprintf(stderr, "%s: unknown option %s\n", argv[0], argv[i]);
            return 2;
        }
    }
    mn_errbuf eb = {{0}};
    mn_gguf *g = NULL;
    mn_tokenizer *t = NULL;
    mn_err err = mn_gguf_open(argv[1], &g, &eb);
    if (!err)
        err = mn_tokenizer_from_gguf(g, &t, &eb);
    mn_gguf_close(g);
    if (err) {
        fprintf(stderr, "%s: %s: %s\n", argv[0], mn_err_name(err), eb.msg);
        return 1;
    }
    size_t len = 0;
    char *in = read_all(stdin, &len);
    if (!in) {
        fprintf(stderr, "%s: cannot read stdin\n", argv[0]);
        mn_tokenizer_free(t);
        return 1;
    }
    int rc = 0;
    if (decode) {
        int64_t n = 0, cap = 1024;
        int32_t *ids = mn_malloc((size_t)cap * sizeof *ids);
        char *p = in, *end = in + len;
        while (ids && p < end) {
            while (p < end && (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r'))
                p++;
            if (p >= end)
                break;
            char *q;
            long v = strtol(p, &q, 10);
            if (q == p) {
                fprintf(stderr, "%s: bad id at byte %td\n", argv[0], p - in);
                rc = 1;
                break;
            }
            p = q;
            if (n == cap) {
                int32_t *nv = mn_realloc(ids, (size_t)(cap *= 2) * sizeof *ids);
                if (!nv)
                    mn_free(ids);
                ids = nv;
                if (!ids)
                    break;
            }
            ids[n++] = (int32_t)v;
        }
        char *out = NULL;
        size_t olen = 0;
        if (!rc && ids) {
            err = mn_detokenize(t, ids, n, (flags & MN_TOK_PARSE_SPECIAL) != 0, &out, &olen, &eb);
            if (err) {
                fprintf(stderr, "%s: %s: %s\n", argv[0], mn_err_name(err), eb.msg);
                rc = 1;
            } else {
                fwrite(out, 1, olen, stdout);
            }
        }
        mn_free(out);
        mn_free(ids);
    } else if (batch) {
        for (size_t a = 0; a <= len && !rc;) {
            char *z = memchr(in + a, 0, len - a);
            size_t e = z ? (size_t)(z - in) : len;
            int32_t *tok = NULL;
            int64_t n = 0;
            err = mn_tokenize(t, in + a, e - a, flags, &tok, &n, &eb);
            if (err) {
                fprintf(stderr, "%s: %s: %s\n", argv[0], mn_err_name(err), eb.msg);
                rc = 1;
            }
            for (int64_t i = 0; i < n; i++)
                printf(i ? " %d" : "%d", tok[i]);
            printf("\n");
            mn_free(tok);
            a = e + 1;
        }
    } else {
        int32_t *tok = NULL;
        int64_t n = 0;
        double t0 = now_s();
        for (int r = 0; r < (bench > 0 ? bench : 1) && !err; r++) {
            mn_free(tok);
            err = mn_tokenize(t, in, len, flags, &tok, &n, &eb);
        }
        double dt = now_s() - t0;
        if (err) {
            fprintf(stderr, "%s: %s: %s\n", argv[0], mn_err_name(err), eb.msg);
            rc = 1;
        } else if (bench > 0) {
            printf("%zu bytes -> %lld tokens, %.3f ms per encode, %.2f MB/s\n", len, (long long)n,
                   1e3 * dt / bench, (double)len * bench / dt / 1e6);
        } else {
            for (int64_t i = 0; i < n; i++)
                printf(i ? " %d" : "%d", tok[i]);
            printf("\n");
        }
        mn_free(tok);
    }
    mn_free(in);
    mn_tokenizer_free(t);
    return rc;
}
