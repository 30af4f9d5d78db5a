/* server/cli_generate.c — `mneme generate` (stream a completion) and `mneme logits`
 * (raw logits / greedy ids for the reference tests). Both run one sequence. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/sampler.h"
#include "engine/tp.h"
#include "server/cli.h"

#define PREFILL_CHUNK 512
#define KV_BLOCK 16

typedef struct runner {
    mn_model *m;
    mn_kv_pool *kv;
    mn_forward *f;
    mn_kv_seq seq;
    float *logits;   /* [n_vocab] of the last token run */
    mn_tp *tp;       /* --tp N > 1: slot 0 of this group (cli_load_tp's; not owned) instead of kv/f */
} runner;

/* The runner's sequence: slot 0 of group, or its own KV pool and forward on be. */
static int runner_init(runner *r, mn_backend *be, mn_model *m, int32_t max_tokens, mn_tp *group) {
    mn_errbuf eb = {{0}};
    memset(r, 0, sizeof *r);
    r->m = m;
    r->tp = group;
    int32_t n_blocks = (max_tokens + KV_BLOCK - 1) / KV_BLOCK + 1;
    const mn_model_config *c = &m->cfg;
    mn_err e = MN_OK;
    if (!group) {
        e = mn_kv_pool_new(be, c->n_layer, c->n_kv_head, c->head_dim, KV_BLOCK, n_blocks, &r->kv, &eb);
        if (e == MN_OK) e = mn_forward_new(m, r->kv, &r->f, &eb);
    }
    if (e == MN_OK && !(r->logits = mn_malloc((size_t)c->n_vocab * sizeof(float)))) e = mn_errf(&eb, MN_ENOMEM, "out of memory");
    if (e != MN_OK) { /* the caller frees only a runner that started */
        fprintf(stderr, "mneme: %s\n", eb.msg);
        mn_forward_free(r->f);
        mn_kv_pool_free(r->kv);
        r->f = NULL;
        r->kv = NULL;
        return -1;
    }
    return 0;
}

static void runner_free(runner *r) {
    if (r->tp) mn_tp_seq_release(r->tp, 0);
    if (r->kv) mn_kv_seq_release(r->kv, &r->seq);
    mn_forward_free(r->f);
    mn_kv_pool_free(r->kv);
    mn_free(r->logits);
}

/* Backend + model, or with --tp N > 1 the group whose rank 0 supplies them: one slot, its
 * KV pools holding the whole context (the prompt is tokenized only after the load, and
 * every run is checked against n_ctx; the engine's default of four 4096-token contexts
 * refused a longer -c). */
static int load(const cli_model_opts *mo, long tp, mn_tp **group, mn_backend **be, mn_model **m) {
    *group = NULL;
    return tp > 1 ? cli_load_tp(mo, (int)tp, KV_BLOCK, -1, 1, group, be, m) : cli_load(mo, be, m);
}

/* Run n tokens at the end of the sequence; all_logits (optional) receives every row's
 * logits, r->logits the last row's. */
static int runner_eval(runner *r, const int32_t *toks, int32_t n, float *all_logits) {
    mn_errbuf eb = {{0}};
    int32_t V = r->m->cfg.n_vocab;
    int32_t *seqv = mn_malloc(PREFILL_CHUNK * sizeof(int32_t)), *pos = mn_malloc(PREFILL_CHUNK * sizeof(int32_t));
    int32_t *rows = mn_malloc(PREFILL_CHUNK * sizeof(int32_t));
    float *chunk_logits = all_logits ? mn_malloc((size_t)PREFILL_CHUNK * V * sizeof(float)) : NULL;
    int rc = (seqv && pos && rows && (!all_logits || chunk_logits)) ? 0 : -1;
    mn_kv_seq *seqs[1] = {&r->seq};
    for (int32_t done = 0; rc == 0 && done < n;) {
        int32_t c = n - done < PREFILL_CHUNK ? n - done : PREFILL_CHUNK;
        for (int32_t i = 0; i < c; i++) {
            seqv[i] = 0;
            pos[i] = (r->tp ? mn_tp_seq_len(r->tp, 0) : r->seq.n_tokens) + i;
            rows[i] = i;
        }
        mn_batch b = {.n_tokens = c, .tokens = toks + done, .seq = seqv, .pos = pos};
        if (all_logits) {
            b.n_out = c;
            b.out_rows = rows;
        } else {
            b.n_out = 1;
            rows[0] = c - 1;
            b.out_rows = rows;
        }
        float *out = all_logits ? chunk_logits : r->logits;
        mn_err e = r->tp ? mn_tp_run(r->tp, &b, out, &eb) : mn_forward_run(r->f, seqs, 1, &b, out, &eb);
        if (e != MN_OK) {
            fprintf(stderr, "mneme: %s\n", eb.msg);
            rc = -1;
            break;
        }
        if (all_logits) {
            memcpy(all_logits + (size_t)done * V, chunk_logits, (size_t)c * V * sizeof(float));
            memcpy(r->logits, chunk_logits + (size_t)(c - 1) * V, (size_t)V * sizeof(float));
        }
        done += c;
    }
    if (rc && !seqv) fprintf(stderr, "mneme: out of memory\n");
    mn_free(seqv);
    mn_free(pos);
    mn_free(rows);
    mn_free(chunk_logits);
    return rc;
}

static int32_t argmax(const float *x, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* ---- mneme logits ---------------------------------------------------------------------- */

static int parse_tokens(const char *s, int32_t **out, int32_t *n) {
    int32_t cap = 64, k = 0;
    int32_t *t = mn_malloc((size_t)cap * sizeof(int32_t));
    const char *p = s;
    while (t && *p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "mneme: --tokens: bad token id at character %d of '%s'\n", (int)(p - s), s);
            mn_free(t);
            return -1;
        }
        if (k == cap) {
            int32_t *nt = mn_realloc(t, (size_t)(cap *= 2) * sizeof(int32_t));
            if (!nt) { mn_free(t); t = NULL; break; }
            t = nt;
        }
        t[k++] = (int32_t)v;
        p = end;
        if (*p == ',') p++;
        else if (*p) {
            fprintf(stderr, "mneme: --tokens: expected ',' at character %d of '%s'\n", (int)(p - s), s);
            mn_free(t);
            return -1;
        }
    }
    if (!t) { fprintf(stderr, "mneme: out of memory\n"); return -1; }
    if (k == 0) { fprintf(stderr, "mneme: --tokens: no token ids\n"); mn_free(t); return -1; }
    *out = t;
    *n = k;
    return 0;
}

int cmd_logits(int argc, char **argv) {
    cli_model_opts mo = {0};
    const char *tokens_s = NULL, *out_path = NULL;
    long greedy = 0, tp = 1;
    for (int i = 1; i < argc; i++) {
        int r = cli_model_opt(argc, argv, &i, &mo);
        if (r < 0) return 2;
        if (r) continue;
        const char *v;
        if (!strcmp(argv[i], "--tokens")) { if (cli_value(argc, argv, &i, &tokens_s)) return 2; }
        else if (!strcmp(argv[i], "-o")) { if (cli_value(argc, argv, &i, &out_path)) return 2; }
        else if (!strcmp(argv[i], "--greedy")) { if (cli_value(argc, argv, &i, &v) || cli_int("--greedy", v, 1, 1 << 20, &greedy)) return 2; }
        else if (!strcmp(argv[i], "--tp")) { if (cli_value(argc, argv, &i, &v) || cli_int("--tp", v, 1, 64, &tp)) return 2; }
        else { fprintf(stderr, "mneme logits: unknown option '%s'\n", argv[i]); return 2; }
    }
    if (!tokens_s || (!out_path && !greedy)) {
        fprintf(stderr, "usage: mneme logits -m FILE --tokens 1,2,3 (-o OUT.f32 | --greedy N) [-t T] [--tp N]\n");
        return 2;
    }
    int32_t *toks, n;
    if (parse_tokens(tokens_s, &toks, &n)) return 2;
    mn_backend *be;
    mn_model *m;
    mn_tp *group;
    if (load(&mo, tp, &group, &be, &m)) { mn_free(toks); return 1; }
    int rc = 0;
    for (int32_t i = 0; i < n; i++)
        if (toks[i] >= m->cfg.n_vocab) {
            fprintf(stderr, "mneme: --tokens: token %d (index %d) is not in [0, %d)\n", toks[i], i, m->cfg.n_vocab);
            rc = 2;
        }
    runner r;
    if (!rc && runner_init(&r, be, m, n + (int32_t)greedy, group)) rc = 1;
    else if (!rc) {
        int32_t V = m->cfg.n_vocab;
        float *all = out_path ? mn_malloc((size_t)n * V * sizeof(float)) : NULL;
        if (out_path && !all) rc = 1;
        if (!rc && runner_eval(&r, toks, n, all)) rc = 1;
        if (!rc && out_path) {
            FILE *f = fopen(out_path, "wb");
            if (!f || fwrite(all, sizeof(float), (size_t)n * V, f) != (size_t)n * V) {
                fprintf(stderr, "mneme: cannot write %s\n", out_path);
                rc = 1;
            }
            if (f && fclose(f) != 0) rc = 1;
        }
        for (long g = 0; !rc && g < greedy; g++) {
            int32_t t = argmax(r.logits, V);
            printf(g ? " %d" : "%d", t);
            if (g + 1 < greedy && runner_eval(&r, &t, 1, NULL)) rc = 1;
        }
        if (greedy) printf("\n");
        mn_free(all);
        runner_free(&r);
    }
    mn_free(toks);
    cli_release(group, be, m);
    return rc;
}

/* ---- mneme generate -------------------------------------------------------------------- */

static void generate_usage(void) {
    fprintf(stderr,
            "usage: mneme generate [-m FILE] -p TEXT [options]\n"
            "  -n N                 tokens to generate (default 128)\n"
            "  --chat               wrap the prompt as a user message in the model's chat template\n"
            "  --system TEXT        system message (with --chat)\n"
            "  --temp T --top-k K --top-p P --min-p P --seed S\n"
            "  --repeat-penalty R --repeat-last-n N --frequency-penalty F --presence-penalty P\n"
            "  --stop TEXT          stop string (repeatable)\n"
            "  --special            render special tokens in the output\n"
            "  --tp N               tensor parallelism over N ranks (N divides the heads): CPU threads, or\n"
            "                       GPUs 0..N-1 over NCCL with --device cuda\n"
            "  -t THREADS  -c CTX  --device cpu|cuda|auto\n");
}

static bool is_value_flag(const char *a) {
    static const char *const flags[] = {"-p", "--prompt", "--system", "-n", "--temp", "--top-k", "--top-p", "--min-p",
                                        "--seed", "--repeat-penalty", "--repeat-last-n", "--frequency-penalty",
                                        "--presence-penalty", "--stop", "--tp"};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        if (!strcmp(a, flags[i])) return true;
    return false;
}

int cmd_generate(int argc, char **argv) {
    cli_model_opts mo = {0};
    const char *prompt = NULL, *system = NULL, *stops[16];
    int n_stops = 0;
    bool chat = false, render_special = false;
    long n_predict = 128, tp = 1;
    mn_sampling_params sp = mn_sampling_defaults();
    for (int i = 1; i < argc; i++) {
        int r = cli_model_opt(argc, argv, &i, &mo);
        if (r < 0) return 2;
        if (r) continue;
        const char *a = argv[i], *v;
        long n;
        double d;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { generate_usage(); return 0; }
        else if (!strcmp(a, "--chat")) chat = true;
        else if (!strcmp(a, "--special")) render_special = true;
        else if (!is_value_flag(a)) { fprintf(stderr, "mneme generate: unknown option '%s'\n", a); generate_usage(); return 2; }
        else if (cli_value(argc, argv, &i, &v)) return 2;
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) prompt = v;
        else if (!strcmp(a, "--system")) system = v;
        else if (!strcmp(a, "--tp")) { if (cli_int(a, v, 1, 64, &tp)) return 2; }
        else if (!strcmp(a, "-n")) { if (cli_int(a, v, 0, 1 << 24, &n_predict)) return 2; }
        else if (!strcmp(a, "--temp")) { if (cli_float(a, v, 0, 100, &d)) return 2; sp.temperature = (float)d; }
        else if (!strcmp(a, "--top-k")) { if (cli_int(a, v, 0, 1 << 24, &n)) return 2; sp.top_k = (int32_t)n; }
        else if (!strcmp(a, "--top-p")) { if (cli_float(a, v, 0, 1, &d)) return 2; sp.top_p = (float)d; }
        else if (!strcmp(a, "--min-p")) { if (cli_float(a, v, 0, 1, &d)) return 2; sp.min_p = (float)d; }
        else if (!strcmp(a, "--seed")) { if (cli_int(a, v, 0, 0x7fffffffL, &n)) return 2; sp.seed = (uint64_t)n; }
        else if (!strcmp(a, "--repeat-penalty")) { if (cli_float(a, v, 0, 10, &d)) return 2; sp.repeat_penalty = (float)d; }
        else if (!strcmp(a, "--repeat-last-n")) { if (cli_int(a, v, -1, 1 << 24, &n)) return 2; sp.repeat_last_n = (int32_t)n; }
        else if (!strcmp(a, "--frequency-penalty")) { if (cli_float(a, v, -2, 2, &d)) return 2; sp.frequency_penalty = (float)d; }
        else if (!strcmp(a, "--presence-penalty")) { if (cli_float(a, v, -2, 2, &d)) return 2; sp.presence_penalty = (float)d; }
        else if (!strcmp(a, "--stop")) {
            if (n_stops == 16) { fprintf(stderr, "mneme: --stop: at most 16 stop strings\n"); return 2; }
            stops[n_stops++] = v;
        } else { fprintf(stderr, "mneme generate: unknown option '%s'\n", a); generate_usage(); return 2; }
    }
    if (!prompt) { generate_usage(); return 2; }

    mn_backend *be;
    mn_model *m;
    mn_tp *group;
    if (load(&mo, tp, &group, &be, &m)) return 1;
    mn_errbuf eb = {{0}};
    int rc = 0;
    char *text = NULL;
    size_t text_len = strlen(prompt);
    const char *in = prompt;
    if (chat) {
        if (!m->has_chat_template) {
            fprintf(stderr, "mneme: --chat: the model has no chat template mneme recognises (ChatML, Llama 3, Llama 2/Mistral)\n");
            cli_release(group, be, m);
            return 1;
        }
        mn_chat_msg msgs[2];
        int nm = 0;
        if (system) msgs[nm++] = (mn_chat_msg){"system", system};
        msgs[nm++] = (mn_chat_msg){"user", prompt};
        if (mn_chat_render(&m->chat, msgs, nm, true, &text, &text_len, &eb) != MN_OK) {
            fprintf(stderr, "mneme: %s\n", eb.msg);
            cli_release(group, be, m);
            return 1;
        }
        in = text;
    }
    int32_t *toks = NULL;
    int64_t n_toks = 0;
    mn_sampler *smp = NULL;
    mn_stop *stop = NULL;
    runner r = {0};
    bool have_runner = false;
    if (mn_tokenize(m->tok, in, text_len, chat ? MN_TOK_PARSE_SPECIAL : MN_TOK_ADD_BOS, &toks, &n_toks, &eb) != MN_OK ||
        mn_sampling_validate(&sp, m->cfg.n_vocab, &eb) != MN_OK ||
        mn_sampler_new(&sp, m->cfg.n_vocab, &smp, &eb) != MN_OK ||
        mn_stop_new(stops, n_stops, &stop, &eb) != MN_OK) {
        fprintf(stderr, "mneme: %s\n", eb.msg);
        rc = 1;
    } else if (n_toks == 0) {
        fprintf(stderr, "mneme: the prompt is empty after tokenization\n");
        rc = 1;
    } else if (n_toks + n_predict > m->cfg.n_ctx) {
        fprintf(stderr, "mneme: prompt (%lld tokens) + -n %ld exceeds the context length %d (set -c)\n", (long long)n_toks, n_predict, m->cfg.n_ctx);
        rc = 1;
    } else if (runner_init(&r, be, m, (int32_t)(n_toks + n_predict), group)) {
        rc = 1;
    } else {
        have_runner = true;
    }
    if (!rc) {
        for (int64_t i = 0; i < n_toks; i++) mn_sampler_accept(smp, toks[i]);
        double t0 = cli_now();
        rc = runner_eval(&r, toks, (int32_t)n_toks, NULL) ? 1 : 0;
        double t1 = cli_now(), t2 = t1;
        long n_gen = 0;
        mn_detok dt;
        mn_detok_reset(&dt);
        char piece[512], outbuf[1024];
        bool stopped = false;
        while (!rc && n_gen < n_predict && !stopped) {
            int32_t t = mn_sampler_sample(smp, r.logits, NULL);
            n_gen++;
            if (mn_tokenizer_is_eog(m->tok, t)) break;
            mn_sampler_accept(smp, t);
            size_t pn = mn_detok_push(m->tok, &dt, t, render_special, piece, sizeof piece);
            size_t on = mn_stop_feed(stop, piece, pn, outbuf, sizeof outbuf, &stopped);
            fwrite(outbuf, 1, on, stdout);
            fflush(stdout);
            if (stopped || n_gen == n_predict) break;
            if (runner_eval(&r, &t, 1, NULL)) rc = 1;
        }
        t2 = cli_now();
        if (!stopped) {
            size_t pn = mn_detok_flush(&dt, piece, sizeof piece);
            size_t on = mn_stop_feed(stop, piece, pn, outbuf, sizeof outbuf, &stopped);
            fwrite(outbuf, 1, on, stdout);
            if (!stopped) fwrite(outbuf, 1, mn_stop_flush(stop, outbuf, sizeof outbuf), stdout);
        }
        printf("\n");
        fflush(stdout);
        fprintf(stderr, "mneme: prompt %lld tokens in %.3f s (%.1f tok/s); generated %ld tokens in %.3f s (%.1f tok/s); %s backend, %d threads",
                (long long)n_toks, t1 - t0, n_toks / (t1 - t0), n_gen, t2 - t1, n_gen > 1 ? (n_gen - 1) / (t2 - t1) : 0.0,
                mn_backend_name(be), be->n_threads);
        if (r.tp) fprintf(stderr, " per rank, %d tensor-parallel ranks", mn_tp_size(r.tp));
        fprintf(stderr, "\n");
    }
    if (have_runner) runner_free(&r);
    mn_stop_free(stop);
    mn_sampler_free(smp);
    mn_free(toks);
    mn_free(text);
    cli_release(group, be, m);
    return rc;
}
