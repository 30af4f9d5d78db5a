/* tests/unit/test_model.h — where the unit tests find the default model (SmolLM2 Q4_1):
 * $MNEME_MODEL, else $MNEME_MODELS/<file>, else ~/.cache/mneme/<file> (tools/setup.sh);
 * the CPU backend + default model most real-model test groups set up; removing a test's
 * temporary directory. */
#ifndef MN_TEST_MODEL_H
#define MN_TEST_MODEL_H

#include <stdio.h>
#include <stdlib.h>

#include "engine/backend.h"
#include "engine/model.h"

static inline const char *mn_test_model_path(void) { return mn_model_default_path(); }

/* A CPU backend of n_threads and the default model on it; 0, or -1 with the reason on
 * stderr (a cmocka group setup's contract). */
static inline int mn_test_load_default_model(int n_threads, mn_backend **be, mn_model **m) {
    mn_errbuf eb;
    mn_backend_params bp = {.device = "cpu", .n_threads = n_threads};
    if (mn_backend_cpu_new(&bp, be, &eb) != MN_OK) {
        fprintf(stderr, "cpu backend: %s\n", eb.msg);
        return -1;
    }
    if (mn_model_load(mn_test_model_path(), *be, NULL, m, &eb) != MN_OK) {
        fprintf(stderr, "cannot load %s: %s (run tools/setup.sh)\n", mn_test_model_path(), eb.msg);
        mn_backend_free(*be);
        *be = NULL;
        return -1;
    }
    return 0;
}

/* rm -rf dir (a test's mkdtemp directory with whatever it left there); 0 or -1. */
static inline int mn_test_remove_dir(const char *dir) {
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

#endif
