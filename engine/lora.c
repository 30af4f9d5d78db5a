/* engine/lora.c — load and validate PEFT LoRA adapters; the registry by name.
 *
 * Loading is two passes over the targets of every layer: the first resolves each
 * module's rank and scale and checks both tensors' presence and shapes (nothing is
 * allocated for the weights yet), the second copies them into one arena (F32, or the
 * file's 16-bit type when every tensor has it) laid out
 * per layer as
 *   A_q A_k A_v | A_gate A_up | A_o | A_down | B_q B_k B_v B_o B_gate B_up B_down
 * so the A's of a group that shares its input are one [r_sum, in] matrix.
 * Every tensor of the file must be used: one that names a layer the model lacks is a
 * mismatch, any other is an unsupported module.
 */
#include "engine/lora.h"

#include <assert.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#include "engine/alloc.h"
#include "engine/gguf.h"
#include "engine/safetensors.h"

static const char *const target_names[MN_LORA_N_TARGETS] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"};

const char *mn_lora_target_name(mn_lora_target t) { return (unsigned)t < MN_LORA_N_TARGETS ? target_names[t] : "?"; }

static const char *block_of(int t) { return t <= MN_LORA_O ? "self_attn" : "mlp"; }

/* in and out features of target t in a model of config c */
static void target_dims(const mn_model_config *c, int t, int64_t *in, int64_t *out) {
    int64_t E = c->n_embd, Q = (int64_t)c->n_head * c->head_dim, KV = (int64_t)c->n_kv_head * c->head_dim, F = c->n_ff;
    switch (t) {
    case MN_LORA_Q: *in = E; *out = Q; break;
    case MN_LORA_K: case MN_LORA_V: *in = E; *out = KV; break;
    case MN_LORA_O: *in = Q; *out = E; break;
    case MN_LORA_GATE: case MN_LORA_UP: *in = E; *out = F; break;
    default: *in = F; *out = E; break;
    }
}

typedef struct cfg {
    bool gguf;         /* llama.cpp GGUF LoRA: ranks from the tensors, rows already permuted */
    int32_t r;
    double alpha;
    bool rslora;
    uint32_t targets;
    json_t *rank_pattern, *alpha_pattern;   /* borrowed from root */
    json_t *root;
} cfg;

/* key matches module name at a dot boundary: name == key or name ends with "." key */
static bool suffix_match(const char *name, const char *key) {
    size_t n = strlen(name), k = strlen(key);
    if (k > n) return false;
    if (strcmp(name + n - k, key) != 0) return false;
    return k == n || name[n - k - 1] == '.';
}

/* The longest key of pattern (an object) matching module; NULL if none. */
static json_t *pattern_lookup(json_t *pattern, const char *module) {
    if (!pattern) return NULL;
    const char *key, *best = NULL;
    json_t *v, *bv = NULL;
    json_object_foreach(pattern, key, v) {
        if (suffix_match(module, key) && (!best || strlen(key) > strlen(best))) {
            best = key;
            bv = v;
        }
    }
    return bv;
}

static mn_err read_config(const char *dir, cfg *c, mn_errbuf *eb) {
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    json_error_t je;
    memset(c, 0, sizeof *c);
    c->root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!c->root) {
        FILE *f = fopen(path, "rb");
        if (!f) return mn_errf(eb, MN_ENOT_FOUND, "lora: %s: cannot open (not a PEFT adapter directory?)", path);
        fclose(f);
        return mn_errf(eb, MN_EFORMAT, "lora: %s: line %d column %d: %s", path, je.line, je.column, je.text);
    }
    json_t *root = c->root;
    if (!json_is_object(root)) return mn_errf(eb, MN_EFORMAT, "lora: %s: not a JSON object", path);
    json_t *v = json_object_get(root, "peft_type");
    if (v && (!json_is_string(v) || strcmp(json_string_value(v), "LORA") != 0))
        return mn_errf(eb, MN_EUNSUPPORTED, "lora: %s: peft_type must be \"LORA\"", path);
    v = json_object_get(root, "r");
    if (!json_is_integer(v)) return mn_errf(eb, MN_EFORMAT, "lora: %s: \"r\" missing or not an integer", path);
    if (json_integer_value(v) < 1 || json_integer_value(v) > 65536)
        return mn_errf(eb, MN_EINVALID, "lora: %s: r = %lld, must be in [1, 65536]", path, (long long)json_integer_value(v));
    c->r = (int32_t)json_integer_value(v);
    v = json_object_get(root, "lora_alpha");
    if (v && !json_is_number(v)) return mn_errf(eb, MN_EFORMAT, "lora: %s: \"lora_alpha\" is not a number", path);
    c->alpha = v ? json_number_value(v) : 8.0;   /* PEFT's default */
    v = json_object_get(root, "use_rslora");
    if (v && !json_is_boolean(v)) return mn_errf(eb, MN_EFORMAT, "lora: %s: \"use_rslora\" is not a boolean", path);
    c->rslora = v && json_is_true(v);
    static const char *const refused[] = {"use_dora", "fan_in_fan_out"};
    for (size_t i = 0; i < 2; i++) {
        v = json_object_get(root, refused[i]);
        if (v && json_is_true(v)) return mn_errf(eb, MN_EUNSUPPORTED, "lora: %s: \"%s\": true is not supported", path, refused[i]);
    }
    v = json_object_get(root, "layers_to_transform");
    if (v && !json_is_null(v)) return mn_errf(eb, MN_EUNSUPPORTED, "lora: %s: \"layers_to_transform\" is not supported", path);
    v = json_object_get(root, "bias");
    if (v && (!json_is_string(v) || strcmp(json_string_value(v), "none") != 0))
        return mn_errf(eb, MN_EUNSUPPORTED, "lora: %s: \"bias\" must be \"none\"", path);
    v = json_object_get(root, "target_modules");
    if (json_is_string(v) && strcmp(json_string_value(v), "all-linear") == 0) {
        c->targets = (1u << MN_LORA_N_TARGETS) - 1;
    } else if (json_is_array(v) || json_is_string(v)) {
        size_t n = json_is_array(v) ? json_array_size(v) : 1;
        for (size_t i = 0; i < n; i++) {
            json_t *s = json_is_array(v) ? json_array_get(v, i) : v;
            if (!json_is_string(s)) return mn_errf(eb, MN_EFORMAT, "lora: %s: target_modules[%zu] is not a string", path, i);
            int t = 0;
            while (t < MN_LORA_N_TARGETS && strcmp(target_names[t], json_string_value(s)) != 0) t++;
            if (t == MN_LORA_N_TARGETS)
                return mn_errf(eb, MN_EUNSUPPORTED, "lora: %s: target_modules[%zu] = \"%s\" (supported: q_proj k_proj v_proj "
                               "o_proj gate_proj up_proj down_proj)", path, i, json_string_value(s));
            c->targets |= 1u << t;
        }
    } else {
        return mn_errf(eb, MN_EFORMAT, "lora: %s: \"target_modules\" missing or not a list", path);
    }
    if (!c->targets) return mn_errf(eb, MN_EINVALID, "lora: %s: target_modules is empty", path);
    static const char *const pats[] = {"rank_pattern", "alpha_pattern"};
    for (int i = 0; i < 2; i++) {
        v = json_object_get(root, pats[i]);
        if (v && json_is_null(v)) v = NULL;
        if (v && !json_is_object(v)) return mn_errf(eb, MN_EFORMAT, "lora: %s: \"%s\" is not an object", path, pats[i]);
        const char *k;
        json_t *x;
        if (v) json_object_foreach(v, k, x) {
            if (i == 0 ? !json_is_integer(x) : !json_is_number(x))
                return mn_errf(eb, MN_EFORMAT, "lora: %s: %s[\"%s\"] is not %s", path, pats[i], k, i == 0 ? "an integer" : "a number");
        }
        if (i == 0) c->rank_pattern = v;
        else c->alpha_pattern = v;
    }
    return MN_OK;
}

/* ---- llama.cpp GGUF LoRA files ----
 * general.type "adapter", adapter.type "lora", adapter.lora.alpha; tensors
 * blk.{i}.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight.lora_{a,b} with
 * ne lora_a = [in, r], lora_b = [r, out] (Q/K rows already in the GGUF order). They are
 * presented to the loader as the PEFT tensors they correspond to (same names and shapes),
 * with the ranks taken from the tensors and scale = alpha / r (1 when alpha is 0, as
 * llama.cpp does). */
static const char *const gguf_names[MN_LORA_N_TARGETS] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                          "ffn_gate", "ffn_up", "ffn_down"};

static void tensor_name(char *buf, size_t n, int layer, int t, char ab);

static mn_err read_gguf(const char *path, cfg *c, mn_gguf **gout, mn_safetensors **out, mn_errbuf *eb) {
    memset(c, 0, sizeof *c);
    c->gguf = true;
    mn_gguf *g;
    mn_err e = mn_gguf_open(path, &g, eb);
    if (e != MN_OK) return e;
    *gout = g;
    mn_str s;
    if (mn_gguf_find(g, "adapter.type") && (mn_gguf_get_str(g, "adapter.type", &s, eb) != MN_OK || s.len != 4 ||
                                             memcmp(s.ptr, "lora", 4) != 0))
        return mn_errf(eb, MN_EUNSUPPORTED, "lora: %s: adapter.type is not \"lora\"", path);
    float alpha = 0;
    if (mn_gguf_find(g, "adapter.lora.alpha") && (e = mn_gguf_get_f32(g, "adapter.lora.alpha", &alpha, eb)) != MN_OK) return e;
    c->alpha = alpha;
    mn_safetensors *st = mn_calloc(1, sizeof *st);
    int64_t n = mn_gguf_n_tensors(g);
    if (!st || !(st->tensors = mn_calloc((size_t)n + 1, sizeof *st->tensors))) {
        mn_free(st);
        return mn_errf(eb, MN_ENOMEM, "lora: out of memory");
    }
    *out = st;
    for (int64_t i = 0; i < n; i++) {
        const mn_gguf_tensor *gt = mn_gguf_tensor_at(g, i);
        mn_st_tensor *t = &st->tensors[st->n_tensors];
        int layer = -1, k = 0;
        char mod[32], ab = 0;
        if (sscanf(gt->name, "blk.%d.%31[a-z_].weight.lora_%c", &layer, mod, &ab) == 3 && (ab == 'a' || ab == 'b'))
            while (k < MN_LORA_N_TARGETS && strcmp(mod, gguf_names[k]) != 0) k++;
        else k = MN_LORA_N_TARGETS;
        if (k == MN_LORA_N_TARGETS || layer < 0)
            return mn_errf(eb, MN_EUNSUPPORTED, "lora: %s: tensor '%s' is not a lora_a/lora_b of a supported module", path, gt->name);
        if (gt->type != MN_F32 && gt->type != MN_F16 && gt->type != MN_BF16)
            return mn_errf(eb, MN_EUNSUPPORTED, "lora: %s: tensor '%s' is %s (F32, F16 and BF16 are read)", path, gt->name,
                           mn_dtype_name(gt->type));
        char pn[256];
        tensor_name(pn, sizeof pn, layer, k, ab == 'a' ? 'A' : 'B');
        if (!(t->name = mn_strdup(pn))) return mn_errf(eb, MN_ENOMEM, "lora: out of memory");
        st->n_tensors++;
        t->type = gt->type;
        t->n_dims = gt->n_dims;
        for (int d = 0; d < gt->n_dims; d++) t->shape[d] = gt->ne[gt->n_dims - 1 - d];
        t->offset = mn_gguf_data_offset(g) + gt->offset;
        t->size = gt->nbytes;
        t->data = gt->data;
        c->targets |= 1u << k;
    }
    if (!c->targets) return mn_errf(eb, MN_EFORMAT, "lora: %s: no lora tensors", path);
    return MN_OK;
}

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static void tensor_name(char *buf, size_t n, int layer, int t, char ab) {
    snprintf(buf, n, "base_model.model.model.layers.%d.%s.%s.lora_%c.weight", layer, block_of(t), target_names[t], ab);
}

/* Check tensor name has 2 dims [rows, cols]. A wrong input/output width is a model mismatch
 * (the adapter belongs to another model); a wrong rank is a malformed adapter. */
static mn_err check_shape(const mn_st_tensor *x, const char *file, int64_t rows, int64_t cols, bool a, mn_errbuf *eb) {
    if (x->n_dims != 2)
        return mn_errf(eb, MN_EFORMAT, "lora: %s: tensor '%s' has %d dims, expected 2 ([%lld, %lld])", file, x->name, x->n_dims,
                       (long long)rows, (long long)cols);
    int64_t r_found = a ? x->shape[0] : x->shape[1], r_want = a ? rows : cols;
    int64_t f_found = a ? x->shape[1] : x->shape[0], f_want = a ? cols : rows;
    if (f_found != f_want)
        return mn_errf(eb, MN_EMISMATCH, "lora: %s: tensor '%s' is [%lld, %lld], expected [%lld, %lld]: %s size %lld does not "
                       "match the model's %lld (adapter made for another model?)", file, x->name, (long long)x->shape[0],
                       (long long)x->shape[1], (long long)rows, (long long)cols, a ? "input" : "output", (long long)f_found,
                       (long long)f_want);
    if (r_found != r_want)
        return mn_errf(eb, MN_EFORMAT, "lora: %s: tensor '%s' is [%lld, %lld], expected [%lld, %lld]: rank %lld, config says %lld",
                       file, x->name, (long long)x->shape[0], (long long)x->shape[1], (long long)rows, (long long)cols,
                       (long long)r_found, (long long)r_want);
    return MN_OK;
}

/* The llama GGUF converter's permutation of Q/K rows (per head: [even, odd] halves
 * interleaved), applied to B's rows of rb bytes: new row h*hd + 2i + j = old row
 * h*hd + j*hd/2 + i. */
static void permute_rows(char *b, int32_t n_head, int32_t hd, size_t rb, char *tmp) {
    for (int32_t h = 0; h < n_head; h++) {
        char *head = b + (size_t)h * hd * rb;
        memcpy(tmp, head, (size_t)hd * rb);
        for (int32_t i = 0; i < hd / 2; i++)
            for (int32_t j = 0; j < 2; j++) memcpy(head + (size_t)(2 * i + j) * rb, tmp + (size_t)(j * (hd / 2) + i) * rb, rb);
    }
}

/* n elements of x from element 0 into dst as type to (x's own type, or F32). */
static void copy_elems(const mn_st_tensor *x, mn_dtype to, void *dst, int64_t n) {
    if (to == x->type) memcpy(dst, x->data, (size_t)n * (to == MN_F32 ? 4 : 2));
    else mn_st_to_f32(x, 0, n, dst);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

mn_err mn_lora_load(const char *dir, const char *name, const mn_model *m, mn_lora **out, mn_errbuf *eb) {
    *out = NULL;
    double t0 = now_s();
    const mn_model_config *mc = &m->cfg;
    cfg c;
    mn_safetensors *st = NULL;
    mn_lora *l = NULL;
    bool *used = NULL;
    float *tmp = NULL;
    char file[4096], tn[256], module[160];
    mn_gguf *gg = NULL;
    mn_err e;
    if (ends_with(dir, ".gguf")) {
        snprintf(file, sizeof file, "%s", dir);
        c.root = NULL;
        if ((e = read_gguf(dir, &c, &gg, &st, eb)) != MN_OK) goto fail;
    } else {
        if ((e = read_config(dir, &c, eb)) != MN_OK) goto fail;
        snprintf(file, sizeof file, "%s/adapter_model.safetensors", dir);
        if ((e = mn_st_open(file, &st, eb)) != MN_OK) {
            if (e == MN_ENOT_FOUND) e = mn_errf(eb, MN_ENOT_FOUND, "lora: %s: cannot open (not a PEFT adapter directory?)", file);
            goto fail;
        }
    }
    l = mn_calloc(1, sizeof *l);
    used = mn_calloc((size_t)st->n_tensors + 1, sizeof *used);
    if (!l || !(l->layers = mn_calloc((size_t)mc->n_layer, sizeof *l->layers)) || !used) {
        e = mn_errf(eb, MN_ENOMEM, "lora: out of memory");
        goto fail;
    }
    snprintf(l->name, sizeof l->name, "%s", name ? name : dir);
    l->n_layer = mc->n_layer;
    l->n_embd = mc->n_embd;
    l->n_q = mc->n_head * mc->head_dim;
    l->n_kv = mc->n_kv_head * mc->head_dim;
    l->n_ff = mc->n_ff;
    l->targets = c.targets;

    /* pass 1: ranks, scales, tensor presence and shapes; arena size */
    uint64_t n_elems = 0;
    int n_types[3] = {0, 0, 0};   /* tensors in F32, F16, BF16 */
    for (int32_t li = 0; li < mc->n_layer; li++) {
        for (int t = 0; t < MN_LORA_N_TARGETS; t++) {
            if (!(c.targets & (1u << t))) continue;
            snprintf(module, sizeof module, "model.layers.%d.%s.%s", li, block_of(t), target_names[t]);
            json_t *rp = pattern_lookup(c.rank_pattern, module), *ap = pattern_lookup(c.alpha_pattern, module);
            int64_t r = rp ? json_integer_value(rp) : c.r;
            double alpha = ap ? json_number_value(ap) : c.alpha;
            if (c.gguf) {   /* the rank is lora_a's row count */
                tensor_name(tn, sizeof tn, li, t, 'A');
                const mn_st_tensor *x = mn_st_find(st, tn);
                r = x && x->n_dims == 2 ? x->shape[0] : 1;
            }
            if (r < 1 || r > 65536) {
                e = mn_errf(eb, MN_EINVALID, "lora: %s/adapter_config.json: rank of %s is %lld, must be in [1, 65536]", dir,
                            module, (long long)r);
                goto fail;
            }
            int64_t in, outf;
            target_dims(mc, t, &in, &outf);
            const mn_st_tensor *ta, *tb;
            tensor_name(tn, sizeof tn, li, t, 'A');
            if (!(ta = mn_st_find(st, tn))) {
                e = mn_errf(eb, MN_EFORMAT, "lora: %s: missing tensor '%s' (%s is in target_modules)", file, tn, target_names[t]);
                goto fail;
            }
            if ((e = check_shape(ta, file, r, in, true, eb)) != MN_OK) goto fail;
            tensor_name(tn, sizeof tn, li, t, 'B');
            if (!(tb = mn_st_find(st, tn))) {
                e = mn_errf(eb, MN_EFORMAT, "lora: %s: missing tensor '%s' (%s is in target_modules)", file, tn, target_names[t]);
                goto fail;
            }
            if ((e = check_shape(tb, file, outf, r, false, eb)) != MN_OK) goto fail;
            used[ta - st->tensors] = used[tb - st->tensors] = true;
            n_types[ta->type == MN_F32 ? 0 : ta->type == MN_F16 ? 1 : 2]++;
            n_types[tb->type == MN_F32 ? 0 : tb->type == MN_F16 ? 1 : 2]++;
            mn_lora_mat *mt = &l->layers[li].t[t];
            mt->r = (int32_t)r;
            mt->scale = (float)(c.rslora ? alpha / sqrt((double)r) : alpha / (double)r);
            if (c.gguf && alpha == 0) mt->scale = 1.0f;
            if (mt->r > l->r_max) l->r_max = mt->r;
            n_elems += (uint64_t)r * (uint64_t)(in + outf);
        }
    }
    for (int64_t i = 0; i < st->n_tensors; i++) {
        if (used[i]) continue;
        const char *nm = st->tensors[i].name;
        int layer;
        if (sscanf(nm, "base_model.model.model.layers.%d.", &layer) == 1 && (layer < 0 || layer >= mc->n_layer)) {
            e = mn_errf(eb, MN_EMISMATCH, "lora: %s: tensor '%s' is for layer %d, the model has %d layers", file, nm, layer,
                        mc->n_layer);
        } else {
            e = mn_errf(eb, MN_EUNSUPPORTED, "lora: %s: tensor '%s' (at offset %llu) is not a lora_A/lora_B of a module in "
                        "target_modules", file, nm, (unsigned long long)st->tensors[i].offset);
        }
        goto fail;
    }

    /* pass 2: copy into the arena. An adapter stored entirely in F16 (or BF16) keeps that
     * type (exact, and half the bytes each use reads); anything else becomes F32. */
    int n_all = n_types[0] + n_types[1] + n_types[2];
    l->wtype = n_types[1] == n_all ? MN_F16 : n_types[2] == n_all ? MN_BF16 : MN_F32;
    const size_t esz = l->wtype == MN_F32 ? 4 : 2;
    l->bytes = n_elems * esz;
    int64_t max_out = l->n_q > l->n_embd ? l->n_q : l->n_embd;
    if (l->n_ff > max_out) max_out = l->n_ff;
    /* tmp: B as stored [out, r], then scratch for the row permutation */
    if (!(l->arena = mn_malloc(l->bytes ? l->bytes : 4)) || !(tmp = mn_malloc(2 * (size_t)max_out * l->r_max * sizeof(float) + 4))) {
        e = mn_errf(eb, MN_ENOMEM, "lora: out of memory (%llu bytes of weights)", (unsigned long long)l->bytes);
        goto fail;
    }
    static const int a_order[MN_LORA_N_TARGETS] = {MN_LORA_Q, MN_LORA_K, MN_LORA_V, MN_LORA_GATE, MN_LORA_UP,
                                                   MN_LORA_O, MN_LORA_DOWN};
    char *p = l->arena;
    char *tb = (char *)tmp;
    for (int32_t li = 0; li < mc->n_layer; li++) {
        for (int pass = 0; pass < 2; pass++) {
            for (int k = 0; k < MN_LORA_N_TARGETS; k++) {
                int t = pass == 0 ? a_order[k] : k;
                mn_lora_mat *mt = &l->layers[li].t[t];
                if (!mt->r) continue;
                int64_t in, outf;
                target_dims(mc, t, &in, &outf);
                tensor_name(tn, sizeof tn, li, t, pass == 0 ? 'A' : 'B');
                const mn_st_tensor *x = mn_st_find(st, tn);
                int64_t n = pass == 0 ? (int64_t)mt->r * in : outf * mt->r;
                if (pass == 0) {
                    copy_elems(x, l->wtype, p, n);
                    mt->a = p;
                } else {
                    copy_elems(x, l->wtype, tb, n);
                    if (!c.gguf && mc->rope_mode == MN_ROPE_NORM && (t == MN_LORA_Q || t == MN_LORA_K))
                        permute_rows(tb, t == MN_LORA_Q ? mc->n_head : mc->n_kv_head, mc->head_dim, (size_t)mt->r * esz,
                                     tb + (size_t)n * esz);
                    for (int64_t row = 0; row < outf; row++)   /* store B^T: [r, out] */
                        for (int32_t j = 0; j < mt->r; j++)
                            memcpy(p + ((size_t)j * outf + row) * esz, tb + ((size_t)row * mt->r + j) * esz, esz);
                    mt->b = p;
                }
                p += (size_t)n * esz;
            }
        }
    }

    /* fingerprint: resolved ranks and scales, then every weight */
    XXH3_state_t *hs = XXH3_createState();
    if (!hs) {
        e = mn_errf(eb, MN_ENOMEM, "lora: out of memory");
        goto fail;
    }
    XXH3_128bits_reset(hs);
    XXH3_128bits_update(hs, "mneme-lora-1", 12);
    int32_t hdr[3] = {l->n_layer, (int32_t)l->targets, (int32_t)l->wtype};
    XXH3_128bits_update(hs, hdr, sizeof hdr);
    for (int32_t li = 0; li < l->n_layer; li++)
        for (int t = 0; t < MN_LORA_N_TARGETS; t++) {
            XXH3_128bits_update(hs, &l->layers[li].t[t].r, sizeof(int32_t));
            XXH3_128bits_update(hs, &l->layers[li].t[t].scale, sizeof(float));
        }
    XXH3_128bits_update(hs, l->arena, (size_t)l->bytes);
    XXH128_canonical_t canon;
    XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(hs));
    XXH3_freeState(hs);
    memcpy(l->fingerprint, canon.digest, 16);

    mn_free(tmp);
    mn_free(used);
    mn_st_free(st);
    mn_gguf_close(gg);
    json_decref(c.root);
    l->load_seconds = now_s() - t0;
    *out = l;
    return MN_OK;
fail:
    mn_free(tmp);
    mn_free(used);
    mn_st_free(st);
    mn_gguf_close(gg);
    json_decref(c.root);
    mn_lora_free(l);
    return e;
}

void mn_lora_free(mn_lora *l) {
    if (!l) return;
    mn_free(l->arena);
    mn_free(l->layers);
    mn_free(l);
}

mn_err mn_lora_check_model(const mn_lora *l, const mn_model *m, mn_errbuf *eb) {
    const mn_model_config *c = &m->cfg;
    if (l->n_layer != c->n_layer || l->n_embd != c->n_embd || l->n_q != c->n_head * c->head_dim ||
        l->n_kv != c->n_kv_head * c->head_dim || l->n_ff != c->n_ff)
        return mn_errf(eb, MN_EMISMATCH, "lora '%s': loaded for a model of %d layers, hidden %d, q %d, kv %d, ff %d; this model "
                       "has %d, %d, %d, %d, %d", l->name, l->n_layer, l->n_embd, l->n_q, l->n_kv, l->n_ff, c->n_layer,
                       c->n_embd, c->n_head * c->head_dim, c->n_kv_head * c->head_dim, c->n_ff);
    return MN_OK;
}

/* ---- registry ----
 * Slots hold the host adapters. With a backend attached (mn_lora_registry_set_budget) a
 * slot may also be resident: a device buffer with a copy of the arena, and a "view", an
 * mn_lora whose layers point into that buffer at the same offsets (so the groups' A's stay
 * adjacent and the forward needs nothing else). Recency is a counter bumped at each use;
 * eviction scans for the smallest one among the unpinned: a handful of adapters per GPU,
 * so a scan is cheaper than keeping a list in order. */
typedef struct lora_slot {
    mn_lora *host;
    mn_buffer *dev;          /* NULL: not resident */
    mn_buffer *staged;       /* page-locked copy of the arena, the source of page-ins (an async
                                copy from pageable memory would not overlap); NULL: none */
    mn_lora view;            /* header copy; layers = view_layers */
    mn_lora_layer *view_layers;
    mn_event ready;          /* the page-in copy */
    bool copying;            /* ready not yet waited for */
    int32_t pins;
    uint64_t last_use;
} lora_slot;

struct mn_lora_registry {
    const mn_model *m;
    lora_slot *slots;
    int32_t n_slots;
    const mn_lora **table;   /* [n_slots], handed to batches */
    int32_t *mark;           /* [n_slots], distinct adapters of one batch */
    mn_backend *be;          /* NULL: batches read the host copies */
    size_t budget;           /* bytes of resident adapters; 0 = unlimited */
    uint64_t clock;
    mn_lora_stats st;
};

mn_err mn_lora_registry_new(const mn_model *m, mn_lora_registry **out, mn_errbuf *eb) {
    mn_lora_registry *r = mn_calloc(1, sizeof *r);
    if (!r) return mn_errf(eb, MN_ENOMEM, "lora registry: out of memory");
    r->m = m;
    *out = r;
    return MN_OK;
}

/* Drop slot s's device copy (its copy finished first: the buffer may still be read by it).
 * With keep non-NULL and *keep NULL, a buffer of keep_size bytes is handed over in *keep
 * instead of freed: adapters of one shape have one size, and on CUDA a free synchronises
 * the device, which would stall the compute a page-in is meant to overlap. */
static void evict_keep(mn_lora_registry *r, lora_slot *s, mn_errbuf *eb, mn_buffer **keep, size_t keep_size) {
    if (!s->dev) return;
    if (s->copying) {
        mn_errbuf tmp = {{0}};
        (void)mn_backend_event_wait(r->be, &s->ready, eb ? eb : &tmp);
        s->copying = false;
    }
    r->st.resident_bytes -= s->dev->size;
    r->st.resident--;
    r->table[s - r->slots] = s->host;
    if (keep && !*keep && s->dev->size == keep_size) *keep = s->dev;
    else mn_buffer_free(s->dev);
    s->dev = NULL;
    mn_free(s->view_layers);
    s->view_layers = NULL;
}

static void evict(mn_lora_registry *r, lora_slot *s, mn_errbuf *eb) { evict_keep(r, s, eb, NULL, 0); }

void mn_lora_registry_free(mn_lora_registry *r) {
    if (!r) return;
    for (int32_t i = 0; i < r->n_slots; i++) {
        evict(r, &r->slots[i], NULL);
        mn_buffer_free(r->slots[i].staged);
        mn_lora_free(r->slots[i].host);
    }
    mn_free(r->slots);
    mn_free(r->table);
    mn_free(r->mark);
    mn_free(r);
}

int32_t mn_lora_registry_find(const mn_lora_registry *r, const char *name) {
    for (int32_t i = 0; i < r->n_slots; i++)
        if (r->slots[i].host && strcmp(r->slots[i].host->name, name) == 0) return i;
    return -1;
}

mn_err mn_lora_registry_add(mn_lora_registry *r, mn_lora *l, int32_t *index, mn_errbuf *eb) {
    if (!l->name[0]) return mn_errf(eb, MN_EINVALID, "lora registry: adapter name must be 1..127 bytes");
    if (mn_lora_registry_find(r, l->name) >= 0)
        return mn_errf(eb, MN_EINVALID, "lora registry: '%s' is already loaded", l->name);
    mn_err e = mn_lora_check_model(l, r->m, eb);
    if (e != MN_OK) return e;
    if (r->be && r->budget && l->bytes > r->budget)
        return mn_errf(eb, MN_ELIMIT, "lora registry: adapter '%s' needs %llu bytes on the device, over the whole "
                       "adapter budget of %zu bytes", l->name, (unsigned long long)l->bytes, r->budget);
    int32_t slot = 0;
    while (slot < r->n_slots && r->slots[slot].host) slot++;
    if (slot == r->n_slots) {
        size_t n = (size_t)r->n_slots + 1;
        lora_slot *ns = mn_realloc(r->slots, n * sizeof *ns);
        if (ns) r->slots = ns;
        const mn_lora **nt = ns ? mn_realloc(r->table, n * sizeof *nt) : NULL;
        if (nt) r->table = nt;
        int32_t *nm = nt ? mn_realloc(r->mark, n * sizeof *nm) : NULL;
        if (!nm) return mn_errf(eb, MN_ENOMEM, "lora registry: out of memory for %zu slots", n);
        r->mark = nm;
        memset(&r->slots[r->n_slots], 0, sizeof *ns);
        r->table[r->n_slots] = NULL;
        r->mark[r->n_slots] = 0;
        r->n_slots++;
    }
    r->slots[slot] = (lora_slot){.host = l};
    r->table[slot] = l;
    if (index) *index = slot;
    return MN_OK;
}

mn_err mn_lora_registry_load(mn_lora_registry *r, const char *name, const char *dir, int32_t *index, mn_errbuf *eb) {
    if (!name || !name[0] || strlen(name) >= sizeof(((mn_lora *)0)->name))
        return mn_errf(eb, MN_EINVALID, "lora registry: adapter name must be 1..127 bytes");
    if (mn_lora_registry_find(r, name) >= 0) /* before reading the files */
        return mn_errf(eb, MN_EINVALID, "lora registry: '%s' is already loaded", name);
    mn_lora *l;
    mn_err e = mn_lora_load(dir, name, r->m, &l, eb);
    if (e != MN_OK) return e;
    if ((e = mn_lora_registry_add(r, l, index, eb)) != MN_OK) mn_lora_free(l);
    return e;
}

mn_err mn_lora_registry_unload(mn_lora_registry *r, const char *name, mn_errbuf *eb) {
    int32_t i = mn_lora_registry_find(r, name);
    if (i < 0) return mn_errf(eb, MN_ENOT_FOUND, "lora registry: no adapter '%s'", name);
    if (r->slots[i].pins)
        return mn_errf(eb, MN_EBUSY, "lora registry: '%s' is used by %d batch(es) in flight", name, r->slots[i].pins);
    evict(r, &r->slots[i], NULL);
    mn_buffer_free(r->slots[i].staged);
    mn_lora_free(r->slots[i].host);
    r->slots[i] = (lora_slot){0};
    r->table[i] = NULL;
    return MN_OK;
}

const mn_lora *const *mn_lora_registry_table(const mn_lora_registry *r, int32_t *n) {
    *n = r->n_slots;
    return r->table;
}

const mn_lora *mn_lora_registry_adapter(const mn_lora_registry *r, int32_t slot) {
    return slot >= 0 && slot < r->n_slots ? r->slots[slot].host : NULL;
}

int32_t mn_lora_registry_n_slots(const mn_lora_registry *r) { return r->n_slots; }

/* ---- residency ---- */

mn_err mn_lora_registry_set_budget(mn_lora_registry *r, mn_backend *be, size_t bytes, mn_errbuf *eb) {
    for (int32_t i = 0; be && bytes && i < r->n_slots; i++)
        if (r->slots[i].host && r->slots[i].host->bytes > bytes)
            return mn_errf(eb, MN_ELIMIT, "lora registry: a device budget of %zu bytes is smaller than adapter '%s' "
                           "(%llu bytes)", bytes, r->slots[i].host->name, (unsigned long long)r->slots[i].host->bytes);
    for (int32_t i = 0; i < r->n_slots; i++)
        if (r->slots[i].pins)
            return mn_errf(eb, MN_EBUSY, "lora registry: budget changed while '%s' is in a batch in flight",
                           r->slots[i].host->name);
    if (be != r->be)
        for (int32_t i = 0; i < r->n_slots; i++) {
            evict(r, &r->slots[i], eb);
            mn_buffer_free(r->slots[i].staged);
            r->slots[i].staged = NULL;
        }
    r->be = be;
    r->budget = bytes;
    r->st.budget = bytes;
    /* a smaller budget takes effect now: drop least recently used copies until it holds */
    while (be && bytes && r->st.resident_bytes > bytes) {
        lora_slot *v = NULL;
        for (int32_t i = 0; i < r->n_slots; i++)
            if (r->slots[i].dev && (!v || r->slots[i].last_use < v->last_use)) v = &r->slots[i];
        evict(r, v, eb);
        r->st.evictions++;
    }
    return MN_OK;
}

bool mn_lora_registry_resident(const mn_lora_registry *r, int32_t slot) {
    return slot >= 0 && slot < r->n_slots && r->slots[slot].dev != NULL;
}

void mn_lora_registry_stats(const mn_lora_registry *r, mn_lora_stats *out) { *out = r->st; }

/* Make slot i resident (copy enqueued, not waited for). Evicts least recently used slots
 * that are neither pinned nor marked (needed by the batch being acquired). */
static mn_err page_in(mn_lora_registry *r, int32_t i, mn_errbuf *eb) {
    lora_slot *s = &r->slots[i];
    const mn_lora *l = s->host;
    size_t need = l->bytes ? (size_t)l->bytes : 4;
    if (r->budget && need > r->budget)
        return mn_errf(eb, MN_ELIMIT, "lora registry: adapter '%s' needs %zu bytes on the device, over the whole "
                       "adapter budget of %zu bytes", l->name, need, r->budget);
    mn_buffer *reuse = NULL;
    while (r->budget && r->st.resident_bytes + need > r->budget) {
        lora_slot *v = NULL;
        for (int32_t j = 0; j < r->n_slots; j++) {
            lora_slot *c = &r->slots[j];
            if (c->dev && !c->pins && !r->mark[j] && (!v || c->last_use < v->last_use)) v = c;
        }
        if (!v) {
            mn_buffer_free(reuse);
            return mn_errf(eb, MN_ELIMIT, "lora registry: adapter '%s' needs %zu bytes; %zu of the %zu byte budget are "
                           "held by adapters in use", l->name, need, (size_t)r->st.resident_bytes, r->budget);
        }
        evict_keep(r, v, eb, &reuse, need);
        r->st.evictions++;
    }
    mn_lora_layer *vl = mn_malloc((size_t)l->n_layer * sizeof *vl);
    if (!vl) {
        mn_buffer_free(reuse);
        return mn_errf(eb, MN_ENOMEM, "lora registry: out of memory for the view of '%s'", l->name);
    }
    mn_err e = MN_OK;
    if (reuse) s->dev = reuse;
    else e = mn_buffer_alloc(r->be, MN_MEM_DEVICE, need, &s->dev, eb);
    if (e != MN_OK) {
        mn_free(vl);
        s->dev = NULL;
        return e;
    }
    /* stage the host copy in page-locked memory once (kept until unload / detach); where
     * the pinned budget says no, copy from the pageable arena (correct, not overlapped) */
    if (!s->staged && l->bytes) {
        mn_errbuf tmp = {{0}};
        if (mn_buffer_alloc(r->be, MN_MEM_HOST_PINNED, (size_t)l->bytes, &s->staged, &tmp) == MN_OK)
            memcpy(s->staged->ptr, l->arena, (size_t)l->bytes);
        else
            s->staged = NULL, r->st.unstaged++;
    }
    double t0 = now_s();
    e = mn_backend_copy_async(r->be, MN_COPY_H2D, s->dev->ptr, s->staged ? s->staged->ptr : l->arena, (size_t)l->bytes,
                              eb);
    if (e == MN_OK) e = mn_backend_event_record(r->be, &s->ready, eb);
    r->st.page_in_seconds += now_s() - t0;
    if (e != MN_OK) {
        mn_buffer_free(s->dev);
        s->dev = NULL;
        mn_free(vl);
        return e;
    }
    /* the view: same offsets into the device copy */
    const char *h0 = l->arena;
    char *d0 = s->dev->ptr;
    for (int32_t k = 0; k < l->n_layer; k++)
        for (int t = 0; t < MN_LORA_N_TARGETS; t++) {
            mn_lora_mat mt = l->layers[k].t[t];
            if (mt.r) {
                mt.a = d0 + ((const char *)mt.a - h0);
                mt.b = d0 + ((const char *)mt.b - h0);
            }
            vl[k].t[t] = mt;
        }
    s->view = *l;
    s->view.layers = vl;
    s->view.arena = s->dev->ptr;
    s->view.backend = r->be;
    s->view_layers = vl;
    s->copying = true;
    r->st.page_ins++;
    r->st.bytes_in += l->bytes;
    r->st.resident++;
    r->st.resident_bytes += need;
    return MN_OK;
}

/* Page in (copies enqueued) and wait for every marked slot; pins them. On failure nothing
 * stays pinned and the marks are cleared. */
static mn_err acquire_marked(mn_lora_registry *r, mn_errbuf *eb) {
    mn_err e = MN_OK;
    for (int32_t i = 0; i < r->n_slots && e == MN_OK; i++)
        if (r->mark[i] && !r->slots[i].dev) e = page_in(r, i, eb);
    double t0 = now_s();
    for (int32_t i = 0; i < r->n_slots && e == MN_OK; i++) {
        lora_slot *s = &r->slots[i];
        if (!r->mark[i] || !s->copying) continue;
        e = mn_backend_event_wait(r->be, &s->ready, eb);
        s->copying = false;
    }
    r->st.page_in_seconds += now_s() - t0;
    for (int32_t i = 0; i < r->n_slots; i++) {
        if (!r->mark[i]) continue;
        r->mark[i] = 0;
        if (e != MN_OK) continue;
        r->slots[i].pins++;
        r->slots[i].last_use = ++r->clock;
        r->table[i] = &r->slots[i].view;
    }
    return e;
}

mn_err mn_lora_registry_pin(mn_lora_registry *r, const int32_t *slots, int32_t n, mn_errbuf *eb) {
    for (int32_t k = 0; k < n; k++) {
        if (slots[k] < 0 || slots[k] >= r->n_slots || !r->slots[slots[k]].host) {
            for (int32_t j = 0; j < r->n_slots; j++) r->mark[j] = 0;
            return mn_errf(eb, MN_EINVALID, "lora registry: slot %d of %d holds no adapter", slots[k], r->n_slots);
        }
        r->mark[slots[k]] = 1;
    }
    if (!r->be) { /* host copies: pinning only guards against unload */
        for (int32_t j = 0; j < r->n_slots; j++)
            if (r->mark[j]) r->mark[j] = 0, r->slots[j].pins++;
        return MN_OK;
    }
    return acquire_marked(r, eb);
}

void mn_lora_registry_unpin(mn_lora_registry *r, const int32_t *slots, int32_t n) {
    for (int32_t k = 0; k < n; k++) {
        if (slots[k] < 0 || slots[k] >= r->n_slots) continue;
        lora_slot *s = &r->slots[slots[k]];
        assert(s->pins > 0);
        if (s->pins > 0) s->pins--;
    }
}

bool mn_lora_registry_pinned(const mn_lora_registry *r, int32_t slot) {
    return slot >= 0 && slot < r->n_slots && r->slots[slot].pins > 0;
}

/* The distinct slots of a per-token adapter array, in r->mark; MN_EINVALID on a bad index. */
static mn_err mark_batch(mn_lora_registry *r, const int32_t *adapter, int32_t n_tokens, mn_errbuf *eb) {
    for (int32_t t = 0; t < n_tokens; t++) {
        int32_t a = adapter[t];
        if (a < 0) continue;
        if (a >= r->n_slots || !r->slots[a].host) {
            for (int32_t j = 0; j < r->n_slots; j++) r->mark[j] = 0;
            return mn_errf(eb, MN_EINVALID, "lora registry: token %d names adapter slot %d, which holds no adapter (%d "
                           "slots)", t, a, r->n_slots);
        }
        r->mark[a] = 1;
    }
    return MN_OK;
}

mn_err mn_lora_registry_acquire_batch(mn_lora_registry *r, const int32_t *adapter, int32_t n_tokens,
                                      const mn_lora *const **table, int32_t *n_table, mn_errbuf *eb) {
    mn_err e = mark_batch(r, adapter, n_tokens, eb);
    if (e != MN_OK) return e;
    if (r->be) {
        e = acquire_marked(r, eb);
    } else {
        for (int32_t j = 0; j < r->n_slots; j++)
            if (r->mark[j]) r->mark[j] = 0, r->slots[j].pins++, r->slots[j].last_use = ++r->clock;
    }
    if (e != MN_OK) return e;
    *table = r->table;
    *n_table = r->n_slots;
    return MN_OK;
}

void mn_lora_registry_release_batch(mn_lora_registry *r, const int32_t *adapter, int32_t n_tokens) {
    for (int32_t t = 0; t < n_tokens; t++)
        if (adapter[t] >= 0 && adapter[t] < r->n_slots) r->mark[adapter[t]] = 1;
    for (int32_t j = 0; j < r->n_slots; j++) {
        if (!r->mark[j]) continue;
        r->mark[j] = 0;
        assert(r->slots[j].pins > 0);
        if (r->slots[j].pins > 0) r->slots[j].pins--;
    }
}

mn_err mn_lora_registry_prefetch(mn_lora_registry *r, const int32_t *adapter, int32_t n_tokens, mn_errbuf *eb) {
    if (!r->be) return MN_OK;
    mn_err e = mark_batch(r, adapter, n_tokens, eb);
    for (int32_t i = 0; i < r->n_slots && e == MN_OK; i++)
        if (r->mark[i] && !r->slots[i].dev) e = page_in(r, i, eb);
    for (int32_t i = 0; i < r->n_slots; i++) r->mark[i] = 0;
    return e;
}
