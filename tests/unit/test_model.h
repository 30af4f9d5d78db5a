/* tests/unit/test_model.h — where the unit tests find the default model (SmolLM2 Q4_1):
 * $MNEME_MODEL, else $MNEME_MODELS/<file>, else ~/.cache/mneme/<file> (tools/setup.sh). */
#ifndef MN_TEST_MODEL_H
#define MN_TEST_MODEL_H

#include <stdio.h>
#include <stdlib.h>

static const char *mn_test_model_path(void) {
    static char buf[4096];
    const char *p = getenv("MNEME_MODEL");
    if (p && *p) return p;
    const char *d = getenv("MNEME_MODELS");
    const char *h = getenv("HOME");
    if (d && *d) snprintf(buf, sizeof buf, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", d);
    else snprintf(buf, sizeof buf, "%s/.cache/mneme/SmolLM2-135M-Instruct.Q4_1.gguf", h ? h : ".");
    return buf;
}

#endif
