/* tests/tools/lora_logits.c — drive one mixed-adapter batch for tests/python/test_lora.py.
 *
 * Usage:
 *   lora_logits check MODEL DIR
 *       load the adapter in DIR for MODEL; print "ok rank_max=R bytes=B fingerprint=HEX
 *       load_ms=T" and exit 0, or print "error MN_E...: message" and exit 1.
 *   lora_logits run MODEL OUT [--threads N] [--decode N] [--tp P] [--adapter DIR]... [--seq A:t0,t1,...]...
 *       one sequence per --seq, using adapter number A (in --adapter order; -1 = none).
 *       Step 0 is ONE batch holding every prompt, interleaved round-robin (so each
 *       adapter's rows are scattered through the batch); each of the N decode steps is one
 *       batch of one greedy (argmax) token per sequence. OUT receives f32 logits: first
 *       every prompt position of sequence 0, then of 1, ...; then per decode step, one row
 *       per sequence. stdout gets "decode STEP SEQ TOKEN" per chosen token. --tp P runs
 *       the batches on P CPU ranks (engine/tp.h, mn_tp_run_lora; N threads each), with
 *       the adapters loaded once and shared by the ranks.
 *       --budget BYTES attaches the registry to the backend with that device budget and
 *       pages each batch's adapters in (acquire/release, LRU eviction); with --halves every
 *       step runs as two batches, the sequences of the first half of the adapters (and
 *       those without one) then the rest, so a budget that holds one half evicts and
 *       reloads adapters between batches. The logits file has the same layout either way;
 *       stderr ends with "page_ins N evictions N".
 * Exit 2 on usage errors or a failed forward.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/backend.h"
#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/lora.h"
#include "engine/model.h"
#include "engine/tp.h"

#define MAX_SEQ 64
#define MAX_ADAPTERS 16

static int usage(void) {
    fprintf(stderr, "usage: lora_logits check MODEL DIR | run MODEL OUT [--threads N] [--decode N] [--tp P] "
                    "[--adapter DIR]... [--seq A:t0,t1,...]...\n");
    return 2;
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

int main(int argc, char **argv) {
    if (argc < 4) return usage();
    const int check = strcmp(argv[1], "check") == 0;
    if (!check && strcmp(argv[1], "run") != 0) return usage();
    mn_errbuf eb = {{0}};
    int threads = 2, n_decode = 0, n_ad = 0, n_seq = 0, tp = 1, halves = 0;
    long long budget = 0;
    const char *dirs[MAX_ADAPTERS];
    int32_t seq_ad[MAX_SEQ], seq_len[MAX_SEQ];
    int32_t *seq_tok[MAX_SEQ];
    for (int i = 4; !check && i < argc; i++) {
        if (i + 1 >= argc && strcmp(argv[i], "--halves") != 0) return usage();
        if (strcmp(argv[i], "--halves") == 0) { halves = 1; continue; }
        if (strcmp(argv[i], "--threads") == 0) threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--budget") == 0) budget = atoll(argv[++i]);
        else if (strcmp(argv[i], "--decode") == 0) n_decode = atoi(argv[++i]);
        else if (strcmp(argv[i], "--tp") == 0) tp = atoi(argv[++i]);
        else if (strcmp(argv[i], "--adapter") == 0 && n_ad < MAX_ADAPTERS) dirs[n_ad++] = argv[++i];
        else if (strcmp(argv[i], "--seq") == 0 && n_seq < MAX_SEQ) {
            char *s = argv[++i], *end;
            seq_ad[n_seq] = (int32_t)strtol(s, &end, 10);
            if (*end != ':') return usage();
            seq_tok[n_seq] = malloc(strlen(s) * sizeof(int32_t));
            int n = 0;
            for (char *p = end + 1; *p;) {
                seq_tok[n_seq][n++] = (int32_t)strtol(p, &end, 10);
                if (end == p) return usage();
                p = *end == ',' ? end + 1 : end;
            }
            seq_len[n_seq++] = n;
        } else return usage();
    }
    mn_backend *be;
    mn_backend_params bp = {.device = "cpu", .n_threads = threads};
    mn_model *m;
    if (mn_backend_cpu_new(&bp, &be, &eb) != MN_OK || mn_model_load(argv[2], be, NULL, &m, &eb) != MN_OK) {
        fprintf(stderr, "%s\n", eb.msg);
        return 2;
    }
    if (check) {
        mn_lora *l;
        mn_err e = mn_lora_load(argv[3], "check", m, &l, &eb);
        if (e != MN_OK) {
            printf("error %s: %s\n", mn_err_name(e), eb.msg);
            mn_model_free(m);
            mn_backend_free(be);
            return 1;
        }
        printf("ok rank_max=%d bytes=%llu fingerprint=", l->r_max, (unsigned long long)l->bytes);
        for (int i = 0; i < 16; i++) printf("%02x", l->fingerprint[i]);
        printf(" load_ms=%.3f\n", l->load_seconds * 1e3);
        mn_lora_free(l);
        mn_model_free(m);
        mn_backend_free(be);
        return 0;
    }
    const mn_model_config *c = &m->cfg;
    int32_t total = 0, longest = 0;
    for (int s = 0; s < n_seq; s++) {
        total += seq_len[s];
        if (seq_len[s] > longest) longest = seq_len[s];
    }
    int32_t bs = 16, blocks = (total + n_seq * (n_decode + bs)) / bs + n_seq + 1;
    mn_tp *t = NULL;
    if (tp > 1) {
        mn_tp_params tpp = {.n_ranks = tp, .n_threads = threads, .block_size = bs, .n_blocks = blocks, .n_seqs = n_seq};
        if (mn_tp_new(argv[2], &tpp, &t, &eb) != MN_OK) {
            fprintf(stderr, "%s\n", eb.msg);
            return 2;
        }
    }
    mn_lora_registry *reg;
    if (mn_lora_registry_new(t ? mn_tp_model(t) : m, &reg, &eb) != MN_OK) return 2;
    for (int a = 0; a < n_ad; a++) {
        char name[32];
        snprintf(name, sizeof name, "a%d", a);
        int32_t idx;
        if (mn_lora_registry_load(reg, name, dirs[a], &idx, &eb) != MN_OK || idx != a) {
            fprintf(stderr, "adapter %s: %s\n", dirs[a], eb.msg);
            return 2;
        }
    }
    mn_kv_pool *kv;
    mn_forward *f;
    if (mn_kv_pool_new(be, c->n_layer, c->n_kv_head, c->head_dim, bs, blocks, &kv, &eb) != MN_OK ||
        mn_forward_new(m, kv, &f, &eb) != MN_OK) {
        fprintf(stderr, "%s\n", eb.msg);
        return 2;
    }
    mn_kv_seq seqs[MAX_SEQ] = {{0}};
    mn_kv_seq *sp[MAX_SEQ];
    for (int s = 0; s < n_seq; s++) sp[s] = &seqs[s];
    int32_t rows_cap = total > n_seq ? total : n_seq;
    int32_t *tok = malloc(rows_cap * sizeof(int32_t)), *sq = malloc(rows_cap * sizeof(int32_t));
    int32_t *pos = malloc(rows_cap * sizeof(int32_t)), *ad = malloc(rows_cap * sizeof(int32_t));
    int32_t *rows = malloc(rows_cap * sizeof(int32_t));
    float *lg = malloc((size_t)rows_cap * c->n_vocab * sizeof(float));
    if (budget > 0 && (t || mn_lora_registry_set_budget(reg, be, (size_t)budget, &eb) != MN_OK)) {
        fprintf(stderr, "--budget: %s\n", t ? "not with --tp" : eb.msg);
        return 2;
    }
    int32_t n_ad_table;
    const mn_lora *const *table = mn_lora_registry_table(reg, &n_ad_table);
    float *lg_all = malloc((size_t)(total + n_seq) * c->n_vocab * sizeof(float));
    int32_t *first = malloc((n_seq + 1) * sizeof(int32_t));
    first[0] = 0;
    for (int s = 0; s < n_seq; s++) first[s + 1] = first[s] + seq_len[s];
    FILE *out = fopen(argv[3], "wb");
    if (!out) {
        fprintf(stderr, "cannot open OUT\n");
        return 2;
    }
    int32_t next[MAX_SEQ];
    /* step -1: the prompts; then the decode steps. Each as one batch, or two with --halves. */
    for (int step = -1; step < n_decode; step++) {
        for (int half = 0; half < (halves ? 2 : 1); half++) {
            int32_t n = 0, n_out = 0;
            int in[MAX_SEQ];
            for (int s = 0; s < n_seq; s++) in[s] = !halves || ((seq_ad[s] >= (n_ad + 1) / 2) == half);
            if (step < 0) { /* prompts round-robin; out rows sequence by sequence */
                for (int32_t p = 0; p < longest; p++)
                    for (int s = 0; s < n_seq; s++)
                        if (in[s] && p < seq_len[s]) {
                            tok[n] = seq_tok[s][p], sq[n] = s, pos[n] = p, ad[n] = seq_ad[s];
                            n++;
                        }
                for (int s = 0; s < n_seq; s++)
                    for (int32_t p = 0; in[s] && p < seq_len[s]; p++)
                        for (int32_t i = 0; i < n; i++)
                            if (sq[i] == s && pos[i] == p) rows[n_out++] = i;
            } else {
                for (int s = 0; s < n_seq; s++)
                    if (in[s]) {
                        printf("decode %d %d %d\n", step, s, next[s]);
                        tok[n] = next[s], sq[n] = s, pos[n] = seq_len[s] + step, ad[n] = seq_ad[s], rows[n_out++] = n;
                        n++;
                    }
            }
            if (n == 0) continue;
            mn_batch b = {.n_tokens = n, .tokens = tok, .seq = sq, .pos = pos, .n_out = n_out, .out_rows = rows};
            mn_batch_lora lb = {.adapter = ad, .adapters = table, .n_adapters = n_ad_table};
            if (budget > 0 &&
                mn_lora_registry_acquire_batch(reg, ad, n, &lb.adapters, &lb.n_adapters, &eb) != MN_OK) {
                fprintf(stderr, "step %d: %s\n", step, eb.msg);
                return 2;
            }
            mn_err e = t ? mn_tp_run_lora(t, &b, &lb, lg, &eb) : mn_forward_run_lora(f, sp, n_seq, &b, &lb, lg, &eb);
            if (budget > 0) mn_lora_registry_release_batch(reg, ad, n);
            if (e != MN_OK) {
                fprintf(stderr, "step %d: %s\n", step, eb.msg);
                return 2;
            }
            /* place the rows where the one-batch layout has them */
            for (int32_t o = 0; o < n_out; o++) {
                int32_t i = rows[o], s = sq[i];
                int32_t dst = step < 0 ? first[s] + pos[i] : s;
                memcpy(lg_all + (size_t)dst * c->n_vocab, lg + (size_t)o * c->n_vocab, (size_t)c->n_vocab * sizeof(float));
            }
        }
        int32_t n_rows = step < 0 ? total : n_seq;
        fwrite(lg_all, sizeof(float), (size_t)n_rows * c->n_vocab, out);
        for (int s = 0; s < n_seq; s++)
            next[s] = argmax(lg_all + (size_t)(step < 0 ? first[s + 1] - 1 : s) * c->n_vocab, c->n_vocab);
    }
    mn_lora_stats ls;
    mn_lora_registry_stats(reg, &ls);
    fprintf(stderr, "page_ins %llu evictions %llu\n", (unsigned long long)ls.page_ins, (unsigned long long)ls.evictions);
    free(lg_all);
    fclose(out);
    for (int s = 0; s < n_seq; s++) {
        mn_kv_seq_release(kv, &seqs[s]);
        free(seq_tok[s]);
    }
    free(tok), free(sq), free(pos), free(ad), free(rows), free(first), free(lg);
    mn_forward_free(f);
    mn_kv_pool_free(kv);
    mn_lora_registry_free(reg);
    mn_tp_free(t);
    mn_model_free(m);
    mn_backend_free(be);
    return 0;
}
