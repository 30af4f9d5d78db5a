/* server/json_util.c — see json_util.h. */
#include "server/json_util.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "engine/alloc.h"

bool api_errf(api_err *err, int status, const char *type, const char *param, const char *fmt, ...) {
    err->status = status;
    err->type = type ? type : "invalid_request_error";
    snprintf(err->param, sizeof err->param, "%s", param ? param : "");
    err->code[0] = 0;
    err->retry_after = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return false;
}

bool api_err_from_mn(api_err *err, mn_err code, const char *msg, const char *param) {
    int status = 500;
    const char *type = "server_error";
    switch (code) {
    case MN_EINVALID: case MN_ERANGE: case MN_EFORMAT: case MN_EMISMATCH: case MN_EUNSUPPORTED:
        status = 400, type = "invalid_request_error"; break;
    case MN_ELIMIT: status = 400, type = "invalid_request_error"; break;
    case MN_ENOT_FOUND: status = 404, type = "not_found_error"; break;
    case MN_EBUSY: status = 409, type = "conflict_error"; break;
    case MN_ENOMEM: status = 503, type = "server_error"; break;
    default: break;
    }
    api_errf(err, status, type, param, "%s", msg && *msg ? msg : mn_strerror(code));
    if (code == MN_ELIMIT && strstr(err->message, "context length"))
        snprintf(err->code, sizeof err->code, "context_length_exceeded");
    if (code == MN_ENOMEM) err->retry_after = 1;
    return false;
}

char *api_err_body(const api_err *err, size_t *len) {
    json_t *e = json_object();
    json_object_set_new(e, "message", ju_string_lossy(err->message, strlen(err->message)));
    json_object_set_new(e, "type", json_string(err->type ? err->type : "server_error"));
    json_object_set_new(e, "param", err->param[0] ? json_string(err->param) : json_null());
    json_object_set_new(e, "code", err->code[0] ? json_string(err->code) : json_null());
    json_t *root = json_object();
    json_object_set_new(root, "error", e);
    char *s = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (s) *len = strlen(s);
    return s;
}

void api_err_respond(mn_http_res *res, const api_err *err) {
    size_t len = 0;
    char *body = api_err_body(err, &len);
    if (!body) {
        static const char oom[] =
            "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";
        mn_http_respond(res, 503, "application/json", oom, sizeof oom - 1, NULL, 0);
        return;
    }
    char ra[16];
    snprintf(ra, sizeof ra, "%d", err->retry_after);
    mn_http_header h[] = {{"Retry-After", ra}};
    mn_http_respond(res, err->status ? err->status : 500, "application/json", body, len, h,
                    err->retry_after > 0 ? 1 : 0);
    mn_free(body);
}

void api_respond_json(mn_http_res *res, int status, json_t *json) {
    char *s = json ? json_dumps(json, JSON_COMPACT) : NULL;
    json_decref(json);
    if (!s) {
        api_err e;
        api_errf(&e, 500, "server_error", NULL, "could not serialise the response");
        api_err_respond(res, &e);
        return;
    }
    mn_http_respond(res, status, "application/json", s, strlen(s), NULL, 0);
    mn_free(s);
}

bool ju_parse_object(const char *body, size_t len, json_t **out, api_err *err) {
    json_error_t je;
    json_t *j = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!j)
        return api_errf(err, 400, "invalid_request_error", NULL,
                        "malformed JSON at line %d, column %d (byte %d): %s", je.line, je.column, je.position, je.text);
    if (!json_is_object(j)) {
        json_decref(j);
        return api_errf(err, 400, "invalid_request_error", NULL, "the request body must be a JSON object");
    }
    *out = j;
    return true;
}

static const char *type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE: case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* The field's value, NULL when absent or null. */
static json_t *field(json_t *obj, const char *name) {
    json_t *v = json_object_get(obj, name);
    return v && !json_is_null(v) ? v : NULL;
}

bool ju_opt_bool(json_t *obj, const char *name, bool *out, api_err *err) {
    json_t *v = field(obj, name);
    if (!v) return true;
    if (!json_is_boolean(v))
        return api_errf(err, 400, NULL, name, "'%s' must be a boolean, got %s", name, type_name(v));
    *out = json_is_true(v);
    return true;
}

bool ju_opt_int(json_t *obj, const char *name, int64_t lo, int64_t hi, int64_t *out, api_err *err) {
    json_t *v = field(obj, name);
    if (!v) return true;
    int64_t x;
    if (json_is_integer(v)) x = (int64_t)json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) && fabs(json_real_value(v)) < 9e15)
        x = (int64_t)json_real_value(v);   /* 16.0 is an integer to most clients */
    else return api_errf(err, 400, NULL, name, "'%s' must be an integer, got %s", name, type_name(v));
    if (x < lo || x > hi)
        return api_errf(err, 400, NULL, name, "'%s' must be in [%lld, %lld], got %lld", name, (long long)lo,
                        (long long)hi, (long long)x);
    *out = x;
    return true;
}

bool ju_opt_number(json_t *obj, const char *name, double lo, double hi, double *out, api_err *err) {
    json_t *v = field(obj, name);
    if (!v) return true;
    if (!json_is_number(v)) return api_errf(err, 400, NULL, name, "'%s' must be a number, got %s", name, type_name(v));
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return api_errf(err, 400, NULL, name, "'%s' must be in [%g, %g], got %g", name, lo, hi, x);
    *out = x;
    return true;
}

bool ju_opt_string(json_t *obj, const char *name, const char **out, size_t *len, api_err *err) {
    json_t *v = field(obj, name);
    if (!v) return true;
    if (!json_is_string(v)) return api_errf(err, 400, NULL, name, "'%s' must be a string, got %s", name, type_name(v));
    *out = json_string_value(v);
    if (len) *len = json_string_length(v);
    return true;
}

bool ju_req_string(json_t *obj, const char *name, const char **out, size_t *len, api_err *err) {
    if (!field(obj, name)) return api_errf(err, 400, NULL, name, "'%s' is required", name);
    return ju_opt_string(obj, name, out, len, err);
}

/* Length of the valid UTF-8 sequence at s (n bytes left), 0 if invalid. */
static size_t utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t k;
    unsigned min;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) k = 2, min = 0x80;
    else if (c >= 0xE0 && c <= 0xEF) k = 3, min = 0x800;
    else if (c >= 0xF0 && c <= 0xF4) k = 4, min = 0x10000;
    else return 0;
    if (n < k) return 0;
    unsigned cp = c & (0xFF >> (k + 1));
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return k;
}

json_t *ju_string_lossy(const char *s, size_t len) {
    json_t *j = json_stringn(s, len);
    if (j) return j;
    char *buf = mn_malloc(3 * len + 1);
    if (!buf) return NULL;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t k = utf8_len((const unsigned char *)s + i, len - i);
        if (k && !(k == 1 && s[i] == 0)) {
            memcpy(buf + o, s + i, k);
            o += k, i += k;
        } else { /* U+FFFD; NUL too, as jansson strings are C strings */
            memcpy(buf + o, "\xEF\xBF\xBD", 3);
            o += 3, i++;
        }
    }
    j = json_stringn(buf, o);
    mn_free(buf);
    return j;
}
