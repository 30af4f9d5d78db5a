/* engine/err.h — error codes and messages.
 *
 * Functions that can fail because of input (a file, a request, a limit) return an
 * mn_err and, when given an mn_errbuf, write a message that names the field, offset or
 * limit. Codes are negative, from one X-macro table; 0 is success. Asserts are for bugs.
 */
#ifndef MN_ERR_H
#define MN_ERR_H

#include <stddef.h>

#define MN_ERR_TABLE(X)                                              \
    X(NOMEM, -1, "out of memory")                                    \
    X(IO, -2, "input/output error")                                  \
    X(FORMAT, -3, "malformed file or data")                          \
    X(UNSUPPORTED, -4, "unsupported feature")                        \
    X(INVALID, -5, "invalid argument")                               \
    X(RANGE, -6, "value out of range")                               \
    X(NOT_FOUND, -7, "not found")                                    \
    X(LIMIT, -8, "limit exceeded")                                   \
    X(MISMATCH, -9, "does not match")                                \
    X(DEVICE, -10, "device error")                                   \
    X(BUSY, -11, "busy")                                             \
    X(CANCELLED, -12, "cancelled")

typedef enum mn_err {
    MN_OK = 0,
#define MN__ERR_ENUM(name, code, text) MN_E##name = (code),
    MN_ERR_TABLE(MN__ERR_ENUM)
#undef MN__ERR_ENUM
} mn_err;

/* A caller-owned message buffer. Functions write one line without a trailing newline. */
typedef struct mn_errbuf {
    char msg[512];
} mn_errbuf;

/** Short description of a code ("out of memory"); never NULL. */
const char *mn_strerror(mn_err e);
/** Name of a code ("MN_ENOMEM"); never NULL. */
const char *mn_err_name(mn_err e);
/** printf into eb (if eb is not NULL) and return e, so callers can write
 *  `return mn_errf(eb, MN_EFORMAT, "tensor %s: offset %llu past end", ...)`. */
mn_err mn_errf(mn_errbuf *eb, mn_err e, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

#endif
