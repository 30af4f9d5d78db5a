/* engine/model_synth.c — a Llama-shaped model with random weights, made in memory.
 *
 * For benchmarks at shapes no test machine can download (Llama-3-8B on a lent GPU): the
 * weights are random blocks of the chosen type with scales that keep activations finite
 * (each row's values spread about 1/sqrt(K)), norms are 1, RoPE is the llama3 base. No
 * tokenizer, no chat template: token ids in, logits out (forward, KV pool, sessions by
 * token). The host arena holding the weights is the model's (zero copy on the CPU backend;
 * copied by weights_map on a GPU).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <xxhash.h>

#include "engine/alloc.h"
#include "engine/model.h"

static uint64_t next_u64(uint64_t *s) { /* xorshift64*: fast, plenty for weights */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

static float unif(uint64_t *s) { return (float)((next_u64(s) >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f; }

/* N rows of K random values of type (amplitude a) at out. */
static void fill(uint8_t *out, mn_dtype type, int64_t N, int64_t K, float a, uint64_t *rng) {
    int64_t rb = mn_dtype_row_bytes(type, K);
    for (int64_t n = 0; n < N; n++) {
        uint8_t *row = out + n * rb;
        switch (type) {
        case MN_F32:
            for (int64_t k = 0; k < K; k++) ((float *)row)[k] = a * unif(rng);
            break;
        case MN_F16:
            for (int64_t k = 0; k < K; k++) ((uint16_t *)row)[k] = mn_fp32_to_fp16(a * unif(rng));
            break;
        case MN_BF16:
            for (int64_t k = 0; k < K; k++) ((uint16_t *)row)[k] = mn_fp32_to_bf16(a * unif(rng));
            break;
        case MN_Q8_0:
            for (int64_t b = 0; b < K / MN_QK; b++) {
                mn_block_q8_0 *blk = (mn_block_q8_0 *)row + b;
                blk->d = mn_fp32_to_fp16(a / 127.0f);
                for (int j = 0; j < MN_QK; j += 8) {
                    uint64_t r = next_u64(rng);
                    memcpy(blk->qs + j, &r, 8);
                }
            }
            break;
        default: /* Q4_0 */
            for (int64_t b = 0; b < K / MN_QK; b++) {
                mn_block_q4_0 *blk = (mn_block_q4_0 *)row + b;
                blk->d = mn_fp32_to_fp16(a / 8.0f);
                for (int j = 0; j < MN_QK / 2; j += 8) {
                    uint64_t r = next_u64(rng);
                    memcpy(blk->qs + j, &r, 8);
                }
            }
            break;
        }
    }
}

mn_err mn_model_synthetic(mn_backend *be, const mn_model_config *shape, mn_dtype type, uint64_t seed, mn_model **out,
                          mn_errbuf *eb) {
    const mn_model_config *s = shape;
    if (type != MN_F32 && type != MN_F16 && type != MN_BF16 && type != MN_Q8_0 && type != MN_Q4_0)
        return mn_errf(eb, MN_EUNSUPPORTED, "synthetic model: type %s (F32, F16, BF16, Q8_0 or Q4_0)", mn_dtype_name(type));
    if (s->n_layer < 1 || s->n_embd < 1 || s->n_head < 1 || s->n_kv_head < 1 || s->head_dim < 2 || s->head_dim % 2 ||
        s->n_ff < 1 || s->n_vocab < 1 || s->n_ctx_train < 1 || s->n_head % s->n_kv_head)
        return mn_errf(eb, MN_EINVALID, "synthetic model: bad shape (layers %d, embd %d, heads %d/%d, head dim %d, ff %d, "
                       "vocab %d, ctx %d)", s->n_layer, s->n_embd, s->n_head, s->n_kv_head, s->head_dim, s->n_ff,
                       s->n_vocab, s->n_ctx_train);
    int64_t be_n = mn_dtype_block_elems(type);
    int64_t E = s->n_embd, Q = (int64_t)s->n_head * s->head_dim, KV = (int64_t)s->n_kv_head * s->head_dim, F = s->n_ff;
    if (E % be_n || Q % be_n || F % be_n)
        return mn_errf(eb, MN_EINVALID, "synthetic model: embd %lld, q %lld and ff %lld must be multiples of %lld (%s blocks)",
                       (long long)E, (long long)Q, (long long)F, (long long)be_n, mn_dtype_name(type));
    mn_model *m = mn_calloc(1, sizeof *m);
    if (!m) return mn_errf(eb, MN_ENOMEM, "model: out of memory");
    m->backend = be;
    m->cfg = *s;
    mn_model_config *c = &m->cfg;
    snprintf(c->arch, sizeof c->arch, "llama");
    c->n_rot = c->head_dim;
    c->rope_mode = MN_ROPE_NORM;
    if (!(c->rope_base > 0)) c->rope_base = 500000.0f;
    if (!(c->rope_freq_scale > 0)) c->rope_freq_scale = 1.0f;
    if (!(c->rms_eps > 0)) c->rms_eps = 1e-5f;
    c->n_ctx = c->n_ctx > 0 ? c->n_ctx : c->n_ctx_train;
    c->qkv_bias = false;
    c->tied_output = false;
    c->rope_llama3 = false;
    snprintf(m->name, sizeof m->name, "synthetic %dL %lld %s", c->n_layer, (long long)E, mn_dtype_name(type));

    /* one host arena: per layer q k v o gate up down, then the embedding and the output */
    int64_t per_layer = mn_dtype_row_bytes(type, E) * (Q + 2 * KV + 2 * F) + mn_dtype_row_bytes(type, Q) * E +
                        mn_dtype_row_bytes(type, F) * E;
    int64_t table = mn_dtype_row_bytes(type, E) * c->n_vocab;
    size_t total = (size_t)(per_layer * c->n_layer + 2 * table);
    uint8_t *arena = mn_aligned_alloc(64, total);
    m->layers = mn_calloc((size_t)c->n_layer, sizeof *m->layers);
    int64_t n_stage = 2 * E * c->n_layer + E + c->n_rot / 2;
    float *stage = mn_malloc((size_t)n_stage * sizeof(float));
    mn_err e = arena && m->layers && stage ? MN_OK : mn_errf(eb, MN_ENOMEM, "synthetic model: out of memory (%zu bytes)", total);
    m->synth = arena;
    m->synth_bytes = total;
    uint64_t rng = seed * 0x9E3779B97F4A7C15ULL + 0x1234567ULL;
    size_t off = 0;
    /* fill, map to the device, describe: one weight of the arena */
#define WEIGHT(dst, K_, N_)                                                                                   \
    if (e == MN_OK) {                                                                                         \
        int64_t rb_ = mn_dtype_row_bytes(type, K_);                                                           \
        void *dev_;                                                                                           \
        fill(arena + off, type, N_, K_, 1.0f / sqrtf((float)(K_)) * 1.7f, &rng);                                \
        e = mn_backend_weights_map(be, arena + off, (size_t)(rb_ * (N_)), &dev_, eb);                         \
        if (e == MN_OK) e = mn_backend_weights_matrix(be, dev_, type, N_, K_, rb_, eb);                       \
        dst = (mn_weight){dev_, type, K_, N_, rb_};                                                           \
        off += (size_t)(rb_ * (N_));                                                                          \
    }
    for (int32_t l = 0; l < c->n_layer && e == MN_OK; l++) {
        mn_layer *L = &m->layers[l];
        WEIGHT(L->wq, E, Q);
        WEIGHT(L->wk, E, KV);
        WEIGHT(L->wv, E, KV);
        WEIGHT(L->wo, Q, E);
        WEIGHT(L->w_gate, E, F);
        WEIGHT(L->w_up, E, F);
        WEIGHT(L->w_down, F, E);
    }
    WEIGHT(m->tok_embd, E, (int64_t)c->n_vocab);
    WEIGHT(m->output, E, (int64_t)c->n_vocab);
#undef WEIGHT
    if (e == MN_OK) e = mn_buffer_alloc(be, MN_MEM_DEVICE, (size_t)n_stage * sizeof(float), &m->owned, eb);
    if (e == MN_OK) {
        float *dev = m->owned->ptr;
        for (int64_t i = 0; i < 2 * E * c->n_layer + E; i++) stage[i] = 1.0f; /* norms */
        for (int32_t l = 0; l < c->n_layer; l++) {
            m->layers[l].attn_norm = dev + 2 * E * l;
            m->layers[l].ffn_norm = dev + 2 * E * l + E;
        }
        m->output_norm = dev + 2 * E * c->n_layer;
        m->inv_freq = dev + 2 * E * c->n_layer + E;
        for (int i = 0; i < c->n_rot / 2; i++)
            stage[2 * E * c->n_layer + E + i] = (float)(pow((double)c->rope_base, -2.0 * i / c->n_rot) * c->rope_freq_scale);
        e = mn_backend_copy_async(be, MN_COPY_H2D, dev, stage, (size_t)n_stage * sizeof(float), eb);
        if (e == MN_OK) e = mn_backend_synchronize(be, eb);
    }
    mn_free(stage);
    if (e != MN_OK) {
        mn_model_free(m);
        return e;
    }
    /* sessions saved under it name this shape, type and seed */
    struct { mn_model_config c; int type; uint64_t seed; } id = {*c, (int)type, seed};
    XXH128_hash_t fp = XXH3_128bits(&id, sizeof id);
    XXH128_canonical_t canon;
    XXH128_canonicalFromHash(&canon, fp);
    memcpy(m->fingerprint, canon.digest, 16);
    *out = m;
    return MN_OK;
}
