/* engine/chat.c — chat template families, recognised by marker and rendered in C.
 *
 * Recognition looks for the family's marker in the Jinja text:
 *   <|im_start|>          ChatML (SmolLM2, Qwen2)
 *   <|start_header_id|>   Llama 3
 *   [INST] + <<SYS>>      Llama 2 (meta-llama/Llama-2-*-chat-hf)
 *   [INST] + system_message, no <<SYS>>   Mistral v0.2+ / Mixtral
 * A ChatML template may insert a default system message when the first message is not
 * a system one (SmolLM2: "You are a helpful AI assistant named SmolLM, ..."); its text
 * is the Jinja string literal that holds "<|im_start|>system\n...<|im_end|>", unescaped.
 *
 * Rendering reproduces the published templates byte for byte (the pytest suite renders
 * the real Jinja with jinja2 and compares), including their whitespace stripping
 * (Jinja `trim` / Python str.strip(): Unicode whitespace, not just ASCII).
 */
#include "engine/chat.h"

#include <stdint.h>
#include <string.h>

#include "engine/alloc.h"

const char *mn_chat_kind_name(mn_chat_kind k) {
    switch (k) {
    case MN_CHAT_CHATML: return "chatml";
    case MN_CHAT_LLAMA3: return "llama3";
    case MN_CHAT_LLAMA2: return "llama2";
    case MN_CHAT_MISTRAL: return "mistral";
    }
    return "unknown";
}

void mn_chat_template_clear(mn_chat_template *t) {
    if (!t) return;
    mn_free(t->default_system);
    t->default_system = NULL;
}

static const char *find(const char *h, size_t n, const char *needle) {
    size_t m = strlen(needle);
    if (m > n) return NULL;
    for (size_t i = 0; i + m <= n; i++)
        if (h[i] == needle[0] && memcmp(h + i, needle, m) == 0) return h + i;
    return NULL;
}

/* Unescape the Jinja string literal starting at its quote q (Python-style escapes:
 * \n \t \r \\ \' \"; others are kept as written). Returns a mn_malloc'ed string, or
 * NULL when unterminated or out of memory (*oom set). */
static char *jinja_literal(const char *q, const char *end, bool *oom) {
    char quote = *q++;
    char *s = mn_malloc((size_t)(end - q) + 1);
    if (!s) { *oom = true; return NULL; }
    size_t n = 0;
    for (; q < end && *q != quote; q++) {
        if (*q == '\\' && q + 1 < end) {
            q++;
            switch (*q) {
            case 'n': s[n++] = '\n'; break;
            case 't': s[n++] = '\t'; break;
            case 'r': s[n++] = '\r'; break;
            case '\\': case '\'': case '"': s[n++] = *q; break;
            default: s[n++] = '\\'; s[n++] = *q; break;
            }
        } else {
            s[n++] = *q;
        }
    }
    if (q >= end) { mn_free(s); return NULL; }   /* unterminated */
    s[n] = 0;
    return s;
}

/* The default system text of a ChatML template, or NULL (none, or *oom). */
static char *chatml_default_system(const char *t, size_t len, bool *oom) {
    static const char *const heads[] = { "<|im_start|>system\n", "<|im_start|>system\\n" };
    const char *end = t + len;
    for (int h = 0; h < 2; h++) {
        for (const char *at = find(t, len, heads[h]); at; at = find(at + 1, (size_t)(end - at - 1), heads[h])) {
            /* the literal's opening quote: the nearest quote before the marker */
            const char *q = at;
            while (q > t && q[-1] != '\'' && q[-1] != '"' && q[-1] != '}' && q[-1] != '%') q--;
            if (q == t || (q[-1] != '\'' && q[-1] != '"')) continue;
            char *lit = jinja_literal(q - 1, end, oom);
            if (*oom) return NULL;
            if (!lit) continue;
            const char *body = strstr(lit, "<|im_start|>system\n");
            const char *stop = body ? strstr(body, "<|im_end|>") : NULL;
            if (body && stop) {
                body += strlen("<|im_start|>system\n");
                size_t n = (size_t)(stop - body);
                memmove(lit, body, n);
                lit[n] = 0;
                if (n > 0) return lit;
            }
            mn_free(lit);
        }
    }
    return NULL;
}

mn_err mn_chat_template_detect(const char *tmpl, size_t len, mn_chat_template *out, mn_errbuf *eb) {
    memset(out, 0, sizeof *out);
    if (!tmpl || len == 0) return mn_errf(eb, MN_EUNSUPPORTED, "chat_template: empty");
    if (find(tmpl, len, "<|im_start|>")) {
        out->kind = MN_CHAT_CHATML;
        if (find(tmpl, len, "'system'") || find(tmpl, len, "\"system\"")) {
            bool oom = false;
            out->default_system = chatml_default_system(tmpl, len, &oom);
            if (oom) return mn_errf(eb, MN_ENOMEM, "chat_template: out of memory");
        }
        return MN_OK;
    }
    if (find(tmpl, len, "<|start_header_id|>")) {
        out->kind = MN_CHAT_LLAMA3;
        return MN_OK;
    }
    if (find(tmpl, len, "[INST]")) {
        if (find(tmpl, len, "<<SYS>>")) { out->kind = MN_CHAT_LLAMA2; return MN_OK; }
        if (find(tmpl, len, "system_message")) { out->kind = MN_CHAT_MISTRAL; return MN_OK; }
        return mn_errf(eb, MN_EUNSUPPORTED,
                       "chat_template: [INST] template without <<SYS>> or system_message "
                       "(Mistral v0.1 style) is not supported");
    }
    return mn_errf(eb, MN_EUNSUPPORTED,
                   "chat_template: not recognised (no <|im_start|>, <|start_header_id|> or [INST] marker)");
}

/* ---- Python str.strip() on UTF-8 ----------------------------------------------------- */

/* Length of the whitespace character starting at s[0..n), or 0. */
static size_t ws_at(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) return 1;
    if (c == 0xC2 && n >= 2 && (s[1] == 0x85 || s[1] == 0xA0)) return 2;
    if (n >= 3) {
        if (c == 0xE1 && s[1] == 0x9A && s[2] == 0x80) return 3;                 /* U+1680 */
        if (c == 0xE2 && s[1] == 0x80 && (s[2] <= 0x8A || s[2] == 0xA8 || s[2] == 0xA9 || s[2] == 0xAF))
            return s[2] >= 0x80 ? 3 : 0;                                          /* U+2000..200A, 2028, 2029, 202F */
        if (c == 0xE2 && s[1] == 0x81 && s[2] == 0x9F) return 3;                 /* U+205F */
        if (c == 0xE3 && s[1] == 0x80 && s[2] == 0x80) return 3;                 /* U+3000 */
    }
    return 0;
}

static void strip(const char **s, size_t *n) {
    const unsigned char *p = (const unsigned char *)*s;
    size_t a = 0, b = *n, w;
    while (a < b && (w = ws_at(p + a, b - a)) > 0) a += w;
    while (b > a) {
        size_t k = 0;
        for (size_t back = 1; back <= 3 && back <= b - a; back++) {
            if (ws_at(p + b - back, back) == back) { k = back; break; }
        }
        if (!k) break;
        b -= k;
    }
    *s += a;
    *n = b - a;
}

/* ---- output buffer ---------------------------------------------------------------------- */

typedef struct sbuf { char *p; size_t n, cap; bool oom; } sbuf;

static void put(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = (b->n + n + 1) * 2;
        char *p = mn_realloc(b->p, nc);
        if (!p) { b->oom = true; return; }
        b->p = p;
        b->cap = nc;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void puts_(sbuf *b, const char *s) { put(b, s, strlen(s)); }
static void put_stripped(sbuf *b, const char *s) {
    size_t n = strlen(s);
    strip(&s, &n);
    put(b, s, n);
}

static bool is_role(const char *r, const char *want) { return strcmp(r, want) == 0; }

/* ---- the families ------------------------------------------------------------------------ */

static void render_chatml(const mn_chat_template *t, const mn_chat_msg *m, int n, bool gen, sbuf *b) {
    if (t->default_system && n > 0 && !is_role(m[0].role, "system")) {
        puts_(b, "<|im_start|>system\n");
        puts_(b, t->default_system);
        puts_(b, "<|im_end|>\n");
    }
    for (int i = 0; i < n; i++) {
        puts_(b, "<|im_start|>");
        puts_(b, m[i].role);
        puts_(b, "\n");
        puts_(b, m[i].content);
        puts_(b, "<|im_end|>\n");
    }
    if (gen) puts_(b, "<|im_start|>assistant\n");
}

static void render_llama3(const mn_chat_msg *m, int n, bool gen, sbuf *b) {
    for (int i = 0; i < n; i++) {
        if (i == 0) puts_(b, "<|begin_of_text|>");
        puts_(b, "<|start_header_id|>");
        puts_(b, m[i].role);
        puts_(b, "<|end_header_id|>\n\n");
        put_stripped(b, m[i].content);
        puts_(b, "<|eot_id|>");
    }
    if (gen) puts_(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

/* [INST] families: system only first, then user/assistant alternating from user. */
static mn_err check_inst_roles(const mn_chat_msg *m, int n, mn_errbuf *eb) {
    int first = n > 0 && is_role(m[0].role, "system") ? 1 : 0;
    for (int i = first; i < n; i++) {
        const char *want = (i - first) % 2 == 0 ? "user" : "assistant";
        if (!is_role(m[i].role, want))
            return mn_errf(eb, MN_EINVALID,
                           "messages[%d]: role '%s' where '%s' is needed (this template takes an optional "
                           "first system message, then user/assistant alternating)", i, m[i].role, want);
    }
    return MN_OK;
}

static void render_llama2(const mn_chat_msg *m, int n, sbuf *b) {
    const char *sys = n > 0 && is_role(m[0].role, "system") ? m[0].content : NULL;
    int first = sys ? 1 : 0;
    for (int i = first; i < n; i++) {
        if (is_role(m[i].role, "user")) {
            puts_(b, "<s>[INST] ");
            if (i == first && sys) {
                /* the template strips the whole "<<SYS>>...user" block as one string */
                sbuf tmp = { 0 };
                puts_(&tmp, "<<SYS>>\n");
                puts_(&tmp, sys);
                puts_(&tmp, "\n<</SYS>>\n\n");
                puts_(&tmp, m[i].content);
                if (tmp.oom) { b->oom = true; mn_free(tmp.p); return; }
                put_stripped(b, tmp.p);
                mn_free(tmp.p);
            } else {
                put_stripped(b, m[i].content);
            }
            puts_(b, " [/INST]");
        } else {
            puts_(b, " ");
            put_stripped(b, m[i].content);
            puts_(b, " </s>");
        }
    }
}

static void render_mistral(const mn_chat_msg *m, int n, sbuf *b) {
    const char *sys = n > 0 && is_role(m[0].role, "system") ? m[0].content : NULL;
    int first = sys ? 1 : 0;
    puts_(b, "<s>");
    for (int i = first; i < n; i++) {
        if (is_role(m[i].role, "user")) {
            puts_(b, " [INST] ");
            if (i == first && sys) {
                puts_(b, sys);
                puts_(b, "\n\n");
            }
            puts_(b, m[i].content);
            puts_(b, " [/INST]");
        } else {
            puts_(b, " ");
            puts_(b, m[i].content);
            puts_(b, "</s>");
        }
    }
}

mn_err mn_chat_render(const mn_chat_template *t, const mn_chat_msg *msgs, int n_msgs,
                      bool add_generation_prompt, char **out, size_t *out_len, mn_errbuf *eb) {
    *out = NULL;
    if (out_len) *out_len = 0;
    if (n_msgs < 0 || (n_msgs > 0 && !msgs))
        return mn_errf(eb, MN_EINVALID, "messages: bad count %d or NULL", n_msgs);
    for (int i = 0; i < n_msgs; i++) {
        if (!msgs[i].role || !msgs[i].role[0])
            return mn_errf(eb, MN_EINVALID, "messages[%d]: role missing", i);
        if (!msgs[i].content) return mn_errf(eb, MN_EINVALID, "messages[%d]: content missing", i);
    }
    sbuf b = { 0 };
    switch (t->kind) {
    case MN_CHAT_CHATML:
        render_chatml(t, msgs, n_msgs, add_generation_prompt, &b);
        break;
    case MN_CHAT_LLAMA3:
        render_llama3(msgs, n_msgs, add_generation_prompt, &b);
        break;
    case MN_CHAT_LLAMA2:
    case MN_CHAT_MISTRAL: {
        mn_err e = check_inst_roles(msgs, n_msgs, eb);
        if (e) return e;
        if (t->kind == MN_CHAT_LLAMA2) render_llama2(msgs, n_msgs, &b);
        else render_mistral(msgs, n_msgs, &b);
        break;
    }
    default:
        return mn_errf(eb, MN_EINVALID, "chat template: unknown kind %d", (int)t->kind);
    }
    put(&b, "", 0);   /* an empty rendering still gets its NUL */
    if (b.oom) {
        mn_free(b.p);
        return mn_errf(eb, MN_ENOMEM, "chat render: out of memory");
    }
    *out = b.p;
    if (out_len) *out_len = b.n;
    return MN_OK;
}
