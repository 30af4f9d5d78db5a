/* server/api_auth.c — who may do what: API keys (tenants), admin keys (adapter
 * administration), and the adapter directory that POST /v1/adapters is confined to.
 *
 * Keys are kept only as XXH3-128 hashes (the owner id of a tenant's sessions). Admin keys
 * are API keys too: srv->keys holds both, srv->admin_keys only the admin ones.
 *
 * Policy for POST / DELETE /v1/adapters (secure by default):
 *   - with admin keys: only a request bearing one of them;
 *   - without admin keys but with API keys: nobody over HTTP (--lora at start-up only);
 *   - with no keys at all: anyone, but only when the server has an adapter directory;
 *   - POST additionally needs an adapter directory (--lora-dir), whoever asks: a path must
 *     resolve (realpath, so `..` and symlinks are followed first) to inside it, and so must
 *     the two files of a PEFT directory. `--lora NAME=PATH` at start-up is the operator's
 *     and is not restricted.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <xxhash.h>

#include "engine/alloc.h"
#include "server/api.h"

void api_owner_of_key(const char *key, size_t n, char out[API_OWNER_LEN]) {
    XXH128_hash_t h = XXH3_128bits(key, n);
    snprintf(out, API_OWNER_LEN, "%016llx%016llx", (unsigned long long)h.high64, (unsigned long long)h.low64);
}

int api_keys_load(const char *flag, const char *path, char (**keys)[API_OWNER_LEN], int *n_keys) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "mneme serve: %s %s: %s\n", flag, path, strerror(errno));
        return -1;
    }
    char line[1024];
    int n = *n_keys, cap = *n_keys, first = *n_keys;
    while (fgets(line, sizeof line, f)) {
        size_t len = strlen(line);
        if (len == sizeof line - 1 && line[len - 1] != '\n') { /* never split a long key into two valid ones */
            fprintf(stderr, "mneme serve: %s %s: key %d is longer than %zu bytes\n", flag, path, n - first + 1,
                    sizeof line - 2);
            fclose(f);
            return -1;
        }
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' ' || line[len - 1] == '\t'))
            len--;
        size_t s = 0;
        while (s < len && (line[s] == ' ' || line[s] == '\t')) s++;
        if (s == len || line[s] == '#') continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 8;
            char (*k)[API_OWNER_LEN] = mn_realloc(*keys, (size_t)cap * API_OWNER_LEN);
            if (!k) {
                fclose(f);
                return -1;
            }
            *keys = k;
        }
        api_owner_of_key(line + s, len - s, (*keys)[n++]);
    }
    fclose(f);
    if (n == first) {
        fprintf(stderr, "mneme serve: %s %s holds no keys\n", flag, path);
        return -1;
    }
    *n_keys = n;
    return 0;
}

static bool key_in(char (*keys)[API_OWNER_LEN], int n, const char *owner) {
    for (int i = 0; i < n; i++)
        if (!strcmp(keys[i], owner)) return true;
    return false;
}

bool api_authenticate(mn_serve *srv, const mn_http_req *req, char owner[API_OWNER_LEN], bool *admin, api_err *err) {
    owner[0] = 0;
    *admin = false;
    if (!srv->keys) return true;
    const char *auth = mn_http_req_header(req, "authorization");
    if (auth && !strncasecmp(auth, "Bearer ", 7)) {
        const char *k = auth + 7;
        while (*k == ' ') k++;
        size_t n = strlen(k);
        while (n && (k[n - 1] == ' ' || k[n - 1] == '\t')) n--;
        api_owner_of_key(k, n, owner);
        if (key_in(srv->keys, srv->n_keys, owner)) {
            *admin = key_in(srv->admin_keys, srv->n_admin_keys, owner);
            return true;
        }
    }
    owner[0] = 0;
    api_errf(err, 401, "authentication_error", NULL,
             auth ? "invalid API key" : "missing API key: send 'Authorization: Bearer <key>'");
    snprintf(err->code, sizeof err->code, "invalid_api_key");
    return false;
}

bool api_adapter_admin_check(const mn_serve *srv, bool admin, bool load, api_err *err) {
    const char *why = NULL;
    if (srv->n_admin_keys > 0) {
        if (!admin) why = "loading and unloading adapters needs an admin key (one of --admin-key-file)";
    } else if (srv->keys) {
        why = "loading and unloading adapters over HTTP is disabled: this server has API keys but no "
              "--admin-key-file (use --lora at start-up)";
    } else if (!srv->lora_dir) {
        why = "loading and unloading adapters over HTTP is disabled: start the server with --lora-dir D (and, with "
              "API keys, --admin-key-file), or use --lora at start-up";
    }
    if (why) {
        api_errf(err, 403, "permission_error", NULL, "%s", why);
        snprintf(err->code, sizeof err->code, "admin_required");
        return false;
    }
    if (load && !srv->lora_dir) {
        api_errf(err, 403, "permission_error", "path",
                 "this server loads adapters over HTTP only from an allow-listed directory, and it has none: start "
                 "it with --lora-dir D");
        snprintf(err->code, sizeof err->code, "path_not_allowed");
        return false;
    }
    return true;
}

static bool inside(const char *dir, const char *p) {
    size_t n = strlen(dir);
    if (n && dir[n - 1] == '/') return !strncmp(p, dir, n);   /* dir is "/" */
    return !strncmp(p, dir, n) && p[n] == '/';
}

/* 403 naming path. The same answer whether the path is missing or outside: a client must
 * not learn what exists outside the directory. */
static bool not_allowed(const char *dir, const char *given, const char *what, api_err *err) {
    api_errf(err, 403, "permission_error", "path",
             "'path' must resolve to an existing adapter inside the adapter directory %s (--lora-dir): '%.200s'%s "
             "does not", dir, given, what);
    snprintf(err->code, sizeof err->code, "path_not_allowed");
    return false;
}

bool api_adapter_path_resolve(const char *dir, const char *given, char *out, size_t cap, api_err *err) {
    char joined[PATH_MAX + 256];
    if (given[0] == '/') snprintf(joined, sizeof joined, "%s", given);
    else snprintf(joined, sizeof joined, "%s/%s", dir, given);   /* relative: against the directory */
    char real[PATH_MAX];
    if (strlen(joined) >= PATH_MAX || !realpath(joined, real) || !inside(dir, real))
        return not_allowed(dir, given, "", err);
    struct stat st;
    if (stat(real, &st) == 0 && S_ISDIR(st.st_mode)) { /* a PEFT directory: its files may be links too */
        static const char *const files[] = {"adapter_config.json", "adapter_model.safetensors"};
        for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
            char fp[PATH_MAX + 64], freal[PATH_MAX];
            snprintf(fp, sizeof fp, "%s/%s", real, files[i]);
            if (realpath(fp, freal)) {
                if (!inside(dir, freal)) return not_allowed(dir, given, i ? " (its adapter_model.safetensors)"
                                                                          : " (its adapter_config.json)", err);
            } else if (errno != ENOENT) {
                return not_allowed(dir, given, "", err);
            }   /* missing: the loader names it */
        }
    }
    if (strlen(real) >= cap) return not_allowed(dir, given, "", err);
    memcpy(out, real, strlen(real) + 1);
    return true;
}
