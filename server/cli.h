/* server/cli.h — shared pieces of the mneme command line: strict argument parsing and
 * loading a model on a backend. Parse errors name the flag and the bad value. */
#ifndef MN_CLI_H
#define MN_CLI_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/backend.h"
#include "engine/err.h"
#include "engine/model.h"
#include "engine/tp.h"

/* Common options of commands that run a model. */
typedef struct cli_model_opts {
    const char *model;      /* -m */
    const char *device;     /* --device */
    int threads;            /* -t */
    int32_t n_ctx;          /* -c */
} cli_model_opts;

/** If argv[*i] is one of the common model options, consume it (and its value) and return 1;
 *  return 0 if not; -1 (message printed) for a bad value. */
int cli_model_opt(int argc, char **argv, int *i, cli_model_opts *o);
/** Fetch the value of flag argv[*i] into *val; -1 (message printed) if missing. */
int cli_value(int argc, char **argv, int *i, const char **val);
int cli_int(const char *flag, const char *s, long lo, long hi, long *out);
int cli_float(const char *flag, const char *s, double lo, double hi, double *out);
/** Default model path: $MNEME_MODEL, else $MNEME_MODELS or ~/.cache/mneme, + the SmolLM2 file name. */
const char *cli_default_model(void);

/** Backend + model; prints the fallback line and any error. 0 on success. */
int cli_load(const cli_model_opts *o, mn_backend **be, mn_model **m);
void cli_unload(mn_backend *be, mn_model *m);
/** --tp N > 1: a tensor-parallel group instead of cli_load's backend + model. Every rank
 *  loads the model; rank 0's backend and model come back as *be and *m, owned by the group
 *  (so a GPU holds one copy, not two). The device resolves as in cli_load (auto: a GPU if
 *  there is one, with a backend made only to ask); CPU ranks get max(1, T / N) threads
 *  each. block_size, n_blocks (0: the group's default; < 0: every slot a whole context)
 *  and n_seqs as in mn_tp_params. 0 on success, else -1 with a message. */
int cli_load_tp(const cli_model_opts *o, int tp, int32_t block_size, int32_t n_blocks, int32_t n_seqs, mn_tp **group,
                mn_backend **be, mn_model **m);
/** Release what cli_load (group NULL) or cli_load_tp made. */
void cli_release(mn_tp *group, mn_backend *be, mn_model *m);

double cli_now(void);   /* seconds, monotonic */

int cmd_generate(int argc, char **argv);
int cmd_logits(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_bench(int argc, char **argv);

#endif
