/* server/cli.c — argument helpers and model loading for the mneme commands. */
#include "server/cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

double cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

const char *cli_default_model(void) { return mn_model_default_path(); }

int cli_value(int argc, char **argv, int *i, const char **val) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "mneme: option %s needs a value\n", argv[*i]);
        return -1;
    }
    *val = argv[++*i];
    return 0;
}

int cli_int(const char *flag, const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end) {
        fprintf(stderr, "mneme: %s: '%s' is not an integer\n", flag, s);
        return -1;
    }
    if (v < lo || v > hi) {
        fprintf(stderr, "mneme: %s: %ld is out of range [%ld, %ld]\n", flag, v, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_float(const char *flag, const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || v != v) {
        fprintf(stderr, "mneme: %s: '%s' is not a number\n", flag, s);
        return -1;
    }
    if (v < lo || v > hi) {
        fprintf(stderr, "mneme: %s: %g is out of range [%g, %g]\n", flag, v, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_model_opt(int argc, char **argv, int *i, cli_model_opts *o) {
    const char *a = argv[*i], *v;
    long n;
    if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
        if (cli_value(argc, argv, i, &v)) return -1;
        o->model = v;
        return 1;
    }
    if (!strcmp(a, "--device")) {
        if (cli_value(argc, argv, i, &v)) return -1;
        o->device = v;
        return 1;
    }
    if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
        if (cli_value(argc, argv, i, &v) || cli_int(a, v, 1, 1024, &n)) return -1;
        o->threads = (int)n;
        return 1;
    }
    if (!strcmp(a, "-c") || !strcmp(a, "--ctx")) {
        if (cli_value(argc, argv, i, &v) || cli_int(a, v, 1, 1 << 24, &n)) return -1;
        o->n_ctx = (int32_t)n;
        return 1;
    }
    return 0;
}

int cli_load(const cli_model_opts *o, mn_backend **be, mn_model **m) {
    mn_errbuf eb = {{0}};
    mn_backend_params bp = {.device = o->device ? o->device : "auto", .n_threads = o->threads};
    bool fell_back = false;
    mn_err e = mn_backend_new(&bp, be, &fell_back, &eb);
    if (e != MN_OK) {
        fprintf(stderr, "mneme: %s\n", eb.msg);
        return -1;
    }
    if (fell_back) fprintf(stderr, "mneme: %s\n", eb.msg);
    const char *path = o->model ? o->model : cli_default_model();
    mn_model_params mp = {.n_ctx = o->n_ctx};
    e = mn_model_load(path, *be, &mp, m, &eb);
    if (e != MN_OK) {
        fprintf(stderr, "mneme: %s: %s\n", path, eb.msg);
        mn_backend_free(*be);
        return -1;
    }
    return 0;
}

void cli_unload(mn_backend *be, mn_model *m) {
    mn_model_free(m);
    mn_backend_free(be);
}

int cli_load_tp(const cli_model_opts *o, int tp, int32_t block_size, int32_t n_blocks, int32_t n_seqs, mn_tp **group,
                mn_backend **be, mn_model **m) {
    mn_errbuf eb = {{0}};
    mn_backend_params bp = {.device = o->device ? o->device : "auto", .n_threads = o->threads};
    bool fell_back = false;
    mn_backend *probe;
    if (mn_backend_new(&bp, &probe, &fell_back, &eb) != MN_OK) {
        fprintf(stderr, "mneme: %s\n", eb.msg);
        return -1;
    }
    if (fell_back) fprintf(stderr, "mneme: %s\n", eb.msg);
    bool cpu = !strcmp(mn_backend_name(probe), "cpu");
    int threads = probe->n_threads / tp > 0 ? probe->n_threads / tp : 1;
    mn_backend_free(probe);
    mn_tp_params p = {.n_ranks = tp, .device = cpu ? "cpu" : "cuda", .n_threads = threads, .model = {.n_ctx = o->n_ctx},
                      .block_size = block_size, .n_blocks = n_blocks, .n_seqs = n_seqs};
    const char *path = o->model ? o->model : cli_default_model();
    if (mn_tp_new(path, &p, group, &eb) != MN_OK) {
        fprintf(stderr, "mneme: --tp %d: %s: %s\n", tp, path, eb.msg);
        return -1;
    }
    *be = mn_tp_backend(*group);
    *m = (mn_model *)mn_tp_model(*group); /* read-only: config, tokenizer, chat template */
    return 0;
}

void cli_release(mn_tp *group, mn_backend *be, mn_model *m) {
    if (group) mn_tp_free(group);
    else cli_unload(be, m);
}
