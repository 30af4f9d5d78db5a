/* engine/sampler.h — turning logits into the next token, and stop rules.
 *
 * Order of the pipeline: logit bias -> repetition / frequency / presence penalties
 * (over the tokens passed to mn_sampler_accept) -> greedy if temperature <= 0, else
 * temperature -> top-k -> top-p -> min-p -> draw with the sampler's own RNG
 * (xoshiro256**, seeded by splitmix64(seed)): same seed and inputs, same tokens.
 * Logprobs are log-softmax of the logits after bias and penalties, before temperature.
 * Everything after the penalties is the sample op of kernels/ops.h (mn_cpu_sample here;
 * the same contract on the device): one u in [0, 1) is drawn per call when temperature
 * > 0, and the draw walks the kept tokens in ascending id order.
 */
#ifndef MN_SAMPLER_H
#define MN_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"
#include "kernels/ops.h"

typedef struct mn_logit_bias { int32_t token; float bias; } mn_logit_bias;

typedef struct mn_sampling_params {
    float temperature;        /* <= 0: greedy (argmax, lowest id wins ties) */
    int32_t top_k;            /* <= 0: off */
    float top_p;              /* >= 1: off */
    float min_p;              /* <= 0: off */
    float repeat_penalty;     /* 1: off (llama.cpp rule: logit>0 ? l/p : l*p) */
    int32_t repeat_last_n;    /* window for all penalties; -1: whole history, 0: off */
    float frequency_penalty;  /* OpenAI: l -= count * f */
    float presence_penalty;   /* OpenAI: l -= (count > 0) * p */
    uint64_t seed;
    const mn_logit_bias *bias; int32_t n_bias;   /* copied by mn_sampler_new */
    int32_t n_logprobs;       /* top-n logprobs to report, 0..20 */
} mn_sampling_params;

/** Defaults: greedy off (temperature 0.8), top_k 40, top_p 0.95, min_p 0.05, no penalties, seed 0. */
mn_sampling_params mn_sampling_defaults(void);
/** Check ranges; the message names the field (e.g. "top_p must be in (0, 1], got 1.5"). */
mn_err mn_sampling_validate(const mn_sampling_params *p, int32_t n_vocab, mn_errbuf *eb);

typedef struct mn_sampler mn_sampler;

typedef struct mn_token_logprob { int32_t token; float logprob; } mn_token_logprob;
typedef struct mn_sample_info {
    float logprob;                    /* of the chosen token */
    int32_t n_top;
    mn_token_logprob top[20];         /* highest first */
} mn_sample_info;

mn_err mn_sampler_new(const mn_sampling_params *p, int32_t n_vocab, mn_sampler **out, mn_errbuf *eb);
void mn_sampler_free(mn_sampler *s);
/** Record a token of the history (prompt and generated) for the penalties. */
void mn_sampler_accept(mn_sampler *s, int32_t token);
/** Choose a token. logits[n_vocab] is used as scratch (modified). info may be NULL. */
int32_t mn_sampler_sample(mn_sampler *s, float *logits, mn_sample_info *info);
/** Sampling elsewhere (the engine runs the sample op on the backend, next to the logits):
 *  when the op alone can choose this sampler's next token, that is when no logit bias is
 *  set and no penalty would change a logit (a penalty is set and the window holds tokens),
 *  fills *out with the op's parameters, drawing u from the RNG exactly as
 *  mn_sampler_sample would (one draw when temperature > 0), and returns true: the op's
 *  token from the raw logits is then the token mn_sampler_sample would have chosen, and
 *  the caller passes it to mn_sampler_accept as usual. Returns false, consuming nothing,
 *  when the host must sample (mn_sampler_sample). want_logprobs: n_logprobs as set (else 0). */
bool mn_sampler_op_params(mn_sampler *s, bool want_logprobs, mn_sample_params *out);
/** info from one row of the op's outputs (logprob, top_id / top_logprob[MN_SAMPLE_MAX_TOP]). */
void mn_sampler_fill_info(const mn_sampler *s, float logprob, const int32_t *top_id, const float *top_logprob,
                          mn_sample_info *info);
/** RNG state, to save and restore a session exactly. */
void mn_sampler_get_rng(const mn_sampler *s, uint64_t state[4]);
void mn_sampler_set_rng(mn_sampler *s, const uint64_t state[4]);

/* Stop strings over streamed text: holds back a tail that could still become a stop
 * string, so text after a stop string is never emitted. */
typedef struct mn_stop mn_stop;
/** stops[n_stops] are copied; an empty or NULL stop string is MN_EINVALID naming its index.
 *  n_stops may be 0 (then only the UTF-8 hold-back applies). Free with mn_stop_free. */
mn_err mn_stop_new(const char *const *stops, int n_stops, mn_stop **out, mn_errbuf *eb);
void mn_stop_free(mn_stop *st);
/** Feed n bytes of new text. Returns how many bytes of the text fed so far (not yet
 *  released) may be emitted now, copying them to out (cap bytes; cap >= n + longest stop
 *  + 3 suffices); sets *stopped when a stop string completed (the stop string itself and
 *  anything after it are not emitted). Released text never ends inside a UTF-8 sequence:
 *  an incomplete one at the end is held until completed (or until mn_stop_flush).
 *  After a stop, further feeds return 0 and set *stopped again. */
size_t mn_stop_feed(mn_stop *st, const char *text, size_t n, char *out, size_t cap, bool *stopped);
/** At end of stream: release the held-back tail. */
size_t mn_stop_flush(mn_stop *st, char *out, size_t cap);

#endif
