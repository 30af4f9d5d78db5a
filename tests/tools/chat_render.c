/* tests/tools/chat_render.c — render a conversation with mneme's chat templates.
 *
 *   chat_render TEMPLATE_FILE MESSAGES_FILE [--gen]   rendered prompt on stdout, raw bytes
 *   chat_render TEMPLATE_FILE --info                  "kind\n" then the default system text
 *
 * TEMPLATE_FILE holds the Jinja text of tokenizer.chat_template. MESSAGES_FILE has one
 * message per line, "role<TAB>content", content escaped as \n \t \r \\ (so a message
 * can hold any byte but NUL). tests/python/test_chat_template.py drives this and
 * compares the output with the real template rendered by jinja2. Errors: message on
 * stderr, exit status 2 (template not recognised: 3).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/chat.h"

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); return NULL; }
    size_t cap = 4096, n = 0;
    char *b = malloc(cap);
    for (;;) {
        if (n + 4096 + 1 > cap) { cap *= 2; b = realloc(b, cap); }
        size_t r = fread(b + n, 1, 4096, f);
        if (r == 0) break;
        n += r;
    }
    fclose(f);
    b[n] = 0;
    *len = n;
    return b;
}

/* in-place unescape of content; returns its end */
static char *unescape(char *s) {
    char *w = s;
    for (char *r = s; *r; r++) {
        if (*r == '\\' && r[1]) {
            r++;
            *w++ = *r == 'n' ? '\n' : *r == 't' ? '\t' : *r == 'r' ? '\r' : *r;
        } else {
            *w++ = *r;
        }
    }
    *w = 0;
    return w;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s TEMPLATE_FILE (MESSAGES_FILE [--gen] | --info)\n", argv[0]);
        return 2;
    }
    size_t tlen;
    char *tmpl = slurp(argv[1], &tlen);
    if (!tmpl) return 2;
    mn_chat_template t;
    mn_errbuf eb = { { 0 } };
    mn_err e = mn_chat_template_detect(tmpl, tlen, &t, &eb);
    free(tmpl);
    if (e) {
        fprintf(stderr, "detect: %s\n", eb.msg);
        return e == MN_EUNSUPPORTED ? 3 : 2;
    }
    if (strcmp(argv[2], "--info") == 0) {
        printf("%s\n%s", mn_chat_kind_name(t.kind), t.default_system ? t.default_system : "");
        mn_chat_template_clear(&t);
        return 0;
    }
    bool gen = argc > 3 && strcmp(argv[3], "--gen") == 0;
    size_t mlen;
    char *text = slurp(argv[2], &mlen);
    if (!text) return 2;
    int n = 0, cap = 16;
    mn_chat_msg *msgs = malloc((size_t)cap * sizeof *msgs);
    for (char *line = text; *line;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        if (*line) {
            char *tab = strchr(line, '\t');
            if (!tab) { fprintf(stderr, "line %d: no TAB between role and content\n", n + 1); return 2; }
            *tab = 0;
            unescape(tab + 1);
            if (n == cap) { cap *= 2; msgs = realloc(msgs, (size_t)cap * sizeof *msgs); }
            msgs[n].role = line;
            msgs[n].content = tab + 1;
            n++;
        }
        if (!nl) break;
        line = nl + 1;
    }
    char *out = NULL;
    size_t out_len = 0;
    e = mn_chat_render(&t, msgs, n, gen, &out, &out_len, &eb);
    if (e) {
        fprintf(stderr, "render: %s\n", eb.msg);
        return 2;
    }
    fwrite(out, 1, out_len, stdout);
    mn_free(out);
    free(msgs);
    free(text);
    mn_chat_template_clear(&t);
    return 0;
}
