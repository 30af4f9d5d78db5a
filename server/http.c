/* server/http.c — the HTTP/1.1 transport (see server/http.h). Work in progress. */
#include "server/http.h"

mn_http_limits mn_http_limits_default(void) {
    mn_http_limits l = {
        .max_header_bytes = 16 * 1024,
        .max_body_bytes = 8u << 20,
        .idle_timeout_ms = 60 * 1000,
        .request_timeout_ms = 30 * 1000,
        .max_pending_write = 1u << 20,
        .max_connections = 4096,
    };
    return l;
}
