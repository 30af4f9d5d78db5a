/* server/cli_info.c — `mneme info` and `mneme tokenize`. */
#include <stdio.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "server/cli.h"

int cmd_info(int argc, char **argv) {
    cli_model_opts mo = {0};
    for (int i = 1; i < argc; i++) {
        int r = cli_model_opt(argc, argv, &i, &mo);
        if (r < 0) return 2;
        if (!r) { fprintf(stderr, "usage: mneme info -m FILE\n"); return 2; }
    }
    mo.device = "cpu";
    mo.threads = 1;
    mn_backend *be;
    mn_model *m;
    if (cli_load(&mo, &be, &m)) return 1;
    const mn_model_config *c = &m->cfg;
    printf("name:          %s\n", m->name);
    printf("architecture:  %s\n", c->arch);
    printf("layers:        %d\n", c->n_layer);
    printf("embedding:     %d\n", c->n_embd);
    printf("heads:         %d (kv %d, GQA %d), head dim %d, rope dims %d (%s%s)\n", c->n_head, c->n_kv_head,
           c->n_head / c->n_kv_head, c->head_dim, c->n_rot, c->rope_mode == MN_ROPE_NEOX ? "neox" : "norm",
           c->rope_llama3 ? ", llama3 scaling" : "");
    printf("rope base:     %g (freq scale %g)\n", c->rope_base, c->rope_freq_scale);
    printf("feed forward:  %d\n", c->n_ff);
    printf("vocab:         %d\n", c->n_vocab);
    printf("context:       %d (trained %d)\n", c->n_ctx, c->n_ctx_train);
    printf("rms eps:       %g\n", c->rms_eps);
    printf("output:        %s\n", c->tied_output ? "tied to token_embd" : "separate output.weight");
    printf("qkv bias:      %s\n", c->qkv_bias ? "yes" : "no");
    int counts[MN_DTYPE_COUNT] = {0};
    for (int64_t i = 0; i < mn_gguf_n_tensors(m->gguf); i++) {
        const mn_gguf_tensor *t = mn_gguf_tensor_at(m->gguf, i);
        if ((unsigned)t->type < MN_DTYPE_COUNT) counts[t->type]++;
    }
    printf("tensors:       %lld (", (long long)mn_gguf_n_tensors(m->gguf));
    bool first = true;
    for (int t = 0; t < MN_DTYPE_COUNT; t++)
        if (counts[t]) { printf("%s%d %s", first ? "" : ", ", counts[t], mn_dtype_name((mn_dtype)t)); first = false; }
    printf(")\n");
    printf("weights:       %.1f MiB\n", mn_model_weight_bytes(m) / 1048576.0);
    printf("kv per token:  %d bytes (f16)\n", c->n_layer * 2 * c->n_kv_head * c->head_dim * 2);
    printf("tokenizer:     %s (pre %s), bos %d, eos %d, eot %d\n", mn_tokenizer_kind(m->tok), mn_tokenizer_pre(m->tok),
           mn_tokenizer_bos(m->tok), mn_tokenizer_eos(m->tok), mn_tokenizer_eot(m->tok));
    printf("chat template: %s\n", m->has_chat_template ? mn_chat_kind_name(m->chat.kind) : "none recognised");
    printf("tensor list:\n");
    for (int64_t i = 0; i < mn_gguf_n_tensors(m->gguf); i++) {
        const mn_gguf_tensor *t = mn_gguf_tensor_at(m->gguf, i);
        printf("  %-28s %-5s [", t->name, mn_dtype_name(t->type));
        for (int d = 0; d < t->n_dims; d++) printf(d ? ", %lld" : "%lld", (long long)t->ne[d]);
        printf("]\n");
    }
    cli_unload(be, m);
    return 0;
}

/* Works on any GGUF with tokenizer keys, including files with no tensors. */
int cmd_tokenize(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL;
    int flags = 0;
    bool ids_only = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--special")) flags |= MN_TOK_PARSE_SPECIAL;
        else if (!strcmp(a, "--bos")) flags |= MN_TOK_ADD_BOS;
        else if (!strcmp(a, "--ids")) ids_only = true;
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { if (cli_value(argc, argv, &i, &model)) return 2; }
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) { if (cli_value(argc, argv, &i, &prompt)) return 2; }
        else { fprintf(stderr, "usage: mneme tokenize -m FILE -p TEXT [--special] [--bos] [--ids]\n"); return 2; }
    }
    if (!prompt) { fprintf(stderr, "usage: mneme tokenize -m FILE -p TEXT [--special] [--bos] [--ids]\n"); return 2; }
    if (!model) model = cli_default_model();
    mn_errbuf eb = {{0}};
    mn_gguf *g = NULL;
    mn_tokenizer *tok = NULL;
    int32_t *ids = NULL;
    int64_t n = 0;
    int rc = 0;
    if (mn_gguf_open(model, &g, &eb) != MN_OK || mn_tokenizer_from_gguf(g, &tok, &eb) != MN_OK ||
        mn_tokenize(tok, prompt, strlen(prompt), flags, &ids, &n, &eb) != MN_OK) {
        fprintf(stderr, "mneme: %s: %s\n", model, eb.msg);
        rc = 1;
    } else if (ids_only) {
        for (int64_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
    } else {
        for (int64_t i = 0; i < n; i++) {
            size_t len;
            const char *b = mn_token_bytes(tok, ids[i], &len);
            printf("%6d  '", ids[i]);
            for (size_t j = 0; j < len; j++) {
                unsigned char ch = (unsigned char)b[j];
                if (ch == '\n') printf("\\n");
                else if (ch == '\t') printf("\\t");
                else if (ch == '\'' || ch == '\\') printf("\\%c", ch);
                else if (ch < 0x20 || ch == 0x7f) printf("\\x%02x", ch);
                else putchar(ch);
            }
            printf("'\n");
        }
        printf("%lld tokens\n", (long long)n);
    }
    mn_free(ids);
    mn_tokenizer_free(tok);
    mn_gguf_close(g);
    return rc;
}
