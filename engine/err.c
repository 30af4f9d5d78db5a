/* engine/err.c — message table for mn_err. */
#include "engine/err.h"

#include <stdarg.h>
#include <stdio.h>

const char *mn_strerror(mn_err e) {
    switch (e) {
    case MN_OK: return "success";
#define MN__ERR_STR(name, code, text) case MN_E##name: return text;
        MN_ERR_TABLE(MN__ERR_STR)
#undef MN__ERR_STR
    }
    return "unknown error";
}

const char *mn_err_name(mn_err e) {
    switch (e) {
    case MN_OK: return "MN_OK";
#define MN__ERR_NAME(name, code, text) case MN_E##name: return "MN_E" #name;
        MN_ERR_TABLE(MN__ERR_NAME)
#undef MN__ERR_NAME
    }
    return "MN_E?";
}

mn_err mn_errf(mn_errbuf *eb, mn_err e, const char *fmt, ...) {
    if (eb) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(eb->msg, sizeof eb->msg, fmt, ap);
        va_end(ap);
    }
    return e;
}
