/* server/json_util.h — jansson helpers for the API handlers: OpenAI-shaped errors, body
 * parsing with the error position, typed field access with range checks naming the field.
 *
 * An api_err is filled by the first check that fails; a handler answers it with
 * api_err_respond. Every getter leaves *out untouched when the field is absent (so the
 * caller presets the default) and returns false with err filled on a wrong type or range.
 * JSON null counts as absent, as OpenAI's clients send explicit nulls.
 */
#ifndef MN_JSON_UTIL_H
#define MN_JSON_UTIL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"
#include "server/http.h"

typedef struct api_err {
    int status;            /* 0: no error */
    const char *type;      /* "invalid_request_error", "not_found_error", ... */
    char param[64];        /* the field at fault, "" for none */
    char code[48];         /* OpenAI code ("context_length_exceeded"), "" for none */
    char message[512];
    int retry_after;       /* seconds for a Retry-After header (429/503), 0: none */
} api_err;

/** Fill err (status, type, param may be NULL) and return false, for `return api_errf(...)`. */
bool api_errf(api_err *err, int status, const char *type, const char *param, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;
/** Map an engine error code to an HTTP status and error type, keeping the message. */
bool api_err_from_mn(api_err *err, mn_err code, const char *msg, const char *param);
/** The error body {"error":{"message","type","param","code"}} (mn_malloc, caller frees). */
char *api_err_body(const api_err *err, size_t *len);
/** Answer res with err (JSON, its status). */
void api_err_respond(mn_http_res *res, const api_err *err);
/** Answer res with json (compact); steals the reference to json. 500 if it cannot be dumped. */
void api_respond_json(mn_http_res *res, int status, json_t *json);

/** Parse a request body that must be one JSON object. Malformed JSON: 400 with line,
 *  column and byte position; not an object: 400. */
bool ju_parse_object(const char *body, size_t len, json_t **out, api_err *err);

/** Optional fields of obj; see the file comment. Ranges are inclusive. */
bool ju_opt_bool(json_t *obj, const char *name, bool *out, api_err *err);
bool ju_opt_int(json_t *obj, const char *name, int64_t lo, int64_t hi, int64_t *out, api_err *err);
bool ju_opt_number(json_t *obj, const char *name, double lo, double hi, double *out, api_err *err);
/** *out points into obj (valid while obj lives). */
bool ju_opt_string(json_t *obj, const char *name, const char **out, size_t *len, api_err *err);
/** A required string field. */
bool ju_req_string(json_t *obj, const char *name, const char **out, size_t *len, api_err *err);

/** A JSON string of len bytes; invalid UTF-8 becomes U+FFFD (never NULL unless out of memory). */
json_t *ju_string_lossy(const char *s, size_t len);

#endif
