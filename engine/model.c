/* engine/model.c — reading a Llama-family GGUF into an mn_model: config, shape checks,
 * weights mapped onto the backend, RoPE frequency table. */
#include "engine/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"

#include <xxhash.h>

/* Optional keys: absent gives the default, a key of the wrong type is still an error. */
static mn_err opt_u32(const mn_gguf *g, const char *key, uint32_t def, uint32_t *out, mn_errbuf *eb) {
    if (!mn_gguf_find(g, key)) { *out = def; return MN_OK; }
    return mn_gguf_get_u32(g, key, out, eb);
}
static mn_err opt_f32(const mn_gguf *g, const char *key, float def, float *out, mn_errbuf *eb) {
    if (!mn_gguf_find(g, key)) { *out = def; return MN_OK; }
    return mn_gguf_get_f32(g, key, out, eb);
}

#define TRY(expr) do { mn_err e_ = (expr); if (e_ != MN_OK) return e_; } while (0)

static mn_err read_config(const mn_gguf *g, const char *arch, mn_model_config *c, mn_errbuf *eb) {
    char k[160];
    uint32_t v;
#define KEY(suffix) (snprintf(k, sizeof k, "%s.%s", arch, suffix), k)
    TRY(mn_gguf_get_u32(g, KEY("block_count"), &v, eb)); c->n_layer = (int32_t)v;
    TRY(mn_gguf_get_u32(g, KEY("embedding_length"), &v, eb)); c->n_embd = (int32_t)v;
    TRY(mn_gguf_get_u32(g, KEY("feed_forward_length"), &v, eb)); c->n_ff = (int32_t)v;
    TRY(mn_gguf_get_u32(g, KEY("attention.head_count"), &v, eb)); c->n_head = (int32_t)v;
    TRY(opt_u32(g, KEY("attention.head_count_kv"), (uint32_t)c->n_head, &v, eb)); c->n_kv_head = (int32_t)v;
    TRY(opt_u32(g, KEY("context_length"), 2048, &v, eb)); c->n_ctx_train = (int32_t)v;
    if (c->n_layer < 1 || c->n_layer > 1024) return mn_errf(eb, MN_EFORMAT, "%s: %d layers is out of range [1, 1024]", KEY("block_count"), c->n_layer);
    if (c->n_embd < 1 || c->n_embd > 65536) return mn_errf(eb, MN_EFORMAT, "%s: %d out of range", KEY("embedding_length"), c->n_embd);
    if (c->n_ff < 1 || c->n_ff > 1 << 20) return mn_errf(eb, MN_EFORMAT, "%s: %d out of range", KEY("feed_forward_length"), c->n_ff);
    if (c->n_head < 1 || c->n_head > 1024) return mn_errf(eb, MN_EFORMAT, "%s: %d out of range", KEY("attention.head_count"), c->n_head);
    if (c->n_kv_head < 1 || c->n_head % c->n_kv_head != 0)
        return mn_errf(eb, MN_EFORMAT, "%s: %d kv heads do not divide %d heads", KEY("attention.head_count_kv"), c->n_kv_head, c->n_head);
    TRY(opt_u32(g, KEY("attention.key_length"), (uint32_t)(c->n_embd / c->n_head), &v, eb)); c->head_dim = (int32_t)v;
    uint32_t vlen;
    TRY(opt_u32(g, KEY("attention.value_length"), (uint32_t)c->head_dim, &vlen, eb));
    if ((int32_t)vlen != c->head_dim) return mn_errf(eb, MN_EUNSUPPORTED, "%s: value_length %u != key_length %d", arch, vlen, c->head_dim);
    if (c->head_dim < 2 || c->head_dim > 256 || c->head_dim % 2)
        return mn_errf(eb, MN_EUNSUPPORTED, "%s: head dim %d not supported (even, 2..256)", arch, c->head_dim);
    TRY(opt_u32(g, KEY("rope.dimension_count"), (uint32_t)c->head_dim, &v, eb)); c->n_rot = (int32_t)v;
    if (c->n_rot < 2 || c->n_rot > c->head_dim || c->n_rot % 2)
        return mn_errf(eb, MN_EFORMAT, "%s: %d out of range (even, <= head dim %d)", KEY("rope.dimension_count"), c->n_rot, c->head_dim);
    TRY(opt_f32(g, KEY("rope.freq_base"), 10000.0f, &c->rope_base, eb));
    TRY(opt_f32(g, KEY("attention.layer_norm_rms_epsilon"), 1e-5f, &c->rms_eps, eb));
    if (!(c->rope_base > 0) || !(c->rms_eps > 0) || !(c->rms_eps < 1))
        return mn_errf(eb, MN_EFORMAT, "%s: rope.freq_base %g / rms epsilon %g out of range", arch, c->rope_base, c->rms_eps);
    c->rope_freq_scale = 1.0f;
    const mn_gguf_value *st = mn_gguf_find(g, KEY("rope.scaling.type"));
    if (st) {
        mn_str s;
        TRY(mn_gguf_get_str(g, k, &s, eb));
        if (s.len == 6 && memcmp(s.ptr, "linear", 6) == 0) {
            float f;
            TRY(mn_gguf_get_f32(g, KEY("rope.scaling.factor"), &f, eb));
            if (!(f > 0)) return mn_errf(eb, MN_EFORMAT, "%s: %g must be > 0", k, f);
            c->rope_freq_scale = 1.0f / f;
        } else if (!(s.len == 4 && memcmp(s.ptr, "none", 4) == 0) && !(s.len == 6 && memcmp(s.ptr, "llama3", 6) == 0)) {
            return mn_errf(eb, MN_EUNSUPPORTED, "%s.rope.scaling.type '%.*s' not supported (none, linear, llama3)", arch,
                           (int)(s.len > 32 ? 32 : s.len), s.ptr);
        }
    }
#undef KEY
    c->rope_mode = strcmp(arch, "qwen2") == 0 ? MN_ROPE_NEOX : MN_ROPE_NORM;
    c->qkv_bias = strcmp(arch, "qwen2") == 0;
    return MN_OK;
}

static mn_err get_weight(mn_model *m, const char *name, int64_t K, int64_t N, bool optional, mn_weight *w, mn_errbuf *eb) {
    const mn_gguf_tensor *t = mn_gguf_find_tensor(m->gguf, name);
    if (!t) {
        if (optional) { memset(w, 0, sizeof *w); return MN_OK; }
        return mn_errf(eb, MN_EFORMAT, "tensor '%s' missing", name);
    }
    if (t->n_dims != 2 || t->ne[0] != K || t->ne[1] != N)
        return mn_errf(eb, MN_EFORMAT, "tensor '%s': shape [%lld, %lld] (%d dims), expected [%lld, %lld]", name,
                       (long long)t->ne[0], (long long)t->ne[1], t->n_dims, (long long)K, (long long)N);
    if (!mn_dtype_is_weight_type(t->type))
        return mn_errf(eb, MN_EUNSUPPORTED, "tensor '%s': type %s not supported", name, mn_dtype_name(t->type));
    int64_t rb = mn_dtype_row_bytes(t->type, K);
    if (rb < 0) return mn_errf(eb, MN_EFORMAT, "tensor '%s': row of %lld not a whole number of %s blocks", name, (long long)K, mn_dtype_name(t->type));
    void *dev;
    TRY(mn_backend_weights_map(m->backend, t->data, (size_t)(rb * N), &dev, eb));
    TRY(mn_backend_weights_matrix(m->backend, dev, t->type, N, K, rb, eb));
    *w = (mn_weight){dev, t->type, K, N, rb};
    return MN_OK;
}

/* Vectors (norms, biases) are converted to f32 in a host staging area, copied later. */
static mn_err get_vector(mn_model *m, const char *name, int64_t n, bool optional, float *stage, bool *found, mn_errbuf *eb) {
    const mn_gguf_tensor *t = mn_gguf_find_tensor(m->gguf, name);
    *found = t != NULL;
    if (!t) return optional ? MN_OK : mn_errf(eb, MN_EFORMAT, "tensor '%s' missing", name);
    if (t->n_dims != 1 || t->ne[0] != n)
        return mn_errf(eb, MN_EFORMAT, "tensor '%s': shape [%lld] (%d dims), expected [%lld]", name, (long long)t->ne[0], t->n_dims, (long long)n);
    if (t->type != MN_F32 && t->type != MN_F16 && t->type != MN_BF16)
        return mn_errf(eb, MN_EUNSUPPORTED, "tensor '%s': vectors must be F32, F16 or BF16, not %s", name, mn_dtype_name(t->type));
    mn_ref_dequant_row(t->type, t->data, stage, n);
    return MN_OK;
}

/* inv_freq[i] = base^(-2i/n_rot) * freq_scale, divided by the llama3 factor if the file has rope_freqs. */
static mn_err rope_table(mn_model *m, float *out, mn_errbuf *eb) {
    const mn_model_config *c = &m->cfg;
    int half = c->n_rot / 2;
    const mn_gguf_tensor *rf = mn_gguf_find_tensor(m->gguf, "rope_freqs.weight");
    if (rf && (rf->type != MN_F32 || rf->n_dims != 1 || rf->ne[0] != half))
        return mn_errf(eb, MN_EFORMAT, "tensor 'rope_freqs.weight': expected F32 [%d], found %s [%lld]", half,
                       mn_dtype_name(rf->type), (long long)rf->ne[0]);
    float factors[128];
    if (rf) mn_ref_dequant_row(MN_F32, rf->data, factors, half);
    m->cfg.rope_llama3 = rf != NULL;
    for (int i = 0; i < half; i++) {
        double f = pow((double)c->rope_base, -2.0 * i / c->n_rot) * c->rope_freq_scale;
        if (rf) {
            if (!(factors[i] > 0)) return mn_errf(eb, MN_EFORMAT, "tensor 'rope_freqs.weight': factor %d is %g", i, factors[i]);
            f /= factors[i];
        }
        out[i] = (float)f;
    }
    return MN_OK;
}

/* general.architecture into c->arch (llama or qwen2), then the rest of c */
static mn_err arch_and_config(const mn_gguf *g, mn_model_config *c, mn_errbuf *eb) {
    mn_str arch;
    TRY(mn_gguf_get_str(g, "general.architecture", &arch, eb));
    if (arch.len >= sizeof c->arch) return mn_errf(eb, MN_EUNSUPPORTED, "general.architecture too long");
    memcpy(c->arch, arch.ptr, arch.len);
    c->arch[arch.len] = 0;
    if (strcmp(c->arch, "llama") != 0 && strcmp(c->arch, "qwen2") != 0)
        return mn_errf(eb, MN_EUNSUPPORTED, "general.architecture '%s' not supported (llama, qwen2)", c->arch);
    return read_config(g, c->arch, c, eb);
}

mn_err mn_model_read_config(const char *path, mn_model_config *c, mn_errbuf *eb) {
    mn_gguf *g;
    TRY(mn_gguf_open(path, &g, eb));
    memset(c, 0, sizeof *c);
    mn_err e = arch_and_config(g, c, eb);
    if (e == MN_OK) c->n_ctx = c->n_ctx_train;
    mn_gguf_close(g);
    return e;
}

static mn_err load(mn_model *m, const char *path, const mn_model_params *p, mn_errbuf *eb) {
    TRY(mn_gguf_open(path, &m->gguf, eb));
    TRY(arch_and_config(m->gguf, &m->cfg, eb));
    mn_str nm;
    if (mn_gguf_find(m->gguf, "general.name") && mn_gguf_get_str(m->gguf, "general.name", &nm, NULL) == MN_OK)
        snprintf(m->name, sizeof m->name, "%.*s", (int)(nm.len > 120 ? 120 : nm.len), nm.ptr);
    /* the whole file, metadata and weights: ~10 ms for 100 MB */
    XXH128_hash_t fp = XXH3_128bits(mn_gguf_file_data(m->gguf), (size_t)mn_gguf_file_size(m->gguf));
    XXH128_canonical_t canon;
    XXH128_canonicalFromHash(&canon, fp);
    memcpy(m->fingerprint, canon.digest, 16);
    mn_model_config *c = &m->cfg;
    c->n_ctx = p && p->n_ctx > 0 ? p->n_ctx : c->n_ctx_train;

    TRY(mn_tokenizer_from_gguf(m->gguf, &m->tok, eb));
    const mn_gguf_value *ct = mn_gguf_find(m->gguf, "tokenizer.chat_template");
    if (ct && ct->type == MN_GGUF_STRING)
        m->has_chat_template = mn_chat_template_detect(ct->v.str.ptr, ct->v.str.len, &m->chat, NULL) == MN_OK;

    const mn_gguf_tensor *te = mn_gguf_find_tensor(m->gguf, "token_embd.weight");
    if (!te || te->n_dims != 2) return mn_errf(eb, MN_EFORMAT, "tensor 'token_embd.weight' missing or not 2-D");
    c->n_vocab = (int32_t)te->ne[1];
    if (c->n_vocab != mn_tokenizer_n_vocab(m->tok))
        return mn_errf(eb, MN_EFORMAT, "token_embd.weight has %d rows but the tokenizer has %d tokens", c->n_vocab,
                       mn_tokenizer_n_vocab(m->tok));
    int64_t E = c->n_embd, Q = (int64_t)c->n_head * c->head_dim, KV = (int64_t)c->n_kv_head * c->head_dim;
    TRY(get_weight(m, "token_embd.weight", E, c->n_vocab, false, &m->tok_embd, eb));
    TRY(get_weight(m, "output.weight", E, c->n_vocab, true, &m->output, eb));
    c->tied_output = m->output.data == NULL;
    if (c->tied_output) m->output = m->tok_embd;

    m->layers = mn_calloc((size_t)c->n_layer, sizeof *m->layers);
    if (!m->layers) return mn_errf(eb, MN_ENOMEM, "model: out of memory");
    /* staging for all f32 vectors: per layer 2 norms (+ 3 biases), output norm, inv_freq */
    int64_t per_layer = 2 * E + (c->qkv_bias ? Q + 2 * KV : 0);
    int64_t n_stage = per_layer * c->n_layer + E + c->n_rot / 2;
    float *stage = mn_malloc((size_t)n_stage * sizeof(float));
    if (!stage) return mn_errf(eb, MN_ENOMEM, "model: out of memory");
    mn_err e = mn_buffer_alloc(m->backend, MN_MEM_DEVICE, (size_t)n_stage * sizeof(float), &m->owned, eb);
    if (e != MN_OK) { mn_free(stage); return e; }
    float *dev = m->owned->ptr;
    int64_t off = 0;
    char name[96];
    bool found;
    for (int i = 0; i < c->n_layer && e == MN_OK; i++) {
        mn_layer *L = &m->layers[i];
#define W(suffix, K_, N_, dst) \
    if (e == MN_OK) { snprintf(name, sizeof name, "blk.%d." suffix, i); e = get_weight(m, name, K_, N_, false, dst, eb); }
#define V(suffix, n_, dst) \
    if (e == MN_OK) { snprintf(name, sizeof name, "blk.%d." suffix, i); \
        e = get_vector(m, name, n_, false, stage + off, &found, eb); dst = dev + off; off += n_; }
        W("attn_q.weight", E, Q, &L->wq);
        W("attn_k.weight", E, KV, &L->wk);
        W("attn_v.weight", E, KV, &L->wv);
        W("attn_output.weight", Q, E, &L->wo);
        W("ffn_gate.weight", E, c->n_ff, &L->w_gate);
        W("ffn_up.weight", E, c->n_ff, &L->w_up);
        W("ffn_down.weight", c->n_ff, E, &L->w_down);
        V("attn_norm.weight", E, L->attn_norm);
        V("ffn_norm.weight", E, L->ffn_norm);
        if (c->qkv_bias) {
            V("attn_q.bias", Q, L->bq);
            V("attn_k.bias", KV, L->bk);
            V("attn_v.bias", KV, L->bv);
        }
#undef W
#undef V
    }
    if (e == MN_OK) {
        e = get_vector(m, "output_norm.weight", E, false, stage + off, &found, eb);
        m->output_norm = dev + off;
        off += E;
    }
    if (e == MN_OK) {
        e = rope_table(m, stage + off, eb);
        m->inv_freq = dev + off;
        off += c->n_rot / 2;
    }
    if (e == MN_OK) e = mn_backend_copy_async(m->backend, MN_COPY_H2D, dev, stage, (size_t)off * sizeof(float), eb);
    if (e == MN_OK) e = mn_backend_synchronize(m->backend, eb);
    mn_free(stage);
    return e;
}

const char *mn_model_default_path(void) {
    static char path[4096];
    const char *m = getenv("MNEME_MODEL");
    if (m && *m) return m;
    const char *dir = getenv("MNEME_MODELS");
    const char *home = getenv("HOME");
    if (dir && *dir) snprintf(path, sizeof path, "%s/%s", dir, MN_DEFAULT_MODEL_FILE);
    else snprintf(path, sizeof path, "%s/.cache/mneme/%s", home ? home : ".", MN_DEFAULT_MODEL_FILE);
    return path;
}

mn_err mn_model_load(const char *path, mn_backend *be, const mn_model_params *p, mn_model **out, mn_errbuf *eb) {
    mn_model *m = mn_calloc(1, sizeof *m);
    if (!m) return mn_errf(eb, MN_ENOMEM, "model: out of memory");
    m->backend = be;
    mn_err e = load(m, path, p, eb);
    if (e != MN_OK) {
        mn_model_free(m);
        return e;
    }
    *out = m;
    return MN_OK;
}

void mn_model_free(mn_model *m) {
    if (!m) return;
    mn_buffer_free(m->owned);
    mn_free(m->layers);
    if (m->has_chat_template) mn_chat_template_clear(&m->chat);
    mn_tokenizer_free(m->tok);
    mn_gguf_close(m->gguf);
    mn_free(m->synth);
    mn_free(m);
}

uint64_t mn_model_weight_bytes(const mn_model *m) {
    if (!m->gguf) return m->synth_bytes;
    uint64_t n = 0;
    for (int64_t i = 0; i < mn_gguf_n_tensors(m->gguf); i++) n += mn_gguf_tensor_at(m->gguf, i)->nbytes;
    return n;
}
